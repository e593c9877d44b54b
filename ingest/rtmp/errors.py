"""Errors of the RTMP protocol core, split as h11 and wsproto split them.

``RemoteProtocolError``: the peer sent something we cannot accept (bad bytes, absurd sizes,
limits exceeded, timeouts). ``LocalProtocolError``: our own code asked for something the
protocol does not allow in the current state (a bug on our side). After either, the
connection is in its error state and accepts nothing more.
"""

from __future__ import annotations


class RtmpError(Exception):
    """Base of every error raised by the RTMP core."""


class RemoteProtocolError(RtmpError):
    """The peer broke the protocol or a limit; ``reason`` is short and fit for a log line."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class LocalProtocolError(RtmpError):
    """We tried to do something the protocol does not allow now."""


class AmfError(RemoteProtocolError):
    """Malformed AMF0 (truncated, unknown marker, absurd length, too deep)."""


class ProtocolTimeout(RemoteProtocolError):
    """The peer was silent for too long (handshake or idle)."""
