from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from livesrv.config import ConfigError, load_settings


def test_precedence_defaults_file_env_flags(tmp_path: Path) -> None:
    assert load_settings(env={}).http == "0.0.0.0:8080"
    assert load_settings(env={}).rtmp_address == ("0.0.0.0", 1935)
    config = tmp_path / "livesrv.toml"
    config.write_text('http = "127.0.0.1:9000"\nrtmp = "127.0.0.1:2935"\n'
                      '[server]\ndata_dir = "/srv/live"\n[hls]\nsegment_seconds = 4\n')
    from_file = load_settings(config, env={})
    assert from_file.http_address == ("127.0.0.1", 9000)
    assert from_file.data_dir == Path("/srv/live")
    assert from_file.tables["hls"] == {"segment_seconds": 4}
    from_env = load_settings(config, env={"LIVESRV_HTTP": "127.0.0.1:9100",
                                          "LIVESRV_REDIS_URL": "redis://r:6379/0"})
    assert from_env.http == "127.0.0.1:9100" and from_env.redis == "redis://r:6379/0"
    from_flags = load_settings(config, env={"LIVESRV_HTTP": "127.0.0.1:9100"}, http="[::1]:9200")
    assert from_flags.http_address == ("::1", 9200)
    assert from_flags.rtmp == "127.0.0.1:2935"
    assert load_settings(env={}, data_dir="/x").database_url == "sqlite:////x/livesrv.db"


def test_bad_settings_are_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="http"):
        load_settings(env={}, http="nonsense")
    bad = tmp_path / "bad.toml"
    bad.write_text("this is = = not toml")
    with pytest.raises(ConfigError, match=r"bad\.toml"):
        load_settings(bad, env={})
    unknown = tmp_path / "unknown.toml"
    unknown.write_text('htp = "1:2"\n')
    with pytest.raises(ConfigError, match="htp"):
        load_settings(unknown, env={})


def test_sections_are_typed_and_strict() -> None:
    @dataclass
    class Hls:
        segment_seconds: float = 2.0

    settings = load_settings(env={})
    assert settings.section("hls", Hls).segment_seconds == 2.0
    object.__setattr__(settings, "tables", {"hls": {"segment_secnds": 1}})
    with pytest.raises(ConfigError, match="segment_secnds"):
        settings.section("hls", Hls)


def test_the_example_config_loads_and_documents_every_setting() -> None:
    """config/livesrv.example.toml is what operators copy: each table must load into its settings
    class (unknown keys are errors) and name every setting, set or commented out."""
    from dataclasses import fields

    from chat.settings import ChatSettings
    from gifts.settings import GiftSettings
    from ingest.rtmp.connection import RtmpLimits
    from ingest.whip import WhipSettings
    from transcode.hls import HlsSettings
    from transcode.record import RecordSettings
    from transcode.thumbs import ThumbSettings
    from transcode.webrtc import WebRtcSettings

    path = Path(__file__).resolve().parents[1] / "config" / "livesrv.example.toml"
    settings = load_settings(path, env={})
    text = path.read_text()
    for name, cls in {"hls": HlsSettings, "thumbs": ThumbSettings, "recordings": RecordSettings,
                      "rtmp": RtmpLimits, "chat": ChatSettings, "gifts": GiftSettings,
                      "webrtc": WebRtcSettings, "whip": WhipSettings}.items():
        settings.section(name, cls)
        table = "\n" + text.split(f"\n[{name}]\n", 1)[1].split("\n[", 1)[0]
        for field in fields(cls):
            assert f"\n{field.name} =" in table or f"\n# {field.name} =" in table, (name, field.name)
