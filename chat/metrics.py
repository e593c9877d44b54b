"""Prometheus metrics of the rooms (process-wide, like every other collector of the house)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

SOCKETS = Gauge("livesrv_chat_sockets", "Room WebSockets open on this node")
ROOMS = Gauge("livesrv_chat_rooms",
              "Rooms held on this node (with sockets, or lingering to keep their history)")
MESSAGES_IN = Counter("livesrv_chat_messages_in_total", "Chat messages accepted from sockets")
MESSAGES_OUT = Counter("livesrv_chat_messages_out_total", "Events written to sockets (events x sockets)")
FRAMES_OUT = Counter("livesrv_chat_frames_out_total", "WebSocket frames written to room sockets")
BYTES_OUT = Counter("livesrv_chat_bytes_out_total", "Bytes of room frames written to sockets")
SHED = Counter("livesrv_chat_shed_total", "Chat events not delivered because a room was past its rate")
REJECTED = Counter("livesrv_chat_rejected_total", "Chat messages refused, by reason", ["reason"])
DROPPED_SOCKETS = Counter("livesrv_chat_dropped_sockets_total", "Sockets closed for being too slow")
FLUSH_SECONDS = Histogram("livesrv_chat_flush_seconds",
                          "One round of a room over all of its sockets on this node (each "
                          "chunk written what is new for it)",
                          buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0))
