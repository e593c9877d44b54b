"""Chromium for the browser tests, and the app served from a background thread for them.

Chromium is Debian's (``make test`` installs it); Playwright's own browser download is never
used. A missing Chromium or hls.js skips a browser test on a developer's machine and fails it
under CI, where the set-up command has installed both.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from livesrv.app import create_app
from livesrv.config import Settings
from livesrv.hub import Hub

REPO = Path(__file__).resolve().parents[2]
HLS_JS = REPO / "web" / "node_modules" / "hls.js" / "dist" / "hls.min.js"
CHROMIUM = "/usr/bin/chromium"
#: what Playwright launches: as root, Chromium without CAP_SYS_NICE (see the script: real-time
#: threads once hung a run); as anyone else, Chromium itself
CHROMIUM_LAUNCHER = (str(REPO / "tests" / "support" / "chromium-no-realtime") if os.geteuid() == 0
                     else CHROMIUM)
#: as root in a container, without a GPU, and without the background traffic a closed network refuses
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


def require_browser(*, hls_js: bool = False) -> None:
    missing = [what for what, path in (("Chromium", Path(CHROMIUM)), ("hls.js", HLS_JS))
               if (what == "Chromium" or hls_js) and not path.exists()]
    if not missing:
        return
    message = f"{' and '.join(missing)} not installed (make test installs them)"
    if os.environ.get("CI"):
        pytest.fail(message + " (CI is set: browser tests are required)")
    pytest.skip(message)


@contextmanager
def chromium() -> Iterator[Any]:
    """A headless Chromium (Playwright's sync API), closed afterwards."""
    require_browser()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM_LAUNCHER, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


class AppThread:
    """The whole app (``create_app``) serving on a free port from a background event loop, so a
    synchronous Playwright test can drive a browser against it and push packets into its hub."""

    def __init__(self, settings: Settings) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.settings = settings
        self.runner: web.AppRunner | None = None
        self.port = 0

    def __enter__(self) -> AppThread:
        self.thread.start()
        self.call(self._start())
        return self

    def __exit__(self, *exc: object) -> None:
        if self.runner is not None:
            self.call(self.runner.cleanup())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)

    async def _start(self) -> None:
        self.app = create_app(self.settings, rtmp=False)
        self.runner = web.AppRunner(self.app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def call(self, coro: Any, timeout: float = 30) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    @property
    def hub(self) -> Hub:
        from livesrv.keys import HUB

        return self.app[HUB]
