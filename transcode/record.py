"""Recordings: a channel's publications written to MP4 files in the data directory, as sent.

Each channel has a switch (``recording_settings`` in the store). When it is on, every
publication of the channel is written, without re-encoding, to
``<root>/<channel>/<YYYYMMDDTHHMMSSZ>.mp4``: the hub's packets go through the same
``Fmp4Writer`` the HLS packager uses into a fragmented MP4 (init segment, then a moof+mdat
fragment every ``fragment_seconds``), appended from a worker thread. A fragmented file is
playable up to its last complete fragment at any moment, so a crash loses at most one
fragment; browsers and PyAV play it as it is.

Memory is bounded by the subscription: packets wait there while a fragment is written, and a
disk too slow to keep up makes the hub skip the recorder to the next keyframe (a gap in the
file, counted) instead of letting a queue grow.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from fractions import Fraction
from pathlib import Path
from typing import Any, BinaryIO

from prometheus_client import Counter, Gauge

from livesrv.config import ConfigError
from livesrv.db import Database
from livesrv.hub import Hub, Stream, Subscription
from livesrv.media import Packet

from .fmp4 import Fmp4Writer, UnsupportedCodec

log = logging.getLogger(__name__)

ACTIVE = Gauge("livesrv_recordings_active", "Publications being recorded now")
RECORDED_BYTES = Counter("livesrv_recording_bytes_total", "Bytes written to recordings")
RECORDINGS = Counter("livesrv_recordings_total", "Recordings started")
GAPS = Counter("livesrv_recording_gaps_total",
               "Times a recorder fell behind (slow disk) and the hub skipped it to the next keyframe")
FAILURES = Counter("livesrv_recording_failures_total", "Recordings stopped by an error (disk full, ...)")

#: a channel name that is safe as a directory name (the accounts' username rule)
CHANNEL_NAME = re.compile(r"^[a-z0-9_][a-z0-9_-]{2,31}$")
#: recording file names: the UTC start time, and a counter when two start in the same second
RECORDING_NAME = re.compile(r"^(\d{8}T\d{6}Z)(?:-(\d{1,4}))?\.mp4$")

MIGRATIONS = [
    {
        "sqlite": """
            CREATE TABLE recording_settings (
                channel TEXT PRIMARY KEY,
                enabled INTEGER NOT NULL DEFAULT 0,
                updated_at REAL NOT NULL
            );
        """,
        "postgresql": """
            CREATE TABLE recording_settings (
                channel TEXT PRIMARY KEY,
                enabled INTEGER NOT NULL DEFAULT 0,
                updated_at DOUBLE PRECISION NOT NULL
            );
        """,
    },
]


@dataclass(frozen=True)
class RecordSettings:
    """The ``[recordings]`` table of the config file."""

    #: length of one fragment: what a crash may lose at most
    fragment_seconds: float = 1.0
    #: the recorder's subscription queue (packets) before the hub skips it to a keyframe
    queue_packets: int = 4096
    #: where recordings go; empty: ``recordings`` in the data directory
    directory: str = ""

    def __post_init__(self) -> None:
        if not 0.2 <= self.fragment_seconds <= 10:
            raise ConfigError("[recordings] fragment_seconds must be between 0.2 and 10")
        if self.queue_packets < 256:
            raise ConfigError("[recordings] queue_packets must be at least 256")


class RecordingStore:
    """The per-channel switch, in the relational store."""

    def __init__(self, db: Database) -> None:
        self.db = db

    async def migrate(self) -> None:
        await self.db.migrate("recordings", MIGRATIONS)

    async def is_enabled(self, channel: str) -> bool:
        value = await self.db.fetchval(
            "SELECT enabled FROM recording_settings WHERE channel = ?", channel)
        return bool(value)

    def is_writing(self, path: Path) -> bool:
        """Whether any recorder still has ``path`` open: the live publication's, one that is
        stopping (its last fragment and fsync still to come), or a replaced publication's that
        is finishing. ``recorder()`` sees only the first, so deleting must ask this."""
        return any(recorder.path == path for recorder in self._running)

    async def set_enabled(self, channel: str, enabled: bool) -> None:
        await self.db.execute(
            "INSERT INTO recording_settings (channel, enabled, updated_at) VALUES (?, ?, ?)"
            " ON CONFLICT (channel) DO UPDATE SET enabled = excluded.enabled,"
            " updated_at = excluded.updated_at",
            channel, int(enabled), time.time())


@dataclass(frozen=True, slots=True)
class RecordingFile:
    name: str
    path: Path
    size: int
    started: datetime
    #: seconds of media in the file (None when it holds no complete fragment)
    duration: float | None
    active: bool

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "size": self.size, "started": self.started.isoformat(),
                "duration": None if self.duration is None else round(self.duration, 3),
                "active": self.active}


# -- one publication ------------------------------------------------------------------------
class Recorder:
    """Writes one publication to one file. ``run()`` returns when the stream ends or
    ``stop()`` is called; the file is then complete up to the last packet."""

    def __init__(self, stream: Stream, subscription: Subscription, writer: Fmp4Writer,
                 path: Path, settings: RecordSettings) -> None:
        self.stream = stream
        self.path = path
        self._subscription = subscription
        self._writer = writer
        self._clock_kind = writer.main_kind
        self._has_video = self._clock_kind == "video"
        self._clock_base = writer.main_time_base
        self._fragment_ticks = Fraction(settings.fragment_seconds) / self._clock_base
        self._started = False
        #: per kind: what is subtracted from timestamps so the file starts at 0
        self._offsets: dict[str, int] = {}
        self._fragment_start = 0
        self._last_clock = 0
        self._pending: list[bytes] = []
        self._file: BinaryIO | None = None
        self.bytes_written = 0
        self.stopping = False
        self._fragments = 0

    @property
    def duration(self) -> float:
        """Seconds recorded so far (on the main track's clock)."""
        return float(self._last_clock * self._clock_base)

    def stop(self) -> None:
        """End the recording where it is (the file is completed in the background)."""
        self.stopping = True
        self._subscription.close()

    async def run(self) -> None:
        subscription = self._subscription
        ACTIVE.inc()
        RECORDINGS.inc()
        try:
            self.path, self._file = await asyncio.to_thread(_create, self.path)
            log.info("channel %s: recording to %s", self.stream.channel, self.path)
            self._pending.append(self._writer.init_segment())
            dropped = 0
            while True:
                packet = await subscription.get()
                if packet is None:
                    break
                if subscription.dropped != dropped:
                    # we fell behind and the hub skipped packets: no sample may span the hole
                    dropped = subscription.dropped
                    GAPS.inc()
                    self._cut(None)
                self._feed(packet)
                for packet in subscription.drain():
                    self._feed(packet)
                if self._pending:
                    await self._write()
            self._cut(None)
            await self._write()
        except OSError as exc:
            FAILURES.inc()
            log.error("channel %s: recording to %s stopped: %s", self.stream.channel, self.path, exc)
        finally:
            subscription.close()
            ACTIVE.dec()
            if self._file is not None:
                # the end of a recording is worth a sync: it is what "ready to publish" means;
                # a file that got no media (stopped at once) is not a recording: removed
                await asyncio.to_thread(_close, self._file, None if self._fragments else self.path)
                log.info("channel %s: recording %s ended (%.1f s, %d bytes)", self.stream.channel,
                         self.path.name, self.duration, self.bytes_written)

    def _feed(self, packet: Packet) -> None:
        kind = packet.kind
        if not self._started:
            if self._has_video and not (kind == "video" and packet.keyframe):
                return  # a file starts with a keyframe: nothing before the first one
            self._begin(packet)
        offset = self._offsets[kind]
        if offset:
            packet = Packet(kind, packet.dts - offset, packet.pts - offset, packet.keyframe,
                            packet.data)
        if kind == self._clock_kind:
            # a fragment is cut when the packet after it arrives: its last sample's duration is exact
            if packet.dts - self._fragment_start >= self._fragment_ticks:
                self._cut(packet.dts)
                self._fragment_start = packet.dts
            self._last_clock = max(self._last_clock, packet.dts)
        self._writer.add(packet)

    def _begin(self, first: Packet) -> None:
        """Rebase every track so the file starts at 0 wherever the publication's clock was."""
        self._started = True
        start = first.dts * Fraction(self.stream.info.track(first.kind).time_base)  # type: ignore[union-attr]
        for track in (self.stream.info.video, self.stream.info.audio):
            if track is not None:
                self._offsets[track.kind] = int(start / Fraction(track.time_base))

    def _cut(self, end_dts: int | None) -> None:
        fragment = self._writer.flush(end_dts)
        if fragment:
            self._pending.append(fragment)
            self._fragments += 1

    async def _write(self) -> None:
        data = b"".join(self._pending)
        self._pending.clear()
        if not data:
            return
        assert self._file is not None
        await asyncio.to_thread(_append, self._file, data)
        self.bytes_written += len(data)
        RECORDED_BYTES.inc(len(data))


def _create(path: Path) -> tuple[Path, BinaryIO]:
    """A new file at ``path``, or at ``STAMP-N.mp4`` beside it when that name is taken."""
    path.parent.mkdir(parents=True, exist_ok=True)
    match = RECORDING_NAME.match(path.name)
    stamp, counter = (match.group(1), int(match.group(2) or 1)) if match else (path.stem, 1)
    while True:
        try:
            return path, open(path, "xb", buffering=0)  # x: an existing file is never overwritten
        except FileExistsError:
            counter += 1
            if counter > 9999:
                raise
            path = path.with_name(f"{stamp}-{counter}.mp4")


def _append(file: BinaryIO, data: bytes) -> None:
    view = memoryview(data)
    while view:  # an unbuffered write may be partial
        written = file.write(view)
        view = view[written or 0:]


def _close(file: BinaryIO, remove: Path | None) -> None:
    try:
        os.fsync(file.fileno())
    except OSError:
        pass
    file.close()
    if remove is not None:
        remove.unlink(missing_ok=True)


# -- every channel ------------------------------------------------------------------------------
class RecordingService:
    """Starts a recorder for each publication of a channel whose switch is on."""

    def __init__(self, hub: Hub, store: RecordingStore, root: Path, settings: RecordSettings) -> None:
        self.hub = hub
        self.store = store
        self.root = root
        self.settings = settings
        #: the recorder of each channel's current publication
        self._current: dict[str, Recorder] = {}
        #: every recorder still writing (one of a replaced publication may still be finishing)
        self._running: set[Recorder] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        #: per channel: (how many times switched here, the latest value)
        self._switched: dict[str, tuple[int, bool]] = {}
        self._closed = False

    def start(self) -> None:
        self.hub.add_listener(on_start=self._on_start)
        for stream in self.hub.streams():
            self._on_start(stream)

    async def close(self) -> None:
        """Stop every recorder and wait until its file is complete."""
        self._closed = True
        for recorder in list(self._running):
            recorder.stop()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    def recorder(self, channel: str) -> Recorder | None:
        """The recorder of the channel's live publication, if it is being recorded."""
        recorder = self._current.get(channel)
        if recorder is None or recorder.stopping or recorder.stream.ended:
            return None
        return recorder

    def is_writing(self, path: Path) -> bool:
        """Whether any recorder still has ``path`` open: the live publication's, one that is
        stopping (its last fragment and fsync still to come), or a replaced publication's that
        is finishing. ``recorder()`` sees only the first, so deleting must ask this."""
        return any(recorder.path == path for recorder in self._running)

    async def set_enabled(self, channel: str, enabled: bool) -> None:
        """Persist the switch and apply it now: a live channel starts or stops recording."""
        await self.store.set_enabled(channel, enabled)
        # a publication whose start is still asking the store must see this answer, not the
        # one it may have read just before
        self._switched[channel] = (self._switched.get(channel, (0, enabled))[0] + 1, enabled)
        recorder = self.recorder(channel)
        if not enabled and recorder is not None:
            recorder.stop()
        elif enabled and recorder is None:
            stream = self.hub.get(channel)
            if stream is not None and not self._closed:
                # from the cached keyframe on: the recording begins at once, not at the next GOP
                self._begin(stream, stream.subscribe("record", maxsize=self.settings.queue_packets))

    # -- hub events -------------------------------------------------------------------------
    def _on_start(self, stream: Stream) -> None:
        if self._closed or not CHANNEL_NAME.match(stream.channel):
            return
        # Subscribed now, so the first packets wait in the queue while the store answers.
        subscription = stream.subscribe("record", maxsize=self.settings.queue_packets)
        self._spawn(self._record_if_enabled(stream, subscription), stream.channel)

    def _spawn(self, coro: Any, channel: str) -> None:
        task = asyncio.get_running_loop().create_task(coro, name=f"record {channel}")
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("a recorder failed", exc_info=task.exception())

    async def _record_if_enabled(self, stream: Stream, subscription: Subscription) -> None:
        switched = self._switched.get(stream.channel)
        try:
            enabled = await self.store.is_enabled(stream.channel)
        except Exception:
            subscription.close()
            raise
        latest = self._switched.get(stream.channel)
        if latest is not None and latest is not switched:
            enabled = latest[1]
        current = self._current.get(stream.channel)
        # (a stream that ended meanwhile is still recorded: its packets wait in the queue)
        if not enabled or self._closed or (current is not None and current.stream is stream):
            subscription.close()  # off, or switched on meanwhile and already recording
            return
        self._begin(stream, subscription)

    def _begin(self, stream: Stream, subscription: Subscription) -> None:
        """Start recording now (synchronously registered, so no second recorder can start)."""
        try:
            writer = Fmp4Writer(stream.info)
        except UnsupportedCodec as exc:
            subscription.close()
            log.warning("channel %s cannot be recorded: %s", stream.channel, exc)
            return
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
        taken = {r.path for r in self._running}
        path = self.root / stream.channel / f"{stamp}.mp4"
        counter = 1
        while path in taken:
            counter += 1
            path = path.with_name(f"{stamp}-{counter}.mp4")
        recorder = Recorder(stream, subscription, writer, path, self.settings)
        self._current[stream.channel] = recorder
        self._running.add(recorder)
        self._spawn(self._run(recorder), stream.channel)

    async def _run(self, recorder: Recorder) -> None:
        try:
            await recorder.run()
        finally:
            self._running.discard(recorder)
            if self._current.get(recorder.stream.channel) is recorder:
                del self._current[recorder.stream.channel]

    # -- the files --------------------------------------------------------------------------
    def path_for(self, channel: str, name: str) -> Path | None:
        """The file of a recording, or None for a name that is not one (never outside root)."""
        if not CHANNEL_NAME.match(channel) or not RECORDING_NAME.match(name):
            return None
        path = self.root / channel / name
        return path if path.is_file() else None

    def list_files(self, channel: str) -> list[RecordingFile]:
        """The channel's recordings, newest first (blocking file I/O: call from a thread)."""
        if not CHANNEL_NAME.match(channel):
            return []
        directory = self.root / channel
        active = {r.path: r for r in self._running}
        files = []
        try:
            entries = list(os.scandir(directory))
        except FileNotFoundError:
            return []
        for entry in entries:
            match = RECORDING_NAME.match(entry.name)
            if match is None or not entry.is_file():
                continue
            path = Path(entry.path)
            try:
                size = entry.stat().st_size
            except FileNotFoundError:
                continue  # gone since the scan: deleted, or a recording that got no media
            recorder = active.get(path)
            duration = recorder.duration if recorder is not None else _cached_duration(path)
            started = datetime.strptime(match.group(1), "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC)
            files.append(RecordingFile(entry.name, path, size, started, duration, recorder is not None))
        files.sort(key=_start_order, reverse=True)
        return files


def _start_order(file: RecordingFile) -> tuple[str, int]:
    match = RECORDING_NAME.match(file.name)
    assert match is not None
    return match.group(1), int(match.group(2) or 1)  # "X-2.mp4" began after "X.mp4"


# -- reading a fragmented MP4 back (durations for the listing) -----------------------------------
_durations: dict[tuple[Path, int, int], float | None] = {}


def _cached_duration(path: Path) -> float | None:
    try:
        stat = path.stat()
    except OSError:
        return None
    key = (path, stat.st_size, stat.st_mtime_ns)
    if key not in _durations:
        if len(_durations) > 1024:
            _durations.clear()
        try:
            _durations[key] = fragmented_duration(path)
        except OSError:
            return None
    return _durations[key]


def _boxes(data: bytes | memoryview, start: int = 0, end: int | None = None
           ) -> Iterator[tuple[bytes, int, int]]:
    """(type, body start, body end) of each box in ``data[start:end]``; stops at a torn box."""
    end = len(data) if end is None else end
    while start + 8 <= end:
        size, kind = struct.unpack_from(">I4s", data, start)
        header = 8
        if size == 1 and start + 16 <= end:
            size = struct.unpack_from(">Q", data, start + 8)[0]
            header = 16
        elif size == 0:
            size = end - start
        if size < header or start + size > end:
            return
        yield bytes(kind), start + header, start + size
        start += size


def _find(data: bytes, path: tuple[bytes, ...], start: int = 0, end: int | None = None
          ) -> tuple[int, int] | None:
    for kind, body, body_end in _boxes(data, start, end):
        if kind == path[0]:
            return (body, body_end) if len(path) == 1 else _find(data, path[1:], body, body_end)
    return None


def _first_track(moov: bytes) -> tuple[int, int] | None:
    """(track_id, timescale) of the movie's first track."""
    tkhd = _find(moov, (b"trak", b"tkhd"))
    mdhd = _find(moov, (b"trak", b"mdia", b"mdhd"))
    if tkhd is None or mdhd is None:
        return None
    version = moov[tkhd[0]]
    track_id = struct.unpack_from(">I", moov, tkhd[0] + (20 if version == 1 else 12))[0]
    version = moov[mdhd[0]]
    timescale = struct.unpack_from(">I", moov, mdhd[0] + (20 if version == 1 else 12))[0]
    return track_id, timescale


def _fragment_span(moof: bytes, track_id: int) -> tuple[int, int] | None:
    """(decode time of the first sample, total sample duration) of a track in one moof."""
    for kind, body, end in _boxes(moof):
        if kind != b"traf":
            continue
        tfhd = _find(moof, (b"tfhd",), body, end)
        if tfhd is None:
            continue
        flags = int.from_bytes(moof[tfhd[0] + 1:tfhd[0] + 4], "big")
        if struct.unpack_from(">I", moof, tfhd[0] + 4)[0] != track_id:
            continue
        at = tfhd[0] + 8 + (8 if flags & 0x01 else 0) + (4 if flags & 0x02 else 0)
        default_duration = struct.unpack_from(">I", moof, at)[0] if flags & 0x08 else 0
        tfdt = _find(moof, (b"tfdt",), body, end)
        if tfdt is None:
            return None
        if moof[tfdt[0]] == 1:
            base = struct.unpack_from(">Q", moof, tfdt[0] + 4)[0]
        else:
            base = struct.unpack_from(">I", moof, tfdt[0] + 4)[0]
        total = 0
        for run_kind, run, _ in _boxes(moof, body, end):
            if run_kind != b"trun":
                continue
            run_flags = int.from_bytes(moof[run + 1:run + 4], "big")
            count = struct.unpack_from(">I", moof, run + 4)[0]
            at = run + 8 + (4 if run_flags & 0x01 else 0) + (4 if run_flags & 0x04 else 0)
            fields = bin(run_flags & 0xF00).count("1")
            if run_flags & 0x100:
                total += sum(struct.unpack_from(f">{count * fields}I", moof, at)[::fields])
            else:
                total += default_duration * count
        return base, total
    return None


def fragmented_duration(path: Path) -> float | None:
    """Seconds of media in a fragmented MP4, from its first track's fragment headers only (the
    media data is skipped); a torn last fragment (a crash mid-write) is not counted."""
    with open(path, "rb") as file:
        total_size = os.fstat(file.fileno()).st_size
        offset = 0
        track: tuple[int, int] | None = None
        first: int | None = None
        end = 0
        pending: tuple[int, int] | None = None
        while offset + 8 <= total_size:
            file.seek(offset)
            header = file.read(16)
            size, kind = struct.unpack_from(">I4s", header)
            if size == 1 and len(header) == 16:
                size = struct.unpack_from(">Q", header, 8)[0]
            elif size == 0:
                size = total_size - offset
            if size < 8 or offset + size > total_size:
                break
            if kind in (b"moov", b"moof") and size <= 16 * 1024 * 1024:
                file.seek(offset)
                box_data = file.read(size)
                body = box_data[16:] if box_data[:4] == b"\x00\x00\x00\x01" else box_data[8:]
                if kind == b"moov":
                    track = _first_track(body)
                elif track is not None:
                    pending = _fragment_span(body, track[0])
            elif kind == b"mdat" and pending is not None:
                # a fragment counts once its media data is whole
                if first is None:
                    first = pending[0]
                end = max(end, pending[0] + pending[1])
                pending = None
            offset += size
    if track is None or first is None or not track[1]:
        return None
    return (end - first) / track[1]
