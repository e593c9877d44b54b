"""Live rooms: chat with moderation, history for late joiners, and fan-out to sockets.

No web imports here: ``livesrv.http.rooms`` adapts sockets to :class:`chat.fanout.Seat`
and the bus to :class:`chat.room.Rooms`.
"""
