"""HLS playlists: one rendition's sliding window of fMP4 segments, and the multivariant list.

A ``MediaPlaylist`` belongs to a channel's rendition and outlives publications: an encoder
that reconnects continues the media sequence after an ``EXT-X-DISCONTINUITY`` with a new init
segment, so a viewer that is playing just carries on. File names carry an id that is new for
each packager run (``init-<id>.mp4``, ``<id>-<seq>.m4s``), so a URL never names two different
contents and every file can be cached forever.

Segments live in memory only for the window plus a small grace (players that fetched the
playlist just before it slid may still ask for the oldest one). Rendering is cached until the
next change: a playlist is fetched by every viewer every couple of seconds.

Low-Latency HLS (RFC 8216bis): with a part target set, a segment grows part by part
(``add_part``), each part its own moof+mdat, and a segment is its parts' concatenation, so the
segment URL (for players without LL support) and the part URLs serve the same bytes; a segment
is held and served as its parts one after the other, never joined (no copy). Parts are named by
a running number per packager run (``<id>.p<n>.m4s``), not by segment, so the part named in
``EXT-X-PRELOAD-HINT`` is right whether or not a keyframe closes the segment before it. Readers
that block (``_HLS_msn``/``_HLS_part`` reloads, preload-hint GETs) wait on ``changed()``: one
future per playlist, resolved at every change, so nothing polls.
"""

from __future__ import annotations

import asyncio
import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from prometheus_client import Gauge

HELD_BYTES = Gauge("livesrv_hls_held_bytes", "Bytes of HLS segments and init segments held in memory")

PLAYLIST_TYPE = "application/vnd.apple.mpegurl"


@dataclass(frozen=True, slots=True)
class Part:
    """One LL-HLS partial segment: a moof+mdat of its segment."""

    name: str
    duration: float
    independent: bool  # its first video sample is a keyframe (audio-only: always)
    size: int


@dataclass(frozen=True, slots=True)
class Segment:
    sequence: int
    name: str
    init_name: str
    duration: float  # seconds, exactly what its samples add up to
    #: its bytes: one fragment, or (LL-HLS) its parts' fragments, served one after the other
    chunks: tuple[bytes, ...]
    size: int
    program_date_time: float  # wall clock (epoch seconds) when its first packet arrived
    discontinuity: bool  # the first segment of a new publication after an older one
    parts: tuple[Part, ...] = ()  # LL-HLS: the parts it was made of (empty without LL)

    @property
    def data(self) -> bytes:
        """The segment as one bytes object (a copy when it is made of parts)."""
        return self.chunks[0] if len(self.chunks) == 1 else b"".join(self.chunks)

    @property
    def bitrate(self) -> float:
        return self.size * 8 / self.duration if self.duration > 0 else 0.0


def format_date_time(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass(slots=True)
class _OpenSegment:
    """LL-HLS: the segment whose parts are being produced (not listed with EXTINF yet)."""

    init_name: str
    program_date_time: float
    parts: list[Part]
    datas: list[bytes]

    @property
    def duration(self) -> float:
        return sum(part.duration for part in self.parts)


def target_duration_for(seconds: float) -> int:
    """EXT-X-TARGETDURATION for segments of ``seconds``: RFC 8216 4.3.3.1 bounds each EXTINF
    *rounded to the nearest integer*, so 2 s segments get 2, not ceil's 3 (players derive how
    far behind live they sit from it)."""
    return max(1, math.floor(seconds + 0.5))


class MediaPlaylist:
    """A rendition's live window. Only the packager (on the event loop) changes it.

    ``part_target`` (seconds) turns on Low-Latency HLS: the packager then builds segments with
    ``add_part`` ... ``close_segment`` instead of ``append``.
    """

    def __init__(self, *, window: int, grace: int, target_seconds: float,
                 part_target: float | None = None) -> None:
        self.window = window
        self.grace = grace
        self.part_target = part_target
        self.next_sequence = 0
        self.discontinuity_sequence = 0
        self.ended = False
        self.target_duration = target_duration_for(target_seconds)
        self._segments: deque[Segment] = deque()  # the window plus the grace, oldest first
        self._files: dict[str, bytes] = {}  # inits, segments, parts: counted in held_bytes
        self._part_segments: dict[str, Segment] = {}  # LL-HLS segments: their parts are held
        self._init_users: dict[str, int] = {}  # init name -> segments referring to it
        self._current_init: str | None = None
        self._rendered: bytes | None = None
        self._changed: asyncio.Future[None] | None = None
        self.held_bytes = 0
        # LL-HLS
        self._open: _OpenSegment | None = None
        self._part_prefix = ""
        self._next_part = 0
        #: (media sequence number, part index) of the newest part, None before the first
        self.last_part: tuple[int, int] | None = None

    # -- packager side ----------------------------------------------------------------------
    def add_init(self, name: str, data: bytes, *, part_prefix: str | None = None) -> None:
        """The init segment of a new packager run; segments appended next refer to it.
        ``part_prefix`` names the run's parts (``<prefix>.p<n>.m4s``)."""
        if name in self._files:
            raise ValueError(f"init segment {name} already exists")
        self._drop_open()  # a run that died mid-segment: its parts are never completed
        self._drop_unused_init()
        self._current_init = name
        self._init_users.setdefault(name, 0)
        self._hold(name, data)
        self._part_prefix = part_prefix if part_prefix is not None else name.removesuffix(".mp4")
        self._next_part = 0
        self._changed_now()

    def append(self, data: bytes, duration: float, program_date_time: float, file_id: str) -> Segment:
        """A whole segment at once (without LL-HLS)."""
        init = self._require_init()
        segment = Segment(self.next_sequence, f"{file_id}-{self.next_sequence}.m4s", init, duration,
                          (data,), len(data), program_date_time, self._is_discontinuity(init))
        self._hold(segment.name, data)
        self._push(segment)
        self._changed_now()
        return segment

    def add_part(self, data: bytes, duration: float, independent: bool, program_date_time: float,
                 *, new_segment: bool = False) -> tuple[Part, Segment | None]:
        """LL-HLS: the next part of the open segment, or with ``new_segment`` the first part of
        a new one (``program_date_time`` is then the new segment's); returns the part and the
        segment that this closed, if any.

        The packager closes a segment only when the next one's first part is ready, in the same
        change: a live playlist whose last segment is complete but has no part after it makes
        hls.js re-fetch that segment's last parts in a loop until the next part is listed."""
        init = self._require_init()
        closed = self._close_open(self._part_prefix) if new_segment else None
        open_ = self._open
        if open_ is None:
            open_ = self._open = _OpenSegment(init, program_date_time, [], [])
        part = Part(f"{self._part_prefix}.p{self._next_part}.m4s", duration, independent, len(data))
        self._next_part += 1
        open_.parts.append(part)
        open_.datas.append(data)
        self._hold(part.name, data)
        self.last_part = (self.next_sequence, len(open_.parts) - 1)
        self.ended = False
        self._changed_now()
        return part, closed

    def close_segment(self, file_id: str) -> Segment | None:
        """LL-HLS: the open segment is complete (the publication ends)."""
        segment = self._close_open(file_id)
        self._changed_now()
        return segment

    def _close_open(self, file_id: str) -> Segment | None:
        """The open segment becomes a segment: its parts, in order (they stay held as parts)."""
        open_ = self._open
        if open_ is None:
            return None
        self._open = None
        segment = Segment(self.next_sequence, f"{file_id}-{self.next_sequence}.m4s", open_.init_name,
                          open_.duration, tuple(open_.datas), sum(map(len, open_.datas)),
                          open_.program_date_time, self._is_discontinuity(open_.init_name),
                          tuple(open_.parts))
        self._part_segments[segment.name] = segment
        self._push(segment)
        return segment

    def end(self) -> None:
        """The publisher stopped: ``#EXT-X-ENDLIST`` until a new publication appends again."""
        if not self.ended:
            self.ended = True
            self._rendered = None
            self._changed_now()  # wake blocked requests: what they wait for may never come

    def release(self) -> None:
        """Forget everything (the channel is gone)."""
        self._drop_open()
        for name in list(self._files):
            self._unhold(name)
        self._part_segments.clear()
        self._segments.clear()
        self._init_users.clear()
        self._rendered = None
        self.ended = True
        self._changed_now()

    def _require_init(self) -> str:
        if self._current_init is None:
            raise RuntimeError("segment before add_init")
        return self._current_init

    def _is_discontinuity(self, init: str) -> bool:
        last = self._segments[-1] if self._segments else None
        return last is not None and last.init_name != init

    def _push(self, segment: Segment) -> None:
        self.next_sequence += 1
        self._segments.append(segment)
        self._init_users[segment.init_name] = self._init_users.get(segment.init_name, 0) + 1
        # EXTINF rounded must not exceed the target: it only grows (a GOP longer than asked)
        self.target_duration = max(self.target_duration, math.floor(segment.duration + 0.5))
        self.ended = False
        while len(self._segments) > self.window + self.grace:
            self._evict()
        self._rendered = None

    def _drop_open(self) -> None:
        if self._open is not None:
            for part in self._open.parts:
                self._unhold(part.name)
            self._open = None

    def _evict(self) -> None:
        old = self._segments.popleft()
        if old.discontinuity:
            self.discontinuity_sequence += 1
        self._unhold(old.name)
        self._part_segments.pop(old.name, None)
        for part in old.parts:
            self._unhold(part.name)
        self._init_users[old.init_name] -= 1
        self._drop_unused_init()

    def _drop_unused_init(self) -> None:
        for name, users in list(self._init_users.items()):
            if users <= 0 and name != self._current_init:
                del self._init_users[name]
                self._unhold(name)

    def _hold(self, name: str, data: bytes) -> None:
        self._files[name] = data
        self.held_bytes += len(data)
        HELD_BYTES.inc(len(data))

    def _unhold(self, name: str) -> None:
        data = self._files.pop(name, None)
        if data is not None:
            self.held_bytes -= len(data)
            HELD_BYTES.dec(len(data))

    def _changed_now(self) -> None:
        self._rendered = None
        changed = self._changed
        if changed is not None:
            self._changed = None
            if not changed.done():
                changed.set_result(None)

    # -- reader side ------------------------------------------------------------------------
    @property
    def listed(self) -> list[Segment]:
        """The segments the playlist names now (the window; the grace ones are not listed)."""
        segments = self._segments
        skip = max(0, len(segments) - self.window)
        return [segments[i] for i in range(skip, len(segments))]

    @property
    def has_segments(self) -> bool:
        return bool(self._segments)

    @property
    def open_parts(self) -> tuple[Part, ...]:
        return tuple(self._open.parts) if self._open is not None else ()

    @property
    def preload_hint(self) -> str | None:
        """The name the next part will have (LL-HLS, while live)."""
        if self.part_target is None or self.ended or self._current_init is None:
            return None
        return f"{self._part_prefix}.p{self._next_part}.m4s"

    def file(self, name: str) -> bytes | None:
        """A file's bytes (a segment made of parts is joined: serve ``chunks`` instead)."""
        data = self._files.get(name)
        if data is not None:
            return data
        segment = self._part_segments.get(name)
        return segment.data if segment is not None else None

    def chunks(self, name: str) -> tuple[bytes, ...] | None:
        """A file as the pieces it is held in, to be sent one after the other."""
        data = self._files.get(name)
        if data is not None:
            return (data,)
        segment = self._part_segments.get(name)
        return segment.chunks if segment is not None else None

    def changed(self) -> asyncio.Future[None]:
        """A future resolved at the next change (part, segment, init, end). Await it through
        ``asyncio.shield`` (or ``asyncio.wait``): it is shared by every waiter."""
        if self._changed is None:
            self._changed = asyncio.get_running_loop().create_future()
        return self._changed

    async def wait_for_segment(self) -> None:
        """Return once a segment exists or the playlist ended (callers bound the wait)."""
        while not (self._segments or self.ended):
            await asyncio.shield(self.changed())

    def too_far_ahead(self, msn: int) -> bool:
        """RFC 8216bis 6.2.5.2: a reload for more than two segments past the last one (the
        open segment, once it has a part) is an error."""
        last = self.next_sequence - 1
        if self.last_part is not None:
            last = max(last, self.last_part[0])
        return msn > last + 2

    def has_reached(self, msn: int, part: int | None) -> bool:
        """Whether a blocking reload for ``_HLS_msn=msn[&_HLS_part=part]`` can be answered: the
        playlist holds segment ``msn`` (complete) or, with a part, that part or a later one."""
        if self.ended:
            return True
        if part is None or self.last_part is None:
            return msn < self.next_sequence
        return (msn, part) <= self.last_part

    def bandwidth(self) -> tuple[int, int] | None:
        """(peak, average) bits per second over the window, None before the first segment."""
        listed = self.listed
        if not listed:
            return None
        peak = max(segment.bitrate for segment in listed)
        total = sum(segment.duration for segment in listed)
        average = sum(segment.size for segment in listed) * 8 / total if total else peak
        return math.ceil(peak), math.ceil(average)

    @property
    def hold_back(self) -> float:
        """HOLD-BACK: the spec's minimum, three target durations, is where players should sit."""
        return 3.0 * self.target_duration

    @property
    def part_hold_back(self) -> float | None:
        return 3.0 * self.part_target if self.part_target is not None else None

    def render(self) -> bytes:
        if self._rendered is not None:
            return self._rendered
        listed = self.listed
        # discontinuities before the first listed segment, as the tag defines it
        skipped = [s for s in self._segments if s.sequence < (listed[0].sequence if listed else 0)]
        discontinuity_sequence = self.discontinuity_sequence + sum(s.discontinuity for s in skipped)
        lines = ["#EXTM3U", "#EXT-X-VERSION:7", f"#EXT-X-TARGETDURATION:{self.target_duration}"]
        part_target = self.part_target
        if part_target is not None:
            lines.append(f"#EXT-X-SERVER-CONTROL:CAN-BLOCK-RELOAD=YES,"
                         f"PART-HOLD-BACK={3 * part_target:.3f},HOLD-BACK={self.hold_back:.3f}")
            lines.append(f"#EXT-X-PART-INF:PART-TARGET={part_target:.3f}")
        else:
            lines.append(f"#EXT-X-SERVER-CONTROL:HOLD-BACK={self.hold_back:.3f}")
        lines += [f"#EXT-X-MEDIA-SEQUENCE:{listed[0].sequence if listed else self.next_sequence}",
                  f"#EXT-X-DISCONTINUITY-SEQUENCE:{discontinuity_sequence}",
                  "#EXT-X-INDEPENDENT-SEGMENTS"]
        open_ = self._open
        # parts are listed for the segments ending within three target durations of the end
        # (the spec lets older ones go: players only need parts near the live edge). An ended
        # playlist lists none: it is a plain VOD list then, and hls.js, which stops following
        # parts once ENDLIST appears, fetches the whole last segment instead of stalling
        # before the parts it has not loaded yet.
        recent = 3 * self.target_duration - (open_.duration if open_ is not None else 0.0)
        if self.ended:
            recent = 0.0
        with_parts = len(listed)
        for index in range(len(listed) - 1, -1, -1):
            if recent <= 0:
                break
            with_parts = index
            recent -= listed[index].duration
        init = None
        previous_init = None
        for index, segment in enumerate(listed):
            if segment.discontinuity:
                lines.append("#EXT-X-DISCONTINUITY")
            if segment.init_name != init:
                init = segment.init_name
                lines.append(f'#EXT-X-MAP:URI="{init}"')
            lines.append(f"#EXT-X-PROGRAM-DATE-TIME:{format_date_time(segment.program_date_time)}")
            if index >= with_parts:
                lines.extend(_part_lines(segment.parts))
            lines.append(f"#EXTINF:{segment.duration:.5f},")
            lines.append(segment.name)
            previous_init = segment.init_name
        if open_ is not None:
            if previous_init is not None and open_.init_name != previous_init:
                lines.append("#EXT-X-DISCONTINUITY")
            if open_.init_name != init:
                lines.append(f'#EXT-X-MAP:URI="{open_.init_name}"')
            lines.append(f"#EXT-X-PROGRAM-DATE-TIME:{format_date_time(open_.program_date_time)}")
            lines.extend(_part_lines(open_.parts))
        hint = self.preload_hint
        if hint is not None:
            lines.append(f'#EXT-X-PRELOAD-HINT:TYPE=PART,URI="{hint}"')
        if self.ended:
            lines.append("#EXT-X-ENDLIST")
        self._rendered = ("\n".join(lines) + "\n").encode()
        return self._rendered


def _part_lines(parts: Sequence[Part]) -> list[str]:
    return [f'#EXT-X-PART:DURATION={part.duration:.5f},URI="{part.name}"'
            + (",INDEPENDENT=YES" if part.independent else "") for part in parts]


def rendition_report(uri: str, playlist: MediaPlaylist) -> str | None:
    """``EXT-X-RENDITION-REPORT`` of a sibling rendition (LL-HLS): where its live edge is, so
    a player switching to it can ask for the right part at once."""
    last = playlist.last_part
    if last is None or playlist.ended:
        return None
    return f'#EXT-X-RENDITION-REPORT:URI="{uri}",LAST-MSN={last[0]},LAST-PART={last[1]}'


@dataclass(frozen=True, slots=True)
class Variant:
    """One line of the multivariant playlist."""

    uri: str
    bandwidth: int
    average_bandwidth: int | None
    codecs: Sequence[str]
    resolution: tuple[int, int] | None
    frame_rate: float | None


def render_multivariant(variants: Sequence[Variant]) -> bytes:
    lines = ["#EXTM3U", "#EXT-X-VERSION:7", "#EXT-X-INDEPENDENT-SEGMENTS"]
    for variant in variants:
        attrs = [f"BANDWIDTH={variant.bandwidth}"]
        if variant.average_bandwidth:
            attrs.append(f"AVERAGE-BANDWIDTH={variant.average_bandwidth}")
        attrs.append(f'CODECS="{",".join(variant.codecs)}"')
        if variant.resolution:
            attrs.append(f"RESOLUTION={variant.resolution[0]}x{variant.resolution[1]}")
        if variant.frame_rate:
            attrs.append(f"FRAME-RATE={variant.frame_rate:.3f}")
        lines.append("#EXT-X-STREAM-INF:" + ",".join(attrs))
        lines.append(variant.uri)
    return ("\n".join(lines) + "\n").encode()
