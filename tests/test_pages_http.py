"""The web app's HTTP side through the real app factory: pages, escaping, static files (safe
paths, versioned caching, gzip), hls.js from node_modules, and a web/ without hls.js."""

from __future__ import annotations

import gzip
import logging
import re
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from livesrv.app import create_app
from livesrv.config import ConfigError, load_settings
from livesrv.http import pages
from livesrv.http.pages import IMMUTABLE, REPO_WEB_DIR
from livesrv.keys import SETTINGS

HOSTILE = '<script>window.pwned=1</script><img src=x onerror="window.pwned=2">"\'&'


async def _client(tmp_path: Path, config: str = "") -> TestClient:
    config_file = tmp_path / "livesrv.toml"
    config_file.write_text(config)
    settings = load_settings(config_file, env={}, data_dir=str(tmp_path / "data"),
                             http="127.0.0.1:8080", rtmp="127.0.0.1:1935")
    client = TestClient(TestServer(create_app(settings, rtmp=False)))
    await client.start_server()
    return client


@pytest.fixture
async def client(tmp_path: Path) -> AsyncIterator[TestClient]:
    client = await _client(tmp_path)
    yield client
    await client.close()


async def _register(client: TestClient, name: str) -> dict:
    response = await client.post("/api/auth/register",
                                 json={"username": name, "password": "correct horse battery"})
    assert response.status == 201, await response.text()
    return await response.json()


def _static_urls(page: str) -> list[str]:
    return re.findall(r'(?:href|src)="(/static/[^"]+)"', page)


async def test_pages_render_with_a_strict_csp_and_versioned_assets(client: TestClient) -> None:
    for path in ("/", "/login", "/login?mode=register&next=/studio"):
        response = await client.get(path)
        assert response.status == 200, path
        assert response.content_type == "text/html"
        assert response.headers["Cache-Control"] == "no-cache"
        csp = response.headers["Content-Security-Policy"]
        assert "script-src 'self' 'sha256-" in csp and "unsafe-inline" not in csp
        page = await response.text()
        urls = _static_urls(page)
        assert any(u.startswith("/static/css/app.css?v=") for u in urls)
        for url in urls:
            asset = await client.get(url)
            assert asset.status == 200, url
            assert asset.headers["Cache-Control"] == IMMUTABLE

    # the import map gives every module's relative imports the same long-cached URLs
    page = await (await client.get("/")).text()
    import_map = re.search(r'<script type="importmap">(.*?)</script>', page, re.S)
    assert import_map and '"/static/js/api.js":"/static/js/api.js?v=' in import_map.group(1)


async def test_static_files_revalidate_compress_and_refuse_escapes(client: TestClient) -> None:
    plain = await client.get("/static/js/player.js")
    assert plain.status == 200
    assert plain.headers["Content-Type"].startswith("text/javascript")
    assert plain.headers["Cache-Control"] == "no-cache"  # unversioned: revalidate
    etag = plain.headers["ETag"]
    body = await plain.read()
    assert body == (REPO_WEB_DIR / "static/js/player.js").read_bytes()

    not_modified = await client.get("/static/js/player.js", headers={"If-None-Match": etag})
    assert not_modified.status == 304

    stale_version = await client.get("/static/js/player.js?v=0123456789abcdef")
    assert stale_version.headers["Cache-Control"] == "no-cache"  # never pin an old name

    zipped = await client.get("/static/js/player.js", headers={"Accept-Encoding": "gzip"},
                              auto_decompress=False)
    assert zipped.headers["Content-Encoding"] == "gzip"
    assert gzip.decompress(await zipped.read()) == body

    for bad in ("/static/../pyproject.toml", "/static/%2e%2e/pyproject.toml",
                "/static/js/..%2f..%2fpages/base.html", "/static/..%5c..%5cpyproject.toml",
                "/static/.hidden", "/static/js/%00.js", "/static/js", "/static/js/",
                "/static/nope.css", "/static/" + "a/" * 300 + "x.js", "/static/%2fetc/passwd"):
        response = await client.get(bad)
        assert response.status == 404, bad


async def test_hls_js_is_served_from_node_modules(client: TestClient) -> None:
    dist = REPO_WEB_DIR / "node_modules" / "hls.js" / "dist"
    assert (dist / "hls.min.js").is_file(), "run `make setup` (npm ci in web/) first"
    page = await (await client.get("/")).text()
    assert "hls.min.js" not in page  # only pages with a player load it
    await _register(client, "vendor_check")
    studio = await (await client.get("/studio")).text()
    src = re.search(r'src="(/static/vendor/hls\.min\.js\?v=[0-9a-f]+)"', studio)
    assert src, studio
    assert 'data-notice="player-missing"' not in studio
    response = await client.get(src.group(1))
    assert response.status == 200 and response.headers["Cache-Control"] == IMMUTABLE
    assert await response.read() == (dist / "hls.min.js").read_bytes()
    for other in ("hls.js", "hls-demo.js", "..%2fpackage.json"):
        assert (await client.get(f"/static/vendor/{other}")).status == 404


async def test_user_strings_are_escaped_in_pages(client: TestClient) -> None:
    await _register(client, "mallory")
    patched = await client.patch("/api/me", json={"title": HOSTILE, "display_name": "<b>M</b>"})
    assert patched.status == 200

    watch = await client.get("/watch/mallory")
    assert watch.status == 200
    page = await watch.text()
    assert "<script>window.pwned" not in page and "<img src=x" not in page and "<b>M</b>" not in page
    assert "&lt;script&gt;window.pwned=1&lt;/script&gt;" in page
    assert "&lt;b&gt;M&lt;/b&gt; · livesrv</title>" in page

    canonical = await client.get("/watch/MalLory", allow_redirects=False)
    assert canonical.status == 301 and canonical.headers["Location"] == "/watch/mallory"

    # a channel that does not exist, named with markup, is a 404 page that shows it as text
    missing = await client.get("/watch/%3Cscript%3Ealert(1)%3C%2Fscript%3E")
    assert missing.status == 404
    text = await missing.text()
    assert "<script>alert(1)" not in text and "&lt;script&gt;alert(1)&lt;/script&gt;" in text


async def test_studio_needs_a_login_and_next_is_same_site_only(client: TestClient) -> None:
    anonymous = await client.get("/studio", allow_redirects=False)
    assert anonymous.status == 302 and anonymous.headers["Location"] == "/login?next=/studio"

    for hostile_next, expected in (("//evil.example/x", "/"), ("https://evil.example", "/"),
                                   ("/\\evil.example", "/"), ("/studio", "/studio")):
        page = await (await client.get("/login", params={"next": hostile_next})).text()
        assert f'data-next="{expected}"' in page, hostile_next

    await _register(client, "anchor_one")
    studio = await client.get("/studio")
    assert studio.status == 200
    page = await studio.text()
    assert 'data-channel="anchor_one"' in page and 'data-action="logout"' in page
    assert "live_" not in page  # the stream key only ever comes from /api/me, not the HTML


async def test_a_web_dir_without_hls_js_says_so(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    web_dir = tmp_path / "web"
    shutil.copytree(REPO_WEB_DIR, web_dir, ignore=shutil.ignore_patterns("node_modules"))
    with caplog.at_level(logging.WARNING, logger="livesrv.http.pages"):
        client = await _client(tmp_path, f'[web]\ndir = "{web_dir}"\n')
    try:
        assert any("hls.js is not installed" in r.getMessage() for r in caplog.records)
        await _register(client, "no_player")
        watch = await (await client.get("/watch/no_player")).text()
        assert 'data-notice="player-missing"' in watch and "npm ci" in watch
        assert 'data-player-installed="false"' in watch
        assert "hls.min.js" not in watch
        vendor = await client.get("/static/vendor/hls.min.js")
        assert vendor.status == 404 and "not installed" in await vendor.text()
        # a symlink that leads out of static/ is refused like ".."
        secret = tmp_path / "secret.txt"
        secret.write_text("not for the web")
        (web_dir / "static" / "leak.txt").symlink_to(secret)
        assert (await client.get("/static/leak.txt")).status == 404
        # the rest of the site works from the configured dir
        (web_dir / "static" / "css" / "app.css").write_text("/* changed */")
        css = await client.get("/static/css/app.css")
        assert await css.text() == "/* changed */"
    finally:
        await client.close()


def test_a_wrong_web_dir_is_a_clear_config_error(tmp_path: Path) -> None:
    # the area's own setup on a bare app: a half-built create_app would leave its metrics
    # collector registered for the rest of the test process
    for table, message in ((f'dir = "{tmp_path / "nowhere"}"', r"\[web\] dir"),
                           ('directory = "x"', "unknown")):
        config_file = tmp_path / "livesrv.toml"
        config_file.write_text(f"[web]\n{table}\n")
        app = web.Application()
        app[SETTINGS] = load_settings(config_file, env={})
        with pytest.raises(ConfigError, match=message):
            pages.setup(app)


async def test_spellings_of_one_static_path_share_one_cache_entry(client: TestClient) -> None:
    # every spelling of a path used to add its own cached copy (body + gzip): unbounded memory
    # for anyone who varies slashes
    store = pages.AssetStore(REPO_WEB_DIR / "static")
    spellings = ["js/player.js", "js//player.js", "js/player.js/", "js///player.js//", "./js/player.js"]
    assets = [store.get(rel) for rel in spellings]
    assert all(asset is not None and asset.etag == assets[0].etag for asset in assets)
    assert len(store._cache) == 1
    for rel in spellings[:3]:
        response = await client.get(f"/static/{rel}")
        assert response.status in (200, 404)  # served or refused, never a new cache entry
