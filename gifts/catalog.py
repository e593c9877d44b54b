"""The gift catalog and coin packages, from a TOML file (config/gifts.toml by default)."""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from livesrv.config import ConfigError

ID_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,31}$")


class CatalogError(ConfigError):
    """The catalog file is missing, not TOML, or has a bad entry (the message says which)."""


@dataclass(frozen=True)
class Gift:
    id: str
    name: str
    price: int  # coins
    animation: str

    def public(self) -> dict[str, Any]:
        return {"id": self.id, "name": self.name, "price": self.price, "animation": self.animation}


@dataclass(frozen=True)
class CoinPackage:
    id: str
    coins: int
    price_cents: int
    currency: str

    def public(self) -> dict[str, Any]:
        return {"id": self.id, "coins": self.coins, "price_cents": self.price_cents,
                "currency": self.currency}


@dataclass(frozen=True)
class Catalog:
    gifts: dict[str, Gift]  # in file order
    packages: dict[str, CoinPackage]


def _positive_int(entry: dict[str, Any], key: str, where: str) -> int:
    value = entry.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise CatalogError(f"{where}: {key} must be a positive integer, got {value!r}")
    return value


def _text(entry: dict[str, Any], key: str, where: str, default: str | None = None) -> str:
    value = entry.get(key, default)
    if not isinstance(value, str) or not value.strip():
        raise CatalogError(f"{where}: {key} must be a non-empty string, got {value!r}")
    return value.strip()


def _id(entry: dict[str, Any], where: str, seen: set[str]) -> str:
    value = entry.get("id")
    if not isinstance(value, str) or not ID_RE.match(value):
        raise CatalogError(f"{where}: id must match {ID_RE.pattern}, got {value!r}")
    if value in seen:
        raise CatalogError(f"{where}: duplicate id {value!r}")
    seen.add(value)
    return value


def parse_catalog(data: dict[str, Any], source: str = "catalog") -> Catalog:
    gifts: dict[str, Gift] = {}
    raw_gifts = data.get("gifts", [])
    if not isinstance(raw_gifts, list) or not raw_gifts:
        raise CatalogError(f"{source}: needs at least one [[gifts]] entry")
    for index, entry in enumerate(raw_gifts):
        where = f"{source} gifts[{index}]"
        if not isinstance(entry, dict):
            raise CatalogError(f"{where}: must be a table")
        gift_id = _id(entry, where, set(gifts))
        gifts[gift_id] = Gift(gift_id, _text(entry, "name", where), _positive_int(entry, "price", where),
                              _text(entry, "animation", where, "float"))
    packages: dict[str, CoinPackage] = {}
    raw_packages = data.get("packages", [])
    if not isinstance(raw_packages, list):
        raise CatalogError(f"{source}: packages must be an array of tables")
    for index, entry in enumerate(raw_packages):
        where = f"{source} packages[{index}]"
        if not isinstance(entry, dict):
            raise CatalogError(f"{where}: must be a table")
        package_id = _id(entry, where, set(packages))
        currency = _text(entry, "currency", where, "USD").upper()
        if not re.fullmatch(r"[A-Z]{3}", currency):
            raise CatalogError(f"{where}: currency must be an ISO 4217 code, got {currency!r}")
        packages[package_id] = CoinPackage(package_id, _positive_int(entry, "coins", where),
                                           _positive_int(entry, "price_cents", where), currency)
    unknown = set(data) - {"gifts", "packages"}
    if unknown:
        raise CatalogError(f"{source}: unknown table(s) {', '.join(sorted(unknown))}")
    return Catalog(gifts, packages)


def load_catalog(path: str | Path) -> Catalog:
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise CatalogError(f"gift catalog {path}: {exc}") from exc
    return parse_catalog(data, str(path))
