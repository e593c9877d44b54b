"""The ABR ladder's composition: one ``LadderService`` per app, listening to the hub.

It has no routes: its rungs are renditions of each publication in the hub, which the HLS
packager serves like the source. Its metrics are registered for the app's lifetime.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from aiohttp import web
from prometheus_client import REGISTRY

from transcode.ladder import LadderService, LadderSettings

from ..keys import HUB, SETTINGS

LADDER = web.AppKey("ladder", LadderService)


def setup(app: web.Application) -> None:
    settings = app[SETTINGS].section("ladder", LadderSettings)  # a bad [ladder] table fails at startup

    async def ladder(app: web.Application) -> AsyncIterator[None]:
        service = LadderService(app[HUB], settings)
        service.start()
        app[LADDER] = service
        REGISTRY.register(service.collector)
        yield
        REGISTRY.unregister(service.collector)
        await service.close()  # stops every worker thread before the hub goes away

    app.cleanup_ctx.append(ladder)
