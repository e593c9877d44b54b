"""Settings: defaults, then a TOML file (``--config``), then the environment, then flags.

Core settings are typed fields here. Each area (hls, chat, gifts, webrtc, ...) owns a TOML
table of its own and reads it with ``settings.section("name")`` into a dataclass defined in
that area's module, so adding an option never means editing this file.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

#: The environment variable for each core setting (the contract fixes these names).
ENV_NAMES = {
    "http": "LIVESRV_HTTP",
    "rtmp": "LIVESRV_RTMP",
    "data_dir": "LIVESRV_DATA_DIR",
    "redis": "LIVESRV_REDIS_URL",
    "database": "LIVESRV_DATABASE_URL",
    "public_url": "LIVESRV_PUBLIC_URL",
    "log_level": "LIVESRV_LOG_LEVEL",
    "node_id": "LIVESRV_NODE_ID",
}


class ConfigError(ValueError):
    """A setting that cannot be used; the message names it."""


def parse_hostport(value: str, name: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(f"{name}: expected HOST:PORT, got {value!r}")
    return (host.strip("[]") or "0.0.0.0"), int(port)


@dataclass(frozen=True)
class Settings:
    http: str = "0.0.0.0:8080"
    rtmp: str = "0.0.0.0:1935"
    data_dir: Path = Path("./var")
    redis: str | None = None  # unset: the in-process bus
    database: str | None = None  # unset: SQLite in the data dir
    #: the URL the outside world reaches this server by, used for the rtmp/whip URLs handed
    #: to anchors; unset: derived from each request's Host header
    public_url: str | None = None
    log_level: str = "INFO"
    node_id: str | None = None
    #: every other TOML table, by name, for the areas to read
    tables: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def http_address(self) -> tuple[str, int]:
        return parse_hostport(self.http, "http")

    @property
    def rtmp_address(self) -> tuple[str, int]:
        return parse_hostport(self.rtmp, "rtmp")

    @property
    def database_url(self) -> str:
        return self.database or f"sqlite:///{(self.data_dir / 'livesrv.db').resolve()}"

    def section(self, name: str, cls: type[T]) -> T:
        """The TOML table ``[name]`` as an instance of the dataclass ``cls``; unknown keys
        are an error (a typo in a config file should not be silently ignored)."""
        table = self.tables.get(name, {})
        known = {f.name for f in fields(cls)}  # type: ignore[arg-type]
        unknown = set(table) - known
        if unknown:
            raise ConfigError(f"[{name}]: unknown setting(s) {', '.join(sorted(unknown))}")
        return cls(**table)


def load_settings(config_file: str | Path | None = None, env: dict[str, str] | None = None,
                  **flags: Any) -> Settings:
    """Build the settings: defaults < TOML file < environment < flags (None = not given)."""
    env = os.environ if env is None else env
    values: dict[str, Any] = {}
    tables: dict[str, dict[str, Any]] = {}
    if config_file:
        path = Path(config_file)
        try:
            data = tomllib.loads(path.read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"--config {path}: {exc}") from exc
        core = data.pop("server", {})
        for key, value in data.items():
            if isinstance(value, dict):
                tables[key] = value
            else:
                core[key] = value
        values.update(core)
    for key, var in ENV_NAMES.items():
        if env.get(var):
            values[key] = env[var]
    values.update({k: v for k, v in flags.items() if v is not None})
    known = {f.name for f in fields(Settings)} - {"tables"}
    unknown = set(values) - known
    if unknown:
        raise ConfigError(f"unknown setting(s): {', '.join(sorted(unknown))}")
    if "data_dir" in values:
        values["data_dir"] = Path(values["data_dir"])
    settings = replace(Settings(), **values, tables=tables)
    settings.http_address  # noqa: B018 - validate now, not at first use
    settings.rtmp_address  # noqa: B018
    return settings
