"""The ABR ladder: each live stream's video decoded once, scaled and encoded into lower rungs
(libx264 through PyAV), each rung a rendition of the publication in the hub.

    hub Stream --subscription--> feeder task --Inbox--> LadderWorker thread --events--> loop
                                                         decode once                    rung Streams
                                                         per rung: scale, encode        (add_rendition)

- One worker thread per stream does all the CPU work (PyAV releases the GIL in decode, swscale
  and x264), shared by every output: HLS packages the rung Streams like any other. Rungs are
  scaled largest first, each from the next larger rung's picture (``cascade``): the source
  is read by one scaler only.
- Keyframes are aligned across rungs: x264 never places a keyframe by itself (infinite keyint,
  no scenecut) and gets a forced IDR on exactly the frames decoded from the source's
  keyframes, with the source's timestamps, so the HLS packager cuts every rung at the same
  timestamps as the source.
- Rungs have no B-frames: browsers' and WebRTC's decoders prefer none, dts equals pts, and the
  encoder adds no reordering delay.
- Audio: AAC is passed through (the same packets); anything else (Opus from WHIP) is decoded
  and encoded to AAC once for all rungs.
- Falling behind: the worker measures its lag behind the source and each rung's cost; a
  ``Governor`` drops the most expensive rung when lag grows and adds it back with hysteresis.
  The feeder's queue is bounded in media time: past it the worker skips to the next keyframe.

This module is the event-loop side (``LadderService``, one ``Ladder`` per stream, metrics);
``ladder_settings`` holds the config and the plan, ``ladder_worker`` the thread,
``ladder_governor`` the drop/restore decisions, ``annexb`` the H.264 framing conversions.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from fractions import Fraction
from typing import Any

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from livesrv.hub import Hub, Stream

from .ladder_settings import LadderSettings, RungPlan, RungSpec, output_fps, plan_ladder, source_picture
from .ladder_worker import Event, Inbox, LadderWorker

__all__ = ["Inbox", "Ladder", "LadderCollector", "LadderService", "LadderSettings", "LadderWorker",
           "RungPlan", "RungSpec", "output_fps", "plan_ladder", "source_picture"]

log = logging.getLogger(__name__)


# -- the event-loop side ----------------------------------------------------------------------
class Ladder:
    """The ladder of one publication: feeds its worker and publishes the rungs it produces."""

    def __init__(self, stream: Stream, plans: list[RungPlan], settings: LadderSettings) -> None:
        assert stream.info.video is not None
        self.stream = stream
        self.plans = plans
        self.settings = settings
        ticks = int(settings.queue_seconds / Fraction(stream.info.video.time_base))
        self.inbox = Inbox(ticks)
        self.outputs: dict[str, Stream] = {}
        self.worker: LadderWorker | None = None
        self.finished = asyncio.Event()
        self._feeder: asyncio.Task[None] | None = None
        self._subscription: Any = None

    @property
    def channel(self) -> str:
        return self.stream.channel

    def start(self) -> None:
        """Subscribe, start the worker and the feeder; on failure nothing is left behind."""
        loop = asyncio.get_running_loop()
        # queued packets are bounded by the inbox in media time; this only needs to hold what
        # arrives between two turns of the feeder
        self._subscription = subscription = self.stream.subscribe("ladder", maxsize=1024)

        def deliver(events: list[Event]) -> None:  # called from the worker thread
            try:
                loop.call_soon_threadsafe(self._apply, events)
            except RuntimeError:
                pass  # the loop is closed: nobody is left to receive

        try:
            self.worker = LadderWorker(self.channel, self.stream.info, self.plans, self.settings,
                                       self.inbox, deliver)
            self.worker.start()
            self._feeder = loop.create_task(self._feed(subscription),
                                            name=f"ladder feed {self.channel}")
        except BaseException:
            self._release()
            raise
        log.info("ladder of %s: %s", self.channel,
                 ", ".join(f"{p.name} {p.width}x{p.height}@{p.fps or p.max_fps:g}" for p in self.plans))

    async def _feed(self, subscription: Any) -> None:
        try:
            while True:
                packet = await subscription.get()
                if packet is None:
                    break
                batch = subscription.drain()
                batch.insert(0, packet)
                self.inbox.put(batch)
        finally:
            subscription.close()
            self.inbox.close()

    def _apply(self, events: list[Event]) -> None:
        outputs = self.outputs
        for event in events:
            kind = event[0]
            if kind == "video":
                target = outputs.get(event[1])
                if target is not None:
                    target.push(event[2])
            elif kind == "audio":
                packet = event[1]
                for target in outputs.values():
                    target.push(packet)
            elif kind == "start":
                if not self.stream.ended:
                    outputs[event[1]] = self.stream.add_rendition(event[1], event[2])
            elif kind == "stop":
                outputs.pop(event[1], None)
                self.stream.remove_rendition(event[1], event[2])
            elif kind == "end":
                # The worker is gone (stream over, or it failed): a feeder left running would
                # keep a subscription draining every packet into a closed inbox until the
                # stream ends, out of sight of LadderService.close().
                self._release()

    def _release(self) -> None:
        """Let go of the stream now: no more packets taken, the worker told to drop what it
        has (a no-op after a normal end, where all of this already happened)."""
        if self._subscription is not None:
            self._subscription.close()
        self.inbox.close(abort=True)
        if self._feeder is not None:
            self._feeder.cancel()
        self.finished.set()

    async def stop(self) -> None:
        """Stop now (shutdown): the worker drops what is queued and exits."""
        self.inbox.close(abort=True)
        if self._feeder is not None and not self._feeder.done():
            self._feeder.cancel()
            await asyncio.gather(self._feeder, return_exceptions=True)
        if self.worker is not None:
            await asyncio.to_thread(self.worker.join)
        self.finished.set()

    def describe(self) -> list[dict[str, Any]]:
        """Per rung: active, encode fps, lag and cost (for metrics and tests)."""
        worker = self.worker
        if worker is None:
            return []
        return [{"rung": name, "active": rung.active, "fps": rung.fps, "frames": rung.frames_out,
                 "lag": worker.rung_lag(rung) if rung.active else 0.0,
                 "cost": rung.seconds_per_second()}
                for name, rung in worker.rungs.items()]


class LadderService:
    """Runs a ``Ladder`` for every live stream whose video is above its smallest rung."""

    def __init__(self, hub: Hub, settings: LadderSettings) -> None:
        self.hub = hub
        self.settings = settings
        self._ladders: dict[Stream, Ladder] = {}
        self._closed = False
        self.collector = LadderCollector(self)

    def start(self) -> None:
        self.hub.add_listener(on_start=self._on_start)
        for stream in self.hub.streams():
            self._on_start(stream)

    def ladders(self) -> list[Ladder]:
        return list(self._ladders.values())

    def ladder(self, channel: str) -> Ladder | None:
        return next((ladder for ladder in self._ladders.values() if ladder.channel == channel), None)

    def _on_start(self, stream: Stream) -> None:
        if self._closed or not self.settings.enabled or stream.info.video is None:
            return
        picture = source_picture(stream.info.video)
        if picture is None:
            log.warning("ladder: %s has a video track of unknown size; no rungs", stream.channel)
            return
        plans = plan_ladder(self.settings, *picture)
        if not plans:
            return  # the source is already the smallest rendition we would offer
        try:
            ladder = Ladder(stream, plans, self.settings)
            ladder.start()  # releases what it took if it fails
        except Exception:
            log.exception("ladder of %s could not start; no rungs", stream.channel)
            return
        # registered only once running: close() stops what is registered, and a ladder that
        # never started has nothing to stop
        self._ladders[stream] = ladder
        task = asyncio.get_running_loop().create_task(ladder.finished.wait())
        task.add_done_callback(lambda _: self._remove(stream, ladder))

    def _remove(self, stream: Stream, ladder: Ladder) -> None:
        if self._ladders.get(stream) is ladder:
            del self._ladders[stream]

    async def close(self) -> None:
        self._closed = True
        ladders = list(self._ladders.values())
        self._ladders.clear()
        await asyncio.gather(*(ladder.stop() for ladder in ladders), return_exceptions=True)


class LadderCollector(Collector):
    """Per-rung gauges read from the running ladders at scrape time."""

    def __init__(self, service: LadderService) -> None:
        self.service = service

    def collect(self) -> Iterator[GaugeMetricFamily]:
        fps = GaugeMetricFamily("livesrv_ladder_encode_fps", "Frames per second each rung encodes",
                                labels=["channel", "rung"])
        lag = GaugeMetricFamily("livesrv_ladder_lag_seconds",
                                "How far each rung's output is behind the newest source packet "
                                "(includes the encoder's own delay of a few frames)",
                                labels=["channel", "rung"])
        cost = GaugeMetricFamily("livesrv_ladder_encode_load",
                                 "Worker seconds each rung costs per second of media",
                                 labels=["channel", "rung"])
        active = GaugeMetricFamily("livesrv_ladder_rungs_active", "Ladder rungs being encoded now",
                                   labels=["channel"])
        busy = GaugeMetricFamily("livesrv_ladder_worker_busy_ratio",
                                 "Fraction of time each ladder worker is busy", labels=["channel"])
        total = 0
        for ladder in self.service.ladders():
            rows = ladder.describe()
            count = 0
            for row in rows:
                if row["active"]:
                    count += 1
                    fps.add_metric([ladder.channel, row["rung"]], row["fps"])
                    lag.add_metric([ladder.channel, row["rung"]], row["lag"])
                    cost.add_metric([ladder.channel, row["rung"]], row["cost"])
            active.add_metric([ladder.channel], count)
            if ladder.worker is not None:
                busy.add_metric([ladder.channel], ladder.worker.busy)
            total += count
        yield fps
        yield lag
        yield cost
        yield active
        yield busy
        yield GaugeMetricFamily("livesrv_ladder_rungs_active_total", "Ladder rungs encoded now, all channels",
                                value=total)
