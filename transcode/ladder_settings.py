"""The ladder's settings (``[ladder]``, defaults from config/ladder.toml) and its plan for one
source: which rungs, at what size and frame rate."""

from __future__ import annotations

import math
import tomllib
from dataclasses import dataclass, field, fields, replace
from functools import lru_cache
from pathlib import Path
from typing import Any

from livesrv.codecs import CodecConfigError, picture_info
from livesrv.config import ConfigError
from livesrv.media import Track

from .hls import RENDITION_NAME
from .ladder_governor import GovernorSettings

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "config" / "ladder.toml"

X264_PRESETS = frozenset({"ultrafast", "superfast", "veryfast", "faster", "fast", "medium", "slow",
                          "slower", "veryslow", "placebo"})
H264_PROFILES = frozenset({"baseline", "main", "high"})
SCALERS = {"fast_bilinear": "FAST_BILINEAR", "bilinear": "BILINEAR", "bicubic": "BICUBIC",
           "area": "AREA", "lanczos": "LANCZOS", "spline": "SPLINE", "point": "POINT"}

# -- settings ---------------------------------------------------------------------------------
_BUILTIN: dict[str, Any] = {
    "enabled": True, "preset": "veryfast", "profile": "high", "tune": "", "max_fps": 30.0,
    "encoder_threads": 0, "scaler": "bicubic", "cascade": True, "scaler_threads": 0,
    "audio_kbps": 128, "queue_seconds": 4.0,
    "max_lag_seconds": 2.0, "restore_lag_seconds": 0.5, "restore_after_seconds": 15.0,
    "settle_seconds": 3.0, "restore_load": 0.75,
    "rungs": [{"name": "720p", "height": 720, "video_kbps": 2800},
              {"name": "480p", "height": 480, "video_kbps": 1400},
              {"name": "360p", "height": 360, "video_kbps": 800}],
}


@lru_cache(maxsize=1)
def file_defaults() -> dict[str, Any]:
    """config/ladder.toml's [ladder] table over the built-in values (the file may be absent
    when the package is installed without the config directory)."""
    values = dict(_BUILTIN)
    try:
        values.update(tomllib.loads(DEFAULT_CONFIG.read_text()).get("ladder", {}))
    except FileNotFoundError:
        pass
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{DEFAULT_CONFIG}: {exc}") from exc
    return values


def _default(name: str) -> Any:
    return field(default_factory=lambda: file_defaults()[name])


@dataclass(frozen=True)
class RungSpec:
    """One rung as configured: a height (width follows the source's aspect unless given)."""

    name: str
    height: int
    video_kbps: int
    width: int | None = None
    max_fps: float | None = None
    preset: str | None = None
    profile: str | None = None


@dataclass(frozen=True)
class LadderSettings:
    """The ``[ladder]`` table (defaults from config/ladder.toml)."""

    enabled: bool = _default("enabled")
    preset: str = _default("preset")
    profile: str = _default("profile")
    tune: str = _default("tune")
    max_fps: float = _default("max_fps")
    encoder_threads: int = _default("encoder_threads")
    scaler: str = _default("scaler")
    cascade: bool = _default("cascade")
    scaler_threads: int = _default("scaler_threads")
    audio_kbps: int = _default("audio_kbps")
    queue_seconds: float = _default("queue_seconds")
    max_lag_seconds: float = _default("max_lag_seconds")
    restore_lag_seconds: float = _default("restore_lag_seconds")
    restore_after_seconds: float = _default("restore_after_seconds")
    settle_seconds: float = _default("settle_seconds")
    restore_load: float = _default("restore_load")
    #: TOML gives a list of tables; kept as a tuple of RungSpec
    rungs: tuple[RungSpec, ...] = _default("rungs")

    def __post_init__(self) -> None:
        if not isinstance(self.enabled, bool):
            raise ConfigError("[ladder] enabled must be true or false")
        if isinstance(self.rungs, (str, dict)):
            raise ConfigError("[ladder] rungs must be a list of tables ([[ladder.rungs]])")
        rungs = tuple(_rung_spec(item) for item in self.rungs)
        object.__setattr__(self, "rungs", rungs)
        names = [r.name for r in rungs]
        if len(set(names)) != len(names):
            raise ConfigError("[ladder] rung names must be unique")
        for rung in rungs:
            _check_rung(rung)
        for rung in (self, *rungs):
            if rung.preset is not None and rung.preset not in X264_PRESETS:
                raise ConfigError(f"[ladder] unknown x264 preset {rung.preset!r}")
            if rung.profile is not None and rung.profile not in H264_PROFILES:
                raise ConfigError(f"[ladder] profile must be one of {', '.join(sorted(H264_PROFILES))}")
        if self.scaler not in SCALERS:
            raise ConfigError(f"[ladder] scaler must be one of {', '.join(SCALERS)}")
        if not 1 <= self.max_fps <= 240:
            raise ConfigError("[ladder] max_fps must be between 1 and 240")
        if not 0 <= self.encoder_threads <= 64 or not 0 <= self.scaler_threads <= 64:
            raise ConfigError("[ladder] encoder_threads and scaler_threads must be between 0 and 64")
        if not isinstance(self.cascade, bool):
            raise ConfigError("[ladder] cascade must be true or false")
        if not 16 <= self.audio_kbps <= 512:
            raise ConfigError("[ladder] audio_kbps must be between 16 and 512")
        if not 0.5 <= self.queue_seconds <= 60:
            raise ConfigError("[ladder] queue_seconds must be between 0.5 and 60")
        if not 0 < self.restore_lag_seconds < self.max_lag_seconds:
            raise ConfigError("[ladder] need 0 < restore_lag_seconds < max_lag_seconds")
        if self.restore_after_seconds < 0 or self.settle_seconds < 0 or not 0 < self.restore_load <= 1:
            raise ConfigError("[ladder] restore_after_seconds and settle_seconds must be >= 0, "
                              "restore_load in (0, 1]")

    @property
    def governor(self) -> GovernorSettings:
        return GovernorSettings(max_lag_seconds=self.max_lag_seconds,
                                restore_lag_seconds=self.restore_lag_seconds,
                                restore_after_seconds=self.restore_after_seconds,
                                settle_seconds=self.settle_seconds, restore_load=self.restore_load)


def _rung_spec(item: Any) -> RungSpec:
    if isinstance(item, RungSpec):
        return item
    if not isinstance(item, dict):
        raise ConfigError("[ladder] rungs must be tables ([[ladder.rungs]])")
    known = {f.name for f in fields(RungSpec)}
    unknown = set(item) - known
    if unknown:
        raise ConfigError(f"[ladder] rung: unknown setting(s) {', '.join(sorted(unknown))}")
    missing = {"name", "height", "video_kbps"} - set(item)
    if missing:
        raise ConfigError(f"[ladder] rung: missing {', '.join(sorted(missing))}")
    return RungSpec(**item)


def _check_rung(rung: RungSpec) -> None:
    # RENDITION_NAME: the names HLS can use as a path segment
    if not isinstance(rung.name, str) or not RENDITION_NAME.match(rung.name) or rung.name == "source":
        raise ConfigError(f"[ladder] rung name {rung.name!r} must be a short path-safe name, not 'source'")
    if not isinstance(rung.height, int) or not 32 <= rung.height <= 4320 or rung.height % 2:
        raise ConfigError(f"[ladder] rung {rung.name}: height must be even, 32..4320")
    if rung.width is not None and (not isinstance(rung.width, int) or not 32 <= rung.width <= 7680
                                   or rung.width % 2):
        raise ConfigError(f"[ladder] rung {rung.name}: width must be even, 32..7680")
    if not isinstance(rung.video_kbps, int) or not 50 <= rung.video_kbps <= 100_000:
        raise ConfigError(f"[ladder] rung {rung.name}: video_kbps must be 50..100000")
    if rung.max_fps is not None and not 1 <= rung.max_fps <= 240:
        raise ConfigError(f"[ladder] rung {rung.name}: max_fps must be between 1 and 240")


# -- planning ---------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class RungPlan:
    """A rung as it will be encoded for one source."""

    name: str
    width: int
    height: int
    #: nominal output rate (the source's, divided to stay under max_fps), None when unknown
    fps: float | None
    max_fps: float
    bitrate: int
    preset: str
    profile: str

    @property
    def pixel_rate(self) -> float:
        """Pixels encoded per second: the static measure of how expensive the rung is."""
        return self.width * self.height * (self.fps or self.max_fps)


#: the highest source frame rate believed: the rate comes from the publisher (onMetaData, SPS
#: VUI) and anything above what a camera or encoder produces is a lie or garbage
MAX_SOURCE_FPS = 240.0


def sane_fps(fps: float | None) -> float | None:
    """``fps`` if it is a frame rate a real source has, else None (unknown)."""
    if fps is None or not math.isfinite(fps) or not 0 < fps <= MAX_SOURCE_FPS:
        return None
    return fps


def output_fps(source_fps: float | None, max_fps: float) -> float | None:
    """A source above ``max_fps`` keeps every n-th frame (60 -> 30, 50 -> 25)."""
    source_fps = sane_fps(source_fps)
    if source_fps is None:
        return None
    # the smallest divisor that brings the rate under max_fps (1% slack for 30.3-ish rates),
    # in one step: this runs on the event loop, with a rate the publisher chose
    divisor = max(1, math.ceil(source_fps / (max_fps * 1.01)))
    return source_fps / divisor


def plan_ladder(settings: LadderSettings, width: int, height: int,
                fps: float | None) -> list[RungPlan]:
    """The rungs for a source of this size: those strictly below it, largest first."""
    plans = []
    for spec in settings.rungs:
        if spec.height >= height or (spec.width is not None and spec.width >= width):
            continue  # the source itself serves this size better than an upscale
        rung_width = spec.width or max(2, round(spec.height * width / height / 2) * 2)
        if rung_width >= width:
            continue
        max_fps = spec.max_fps or settings.max_fps
        plans.append(RungPlan(spec.name, rung_width, spec.height, output_fps(fps, max_fps), max_fps,
                              spec.video_kbps * 1000, spec.preset or settings.preset,
                              spec.profile or settings.profile))
    plans.sort(key=lambda p: (-p.width * p.height, -p.pixel_rate))
    return plans


def source_picture(track: Track) -> tuple[int, int, float | None] | None:
    """(width, height, fps) of a video track: announced, else parsed from its extradata (an
    announced rate that no real source has counts as not announced)."""
    fps = sane_fps(track.fps)
    if fps is None and track.fps is not None:
        track = replace(track, fps=None)  # so picture_info reads the SPS's rate instead
    if track.width and track.height:
        if fps is None:
            try:
                parsed = picture_info(track)
            except CodecConfigError:
                parsed = None
            fps = sane_fps(parsed.fps) if parsed is not None else None
        return track.width, track.height, fps
    try:
        parsed = picture_info(track)
    except CodecConfigError:
        return None
    if parsed is None:
        return None
    return parsed.width, parsed.height, fps or sane_fps(parsed.fps)
