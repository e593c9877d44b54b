"""Gifts without HTTP: the catalog file, the [gifts] settings, combos and the coin split."""

from __future__ import annotations

from pathlib import Path

import pytest

from gifts.catalog import CatalogError, load_catalog, parse_catalog
from gifts.combo import Combos
from gifts.service import GiftError, check_count, check_key, split
from gifts.settings import DEFAULT_CATALOG, GiftSettings, GiftSettingsError
from livesrv.config import ConfigError, load_settings


def test_default_catalog_loads() -> None:
    catalog = load_catalog(DEFAULT_CATALOG)
    assert len(catalog.gifts) >= 8
    prices = [g.price for g in catalog.gifts.values()]
    assert prices[0] == 1 and prices == sorted(prices)  # cheapest first, as the panel shows them
    assert {g.animation for g in catalog.gifts.values()} <= {"float", "burst", "fullscreen"}
    assert catalog.packages and all(p.coins > 0 and p.price_cents > 0 for p in catalog.packages.values())
    assert catalog.gifts["rose"].public() == {"id": "rose", "name": "Rose", "price": 1, "animation": "float"}


@pytest.mark.parametrize(("data", "message"), [
    ({}, "at least one"),
    ({"gifts": [{"id": "a", "name": "A", "price": 0}]}, "price"),
    ({"gifts": [{"id": "a", "name": "A", "price": 1.5}]}, "price"),
    ({"gifts": [{"id": "a", "name": "A", "price": True}]}, "price"),
    ({"gifts": [{"id": "Bad Id", "name": "A", "price": 1}]}, "id"),
    ({"gifts": [{"id": "a", "name": "A", "price": 1}, {"id": "a", "name": "B", "price": 2}]}, "duplicate"),
    ({"gifts": [{"id": "a", "name": "", "price": 1}]}, "name"),
    ({"gifts": [{"id": "a", "name": "A", "price": 1}], "packages": [{"id": "p", "coins": 5}]}, "price_cents"),
    ({"gifts": [{"id": "a", "name": "A", "price": 1}],
      "packages": [{"id": "p", "coins": 5, "price_cents": 5, "currency": "dollars"}]}, "currency"),
    ({"gifts": [{"id": "a", "name": "A", "price": 1}], "extra": {}}, "unknown"),
])
def test_bad_catalogs_are_refused_with_the_reason(data: dict, message: str) -> None:
    with pytest.raises(CatalogError, match=message):
        parse_catalog(data)


def test_catalog_file_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(CatalogError, match=r"missing\.toml"):
        load_catalog(tmp_path / "missing.toml")
    broken = tmp_path / "broken.toml"
    broken.write_text("[[gifts]\n")
    with pytest.raises(CatalogError, match=r"broken\.toml"):
        load_catalog(broken)
    assert issubclass(CatalogError, ConfigError)


def test_gift_settings_from_the_config_file(tmp_path: Path) -> None:
    config = tmp_path / "livesrv.toml"
    config.write_text('[gifts]\nplatform_share = 20\ncombo_seconds = 3\nsandbox = false\n'
                      'webhook_secret = "whsec"\n')
    settings = load_settings(config, env={}).section("gifts", GiftSettings)
    assert (settings.platform_share, settings.combo_seconds, settings.sandbox) == (20, 3, False)
    assert settings.provider_name(embedded=True) == "psp"
    defaults = GiftSettings()
    assert defaults.platform_share == 30 and defaults.combo_seconds == 5
    assert defaults.webhook_tolerance_seconds == 300
    assert defaults.sandbox_on(embedded=True) and not defaults.sandbox_on(embedded=False)
    assert defaults.provider_name(embedded=True) == "sandbox"
    config.write_text("[gifts]\nplatform_sahre = 20\n")
    with pytest.raises(ConfigError, match="platform_sahre"):
        load_settings(config, env={}).section("gifts", GiftSettings)
    with pytest.raises(GiftSettingsError, match="platform_share"):
        GiftSettings(platform_share=101)
    with pytest.raises(GiftSettingsError, match="webhook_tolerance_seconds"):
        GiftSettings(webhook_tolerance_seconds=0)


def test_the_example_config_documents_every_gift_setting() -> None:
    example = (Path(__file__).resolve().parents[1] / "config" / "livesrv.example.toml").read_text()
    section = example.split("\n[gifts]\n", 1)[1]
    for name in GiftSettings.__dataclass_fields__:
        assert f"\n{name} =" in "\n" + section or f"\n# {name} =" in "\n" + section, name


@pytest.mark.parametrize(("total", "share", "anchor", "platform"), [
    (1, 30, 1, 0),  # rounding favours the anchor
    (10, 30, 7, 3),
    (15, 30, 11, 4),
    (999 * 5000, 30, 3_496_500, 1_498_500),
    (7, 0, 7, 0),
    (7, 100, 0, 7),
])
def test_split_rounds_the_platform_share_down(total: int, share: int, anchor: int, platform: int) -> None:
    assert split(total, share) == (anchor, platform)
    assert anchor + platform == total


def test_count_and_key_checks() -> None:
    assert check_count(1) == 1 and check_count(999) == 999
    for bad in (0, 1000, -1, 1.0, "3", True, None):
        with pytest.raises(GiftError):
            check_count(bad)
    assert check_key("k") == "k"
    for bad in ("", "x" * 129, 5, None):
        with pytest.raises(GiftError):
            check_key(bad)


def test_combo_counts_repeats_within_the_window() -> None:
    combos = Combos(window=5)
    assert combos.add("room", "ann", "rose", 1, now=100.0) == 1
    assert combos.add("room", "ann", "rose", 1, now=104.0) == 2
    assert combos.add("room", "ann", "rose", 10, now=108.5) == 12  # 4.5 s after the previous one
    # another gift, user or room is a combo of its own
    assert combos.add("room", "ann", "heart", 1, now=109.0) == 1
    assert combos.add("room", "bob", "rose", 1, now=109.0) == 1
    assert combos.add("other", "ann", "rose", 1, now=109.0) == 1
    # a pause longer than the window starts over
    assert combos.add("room", "ann", "rose", 1, now=115.0) == 1
    assert combos.peek("room", "ann", "rose", 3, now=116.0) == 4
    assert combos.peek("room", "ann", "rose", 3, now=130.0) == 3
    assert combos.add("room", "ann", "rose", 1, now=116.0) == 2  # peek recorded nothing


def test_combo_table_stays_bounded() -> None:
    combos = Combos(window=5, max_runs=100)
    for i in range(1000):
        combos.add("room", f"user{i}", "rose", 1, now=float(i))
    assert len(combos) <= 100
    combos = Combos(window=1000, max_runs=100)  # all runs still active: the oldest go
    for i in range(1000):
        combos.add("room", f"user{i}", "rose", 1, now=float(i))
    assert len(combos) <= 100
    assert combos.add("room", "user999", "rose", 1, now=1000.0) == 2
