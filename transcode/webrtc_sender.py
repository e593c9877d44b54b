"""aiortc glue: a lean RTP send loop for WHEP senders, whose frames are already RTP payloads.

aiortc's ``RTCRtpSender._run_rtp`` does, for every packet of every viewer, work that only needs
doing once per frame: it builds the header extensions (reading the wall clock for
abs-send-time) and serializes a whole header through ``HeaderExtensionsMap.set``. Profiled at 25
viewers of a 2.5 Mb/s stream, that was about a quarter of the server's CPU. ``install`` puts a
loop on a sender that serializes one header per frame and, per packet, patches the marker bit
and sequence number into a copy of it; everything else is aiortc's own path, unchanged:
``_send_rtp`` (SRTP, ICE), the RTP history that NACKs are answered from (RTX), and the counters
its RTCP sender reports are made from (updated once per frame).

The loop runs in place of a private method and reads private state (name-mangled attributes);
``install`` checks that all of it is there, so an aiortc upgrade that renames any of it fails
at the first WHEP offer, loudly, instead of on air.
"""

from __future__ import annotations

import asyncio
import logging
import struct
from functools import partial
from typing import Any

from aiortc import RTCRtpSender, clock
from aiortc.mediastreams import MediaStreamError
from aiortc.rtcrtpparameters import RTCRtpCodecParameters
from aiortc.rtp import RTP_HISTORY_SIZE, HeaderExtensions, RtpPacket
from aiortc.utils import random16, random32

log = logging.getLogger(__name__)

_PRIVATE = "_RTCRtpSender__"
#: the sender state the loop reads or keeps up to date, as aiortc names it
_STATE = ("rtp_started", "rtp_exited", "rtp_history", "rtp_header_extensions_map", "mid", "track",
          "ntp_timestamp", "rtp_timestamp", "octet_count", "packet_count", "transport")
_SEQUENCE = struct.Struct("!H")


def install(sender: RTCRtpSender) -> None:
    """Have ``sender`` send its track's ``EncodedFrame``s through the lean loop."""
    missing = [name for name in _STATE if not hasattr(sender, _PRIVATE + name)]
    if missing or not hasattr(sender, "_run_rtp"):
        raise RuntimeError(f"this aiortc version's RTCRtpSender lacks {missing or '_run_rtp'}: "
                           "see transcode/webrtc_sender.py")
    sender._run_rtp = partial(_run_rtp, sender)  # type: ignore[method-assign]


async def _run_rtp(sender: RTCRtpSender, codec: RTCRtpCodecParameters) -> None:
    state: Any = sender  # the private attributes, by their mangled names
    getattr(state, _PRIVATE + "rtp_started").set()
    history: dict[int, RtpPacket] = getattr(state, _PRIVATE + "rtp_history")
    extensions_map = getattr(state, _PRIVATE + "rtp_header_extensions_map")
    transport = getattr(state, _PRIVATE + "transport")
    mid = getattr(state, _PRIVATE + "mid")
    payload_type = codec.payloadType
    sequence = random16()
    timestamp_origin = random32()
    try:
        while True:
            track = getattr(state, _PRIVATE + "track")
            if track is None:
                await asyncio.sleep(0.02)
                continue
            frame = await track.recv()
            if not sender._enabled:
                continue  # read on, so frames do not pile up, but send nothing
            payloads = frame.payloads
            if not payloads:
                continue
            timestamp = (timestamp_origin + frame.timestamp) & 0xFFFFFFFF
            extensions = HeaderExtensions(mid=mid, abs_send_time=(clock.current_ntp_time() >> 14) & 0xFFFFFF)
            template = RtpPacket(payload_type=payload_type, timestamp=timestamp, ssrc=sender._ssrc)
            template.extensions = extensions
            header = bytearray(template.serialize(extensions_map))  # the header alone: no payload
            last = len(payloads) - 1
            octets = 0
            for index, payload in enumerate(payloads):
                marker = 1 if index == last else 0
                header[1] = (marker << 7) | payload_type
                _SEQUENCE.pack_into(header, 2, sequence)
                packet = RtpPacket(payload_type, marker, sequence, timestamp, sender._ssrc, payload)
                packet.extensions = extensions
                history[sequence % RTP_HISTORY_SIZE] = packet  # what a NACK is answered from
                await transport._send_rtp(bytes(header) + payload)
                octets += len(payload)
                sequence = (sequence + 1) & 0xFFFF
            # what the next RTCP sender report says, as aiortc keeps it (per frame, not per packet)
            setattr(state, _PRIVATE + "ntp_timestamp", clock.current_ntp_time())
            setattr(state, _PRIVATE + "rtp_timestamp", timestamp)
            setattr(state, _PRIVATE + "octet_count", getattr(state, _PRIVATE + "octet_count") + octets)
            setattr(state, _PRIVATE + "packet_count",
                    getattr(state, _PRIVATE + "packet_count") + len(payloads))
    except (asyncio.CancelledError, ConnectionError, MediaStreamError):
        pass
    except Exception:  # aiortc's stop() waits for rtp_exited: never leave without setting it
        log.exception("WHEP RTP sender failed")
    finally:
        track = getattr(state, _PRIVATE + "track")
        if track is not None:
            track.stop()
            setattr(state, _PRIVATE + "track", None)
        getattr(state, _PRIVATE + "rtp_exited").set()
