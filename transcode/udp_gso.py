"""A frame's datagrams to one peer in as few system calls as the kernel allows (UDP GSO).

A video frame leaves as ~10 RTP packets, nearly all the same size (H.264 fragments cut at the
same length; each gets the same SRTP tag). Linux's UDP segmentation offload (``UDP_SEGMENT``,
4.18+) takes one buffer and a segment size, and sends it as that many datagrams: one ``sendmsg``
in place of one ``sendto`` each, with the per-call and per-route work done once. Measured on
loopback (``bench/udp_gso_loopback.py``), a 9-packet frame: 39.6 µs as nine ``sendto`` calls,
16.7 µs as one segmented send, receiving included.

The kernel's rule: every segment of a send is the segment size, except the last, which may be
shorter. :func:`segment_runs` (pure) cuts a frame's packets into runs that follow it;
:func:`send_datagrams` sends them on the asyncio transport's socket, and falls back to the
transport's own ``sendto`` (per packet) wherever segmentation cannot be used: a transport that
holds unsent datagrams (order first), one without a socket (aioice's TURN relay), a kernel that
refuses the option, or a full socket buffer (the transport queues the rest).
"""

from __future__ import annotations

import asyncio
import logging
import socket
import struct
from collections.abc import Sequence

log = logging.getLogger(__name__)

#: Linux's UDP_SEGMENT socket option (Python names it from 3.12 on)
UDP_SEGMENT = getattr(socket, "UDP_SEGMENT", 103)
#: the kernel's UDP_MAX_SEGMENTS
MAX_SEGMENTS = 64
#: what one UDP datagram (the whole segmented send) can carry
MAX_BYTES = 65_507
_SEGMENT_SIZE = struct.Struct("=H")


def segment_runs(sizes: Sequence[int]) -> list[tuple[int, int]]:
    """``(start, end)`` runs of packets that one segmented send can carry, in order: every
    packet of a run the size of its first, except a last one that may be smaller."""
    runs: list[tuple[int, int]] = []
    start, count = 0, len(sizes)
    while start < count:
        size = sizes[start]
        most = min(MAX_SEGMENTS, MAX_BYTES // size) if size else 1
        end = start + 1
        while end < count and end - start < most and sizes[end] == size:
            end += 1
        if end < count and end - start < most and sizes[end] < size:
            end += 1  # a shorter last segment
        runs.append((start, end))
        start = end
    return runs


class Sender:
    """Sends one peer's frames of datagrams; remembers that the kernel refused segmentation.

    It keeps a socket object on the transport's descriptor (building one costs system calls)
    and checks the transport before every send: a closing transport sends nothing more, and its
    descriptor may soon be another socket's. ``close`` lets go of the socket object without
    closing the descriptor."""

    def __init__(self) -> None:
        self.segmenting = True
        self._transport: asyncio.DatagramTransport | None = None
        self._socket: socket.socket | None = None

    def close(self) -> None:
        if self._socket is not None:
            self._socket.detach()  # the descriptor stays the transport's
        self._transport = self._socket = None

    def _socket_for(self, transport: asyncio.DatagramTransport) -> socket.socket | None:
        if transport is not self._transport:  # (send has checked that it is not closing)
            self.close()
            self._transport, self._socket = transport, _socket_of(transport)
        return self._socket

    def send(self, transport: asyncio.DatagramTransport, addr: tuple[str, int],
             datagrams: Sequence[bytes]) -> None:
        closing = getattr(transport, "is_closing", None)  # aioice's TURN transport has none
        if closing is not None and closing():
            self.close()
            return  # the ICE pair is going away: nothing more goes out on it
        sock = self._socket_for(transport) if self.segmenting and len(datagrams) > 1 else None
        if sock is None or transport.get_write_buffer_size():
            for datagram in datagrams:
                transport.sendto(datagram, addr)
            return
        done = 0
        try:
            for start, end in segment_runs([len(datagram) for datagram in datagrams]):
                if end - start == 1:
                    sock.sendto(datagrams[start], addr)
                else:
                    option = _SEGMENT_SIZE.pack(len(datagrams[start]))
                    sock.sendmsg(datagrams[start:end], [(socket.SOL_UDP, UDP_SEGMENT, option)],
                                 0, addr)
                done = end
        except BlockingIOError:
            pass  # the socket buffer is full: the transport queues the rest
        except OSError as exc:
            self.segmenting = False
            self.close()
            log.warning("UDP segmentation offload refused (%s): sending one datagram a call", exc)
        for datagram in datagrams[done:]:
            transport.sendto(datagram, addr)


def _socket_of(transport: asyncio.DatagramTransport) -> socket.socket | None:
    """A socket object on the transport's descriptor (to be detached, never closed), or None:
    aioice's TURN relay transport has no socket (and no more than ``sendto`` and
    ``get_extra_info`` of a transport's methods)."""
    pseudo = transport.get_extra_info("socket")
    if pseudo is None:
        return None
    try:
        return socket.socket(pseudo.family, socket.SOCK_DGRAM, 0, pseudo.fileno())
    except (OSError, AttributeError, TypeError):
        return None
