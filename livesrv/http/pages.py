"""The browser app: HTML pages, the static files under ``web/static`` and hls.js from npm.

There is no build step. Pages are small HTML templates in ``web/pages`` filled on the server
(every value escaped unless it is ``Markup`` built here); the JS is plain ES modules. Static
URLs carry a content hash (``?v=``) so browsers may cache them for a year; an import map
gives the modules' relative imports the same versioned URLs. Unversioned requests revalidate
by ETag. Text files are gzipped once in memory, since hls.js alone is ~500 kB.

``[web] dir`` overrides where ``web/`` is (default: next to the ``livesrv`` package).
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import html
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from urllib.parse import quote, urlsplit

from aiohttp import web

from ..config import ConfigError
from ..keys import SETTINGS
from .auth import ACCOUNTS, optional_user

log = logging.getLogger(__name__)

REPO_WEB_DIR = Path(__file__).resolve().parents[2] / "web"
#: the only files served from hls.js's dist folder (its demo and worker builds are not ours)
VENDOR_FILES = frozenset({"hls.min.js", "hls.min.js.map"})
IMMUTABLE = "public, max-age=31536000, immutable"
REVALIDATE = "no-cache"
CONTENT_TYPES = {
    ".js": "text/javascript; charset=utf-8",
    ".mjs": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
    ".map": "application/json; charset=utf-8",
    ".json": "application/json; charset=utf-8",
    ".html": "text/html; charset=utf-8",
    ".png": "image/png",
    ".jpg": "image/jpeg",
    ".webp": "image/webp",
    ".ico": "image/x-icon",
    ".txt": "text/plain; charset=utf-8",
}
#: worth gzipping (images are compressed already)
COMPRESSIBLE = frozenset({".js", ".mjs", ".css", ".svg", ".map", ".json", ".html", ".txt"})
PLAYER_MISSING = ("The video player library (hls.js) is not installed on this server. "
                  "The operator can install it with “make setup” (or “cd web && npm ci”).")


@dataclass(frozen=True)
class WebSettings:
    """The ``[web]`` table."""

    #: the web/ directory (pages/, static/, node_modules/); empty: the one in the repository
    dir: str = ""


class Markup(str):
    """HTML built here from trusted parts; the template renderer does not escape it."""


# ---------------------------------------------------------------------------------------
# Static files


@dataclass(frozen=True)
class Asset:
    body: bytes
    gzipped: bytes | None
    etag: str  # a content hash; also the ``?v=`` version
    content_type: str


class AssetStore:
    """Files under one root, read once and kept (with their gzip) until they change on disk.

    ``get`` refuses anything that is not a plain file inside the root: ``..``, hidden files,
    backslashes, NULs, and symlinks that lead out of it.
    """

    def __init__(self, root: Path) -> None:
        self.root = root.resolve()
        self._cache: dict[str, tuple[tuple[int, int], Asset]] = {}

    def _path(self, rel: str) -> Path | None:
        if not rel or "\\" in rel or "\0" in rel or len(rel) > 512:
            return None
        parts = PurePosixPath(rel).parts
        if not parts or any(p in ("", "..", "/") or p.startswith(".") for p in parts):
            return None
        path = (self.root / Path(*parts)).resolve()
        if not path.is_relative_to(self.root):
            return None
        return path

    def get(self, rel: str) -> Asset | None:
        path = self._path(rel)
        if path is None:
            return None
        try:
            stat = path.stat()
        except OSError:
            return None
        if not path.is_file():
            return None
        stamp = (stat.st_mtime_ns, stat.st_size)
        # keyed by the file, not by the request's spelling of it: "js//a.js", "js/a.js/" and
        # "js/a.js" are one entry, so the cache is bounded by the files in the folder
        key = path.relative_to(self.root).as_posix()
        cached = self._cache.get(key)
        if cached is not None and cached[0] == stamp:
            return cached[1]
        try:
            body = path.read_bytes()
        except OSError:
            return None
        suffix = path.suffix.lower()
        gzipped = None
        if suffix in COMPRESSIBLE and len(body) > 1024:
            gzipped = gzip.compress(body, compresslevel=9, mtime=0)
        asset = Asset(body=body, gzipped=gzipped,
                      etag=hashlib.sha256(body).hexdigest()[:16],
                      content_type=CONTENT_TYPES.get(suffix, "application/octet-stream"))
        self._cache[key] = (stamp, asset)
        return asset

    def version(self, rel: str) -> str:
        asset = self.get(rel)
        return asset.etag if asset else "missing"

    def files(self, under: str, suffix: str) -> list[str]:
        base = self.root / under
        if not base.is_dir():
            return []
        return sorted(p.relative_to(self.root).as_posix() for p in base.rglob(f"*{suffix}")
                      if p.is_file() and not any(s.startswith(".") for s in p.parts))


def asset_response(request: web.Request, asset: Asset) -> web.Response:
    """The asset, long-cached when asked for by its current version, else revalidated."""
    etag = f'"{asset.etag}"'
    cache = IMMUTABLE if request.query.get("v") == asset.etag else REVALIDATE
    headers = {"Cache-Control": cache, "ETag": etag, "Vary": "Accept-Encoding",
               "X-Content-Type-Options": "nosniff"}
    if etag in [t.strip().removeprefix("W/") for t in request.headers.get("If-None-Match", "").split(",")]:
        return web.Response(status=304, headers=headers)
    body = asset.body
    if asset.gzipped is not None and "gzip" in request.headers.get("Accept-Encoding", ""):
        body = asset.gzipped
        headers["Content-Encoding"] = "gzip"
    headers["Content-Type"] = asset.content_type
    return web.Response(body=body, headers=headers)


# ---------------------------------------------------------------------------------------
# Templates

_PLACEHOLDER = re.compile(r"\{\{\s*([a-z_]+)\s*\}\}")


class Templates:
    """``web/pages/*.html`` with ``{{ name }}`` placeholders; re-read when a file changes."""

    def __init__(self, root: Path) -> None:
        self.store = AssetStore(root)

    def render(self, name: str, **values: str | int) -> Markup:
        asset = self.store.get(f"{name}.html")
        if asset is None:
            raise FileNotFoundError(f"page template {name}.html is missing from {self.store.root}")

        def fill(match: re.Match[str]) -> str:
            value = values[match.group(1)]  # a missing value is a bug in this module: fail loudly
            return value if isinstance(value, Markup) else html.escape(str(value), quote=True)

        return Markup(_PLACEHOLDER.sub(fill, asset.body.decode()))


# ---------------------------------------------------------------------------------------
# The web app


class WebApp:
    """Everything the page handlers share: where web/ is, its files, and the page chrome."""

    def __init__(self, web_dir: Path, public_url: str | None) -> None:
        self.dir = web_dir
        self.static = AssetStore(web_dir / "static")
        self.vendor = AssetStore(web_dir / "node_modules" / "hls.js" / "dist")
        self.templates = Templates(web_dir / "pages")
        self.public_origin = _origin(public_url)

    @property
    def player_installed(self) -> bool:
        return self.vendor.get("hls.min.js") is not None

    def static_url(self, rel: str) -> str:
        return f"/static/{rel}?v={self.static.version(rel)}"

    def import_map(self) -> str:
        """Maps each module's plain URL to its versioned one, so ``import './api.js'`` inside
        a module fetches the same long-cached URL the page would."""
        modules = self.static.files("js", ".js")
        imports = {f"/static/{m}": self.static_url(m) for m in modules}
        # "</" could end the <script> element early; JSON allows it escaped
        return json.dumps({"imports": imports}, separators=(",", ":")).replace("</", "<\\/")

    def csp(self, inline_script: str) -> str:
        """Only our own scripts run: a hostile title that slipped through escaping still could
        not execute. hls.js runs its transmuxer in a blob: worker and plays from blob: URLs."""
        digest = base64.b64encode(hashlib.sha256(inline_script.encode()).digest()).decode()
        extra = f" {self.public_origin}" if self.public_origin else ""
        return ("default-src 'self'; "
                f"script-src 'self' 'sha256-{digest}'; "
                "style-src 'self'; "
                f"img-src 'self' data: blob:{extra}; "
                f"media-src 'self' blob: data:{extra}; "
                f"connect-src 'self'{extra}; "
                "worker-src 'self' blob:; "
                "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'")

    def page(self, request: web.Request, *, name: str, title: str, body: Markup,
             user_name: str | None, script: str | None, player: bool = False,
             status: int = 200) -> web.Response:
        import_map = self.import_map()
        notice = Markup("")
        scripts: list[str] = []
        if player:
            if self.player_installed:
                vendor = f"/static/vendor/hls.min.js?v={self.vendor.version('hls.min.js')}"
                scripts.append(f'<script defer src="{html.escape(vendor)}"></script>')
            else:
                notice = self.templates.render("notice", message=PLAYER_MISSING)
        if script:
            scripts.append(f'<script type="module" src="{html.escape(self.static_url(script))}">'
                           "</script>")
        document = self.templates.render(
            "base",
            page=name,
            title=title,
            css_url=self.static_url("css/app.css"),
            icon_url=self.static_url("icons/logo.svg"),
            import_map=Markup(import_map),
            scripts=Markup("\n".join(scripts)),
            header=self.header(request, user_name),
            notice=notice,
            body=body,
            player_installed="true" if self.player_installed else "false",
        )
        response = web.Response(text=document, status=status, content_type="text/html", headers={
            "Cache-Control": "no-cache",
            "Content-Security-Policy": self.csp(import_map),
            "X-Content-Type-Options": "nosniff",
            "Referrer-Policy": "same-origin",
        })
        response.enable_compression()  # a no-op for clients that do not accept it
        return response

    def header(self, request: web.Request, user_name: str | None) -> Markup:
        if user_name:
            account = self.templates.render("header_user", username=user_name,
                                           initial=user_name[:1].upper())
        else:
            # back to this page after logging in (but not from the login page to itself)
            here = "/" if request.path == "/login" else _safe_next(request.path_qs)
            account = self.templates.render("header_guest", next=quote(here, safe="/"))
        return self.templates.render("header", account=account)


WEB_APP = web.AppKey("web_app", WebApp)


def _origin(url: str | None) -> str | None:
    if not url:
        return None
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}" if parts.scheme and parts.netloc else None


def _safe_next(value: str | None) -> str:
    """Only same-site paths: ``//evil.example`` and ``https://…`` would make the login page
    an open redirect."""
    if not value or not value.startswith("/") or value.startswith("//") or "\\" in value:
        return "/"
    return value


def resolve_web_dir(configured: str) -> Path:
    return Path(configured).expanduser().resolve() if configured else REPO_WEB_DIR


routes = web.RouteTableDef()


@routes.get("/")
async def home(request: web.Request) -> web.Response:
    site = request.app[WEB_APP]
    user = await optional_user(request)
    body = site.templates.render("home")
    return site.page(request, name="home", title="livesrv · Live now", body=body,
                     user_name=user.username if user else None, script="js/home.js")


@routes.get("/watch/{channel}")
async def watch(request: web.Request) -> web.Response:
    site = request.app[WEB_APP]
    viewer = await optional_user(request)
    viewer_name = viewer.username if viewer else None
    channel = request.match_info["channel"]
    anchor = await request.app[ACCOUNTS].get(channel)
    if anchor is None:
        body = site.templates.render("not_found", what=f"There is no channel called “{channel}”.")
        return site.page(request, name="not-found", title="No such channel · livesrv", body=body,
                         user_name=viewer_name, script=None, status=404)
    if channel != anchor.channel:  # one address per channel: /watch/Alice -> /watch/alice
        raise web.HTTPMovedPermanently(f"/watch/{anchor.channel}")
    body = site.templates.render(
        "watch", channel=anchor.channel, display_name=anchor.display_name,
        title=anchor.title or f"{anchor.display_name}'s channel",
        initial=(anchor.display_name[:1] or "?").upper())
    return site.page(request, name="watch", title=f"{anchor.display_name} · livesrv", body=body,
                     user_name=viewer_name, script="js/watch.js", player=True)


@routes.get("/login")
async def login_page(request: web.Request) -> web.Response:
    site = request.app[WEB_APP]
    user = await optional_user(request)
    next_path = _safe_next(request.query.get("next"))
    body = site.templates.render("login", next=next_path,
                                 signed_in_as=user.username if user else "")
    return site.page(request, name="login", title="Log in · livesrv", body=body,
                     user_name=user.username if user else None, script="js/login.js")


async def _anchor_page(request: web.Request, name: str, title: str, *, player: bool = False) -> web.Response:
    """One of a logged-in user's own pages (``/NAME``, template and script of that name, about
    their channel); the login page first for anyone else."""
    site = request.app[WEB_APP]
    user = await optional_user(request)
    if user is None:
        raise web.HTTPFound(f"/login?next=/{name}")
    body = site.templates.render(name, channel=user.channel)
    return site.page(request, name=name, title=title, body=body, user_name=user.username,
                     script=f"js/{name}.js", player=player)


@routes.get("/studio")
async def studio(request: web.Request) -> web.Response:
    return await _anchor_page(request, "studio", "Go live · livesrv", player=True)


@routes.get("/golive")
async def golive(request: web.Request) -> web.Response:
    return await _anchor_page(request, "golive", "Go live from the browser · livesrv")


@routes.get("/static/vendor/{name}")
async def vendor_file(request: web.Request) -> web.Response:
    site = request.app[WEB_APP]
    name = request.match_info["name"]
    asset = site.vendor.get(name) if name in VENDOR_FILES else None
    if asset is None:
        message = PLAYER_MISSING if name in VENDOR_FILES else "not found"
        raise web.HTTPNotFound(text=message, headers={"Cache-Control": "no-cache"})
    return asset_response(request, asset)


@routes.get("/static/{path:.+}")
async def static_file(request: web.Request) -> web.Response:
    asset = request.app[WEB_APP].static.get(request.match_info["path"])
    if asset is None:
        raise web.HTTPNotFound(text="not found", headers={"Cache-Control": "no-cache"})
    return asset_response(request, asset)


def setup(app: web.Application) -> None:
    settings = app[SETTINGS]
    web_settings = settings.section("web", WebSettings)
    web_dir = resolve_web_dir(web_settings.dir)
    site = WebApp(web_dir, settings.public_url)
    if not (web_dir / "pages" / "base.html").is_file():
        raise ConfigError(f"[web] dir: {web_dir} has no pages/base.html (is it the web/ folder?)")
    if not site.player_installed:
        log.warning("hls.js is not installed (%s missing): the watch page cannot play video in "
                    "most browsers; run `make setup` or `cd web && npm ci`",
                    site.vendor.root / "hls.min.js")
    app[WEB_APP] = site
    app.add_routes(routes)
