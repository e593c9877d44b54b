"""The HTTP layer. One module per area (``accounts``, ``live``, ``rooms``, ``wallet``,
``webrtc``, ``ops``), each exposing ``setup(app: web.Application) -> None`` that adds its
routes and, for anything with a lifetime, a ``cleanup_ctx`` generator. Only ``livesrv.app``
imports these modules; domain packages (ingest, transcode, chat, gifts) never do.

Shared services are found through the typed keys in ``livesrv.keys``.
"""
