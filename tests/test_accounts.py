"""Accounts on SQLite and PostgreSQL, and over HTTP through the real app factory."""

from __future__ import annotations

from pathlib import Path

import pytest
from aiohttp.test_utils import TestClient, TestServer

from livesrv.accounts import AccountError, Accounts, hash_token
from livesrv.app import create_app
from livesrv.config import load_settings


async def test_users_passwords_sessions_and_stream_keys(db) -> None:
    accounts = Accounts(db)
    await accounts.migrate()
    await accounts.migrate()  # idempotent
    user, generated = await accounts.create_user("Alice_1", "s3cret-pass")
    assert generated is None
    assert user.username == "alice_1" and user.channel == "alice_1"
    assert user.stream_key.startswith("live_") and len(user.stream_key) > 30

    with pytest.raises(AccountError) as taken:
        await accounts.create_user("alice_1", "another-pass")
    assert taken.value.status == 409
    for bad_name in ("ab", "has space", "x" * 40, "admin", "ünï"):
        with pytest.raises(AccountError):
            await accounts.create_user(bad_name, "good-password")
    for weak in ("short", "12345678901", "aaaaaaaaaaa"):
        with pytest.raises(AccountError):
            await accounts.create_user("bob_bob", weak)

    # the password is stored as an argon2id hash, never as given
    stored = await db.fetchval("SELECT password_hash FROM users WHERE id = ?", user.id)
    assert stored.startswith("$argon2id$") and "s3cret-pass" not in stored

    assert await accounts.authenticate("alice_1", "wrong-pass") is None
    assert await accounts.authenticate("nobody", "s3cret-pass") is None
    assert (await accounts.authenticate("ALICE_1", "s3cret-pass")) == user

    token = await accounts.create_session(user)
    assert await accounts.user_for_token(token) == user
    # tokens are stored hashed
    assert await db.fetchval("SELECT COUNT(*) FROM sessions WHERE token_hash = ?", token) == 0
    assert await db.fetchval("SELECT COUNT(*) FROM sessions WHERE token_hash = ?",
                             hash_token(token)) == 1
    await accounts.end_session(token)
    assert await accounts.user_for_token(token) is None

    assert await accounts.channel_for_stream_key(user.stream_key) == "alice_1"
    assert await accounts.channel_for_stream_key("live_wrong") is None
    assert await accounts.channel_for_stream_key("") is None
    new_key = await accounts.rotate_stream_key(user)
    assert new_key != user.stream_key
    assert await accounts.channel_for_stream_key(user.stream_key) is None
    assert await accounts.channel_for_stream_key(new_key) == "alice_1"

    generated_user, password = await accounts.create_user("carol")
    assert password and await accounts.authenticate("carol", password) == generated_user


async def test_session_lookups_are_cached_briefly_and_dropped_on_change(db) -> None:
    accounts = Accounts(db)
    await accounts.migrate()
    user, _ = await accounts.create_user("dave_1", "s3cret-pass")
    token = await accounts.create_session(user)
    assert await accounts.user_for_token(token) == user
    # the lookup is served from the cache: the row is gone, the user still answers ...
    await db.execute("DELETE FROM sessions WHERE token_hash = ?", hash_token(token))
    assert await accounts.user_for_token(token) == user
    # ... only for SESSION_CACHE_SECONDS (another node's logout takes at most that long)
    accounts._sessions[hash_token(token)] = (0.0, user)
    assert await accounts.user_for_token(token) is None

    # a change of the user on this node is seen at once
    token = await accounts.create_session(user)
    before = await accounts.user_for_token(token)
    assert before is not None
    key = await accounts.rotate_stream_key(before)
    after = await accounts.user_for_token(token)
    assert after is not None and after.stream_key == key
    renamed = await accounts.update_profile(after, title="tonight: chess")
    cached = await accounts.user_for_token(token)
    assert cached is not None and cached.title == renamed.title == "tonight: chess"
    # a logout on this node is seen at once
    await accounts.end_session(token)
    assert await accounts.user_for_token(token) is None


@pytest.fixture
async def client(tmp_path: Path):
    settings = load_settings(env={}, data_dir=str(tmp_path), http="127.0.0.1:8080",
                             rtmp="127.0.0.1:1935")
    app = create_app(settings, rtmp=False)
    async with TestClient(TestServer(app)) as client:
        yield client


async def test_register_login_me_over_http(client: TestClient) -> None:
    response = await client.post("/api/auth/register", json={"username": "dora", "password": "pw-dora-123"})
    assert response.status == 201
    body = await response.json()
    assert body["user"]["username"] == "dora" and body["token"]
    assert "stream_key" not in body["user"]  # never in what others could see

    again = await client.post("/api/auth/register", json={"username": "dora", "password": "pw-dora-123"})
    assert again.status == 409 and "taken" in (await again.json())["error"]
    weak = await client.post("/api/auth/register", json={"username": "eve", "password": "1"})
    assert weak.status == 400 and "password" in (await weak.json())["error"]
    bad_json = await client.post("/api/auth/register", data=b"{not json",
                                 headers={"Content-Type": "application/json"})
    assert bad_json.status == 400 and "JSON" in (await bad_json.json())["error"]

    assert (await client.get("/api/me")).status == 200  # registering logged the browser in
    client.session.cookie_jar.clear()
    assert (await client.get("/api/me")).status == 401
    wrong = await client.post("/api/auth/login", json={"username": "dora", "password": "nope-nope"})
    assert wrong.status == 401

    client.session.cookie_jar.clear()
    login = await client.post("/api/auth/login", json={"username": "dora", "password": "pw-dora-123"})
    assert login.status == 200
    token = (await login.json())["token"]

    # bearer token
    me = await client.get("/api/me", headers={"Authorization": f"Bearer {token}"})
    assert me.status == 200
    profile = await me.json()
    assert profile["username"] == "dora"
    assert profile["stream_key"].startswith("live_")
    assert profile["rtmp_url"].startswith("rtmp://") and profile["rtmp_url"].endswith(":1935/live")
    assert profile["whip_url"].endswith("/whip")

    # the cookie the login set works for browsers
    by_cookie = await client.get("/api/me")
    assert by_cookie.status == 200 and (await by_cookie.json())["username"] == "dora"

    rotated = await client.post("/api/me/stream-key")
    assert (await rotated.json())["stream_key"] != profile["stream_key"]

    titled = await client.patch("/api/me", json={"title": "Cooking noodles"})
    assert (await titled.json())["title"] == "Cooking noodles"

    await client.post("/api/auth/logout")
    assert (await client.get("/api/me", headers={"Authorization": f"Bearer {token}"})).status == 401


async def test_health_readiness_and_metrics(client: TestClient) -> None:
    assert (await client.get("/healthz")).status == 200
    ready = await client.get("/readyz")
    assert ready.status == 200, await ready.text()
    assert (await ready.json())["checks"]["store"] is True
    await client.get("/api/live")
    metrics = await (await client.get("/metrics")).text()
    assert 'livesrv_http_requests_total{method="GET",route="/api/live",status="200"}' in metrics
    assert "livesrv_live_streams" in metrics
    assert await (await client.get("/api/live")).json() == []
    missing = await client.get("/api/live/nobody")
    assert missing.status == 404 and (await missing.json())["error"]
