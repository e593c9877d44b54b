"""RTMP ingest: a sans-IO protocol core and a thin asyncio server feeding the hub.

The core (no sockets, no clocks): ``buffer`` (receive buffer with commit/rollback), ``amf0``,
``handshake`` (plain and digest), ``chunks`` (chunk stream reader/writer), ``events``,
``connection`` (``ServerConnection`` / ``ClientConnection``, ``RtmpLimits``), ``flv`` (tag
bodies → ``Track``/``Packet``, Enhanced RTMP). SPS and AudioSpecificConfig parsing is
``livesrv.codecs``, shared with transcode.
The shells: ``server`` (``RtmpServer``, used by ``livesrv.app``) and ``client`` (an asyncio
publisher for tests and benchmarks).
"""
