"""The ladder's sans-IO parts: Annex-B <-> AVCC conversion, the load governor, the worker's
inbox, and the shared decoder factory."""

from __future__ import annotations

import av
import pytest

from livesrv.annexb import (
    annexb_to_avcc,
    avcc_record_to_annexb,
    avcc_to_annexb,
    build_avcc_record,
    split_annexb,
)
from livesrv.codecs import CodecConfigError, avcc_parameter_sets, parse_h264_sps
from livesrv.media import Packet, Track
from tests.support.media import make_clip
from transcode.decoders import DecoderError, create_decoder
from transcode.ladder_governor import Drop, Governor, GovernorSettings, Restore
from transcode.ladder_worker import Inbox

SPS = bytes.fromhex("6764001eacd940a02ff9610000030001000003003c8f162d96")
PPS = bytes.fromhex("68ebecb22c")


# -- Annex-B / AVCC -----------------------------------------------------------------------------
def test_split_handles_three_and_four_byte_start_codes_and_trailing_zeros() -> None:
    stream = b"\x00\x00\x00\x01" + SPS + b"\x00\x00\x01" + PPS + b"\x00\x00\x00\x01\x65\x88\x84\x00\x00"
    assert split_annexb(stream) == [SPS, PPS, b"\x65\x88\x84"]
    assert split_annexb(b"") == [] and split_annexb(b"\x00\x00\x00") == []


def test_annexb_to_avcc_moves_parameter_sets_out_and_back() -> None:
    idr = b"\x65" + bytes(range(1, 200))
    sei = b"\x06\x05\x01\xff\x80"
    stream = b"".join(b"\x00\x00\x00\x01" + n for n in (b"\x09\xf0", SPS, PPS, sei, idr))
    payload, sps, pps = annexb_to_avcc(stream)
    assert (sps, pps) == ([SPS], [PPS])
    assert payload == len(sei).to_bytes(4, "big") + sei + len(idr).to_bytes(4, "big") + idr
    assert avcc_to_annexb(payload) == b"\x00\x00\x00\x01" + sei + b"\x00\x00\x00\x01" + idr
    record = build_avcc_record(sps, pps)
    assert avcc_parameter_sets(record) == ([SPS], [PPS])
    assert record[1:4] == SPS[1:4] and record[4] == 0xFF  # profile, compat, level; 4-byte lengths
    assert record[-4:] == bytes((0xFD, 0xF8, 0xF8, 0))  # High: 4:2:0, 8 bit, no SPS-ext
    assert avcc_record_to_annexb(record) == b"\x00\x00\x00\x01" + SPS + b"\x00\x00\x00\x01" + PPS


def test_x264_output_becomes_a_record_and_samples_ffmpeg_decodes() -> None:
    """libx264's Annex-B through our conversion decodes with FFmpeg's AVCC-configured decoder."""
    encoder = av.CodecContext.create("libx264", "w")
    encoder.width, encoder.height, encoder.pix_fmt = 160, 96, "yuv420p"
    encoder.framerate = 30
    encoder.options = {"preset": "ultrafast", "x264-params": "bframes=0"}
    frames = [av.VideoFrame(160, 96, "yuv420p") for _ in range(5)]
    for index, frame in enumerate(frames):
        frame.pts = index
        for plane in frame.planes:
            plane.update(bytes([index * 40]) * plane.buffer_size)
    packets = [p for f in frames for p in encoder.encode(f)] + list(encoder.encode(None))
    converted = [annexb_to_avcc(bytes(p)) for p in packets]
    record = build_avcc_record(converted[0][1], converted[0][2])
    assert (parse_h264_sps(converted[0][1][0]).width, parse_h264_sps(converted[0][1][0]).height) == (160, 96)
    decoder = av.CodecContext.create("h264", "r")
    decoder.extradata = record
    decoded = [f for payload, _, _ in converted for f in decoder.decode(av.Packet(payload))]
    decoded += decoder.decode(None)
    assert len(decoded) == 5 and {(f.width, f.height) for f in decoded} == {(160, 96)}


def test_hub_payloads_survive_the_round_trip() -> None:
    clip = make_clip("h264", 320, 180, 30, seconds=1, audio=False)
    for packet in clip.video_packets[:10]:
        assert annexb_to_avcc(avcc_to_annexb(packet.data))[0] == packet.data


@pytest.mark.parametrize("bad", [b"\x00\x00\x00\x09abc", b"\x00\x00\x01"])
def test_truncated_avcc_is_a_clear_error(bad: bytes) -> None:
    with pytest.raises(CodecConfigError):
        avcc_to_annexb(bad)


def test_record_needs_parameter_sets() -> None:
    with pytest.raises(CodecConfigError):
        build_avcc_record([], [PPS])
    with pytest.raises(CodecConfigError):
        build_avcc_record([PPS], [PPS])


# -- the governor -------------------------------------------------------------------------------
RUNGS = {"720p": 1280 * 720 * 30.0, "480p": 854 * 480 * 30.0, "360p": 640 * 360 * 30.0}
SETTINGS = GovernorSettings(max_lag_seconds=2.0, restore_lag_seconds=0.5, restore_after_seconds=10,
                            settle_seconds=3, restore_load=0.75)
COSTS = {"720p": 0.5, "480p": 0.25, "360p": 0.15}


def test_keeping_up_changes_nothing() -> None:
    governor = Governor(SETTINGS, RUNGS, started=0.0)
    assert all(governor.observe(t / 10, 0.2, 0.9, COSTS) is None for t in range(1000))
    assert governor.active == set(RUNGS)


def test_growing_lag_drops_most_expensive_first_then_the_next() -> None:
    governor = Governor(SETTINGS, RUNGS, started=0.0)
    assert governor.observe(1.0, 2.5, 1.0, COSTS) is None  # settling after the start
    assert governor.observe(3.0, 2.6, 1.0, COSTS) == Drop("720p", 2.6)
    assert governor.observe(4.0, 2.8, 1.0, COSTS) is None  # settling after the change
    assert governor.observe(6.5, 3.0, 1.0, COSTS) == Drop("480p", 3.0)
    assert governor.active == {"360p"}


def test_shrinking_lag_is_a_backlog_being_worked_off() -> None:
    governor = Governor(SETTINGS, RUNGS, started=0.0)
    assert governor.observe(3.0, 5.0, 1.0, COSTS) == Drop("720p", 5.0)
    assert [governor.observe(t, lag, 1.0, COSTS) for t, lag in ((7, 4.0), (8, 3.0), (9, 2.1))] == [None] * 3
    assert governor.active == {"480p", "360p"}


def test_restore_waits_for_low_lag_and_headroom_with_backoff() -> None:
    governor = Governor(SETTINGS, RUNGS, started=0.0)
    assert governor.observe(3.0, 3.0, 1.0, COSTS) == Drop("720p", 3.0)
    # low lag from t=4, but the worker is busy: 0.4 + 0.5 > 0.75
    assert all(governor.observe(t, 0.1, 0.4, COSTS) is None for t in range(4, 30))
    # headroom: back once lag has been low for restore_after_seconds
    assert governor.observe(30, 0.1, 0.2, COSTS) == Restore("720p", 0.2)
    assert governor.active == set(RUNGS)
    # dropped again: the wait doubles (20 s), and a lag blip restarts it
    assert governor.observe(34, 2.5, 1.0, COSTS) == Drop("720p", 2.5)
    assert all(governor.observe(t, 0.1, 0.2, COSTS) is None for t in range(38, 50))
    assert governor.observe(50, 1.0, 0.2, COSTS) is None
    assert all(governor.observe(t, 0.1, 0.2, COSTS) is None for t in range(51, 71))
    assert governor.observe(71, 0.1, 0.2, COSTS) == Restore("720p", 0.2)


# -- the worker's inbox -------------------------------------------------------------------------
# WHIP's clocks: video at 90 kHz, audio at 48 kHz; the bound is 4 s of video
VIDEO_HZ, AUDIO_HZ = 90_000, 48_000
BOUND = 4 * VIDEO_HZ


def video(seconds: float, keyframe: bool = False) -> Packet:
    ticks = round(seconds * VIDEO_HZ)
    return Packet("video", ticks, ticks, keyframe, b"v")


def audio(seconds: float) -> Packet:
    ticks = round(seconds * AUDIO_HZ)
    return Packet("audio", ticks, ticks, True, b"a")


def test_audio_heading_the_queue_in_its_own_time_base_is_no_overflow() -> None:
    """Audio at the head (smaller numbers for the same time at 48 kHz) made one second of
    video look like 4.5 s of queue: a skip that threw good packets away."""
    inbox = Inbox(BOUND)
    batch = [audio(100.0), video(100.0, keyframe=True)]
    batch += [p for i in range(1, 31) for p in (audio(100 + i / 30), video(100 + i / 30))]
    inbox.put(batch)
    assert inbox.skipped == 0
    assert inbox.take() == batch


def test_a_real_overflow_is_seen_whatever_heads_the_queue() -> None:
    """With millisecond video and 48 kHz audio, audio's numbers are the larger: the old
    difference went negative and the queue grew without bound."""
    inbox = Inbox(4 * 1000)  # video in milliseconds
    head = Packet("audio", 10 * AUDIO_HZ, 10 * AUDIO_HZ, True, b"a")
    frames = [Packet("video", 10_000 + i * 100, 10_000 + i * 100, i % 30 == 0, b"v") for i in range(45)]
    inbox.put([head, *frames[:41]])  # 10.0 s .. 14.0 s of video: exactly the bound
    assert inbox.skipped == 0
    inbox.put(frames[41:])  # 14.1 s: past it -> emptied, refilled from the next keyframe
    assert inbox.skipped == 42 + 4  # what was queued, then the non-keyframes that followed
    key = Packet("video", 16_000, 16_000, True, b"k")
    inbox.put([key])
    assert inbox.take() == [key]


def test_the_bound_restarts_from_what_the_worker_has_not_taken() -> None:
    inbox = Inbox(BOUND)
    inbox.put([video(0.0, keyframe=True), video(3.0)])
    assert len(inbox.take() or []) == 2
    inbox.put([audio(3.5), video(6.0), video(9.5)])  # 3.5 s of queued video: within the bound
    assert inbox.skipped == 0


# -- decoders -----------------------------------------------------------------------------------
def test_a_decoder_comes_configured_from_the_track() -> None:
    clip = make_clip("h264", 320, 180, 30, seconds=1)
    assert clip.info.video is not None
    decoder = create_decoder(clip.info.video)
    assert decoder.name == "h264" and decoder.extradata == clip.info.video.extradata
    frames = [f for p in clip.video_packets[:3] for f in decoder.decode(av.Packet(p.data))]
    frames += decoder.decode(None)
    assert frames and (frames[0].width, frames[0].height) == (320, 180)
    assert create_decoder(Track("video", "av1")).name == "libdav1d"  # FFmpeg's own av1 is hwaccel-only


def test_a_codec_without_a_decoder_is_a_clear_error() -> None:
    with pytest.raises(DecoderError, match="nonesuch"):
        create_decoder(Track("video", "nonesuch"))
