"""What WHIP (ingest) and WHEP (transcode) share about the offers they answer: the size limit
of an SDP offer, and a refusal that carries its HTTP status and a reason for the peer."""

from __future__ import annotations

#: an offer is a few kilobytes; anything much larger is not an SDP offer
MAX_OFFER_BYTES = 64 * 1024


class Refused(Exception):
    """A publish or a play refused: ``status`` is the HTTP answer, ``reason`` is meant for the
    publisher's or viewer's eyes."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


class OfferError(Refused, ValueError):
    """The SDP offer itself cannot be answered."""
