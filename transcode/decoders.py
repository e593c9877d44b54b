"""One place that turns a hub ``Track`` into a PyAV decoder: the ladder, thumbnails and WebRTC
egress all decode what publishers send, and must agree on which FFmpeg decoder serves which
hub codec name and on how the track's extradata reaches it."""

from __future__ import annotations

from typing import Any

import av

from livesrv.media import Track

#: FFmpeg decoder for each hub video codec name. AV1 needs dav1d: FFmpeg's own "av1" decoder
#: only works through a hardware accelerator. Codecs not listed (audio) use FFmpeg's default.
DECODERS = {"h264": "h264", "hevc": "hevc", "av1": "libdav1d", "vp8": "vp8", "vp9": "vp9"}


class DecoderError(Exception):
    """No decoder for the track: FFmpeg lacks the codec, or refuses its extradata."""


def create_decoder(track: Track) -> Any:
    """A decoding ``CodecContext`` for ``track`` with its extradata (avcC, hvcC, av1C,
    AudioSpecificConfig...) set. Threading is left to the caller: what suits a continuous
    decode (the ladder) holds frames back from a one-keyframe decode (thumbnails)."""
    name = DECODERS.get(track.codec, track.codec)
    try:
        context = av.CodecContext.create(name, "r")
        if track.extradata:
            context.extradata = track.extradata
    except (av.FFmpegError, ValueError) as exc:  # UnknownCodecError is a ValueError
        raise DecoderError(f"cannot open a {track.codec} decoder: {exc}") from exc
    return context
