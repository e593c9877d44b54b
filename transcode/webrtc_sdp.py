"""WHEP's SDP: reading a viewer's offer and choosing what to send, editing the answer. Pure.

aiortc announces H.264 in constrained baseline and baseline only, and answers with the
profile-level-id of its own table. A WHEP server passes the publisher's H.264 through, so the
answer must name the profile the *stream* has: ``choose_h264`` picks, from the offer, an H.264
format (packetization-mode 1: we send FU-A and STAP-A) whose decoder can take the stream's
profile, and ``h264_capability`` is the matching entry ``webrtc.py`` registers with aiortc and
prefers on the transceiver, so aiortc's answer carries that format with the offer's payload type.

``add_public_candidates`` adds, for a server behind 1:1 NAT (``[webrtc] public_ip``), a copy of
each IPv4 host candidate with the public address: the viewer's checks reach the host
candidate's port through the NAT, and ICE learns the rest (peer-reflexive candidates).
"""

from __future__ import annotations

from dataclasses import dataclass

from aiortc import sdp as aiortc_sdp

from livesrv.webrtc_offers import OfferError

from .webrtc_rtp import DECODABLE_BY, parse_profile_level_id, profile_name


@dataclass(frozen=True, slots=True)
class Offer:
    description: aiortc_sdp.SessionDescription
    #: the offered H.264 formats: (payload type, parameters)
    h264: list[tuple[int, dict[str, object]]]
    has_opus: bool


#: each profile's canonical profile-level-id, level 3.1 like aiortc's own (the level is
#: advisory here: ``level-asymmetry-allowed`` lets a sender exceed the receiver's level)
CANONICAL_PROFILE_LEVEL_ID = {
    "constrained-baseline": "42e01f",
    "baseline": "42001f",
    "main": "4d001f",
    "constrained-high": "640c1f",
    "high": "64001f",
}


def parse_offer(text: str) -> Offer:
    """The offer's media, validated enough to know what can be sent."""
    if not text.strip():
        raise OfferError(400, "empty body: POST an SDP offer (Content-Type: application/sdp)")
    if not text.lstrip().startswith("v=0"):
        raise OfferError(400, "malformed SDP offer: it must start with v=0")
    try:
        description = aiortc_sdp.SessionDescription.parse(text)
    except (ValueError, KeyError, IndexError, TypeError) as exc:
        raise OfferError(400, f"malformed SDP offer: {exc}") from None
    if not description.media:
        raise OfferError(400, "malformed SDP offer: it has no media sections")
    for media in description.media:
        if not media.ice or not media.ice.usernameFragment or not media.ice.password:
            raise OfferError(400, "malformed SDP offer: a media section lacks ice-ufrag/ice-pwd")
        if media.dtls is None or not media.dtls.fingerprints:
            raise OfferError(400, "malformed SDP offer: a media section lacks a DTLS fingerprint")
    video = [m for m in description.media if m.kind == "video"]
    if not video:
        raise OfferError(415, "the offer has no video section")
    if video[0].direction not in ("recvonly", "sendrecv", None):
        raise OfferError(400, f"the offer's video is {video[0].direction}: WHEP viewers receive")
    h264 = [(codec.payloadType, dict(codec.parameters)) for codec in video[0].rtp.codecs
            if codec.mimeType.lower() == "video/h264"]
    if not h264:
        offered = sorted({c.name for c in video[0].rtp.codecs if c.name.lower() not in ("rtx", "red",
                                                                                          "ulpfec")})
        raise OfferError(415, f"the offer has no H.264 (offered: {', '.join(offered) or 'nothing'}); "
                              "the stream is H.264")
    audio = [m for m in description.media if m.kind == "audio"]
    has_opus = bool(audio) and any(c.mimeType.lower() == "audio/opus" for c in audio[0].rtp.codecs)
    return Offer(description, h264, has_opus)


def stream_profile(profile_level_id: str) -> str:
    """The profile name of the stream's SPS (``webrtc_rtp.profile_level_id``)."""
    raw = bytes.fromhex(profile_level_id)
    name = profile_name(raw[0], raw[1])
    if name is None:
        raise OfferError(415, f"the stream's H.264 profile (profile_idc {raw[0]}) cannot be sent "
                              "to browsers")
    return name


def choose_h264(offer: Offer, source_profile_level_id: str) -> str:
    """The offered profile to answer with for a stream of this profile-level-id."""
    source = stream_profile(source_profile_level_id)
    mode1 = []
    for _pt, params in offer.h264:
        if str(params.get("packetization-mode", "0")) != "1":
            continue
        try:
            name, _level = parse_profile_level_id(str(params.get("profile-level-id", "42e01f")))
        except ValueError:
            continue
        if name is not None:
            mode1.append(name)
    if not mode1:
        raise OfferError(415, "the offer's H.264 lacks packetization-mode=1, which this server sends")
    for candidate in DECODABLE_BY[source]:  # narrowest decoder that can take the stream
        if candidate in mode1:
            return candidate
    raise OfferError(415, f"the stream is H.264 {source} profile; the offer only takes "
                          f"{', '.join(sorted(set(mode1)))}")


def h264_capability_parameters(profile: str) -> dict[str, str]:
    return {"level-asymmetry-allowed": "1", "packetization-mode": "1",
            "profile-level-id": CANONICAL_PROFILE_LEVEL_ID[profile]}


def add_public_candidates(answer: str, public_ip: str) -> str:
    """The answer with a public-address copy of each IPv4 host candidate (1:1 NAT)."""
    description = aiortc_sdp.SessionDescription.parse(answer)
    for media in description.media:
        extra = []
        for candidate in media.ice_candidates:
            if candidate.type == "host" and ":" not in candidate.ip and candidate.ip != public_ip:
                copy = aiortc_sdp.candidate_from_sdp(aiortc_sdp.candidate_to_sdp(candidate))
                copy.ip = public_ip
                copy.foundation = f"{candidate.foundation}p"
                copy.priority = max(candidate.priority - 1, 0)
                extra.append(copy)
        media.ice_candidates.extend(extra)
    return str(description)
