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

Below the sender, each packet used to go down four coroutines (the DTLS transport's
``_send_rtp``, aioice's ``Connection.send`` and ``sendto``, ``StunProtocol.send_data``) to reach
one ``DatagramTransport.sendto``. Per frame, the loop now finds the nominated ICE pair once,
protects each packet with the DTLS transport's SRTP session, and sends the frame's datagrams to
that pair's address on its datagram transport, exactly where those four layers end, in one
segmented send where the kernel allows (``transcode/udp_gso.py``). The DTLS transport's
counters are kept as it keeps them. A pair whose protocol sends differently (a subclass of
aioice's) still goes through aiortc's path, packet by packet.
"""

from __future__ import annotations

import asyncio
import logging
import struct
import time
from functools import partial
from typing import Any

from aioice.ice import StunProtocol
from aiortc import RTCRtpSender
from aiortc.mediastreams import MediaStreamError
from aiortc.rtcdtlstransport import RTCDtlsTransport, State
from aiortc.rtcrtpparameters import RTCRtpCodecParameters
from aiortc.rtp import RTP_HISTORY_SIZE, HeaderExtensions, RtpPacket
from aiortc.utils import random16, random32

from . import udp_gso

log = logging.getLogger(__name__)

_PRIVATE = "_RTCRtpSender__"
#: the sender state the loop reads or keeps up to date, as aiortc names it
_STATE = ("rtp_started", "rtp_exited", "rtp_history", "rtp_header_extensions_map", "mid", "track",
          "ntp_timestamp", "rtp_timestamp", "octet_count", "packet_count", "transport")
_SEQUENCE = struct.Struct("!H")
_NTP_UNIX_OFFSET = 2_208_988_800  # seconds from 1900 (NTP's epoch) to 1970 (the Unix epoch)
_DTLS = "_RTCDtlsTransport__"
#: the DTLS transport's state this module reads or keeps: its SRTP session, its state, the
#: ICE transport's aioice connection (its nominated pairs), and the counters of getStats()
_DTLS_STATE = ("_tx_srtp", "_state", _DTLS + "tx_bytes", _DTLS + "tx_packets")


def install(sender: RTCRtpSender) -> None:
    """Have ``sender`` send its track's ``EncodedFrame``s through the lean loop."""
    missing = [name for name in _STATE if not hasattr(sender, _PRIVATE + name)]
    if missing or not hasattr(sender, "_run_rtp"):
        raise RuntimeError(f"this aiortc version's RTCRtpSender lacks {missing or '_run_rtp'}: "
                           "see transcode/webrtc_sender.py")
    dtls = getattr(sender, _PRIVATE + "transport")
    missing = [name for name in _DTLS_STATE if not hasattr(dtls, name)]
    if missing or not hasattr(dtls.transport, "_connection") or not hasattr(
            dtls.transport._connection, "_nominated"):
        raise RuntimeError(f"this aiortc version's DTLS/ICE transports lack {missing or '_connection'}"
                           ": see transcode/webrtc_sender.py")
    sender._run_rtp = partial(_run_rtp, sender)  # type: ignore[method-assign]


def ntp_now() -> int:
    """The wall clock as a 64-bit NTP timestamp: what ``aiortc.clock.current_ntp_time`` gives,
    without its detour through ``datetime`` (a few µs, twice a frame for every viewer)."""
    now = time.time()
    seconds = int(now)
    return ((seconds + _NTP_UNIX_OFFSET) << 32) | int((now - seconds) * (1 << 32))


def _direct_route(dtls: RTCDtlsTransport) -> tuple[Any, tuple[str, int]] | None:
    """The nominated pair's datagram transport and remote address, where
    ``StunProtocol.send_data`` would do no more than call its ``sendto``; None where aiortc's
    own path must send."""
    pair = dtls.transport._connection._nominated.get(1)
    if pair is None:
        raise ConnectionError("Cannot send data, not connected")  # as aioice says it
    protocol = pair.protocol
    if type(protocol).send_data is not StunProtocol.send_data:
        return None
    return protocol.transport, pair.remote_addr


async def _run_rtp(sender: RTCRtpSender, codec: RTCRtpCodecParameters) -> None:
    state: Any = sender  # the private attributes, by their mangled names
    getattr(state, _PRIVATE + "rtp_started").set()
    history: dict[int, RtpPacket] = getattr(state, _PRIVATE + "rtp_history")
    extensions_map = getattr(state, _PRIVATE + "rtp_header_extensions_map")
    transport = getattr(state, _PRIVATE + "transport")
    mid = getattr(state, _PRIVATE + "mid")
    payload_type = codec.payloadType
    sequence = random16()
    datagram_sender = udp_gso.Sender()
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
            ntp = ntp_now()
            extensions = HeaderExtensions(mid=mid, abs_send_time=(ntp >> 14) & 0xFFFFFF)
            template = RtpPacket(payload_type=payload_type, timestamp=timestamp, ssrc=sender._ssrc)
            template.extensions = extensions
            header = bytearray(template.serialize(extensions_map))  # the header alone: no payload
            if transport._state != State.CONNECTED:  # as RTCDtlsTransport._send_rtp checks
                raise ConnectionError("Cannot send encrypted RTP, not connected")
            route = _direct_route(transport)
            protect = transport._tx_srtp.protect
            last = len(payloads) - 1
            octets = sent = 0
            datagrams: list[bytes] = []
            for index, payload in enumerate(payloads):
                marker = 1 if index == last else 0
                header[1] = (marker << 7) | payload_type
                _SEQUENCE.pack_into(header, 2, sequence)
                packet = RtpPacket(payload_type, marker, sequence, timestamp, sender._ssrc, payload)
                packet.extensions = extensions
                history[sequence % RTP_HISTORY_SIZE] = packet  # what a NACK is answered from
                data = protect(bytes(header) + payload)
                if route is not None:
                    datagrams.append(data)
                else:
                    await transport.transport._send(data)
                octets += len(payload)
                sent += len(data)
                sequence = (sequence + 1) & 0xFFFF
            if route is not None:
                datagram_sender.send(route[0], route[1], datagrams)
            setattr(transport, _DTLS + "tx_bytes", getattr(transport, _DTLS + "tx_bytes") + sent)
            setattr(transport, _DTLS + "tx_packets",
                    getattr(transport, _DTLS + "tx_packets") + len(payloads))
            # what the next RTCP sender report says, as aiortc keeps it (per frame, not per packet)
            setattr(state, _PRIVATE + "ntp_timestamp", ntp)
            setattr(state, _PRIVATE + "rtp_timestamp", timestamp)
            setattr(state, _PRIVATE + "octet_count", getattr(state, _PRIVATE + "octet_count") + octets)
            setattr(state, _PRIVATE + "packet_count",
                    getattr(state, _PRIVATE + "packet_count") + len(payloads))
    except (asyncio.CancelledError, ConnectionError, MediaStreamError):
        pass
    except Exception:  # aiortc's stop() waits for rtp_exited: never leave without setting it
        log.exception("WHEP RTP sender failed")
    finally:
        datagram_sender.close()
        track = getattr(state, _PRIVATE + "track")
        if track is not None:
            track.stop()
            setattr(state, _PRIVATE + "track", None)
        getattr(state, _PRIVATE + "rtp_exited").set()
