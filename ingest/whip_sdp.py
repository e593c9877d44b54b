"""What a WHIP offer must hold before a peer connection is spent on it (sans-IO).

``check_offer(text)`` reads an SDP offer just far enough to refuse, with a reason a person
can act on, what the WebRTC stack would otherwise refuse with an opaque error or accept and
then never publish: not SDP at all, no ICE credentials or DTLS fingerprint, an offer that
does not send, more than one audio or video track, data channels, or no codec we take in.

What we take in (``ACCEPTED``): H.264 with packetization-mode 1 in a Baseline-compatible
profile (passed through to the hub as is), VP8 (decoded and encoded to H.264 once, since
fMP4 HLS cannot carry it), and Opus audio (passed through). H.264 Main/High offers are not
negotiable with aiortc's receiver, so an offer of only those is refused here, by name.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from aiortc.sdp import H264Profile, parse_h264_profile_level_id

from livesrv.webrtc_offers import OfferError

ACCEPTED = ("H.264 (packetization-mode=1, Constrained Baseline or Baseline profile) or VP8 video, "
            "Opus audio")


@dataclass
class MediaSection:
    kind: str  # "audio", "video", "application", ...
    port: int
    #: payload type -> (encoding name upper-cased, clock rate, channels or None)
    rtpmap: dict[int, tuple[str, int, int | None]] = field(default_factory=dict)
    #: payload type -> fmtp parameters
    fmtp: dict[int, dict[str, str]] = field(default_factory=dict)
    payload_types: list[int] = field(default_factory=list)
    direction: str | None = None
    ice_ufrag: bool = False
    ice_pwd: bool = False
    fingerprint: bool = False

    def codec_names(self) -> list[str]:
        seen: list[str] = []
        for pt in self.payload_types:
            name = self.rtpmap.get(pt, (_STATIC_NAMES.get(pt, f"PT{pt}"), 0, None))[0]
            if name not in seen and name not in _SIDE_CODECS:
                seen.append(name)
        return seen


#: static payload types an offer may list without an rtpmap line
_STATIC_NAMES = {0: "PCMU", 8: "PCMA", 9: "G722"}
#: not media codecs: retransmission, FEC, comfort noise, DTMF
_SIDE_CODECS = frozenset({"RTX", "RED", "ULPFEC", "FLEXFEC-03", "CN", "TELEPHONE-EVENT"})


@dataclass(frozen=True)
class OfferSummary:
    """What an acceptable offer publishes: the video codec we will receive ("h264" when the
    offer allows it, else "vp8"; None without video) and whether Opus audio comes."""

    video: str | None
    audio: bool


def h264_is_baseline(fmtp: dict[str, str]) -> bool:
    """Whether an H.264 payload type is one aiortc's receiver negotiates: packetization-mode 1
    and a (Constrained) Baseline profile, read the way aiortc reads it so the two agree."""
    if fmtp.get("packetization-mode", "0") != "1":
        return False
    # absent: Constrained Baseline level 3.1, as RFC 6184 and aiortc assume
    level_id = fmtp.get("profile-level-id", "42e01f")
    try:
        profile, _level = parse_h264_profile_level_id(level_id)
    except ValueError:
        return False
    return profile in (H264Profile.PROFILE_CONSTRAINED_BASELINE, H264Profile.PROFILE_BASELINE)


def parse_sections(text: str) -> tuple[MediaSection, list[MediaSection]]:
    """(session-level attributes, media sections) of an SDP; OfferError when it is not SDP."""
    lines = [line.strip() for line in text.replace("\r\n", "\n").split("\n")]
    lines = [line for line in lines if line]
    if not lines or lines[0] != "v=0":
        raise OfferError(400, "the body is not an SDP offer (it must start with v=0)")
    session = MediaSection("session", 0)
    media: list[MediaSection] = []
    current = session
    for line in lines[1:]:
        if len(line) < 2 or line[1] != "=":
            raise OfferError(400, f"malformed SDP line: {line[:60]!r}")
        kind, value = line[0], line[2:]
        if kind == "m":
            parts = value.split()
            if len(parts) < 3:
                raise OfferError(400, f"malformed m= line: {line[:60]!r}")
            try:
                port = int(parts[1].split("/")[0])
            except ValueError:
                raise OfferError(400, f"malformed m= line port: {line[:60]!r}") from None
            current = MediaSection(parts[0], port)
            for fmt in parts[3:]:
                if fmt.isdigit():
                    current.payload_types.append(int(fmt))
            media.append(current)
        elif kind == "a":
            _attribute(current, value)
    return session, media


def _attribute(section: MediaSection, value: str) -> None:
    name, _, rest = value.partition(":")
    if name in ("sendonly", "recvonly", "sendrecv", "inactive"):
        section.direction = name
    elif name == "ice-ufrag":
        section.ice_ufrag = bool(rest.strip())
    elif name == "ice-pwd":
        section.ice_pwd = bool(rest.strip())
    elif name == "fingerprint":
        section.fingerprint = bool(rest.strip())
    elif name == "rtpmap":
        pt, _, encoding = rest.partition(" ")
        fields = encoding.strip().split("/")
        if not pt.isdigit() or len(fields) < 2 or not fields[1].isdigit():
            raise OfferError(400, f"malformed rtpmap: {value[:60]!r}")
        channels = int(fields[2]) if len(fields) > 2 and fields[2].isdigit() else None
        section.rtpmap[int(pt)] = (fields[0].upper(), int(fields[1]), channels)
    elif name == "fmtp":
        pt, _, params = rest.partition(" ")
        if pt.isdigit():
            parsed: dict[str, str] = {}
            for item in params.split(";"):
                key, _, val = item.strip().partition("=")
                if key:
                    parsed[key.strip().lower()] = val.strip()
            section.fmtp[int(pt)] = parsed


def check_offer(text: str) -> OfferSummary:
    """The offer's publication, or OfferError (status 400) saying what is wrong with it."""
    session, sections = parse_sections(text)
    active = [s for s in sections if s.port != 0]  # port 0: a rejected / stopped section
    if any(s.kind == "application" for s in active):
        raise OfferError(400, "data channels are not taken over WHIP: offer audio and/or video only")
    others = [s.kind for s in active if s.kind not in ("audio", "video")]
    if others:
        raise OfferError(400, f"unsupported media section(s): {', '.join(others)}")
    video = [s for s in active if s.kind == "video"]
    audio = [s for s in active if s.kind == "audio"]
    if not video and not audio:
        raise OfferError(400, "the offer has no audio or video to publish")
    if len(video) > 1 or len(audio) > 1:
        raise OfferError(400, "at most one video and one audio track can be published "
                         f"(the offer has {len(video)} video and {len(audio)} audio)")
    for section in video + audio:
        direction = section.direction or session.direction or "sendrecv"
        if direction not in ("sendonly", "sendrecv"):
            raise OfferError(400, f"the {section.kind} section is {direction}: a WHIP offer must send "
                             "(sendonly)")
        if not (section.ice_ufrag or session.ice_ufrag) or not (section.ice_pwd or session.ice_pwd):
            raise OfferError(400, f"the {section.kind} section has no ICE credentials "
                             "(a=ice-ufrag / a=ice-pwd)")
        if not (section.fingerprint or session.fingerprint):
            raise OfferError(400, f"the {section.kind} section has no DTLS fingerprint (a=fingerprint)")
    video_codec = _video_codec(video[0]) if video else None
    if audio:
        _check_audio(audio[0])
    return OfferSummary(video=video_codec, audio=bool(audio))


def _video_codec(section: MediaSection) -> str:
    names = set()
    for pt in section.payload_types:
        name, rate, _ = section.rtpmap.get(pt, ("", 0, None))
        if rate != 90000:
            continue
        if name == "H264" and h264_is_baseline(section.fmtp.get(pt, {})):
            return "h264"
        names.add(name)
    if "VP8" in names:
        return "vp8"
    offered = ", ".join(_describe_video(section)) or "none"
    raise OfferError(400, f"no supported video codec: send {ACCEPTED} (offered: {offered})")


def _describe_video(section: MediaSection) -> list[str]:
    out: list[str] = []
    for pt in section.payload_types:
        name = section.rtpmap.get(pt, (f"PT{pt}", 0, None))[0]
        if name in _SIDE_CODECS:
            continue
        if name == "H264":
            fmtp = section.fmtp.get(pt, {})
            name = (f"H264 profile-level-id={fmtp.get('profile-level-id', '?')} "
                    f"packetization-mode={fmtp.get('packetization-mode', '0')}")
        if name not in out:
            out.append(name)
    return out


def _check_audio(section: MediaSection) -> None:
    for pt in section.payload_types:
        name, rate, _ = section.rtpmap.get(pt, ("", 0, None))
        if name == "OPUS" and rate == 48000:
            return
    offered = ", ".join(section.codec_names()) or "none"
    raise OfferError(400, f"no supported audio codec: send Opus (offered: {offered})")
