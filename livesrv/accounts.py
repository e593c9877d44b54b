"""Accounts: users, passwords (argon2), session tokens (stored hashed) and stream keys.

A channel is a user: its name is the username, its stream key authenticates publishing.
Session tokens and stream keys are random 256-bit secrets. Tokens are kept only as SHA-256
hashes (a leaked table does not log anyone in); stream keys are kept as they are, because
the anchor must be able to read theirs back on every device (as Owncast and Twitch show it).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
import secrets
import time
from dataclasses import dataclass
from typing import Any

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

from .db import Database, IntegrityError, Row

log = logging.getLogger(__name__)

USERNAME_RE = re.compile(r"[a-z0-9_][a-z0-9_-]{2,31}")
MIN_PASSWORD = 8
MAX_PASSWORD = 1024
TOKEN_TTL_SECONDS = 30 * 24 * 3600
#: names that would collide with paths or mislead viewers
RESERVED_NAMES = frozenset({"admin", "api", "live", "static", "system", "root", "whip", "whep",
                            "ws", "metrics", "healthz", "readyz", "login", "logout", "register"})

MIGRATIONS = [
    {
        "sqlite": """
            CREATE TABLE users (
                id INTEGER PRIMARY KEY AUTOINCREMENT,
                username TEXT NOT NULL UNIQUE,
                display_name TEXT NOT NULL,
                password_hash TEXT NOT NULL,
                stream_key TEXT NOT NULL UNIQUE,
                title TEXT NOT NULL DEFAULT '',
                is_admin INTEGER NOT NULL DEFAULT 0,
                created_at REAL NOT NULL
            );
            CREATE TABLE sessions (
                token_hash TEXT PRIMARY KEY,
                user_id INTEGER NOT NULL REFERENCES users(id) ON DELETE CASCADE,
                created_at REAL NOT NULL,
                expires_at REAL NOT NULL
            );
            CREATE INDEX sessions_user ON sessions(user_id);
        """,
        "postgresql": """
            CREATE TABLE users (
                id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
                username TEXT NOT NULL UNIQUE,
                display_name TEXT NOT NULL,
                password_hash TEXT NOT NULL,
                stream_key TEXT NOT NULL UNIQUE,
                title TEXT NOT NULL DEFAULT '',
                is_admin INTEGER NOT NULL DEFAULT 0,
                created_at DOUBLE PRECISION NOT NULL
            );
            CREATE TABLE sessions (
                token_hash TEXT PRIMARY KEY,
                user_id BIGINT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
                created_at DOUBLE PRECISION NOT NULL,
                expires_at DOUBLE PRECISION NOT NULL
            );
            CREATE INDEX sessions_user ON sessions(user_id);
        """,
    },
]


class AccountError(ValueError):
    """A request the accounts service refuses; ``status`` is the HTTP status that fits."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True, slots=True)
class User:
    id: int
    username: str
    display_name: str
    stream_key: str
    title: str
    is_admin: bool
    created_at: float

    @property
    def channel(self) -> str:
        return self.username

    def public(self) -> dict[str, Any]:
        """What anyone may see of a user."""
        return {"id": self.id, "username": self.username, "display_name": self.display_name,
                "channel": self.channel}

    def private(self) -> dict[str, Any]:
        """What the user sees of themselves (includes the stream key)."""
        return {**self.public(), "title": self.title, "is_admin": self.is_admin,
                "stream_key": self.stream_key, "created_at": self.created_at}


def _user(row: Row) -> User:
    return User(id=int(row["id"]), username=row["username"], display_name=row["display_name"],
                stream_key=row["stream_key"], title=row["title"], is_admin=bool(row["is_admin"]),
                created_at=float(row["created_at"]))


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def new_stream_key() -> str:
    # a prefix makes a leaked key recognisable in logs and secret scanners
    return "live_" + secrets.token_urlsafe(24)


def check_username(username: str) -> str:
    name = username.strip().lower() if isinstance(username, str) else ""
    if not USERNAME_RE.fullmatch(name):
        raise AccountError("username must be 3-32 characters: lowercase letters, digits, '_' or '-'")
    if name in RESERVED_NAMES:
        raise AccountError(f"the name {name!r} is reserved")
    return name


def check_password(password: str) -> str:
    if not isinstance(password, str) or len(password) < MIN_PASSWORD:
        raise AccountError(f"password must be at least {MIN_PASSWORD} characters")
    if len(password) > MAX_PASSWORD:
        raise AccountError(f"password must be at most {MAX_PASSWORD} characters")
    if password.isdigit() or len(set(password)) < 4:
        raise AccountError("password is too weak")
    return password


_USER_COLUMNS = "id, username, display_name, stream_key, title, is_admin, created_at"


#: how long this node trusts a session lookup: every API call of a logged-in user looks its
#: token up, and a gift or a chat line should not pay a store round trip for it. A logout or a
#: profile change on this node takes effect at once; on another node within this time.
SESSION_CACHE_SECONDS = 2.0
SESSION_CACHE_MAX = 50_000


class Accounts:
    def __init__(self, db: Database) -> None:
        self.db = db
        # argon2id with the library's defaults (RFC 9106's second recommendation)
        self._hasher = PasswordHasher()
        self._sessions: dict[str, tuple[float, User]] = {}  # token hash -> (valid until, user)

    async def migrate(self) -> None:
        await self.db.migrate("accounts", MIGRATIONS)

    # argon2 costs tens of milliseconds of CPU by design: keep it off the event loop
    async def _hash(self, password: str) -> str:
        return await asyncio.to_thread(self._hasher.hash, password)

    async def _verify(self, password_hash: str, password: str) -> bool:
        try:
            return await asyncio.to_thread(self._hasher.verify, password_hash, password)
        except (VerifyMismatchError, VerificationError, InvalidHashError):
            return False

    async def create_user(self, username: str, password: str | None = None, *,
                          is_admin: bool = False) -> tuple[User, str | None]:
        """A new user; a password is generated when none is given (returned once, else None)."""
        name = check_username(username)
        generated = None
        if password is None:
            password = generated = secrets.token_urlsafe(12)
        check_password(password)
        password_hash = await self._hash(password)
        try:
            row = await self.db.fetchone(
                f"INSERT INTO users (username, display_name, password_hash, stream_key, is_admin,"
                f" created_at) VALUES (?, ?, ?, ?, ?, ?) RETURNING {_USER_COLUMNS}",
                name, name, password_hash, new_stream_key(), int(is_admin), time.time())
        except IntegrityError as exc:
            raise AccountError(f"the name {name!r} is taken", status=409) from exc
        assert row is not None
        log.info("user %s created", name)
        return _user(row), generated

    async def authenticate(self, username: str, password: str) -> User | None:
        if not isinstance(username, str) or not isinstance(password, str):
            return None
        row = await self.db.fetchone(
            f"SELECT {_USER_COLUMNS}, password_hash FROM users WHERE username = ?",
            username.strip().lower())
        if row is None:
            # spend the same time as a real check, so timing does not reveal which names exist
            await self._verify(_DUMMY_HASH, password)
            return None
        if not await self._verify(row["password_hash"], password):
            return None
        if self._hasher.check_needs_rehash(row["password_hash"]):
            await self.db.execute("UPDATE users SET password_hash = ? WHERE id = ?",
                                  await self._hash(password), row["id"])
        return _user(row)

    async def create_session(self, user: User) -> str:
        token = secrets.token_urlsafe(32)
        now = time.time()
        await self.db.execute(
            "INSERT INTO sessions (token_hash, user_id, created_at, expires_at) VALUES (?, ?, ?, ?)",
            hash_token(token), user.id, now, now + TOKEN_TTL_SECONDS)
        return token

    async def user_for_token(self, token: str) -> User | None:
        if not token or len(token) > 200:
            return None
        token_hash = hash_token(token)
        now = time.monotonic()
        cached = self._sessions.get(token_hash)
        if cached is not None and cached[0] > now:
            return cached[1]
        row = await self.db.fetchone(
            f"SELECT {', '.join('u.' + c for c in _USER_COLUMNS.split(', '))} FROM sessions s"
            " JOIN users u ON u.id = s.user_id WHERE s.token_hash = ? AND s.expires_at > ?",
            token_hash, time.time())
        if row is None:
            self._sessions.pop(token_hash, None)
            return None
        user = _user(row)
        if len(self._sessions) >= SESSION_CACHE_MAX:
            self._sessions.clear()  # crude but bounded: entries live two seconds anyway
        self._sessions[token_hash] = (now + SESSION_CACHE_SECONDS, user)
        return user

    async def end_session(self, token: str) -> None:
        token_hash = hash_token(token)
        self._sessions.pop(token_hash, None)
        await self.db.execute("DELETE FROM sessions WHERE token_hash = ?", token_hash)

    def _forget_user(self, user_id: int) -> None:
        """Cached sessions of ``user_id`` are stale (their profile or key changed)."""
        for token_hash, (_, user) in list(self._sessions.items()):
            if user.id == user_id:
                del self._sessions[token_hash]

    async def get(self, username: str) -> User | None:
        row = await self.db.fetchone(f"SELECT {_USER_COLUMNS} FROM users WHERE username = ?",
                                     username.strip().lower())
        return None if row is None else _user(row)

    async def get_by_id(self, user_id: int) -> User | None:
        row = await self.db.fetchone(f"SELECT {_USER_COLUMNS} FROM users WHERE id = ?", user_id)
        return None if row is None else _user(row)

    async def channel_for_stream_key(self, stream_key: str) -> str | None:
        """The channel a stream key publishes to, or None for a wrong key."""
        if not stream_key or len(stream_key) > 200:
            return None
        row = await self.db.fetchone("SELECT username, stream_key FROM users WHERE stream_key = ?",
                                     stream_key)
        if row is None or not secrets.compare_digest(row["stream_key"], stream_key):
            return None
        return str(row["username"])

    async def rotate_stream_key(self, user: User) -> str:
        key = new_stream_key()
        await self.db.execute("UPDATE users SET stream_key = ? WHERE id = ?", key, user.id)
        self._forget_user(user.id)
        log.info("user %s rotated their stream key", user.username)
        return key

    async def update_profile(self, user: User, *, title: str | None = None,
                             display_name: str | None = None) -> User:
        if title is not None:
            if not isinstance(title, str) or len(title) > 140:
                raise AccountError("title must be a string of at most 140 characters")
            await self.db.execute("UPDATE users SET title = ? WHERE id = ?", title.strip(), user.id)
        if display_name is not None:
            if not isinstance(display_name, str) or not 1 <= len(display_name.strip()) <= 40:
                raise AccountError("display_name must be 1-40 characters")
            await self.db.execute("UPDATE users SET display_name = ? WHERE id = ?",
                                  display_name.strip(), user.id)
        self._forget_user(user.id)
        updated = await self.get_by_id(user.id)
        assert updated is not None
        return updated


_DUMMY_HASH = PasswordHasher().hash("not-a-real-password")
