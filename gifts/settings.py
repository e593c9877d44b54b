"""The ``[gifts]`` table of the settings (read with ``settings.section("gifts", GiftSettings)``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from livesrv.config import ConfigError

DEFAULT_CATALOG = Path(__file__).resolve().parents[1] / "config" / "gifts.toml"


class GiftSettingsError(ConfigError):
    """A [gifts] setting that cannot be used; the message names it."""


@dataclass(frozen=True)
class GiftSettings:
    #: percent of every gift kept by the platform; the anchor earns the rest
    platform_share: int = 30
    #: the same gift from the same user in a room within this many seconds continues a combo
    combo_seconds: float = 5.0
    #: the sandbox payment provider (confirms recharges at once); None: on in the embedded
    #: mode (no --database and no --redis), off in a cluster
    sandbox: bool | None = None
    #: the HMAC-SHA256 key of the payment webhook; empty with the sandbox: a random key per
    #: process (the sandbox signs in-process); empty without it: every webhook is refused
    webhook_secret: str = ""
    #: a webhook signature older (or further in the future) than this is refused as stale
    webhook_tolerance_seconds: int = 300
    #: the payment provider's name when the sandbox is off (its clearing account)
    provider: str = "psp"
    #: a recharge by "coins" (not a package) costs this many cents per coin
    coin_price_cents: int = 1
    currency: str = "USD"
    #: the largest single recharge by "coins"
    max_recharge_coins: int = 1_000_000
    #: the catalog file (gifts and packages); empty: config/gifts.toml
    catalog: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.platform_share, int) or not 0 <= self.platform_share <= 100:
            raise GiftSettingsError("[gifts] platform_share: an integer percent 0..100")
        if not isinstance(self.combo_seconds, int | float) or self.combo_seconds < 0:
            raise GiftSettingsError("[gifts] combo_seconds: a number of seconds >= 0")
        if self.sandbox is not None and not isinstance(self.sandbox, bool):
            raise GiftSettingsError("[gifts] sandbox: true or false")
        if not isinstance(self.webhook_secret, str):
            raise GiftSettingsError("[gifts] webhook_secret: a string")
        if not isinstance(self.webhook_tolerance_seconds, int) or self.webhook_tolerance_seconds <= 0:
            raise GiftSettingsError("[gifts] webhook_tolerance_seconds: a positive integer")
        if not isinstance(self.coin_price_cents, int) or self.coin_price_cents <= 0:
            raise GiftSettingsError("[gifts] coin_price_cents: a positive integer")
        if not isinstance(self.max_recharge_coins, int) or self.max_recharge_coins <= 0:
            raise GiftSettingsError("[gifts] max_recharge_coins: a positive integer")
        if not isinstance(self.provider, str) or not self.provider.isidentifier():
            raise GiftSettingsError("[gifts] provider: a short name (letters, digits, _)")

    @property
    def catalog_path(self) -> Path:
        return Path(self.catalog) if self.catalog else DEFAULT_CATALOG

    def sandbox_on(self, embedded: bool) -> bool:
        return embedded if self.sandbox is None else self.sandbox

    def provider_name(self, embedded: bool) -> str:
        return "sandbox" if self.sandbox_on(embedded) else self.provider
