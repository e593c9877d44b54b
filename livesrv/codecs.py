"""What a packager must read out of codec configuration records, without decoding media.

- RFC 6381 ``CODECS`` strings (avc1.PPCCLL, hvc1.* per ISO 14496-15 Annex E, av01.P.LLT.DD,
  mp4a.40.N, opus) from the records the hub carries as ``Track.extradata``;
- picture size and frame rate from an H.264 or HEVC SPS, for publishers that announce none;
- the AudioSpecificConfig fields (object type, sample rate, channels, frame length);
- samples per Opus packet (from its TOC byte), since Opus frames vary in length.

Everything here is pure and raises ``CodecConfigError`` (a ``ValueError``) on malformed input.
"""

from __future__ import annotations

from dataclasses import dataclass

from .media import Track


class CodecConfigError(ValueError):
    """A codec configuration record that cannot be parsed."""


# -- bit reading --------------------------------------------------------------------------------
def unescape_rbsp(nal: bytes) -> bytes:
    """Remove emulation-prevention bytes (00 00 03 -> 00 00) from a NAL unit's payload."""
    if b"\x00\x00\x03" not in nal:
        return nal
    out = bytearray()
    zeros = 0
    for byte in nal:
        if zeros >= 2 and byte == 3:
            zeros = 0
            continue
        out.append(byte)
        zeros = zeros + 1 if byte == 0 else 0
    return bytes(out)


class BitReader:
    """Big-endian bit reader with Exp-Golomb codes (H.264/HEVC parameter sets)."""

    __slots__ = ("_bits", "_data", "_pos")

    def __init__(self, data: bytes) -> None:
        self._data = data
        self._pos = 0
        self._bits = len(data) * 8

    def u(self, n: int) -> int:
        if self._pos + n > self._bits:
            raise CodecConfigError("parameter set ends early")
        value = 0
        data, pos = self._data, self._pos
        for i in range(pos, pos + n):
            value = (value << 1) | ((data[i >> 3] >> (7 - (i & 7))) & 1)
        self._pos = pos + n
        return value

    def skip(self, n: int) -> None:
        if self._pos + n > self._bits:
            raise CodecConfigError("parameter set ends early")
        self._pos += n

    def ue(self) -> int:
        zeros = 0
        while self.u(1) == 0:
            zeros += 1
            if zeros > 31:
                raise CodecConfigError("Exp-Golomb code too long")
        return (1 << zeros) - 1 + self.u(zeros)

    def se(self) -> int:
        value = self.ue()
        return (value + 1) // 2 if value & 1 else -(value // 2)


@dataclass(frozen=True, slots=True)
class PictureInfo:
    width: int
    height: int
    fps: float | None = None


# -- H.264 --------------------------------------------------------------------------------------
_HIGH_PROFILES = frozenset({100, 110, 122, 244, 44, 83, 86, 118, 128, 138, 139, 134, 135})


def avcc_parameter_sets(avcc: bytes) -> tuple[list[bytes], list[bytes]]:
    """(SPS list, PPS list) of an AVCDecoderConfigurationRecord."""
    if len(avcc) < 7 or avcc[0] != 1:
        raise CodecConfigError("not an AVCDecoderConfigurationRecord")
    pos = 5
    out: tuple[list[bytes], list[bytes]] = ([], [])
    for which in (0, 1):
        if pos >= len(avcc):
            raise CodecConfigError("avcC ends early")
        count = avcc[pos] & (0x1F if which == 0 else 0xFF)
        pos += 1
        for _ in range(count):
            size = int.from_bytes(avcc[pos:pos + 2], "big")
            nal = avcc[pos + 2:pos + 2 + size]
            if len(nal) != size:
                raise CodecConfigError("avcC parameter set truncated")
            out[which].append(nal)
            pos += 2 + size
    return out


def _skip_scaling_list(r: BitReader, size: int) -> None:
    last = nxt = 8
    for _ in range(size):
        if nxt:
            nxt = (last + r.se() + 256) % 256
        last = nxt or last


def _vui_fps(r: BitReader) -> float | None:
    if r.u(1) and r.u(8) == 255:  # aspect_ratio_info_present_flag, aspect_ratio_idc
        r.skip(32)
    if r.u(1):  # overscan_info_present_flag
        r.skip(1)
    if r.u(1):  # video_signal_type_present_flag
        r.skip(4)
        if r.u(1):
            r.skip(24)
    if r.u(1):  # chroma_loc_info_present_flag
        r.ue()
        r.ue()
    if r.u(1):  # timing_info_present_flag
        units, scale = r.u(32), r.u(32)
        if units:
            fps = scale / (2 * units)
            # 32-bit fields: a hostile or broken SPS says ~2e9 fps (or 0), which would reach
            # players and segmenters as if real. No camera or encoder goes past 240.
            return fps if 0 < fps <= 240 else None
    return None


def parse_h264_sps(sps: bytes) -> PictureInfo:
    """Cropped picture size (and frame rate when the VUI has timing) of an H.264 SPS NAL."""
    r = BitReader(unescape_rbsp(sps[1:]))
    profile = r.u(8)
    r.skip(16)  # constraint flags, level
    r.ue()  # seq_parameter_set_id
    chroma_format = 1
    separate_planes = 0
    if profile in _HIGH_PROFILES:
        chroma_format = r.ue()
        if chroma_format == 3:
            separate_planes = r.u(1)
        r.ue()
        r.ue()  # bit depths
        r.skip(1)
        if r.u(1):  # seq_scaling_matrix_present_flag
            for i in range(12 if chroma_format == 3 else 8):
                if r.u(1):
                    _skip_scaling_list(r, 16 if i < 6 else 64)
    r.ue()  # log2_max_frame_num_minus4
    poc_type = r.ue()
    if poc_type == 0:
        r.ue()
    elif poc_type == 1:
        r.skip(1)
        r.se()
        r.se()
        for _ in range(r.ue()):
            r.se()
    r.ue()  # max_num_ref_frames
    r.skip(1)
    width_mbs = r.ue() + 1
    height_units = r.ue() + 1
    frame_mbs_only = r.u(1)
    if not frame_mbs_only:
        r.skip(1)
    r.skip(1)  # direct_8x8_inference_flag
    crop = (r.ue(), r.ue(), r.ue(), r.ue()) if r.u(1) else (0, 0, 0, 0)
    if chroma_format == 0 or separate_planes:
        unit_x, unit_y = 1, 2 - frame_mbs_only
    else:
        unit_x = 1 if chroma_format == 3 else 2
        unit_y = (2 if chroma_format == 1 else 1) * (2 - frame_mbs_only)
    width = width_mbs * 16 - unit_x * (crop[0] + crop[1])
    height = (2 - frame_mbs_only) * height_units * 16 - unit_y * (crop[2] + crop[3])
    fps = None
    try:
        if r.u(1):
            fps = _vui_fps(r)
    except CodecConfigError:
        fps = None  # a truncated VUI still leaves a usable size
    return PictureInfo(width, height, fps)


def avc_codec_string(avcc: bytes) -> str:
    if len(avcc) < 4:
        raise CodecConfigError("avcC too short")
    return f"avc1.{avcc[1]:02x}{avcc[2]:02x}{avcc[3]:02x}"


# -- HEVC ---------------------------------------------------------------------------------------
def hvcc_nal_units(hvcc: bytes, nal_type: int) -> list[bytes]:
    if len(hvcc) < 23:
        raise CodecConfigError("hvcC too short")
    pos = 23
    found = []
    for _ in range(hvcc[22]):
        if pos + 3 > len(hvcc):
            raise CodecConfigError("hvcC ends early")
        kind = hvcc[pos] & 0x3F
        count = int.from_bytes(hvcc[pos + 1:pos + 3], "big")
        pos += 3
        for _ in range(count):
            size = int.from_bytes(hvcc[pos:pos + 2], "big")
            nal = hvcc[pos + 2:pos + 2 + size]
            if len(nal) != size:
                raise CodecConfigError("hvcC NAL unit truncated")
            if kind == nal_type:
                found.append(nal)
            pos += 2 + size
    return found


def parse_hevc_sps(sps: bytes) -> PictureInfo:
    """Cropped picture size of an HEVC SPS NAL (two-byte NAL header included)."""
    r = BitReader(unescape_rbsp(sps[2:]))
    r.skip(4)  # sps_video_parameter_set_id
    max_sub_layers = r.u(3)
    r.skip(1)
    r.skip(88 + 8)  # general profile (88 bits) and level
    present = [(r.u(1), r.u(1)) for _ in range(max_sub_layers)]
    if max_sub_layers:
        r.skip(2 * (8 - max_sub_layers))
    for profile_present, level_present in present:
        r.skip(88 * profile_present + 8 * level_present)
    r.ue()  # sps_seq_parameter_set_id
    chroma_format = r.ue()
    if chroma_format == 3:
        r.skip(1)
    width, height = r.ue(), r.ue()
    if r.u(1):  # conformance_window_flag
        sub_w = 2 if chroma_format in (1, 2) else 1
        sub_h = 2 if chroma_format == 1 else 1
        left, right, top, bottom = r.ue(), r.ue(), r.ue(), r.ue()
        width -= sub_w * (left + right)
        height -= sub_h * (top + bottom)
    return PictureInfo(width, height)


def hevc_codec_string(hvcc: bytes) -> str:
    """``hvc1.<space><profile>.<compat>.<tier><level>[.<constraints>]`` (ISO 14496-15 E.3)."""
    if len(hvcc) < 13:
        raise CodecConfigError("hvcC too short")
    space = "" if hvcc[1] >> 6 == 0 else "ABC"[(hvcc[1] >> 6) - 1]
    tier = "H" if hvcc[1] & 0x20 else "L"
    profile = hvcc[1] & 0x1F
    compat = int.from_bytes(hvcc[2:6], "big")
    reversed_compat = int(f"{compat:032b}"[::-1], 2)  # written in reverse bit order
    constraints = list(hvcc[6:12])
    while constraints and constraints[-1] == 0:
        constraints.pop()
    parts = [f"hvc1.{space}{profile}", f"{reversed_compat:X}", f"{tier}{hvcc[12]}"]
    parts += [f"{byte:X}" for byte in constraints]
    return ".".join(parts)


# -- AV1 ----------------------------------------------------------------------------------------
def av1_codec_string(av1c: bytes) -> str:
    """``av01.P.LLT.DD`` from an AV1CodecConfigurationRecord."""
    if len(av1c) < 4 or not av1c[0] & 0x80:
        raise CodecConfigError("not an AV1CodecConfigurationRecord")
    profile, level = av1c[1] >> 5, av1c[1] & 0x1F
    tier = "H" if av1c[2] & 0x80 else "M"
    depth = 12 if av1c[2] & 0x20 and av1c[2] & 0x40 else 10 if av1c[2] & 0x40 else 8
    return f"av01.{profile}.{level:02d}{tier}.{depth:02d}"


# -- AAC ----------------------------------------------------------------------------------------
AAC_RATES = (96000, 88200, 64000, 48000, 44100, 32000, 24000, 22050, 16000, 12000, 11025, 8000, 7350)


@dataclass(frozen=True, slots=True)
class AudioSpecificConfig:
    object_type: int
    sample_rate: int
    channels: int
    frame_length: int  # samples per access unit: 1024, or 960 with frameLengthFlag


def parse_asc(asc: bytes) -> AudioSpecificConfig:
    r = BitReader(asc)
    try:
        object_type = r.u(5)
        if object_type == 31:
            object_type = 32 + r.u(6)
        index = r.u(4)
        rate = r.u(24) if index == 15 else (AAC_RATES[index] if index < len(AAC_RATES) else 0)
        channels = r.u(4)
        frame_length = 1024
        if object_type in (5, 29):  # explicit SBR/PS: the core's config follows
            index = r.u(4)
            if index == 15:
                r.skip(24)
            object_type_core = r.u(5)
            if object_type_core in (1, 2, 3, 4, 6, 7):
                frame_length = 960 if r.u(1) else 1024
        elif object_type in (1, 2, 3, 4, 6, 7):
            frame_length = 960 if r.u(1) else 1024
    except CodecConfigError:
        raise CodecConfigError("AudioSpecificConfig too short") from None
    if rate == 0:
        raise CodecConfigError("AudioSpecificConfig has an invalid sample rate")
    return AudioSpecificConfig(object_type, rate, channels, frame_length)


def build_asc(sample_rate: int, channels: int, object_type: int = 2) -> bytes:
    """An AAC-LC AudioSpecificConfig, for a track that arrived without one."""
    if sample_rate in AAC_RATES:
        bits = (object_type << 11) | (AAC_RATES.index(sample_rate) << 7) | (channels << 3)
        return bits.to_bytes(2, "big")
    bits = (object_type << 35) | (15 << 31) | (sample_rate << 7) | (channels << 3)
    return bits.to_bytes(5, "big")


# -- Opus ---------------------------------------------------------------------------------------
_OPUS_FRAME_48K = (
    [480, 960, 1920, 2880] * 3  # SILK-only, configs 0-11: 10/20/40/60 ms
    + [480, 960] * 2  # hybrid, 12-15: 10/20 ms
    + [120, 240, 480, 960] * 4  # CELT-only, 16-31: 2.5/5/10/20 ms
)


def opus_samples(packet: bytes) -> int:
    """Samples at 48 kHz in one Opus packet (RFC 6716 section 3.1), 960 if unreadable."""
    if not packet:
        return 960
    toc = packet[0]
    code = toc & 3
    frames = 1 if code == 0 else 2 if code in (1, 2) else (packet[1] & 0x3F if len(packet) > 1 else 1)
    return _OPUS_FRAME_48K[toc >> 3] * max(frames, 1)


# -- whole tracks -------------------------------------------------------------------------------
def picture_info(track: Track) -> PictureInfo | None:
    """Width/height/fps of a video track: from the Track, else from its SPS."""
    parsed: PictureInfo | None = None
    if (track.width is None or track.height is None or track.fps is None) and track.extradata:
        try:
            if track.codec == "h264":
                sps = avcc_parameter_sets(track.extradata)[0]
                parsed = parse_h264_sps(sps[0]) if sps else None
            elif track.codec == "hevc":
                sps = hvcc_nal_units(track.extradata, 33)
                parsed = parse_hevc_sps(sps[0]) if sps else None
        except CodecConfigError:
            parsed = None
    width = track.width or (parsed.width if parsed else None)
    height = track.height or (parsed.height if parsed else None)
    if not width or not height:
        return None
    return PictureInfo(width, height, track.fps or (parsed.fps if parsed else None))


def codec_string(track: Track) -> str:
    """The RFC 6381 codec string for HLS ``CODECS``; a sensible default when the record is absent."""
    extradata = track.extradata or b""
    codec = track.codec
    try:
        if codec == "h264":
            return avc_codec_string(extradata) if extradata else "avc1.64001f"
        if codec == "hevc":
            return hevc_codec_string(extradata) if extradata else "hvc1.1.6.L93.B0"
        if codec == "av1":
            return av1_codec_string(extradata) if extradata else "av01.0.08M.08"
        if codec == "aac":
            return f"mp4a.40.{parse_asc(extradata).object_type}" if extradata else "mp4a.40.2"
    except CodecConfigError:
        return {"h264": "avc1.64001f", "hevc": "hvc1.1.6.L93.B0", "av1": "av01.0.08M.08",
                "aac": "mp4a.40.2"}[codec]
    if codec == "opus":
        return "opus"
    raise CodecConfigError(f"no HLS codec string for {codec!r}")
