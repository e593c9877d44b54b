"""VP8 from a WHIP publisher, turned into H.264 once, on a thread of its own.

fMP4 HLS (and the WHEP passthrough) carry H.264, not VP8, so a VP8 publish is decoded and
encoded again here, once per publication: every output downstream then sees an ordinary
H.264 source. The encoder makes a keyframe every ``keyframe_seconds`` of RTP time (HLS cuts
segments there) and no B-frames (WebRTC viewers get it as is).

``Vp8Transcoder(on_output, on_keyframe_needed)``: ``submit(frame, timestamp)`` from the event
loop never blocks: a full queue drops frames up to the next VP8 keyframe and says so through
``on_keyframe_needed``, which the shell turns into a PLI. ``on_output(annexb, timestamp)``
is called on the worker thread with each H.264 access unit (Annex-B, SPS/PPS in-band before
IDRs, as the H.264 passthrough path receives them); the shell hops it onto the loop.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from fractions import Fraction
from typing import Any

import av
from av.video.frame import PictureType

from .whip_media import VIDEO_CLOCK, vp8_is_keyframe

log = logging.getLogger("livesrv.whip")

#: ~2 s of 30 fps video waiting to be transcoded; past that the machine is not keeping up
QUEUE_FRAMES = 60


class Vp8Transcoder:
    def __init__(self, on_output: Callable[[bytes, int], None],
                 on_keyframe_needed: Callable[[], None], *, keyframe_seconds: float = 2.0,
                 bitrate: int = 2_500_000, name: str = "whip-vp8") -> None:
        self._on_output = on_output
        self._on_keyframe_needed = on_keyframe_needed
        self._keyframe_ticks = round(keyframe_seconds * VIDEO_CLOCK)
        self._bitrate = bitrate
        self._queue: queue.Queue[tuple[bytes, int] | None] = queue.Queue(QUEUE_FRAMES)
        self._skip_to_keyframe = True  # a decoder starts at a keyframe
        self._closed = False
        #: frames dropped because the queue was full or the decoder needed a keyframe
        self.dropped = 0
        self.frames_out = 0
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, frame: bytes, timestamp: int) -> None:
        if self._closed:
            return
        if self._skip_to_keyframe:
            if not vp8_is_keyframe(frame):
                self.dropped += 1
                return
            self._skip_to_keyframe = False
        try:
            self._queue.put_nowait((frame, timestamp))
        except queue.Full:
            self.dropped += 1
            self._skip_to_keyframe = True
            log.info("VP8 transcoding is behind; dropping to the next keyframe")
            self._on_keyframe_needed()

    def close(self) -> None:
        """Stop the worker (it finishes the frame at hand; what is queued is dropped)."""
        if self._closed:
            return
        self._closed = True
        while True:
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        self._queue.put(None)

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)

    # -- the worker thread ---------------------------------------------------------------------
    def _run(self) -> None:
        decoder = av.CodecContext.create("vp8", "r")
        encoder: Any = None
        last_key: int | None = None
        try:
            while True:
                item = self._queue.get()
                if item is None:
                    break
                data, timestamp = item
                try:
                    frames = decoder.decode(av.Packet(data))
                except av.FFmpegError as exc:
                    log.info("VP8 frame failed to decode (%s); asking for a keyframe", exc)
                    self._skip_to_keyframe = True
                    self._on_keyframe_needed()
                    continue
                for frame in frames:
                    width, height = frame.width & ~1, frame.height & ~1
                    if encoder is None or (encoder.width, encoder.height) != (width, height):
                        encoder = self._open_encoder(width, height)
                        last_key = None
                    if (frame.width, frame.height) != (width, height) or frame.format.name != "yuv420p":
                        frame = frame.reformat(width, height, "yuv420p")
                    frame.pts = timestamp
                    frame.time_base = encoder.time_base
                    key = last_key is None or timestamp - last_key >= self._keyframe_ticks
                    frame.pict_type = PictureType.I if key else PictureType.NONE
                    if key:
                        last_key = timestamp
                    for packet in encoder.encode(frame):
                        self.frames_out += 1
                        self._on_output(bytes(packet), int(packet.pts))
        except Exception:
            log.exception("VP8 transcoding stopped")
        finally:
            self._closed = True

    def _open_encoder(self, width: int, height: int) -> Any:
        encoder = av.CodecContext.create("libx264", "w")
        encoder.width, encoder.height, encoder.pix_fmt = width, height, "yuv420p"
        encoder.time_base = Fraction(1, VIDEO_CLOCK)
        encoder.framerate = Fraction(30, 1)  # a hint for rate control; timestamps rule
        encoder.bit_rate = self._bitrate
        encoder.thread_count = 1
        # one thread, no lookahead and no B-frames: each frame comes out as it goes in; IDRs
        # only where forced (every keyframe_seconds), with the parameter sets in front
        encoder.options = {"preset": "veryfast", "tune": "zerolatency", "profile": "baseline",
                           "forced-idr": "1", "maxrate": str(self._bitrate),
                           "bufsize": str(self._bitrate),
                           "x264-params": "keyint=infinite:scenecut=0:bframes=0:repeat-headers=1"}
        encoder.open()
        return encoder
