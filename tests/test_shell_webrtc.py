"""The WebRTC sink against real aiortc peers in one process (loopback, no browser)."""
from __future__ import annotations

import asyncio
from fractions import Fraction

import av
import numpy as np
import pytest

pytest.importorskip("aiortc")

from avatar.timebase import SAMPLES_PER_FRAME, AvFrame  # noqa: E402
from streaming.session import Session  # noqa: E402
from streaming.testing import ToneAnimator, decode_pts  # noqa: E402
from streaming.webrtc import WebRTCOptions, WebRTCSink, ice_servers  # noqa: E402

TONE = (0.5 * np.sin(2 * np.pi * 1000 * np.arange(SAMPLES_PER_FRAME) / 16000)).astype(np.float32)


class MarkedAnimator(ToneAnimator):
    """Frames whose number is a multiple of 25 carry a 1 kHz tone, all others silence: the receiver can
    find each marked frame in the video (its bars) and in the audio (the tone's onset)."""

    def _emit(self):
        return [AvFrame(f.image, TONE if f.pts % 25 == 0 else 0 * f.audio, f.pts, f.pushed_at, f.produced_at)
                for f in super()._emit()]


async def receiver(sink: WebRTCSink):
    from aiortc import RTCPeerConnection, RTCSessionDescription
    pc = RTCPeerConnection()
    got = {"video": [], "audio": []}

    async def pull(track):
        from aiortc.mediastreams import MediaStreamError
        try:
            while True:
                got[track.kind].append(await track.recv())
        except MediaStreamError:          # the connection closed
            pass

    pc.on("track", lambda t: asyncio.ensure_future(pull(t)))
    pc.addTransceiver("video", direction="recvonly")
    pc.addTransceiver("audio", direction="recvonly")
    await pc.setLocalDescription(await pc.createOffer())
    _, answer = await sink.connect(pc.localDescription.sdp)
    await pc.setRemoteDescription(RTCSessionDescription(answer, "answer"))
    return pc, got, answer


def check_sync(got, n: int):
    """Video: frame numbers in order, RTP time = frame slot. Audio: no gaps, and each tone onset keeps one
    fixed distance to the video frame that carries it (no drift between the tracks). Each track's timeline
    starts at the first frame this receiver got, which may differ by a frame between the tracks, so the
    distance is checked for constancy here; tests/test_avsync.py measures the offset itself in a browser."""
    video = got["video"][:n]
    shown = [decode_pts(f.to_ndarray(format="rgb24")) for f in video]
    assert all(b >= a for a, b in zip(shown, shown[1:])), shown
    ts = [f.pts for f in video]
    assert all(b > a for a, b in zip(ts, ts[1:])) and all((t - ts[0]) % 3600 == 0 for t in ts)
    audio = got["audio"]
    assert all(b.pts - a.pts == a.samples for a, b in zip(audio, audio[1:]))      # no gaps
    x = np.concatenate([f.to_ndarray().reshape(-1, 2)[:, 0] for f in audio]).astype(np.float32) / 32768
    loud = np.abs(x) > 0.1
    count = np.concatenate([[0], np.cumsum(loud)])          # loud samples before each index
    i = np.flatnonzero(loud)
    onsets = i[count[i] - count[np.maximum(i - 480, 0)] == 0]   # loud after 10 ms of quiet
    t_audio = onsets / 48000
    marks = {}
    for p, t in zip(shown, ts):
        if p % 25 == 0 and p not in marks:
            marks[p] = (t - ts[0]) / 90000
    assert len(marks) >= 2, shown
    gaps = []
    for t_video in marks.values():
        if t_video * 48000 < len(x) - 2000:
            gaps.append(t_audio[np.argmin(np.abs(t_audio - t_video))] - t_video)
    # at most a frame apart at every mark and never drifting: aiortc's receiver, under load, sometimes
    # shifts one track by a frame (no packet was dropped by the sender: its queues count drops)
    assert len(gaps) >= 2 and np.ptp(gaps) < 1 / 25 + 0.002, gaps
    assert max(abs(g) for g in gaps) < 1 / 25 + 0.01, gaps


def test_two_viewers_get_frames_in_sync():
    async def main():
        sink = WebRTCSink(WebRTCOptions(port_range=(40100, 40160)))
        async with Session(MarkedAnimator(size=128), [sink]):
            peers = [await receiver(sink) for _ in range(2)]
            assert len(sink.viewers) == 2
            n = 80
            for _ in range(300):
                if all(len(g["video"]) >= n and sum(f.samples for f in g["audio"]) >= n * 1920 for _, g, _ in peers):
                    break
                await asyncio.sleep(0.1)
            for pc, got, answer in peers:
                ports = [int(line.split()[5]) for line in answer.splitlines() if line.startswith("a=candidate")]
                assert ports and all(40100 <= p <= 40160 for p in ports), ports
                check_sync(got, n)
                await pc.close()
            for _ in range(50):                      # the sink notices the peers left and frees them
                if not sink.viewers:
                    break
                await asyncio.sleep(0.1)
            assert not sink.viewers
    asyncio.run(main())


def test_codec_choice_and_viewer_limit(monkeypatch):
    from aiortc.codecs import h264, vpx
    for codec in (vpx, h264):            # the bitrate setting is process-wide: restore it afterwards
        for name in ("DEFAULT_BITRATE", "MIN_BITRATE", "MAX_BITRATE"):
            monkeypatch.setattr(codec, name, getattr(codec, name))

    async def main():
        from aiortc import RTCPeerConnection
        sink = WebRTCSink(WebRTCOptions(codec="h264", bitrate=800_000, max_viewers=1))
        pc = RTCPeerConnection()
        pc.addTransceiver("video", direction="recvonly")
        pc.addTransceiver("audio", direction="recvonly")
        await pc.setLocalDescription(await pc.createOffer())
        _, answer = await sink.connect(pc.localDescription.sdp)
        assert "H264/90000" in answer and "VP8/90000" not in answer
        assert h264.MAX_BITRATE == 800_000
        with pytest.raises(Exception, match="too many viewers"):
            await sink.connect(pc.localDescription.sdp)
        await sink.aclose()
        await pc.close()
        assert not sink.viewers
    asyncio.run(main())


def test_ice_server_urls():
    stun, turn = ice_servers(["stun:stun.example.org:3478", "turn:me:p@ss:w@turn.example.org:3478?transport=tcp"])
    assert (stun.urls, stun.username, stun.credential) == ("stun:stun.example.org:3478", None, None)
    assert (turn.urls, turn.username, turn.credential) == ("turn:turn.example.org:3478?transport=tcp", "me", "p@ss:w")
    with pytest.raises(Exception, match="bad ICE server"):
        ice_servers(["http://example.org"])


def test_peer_audio_nobody_takes_is_not_kept():
    """A peer that sends its microphone to a sink connected without on_audio: aiortc would queue every
    decoded frame of it for a reader that never comes (50 a second, for the viewer's whole stay)."""
    from aiortc import RTCPeerConnection, RTCSessionDescription
    from aiortc.mediastreams import AudioStreamTrack

    async def main():
        sink = WebRTCSink()
        async with Session(MarkedAnimator(size=64), [sink]):
            pc = RTCPeerConnection()
            got = []

            async def pull(track):
                from aiortc.mediastreams import MediaStreamError
                try:
                    while True:
                        got.append(await track.recv())
                except MediaStreamError:          # the connection closed
                    pass

            pc.on("track", lambda t: asyncio.ensure_future(pull(t)) if t.kind == "audio" else None)
            pc.addTransceiver("video", direction="recvonly")
            pc.addTransceiver(AudioStreamTrack(), direction="sendrecv")     # a microphone (silence)
            await pc.setLocalDescription(await pc.createOffer())
            server_pc, answer = await sink.connect(pc.localDescription.sdp)
            await pc.setRemoteDescription(RTCSessionDescription(answer, "answer"))
            for _ in range(300):                     # 2 s of the session's audio has arrived
                if len(got) >= 100:
                    break
                await asyncio.sleep(0.1)
            assert len(got) >= 100
            kept = [r.track._queue.qsize() for r in server_pc.getReceivers() if r.track is not None]
            await pc.close()
            assert sum(kept) == 0, kept
    asyncio.run(main())


def test_the_page_finds_the_click_in_the_packet_aiortc_marks():
    """The page's ?avsync=1 times each click from the audio packet that carries it (streaming/static/app.js):
    the first packet whose RFC 6464 level is above CLICK_LEVEL, the click OPUS_LOOKAHEAD_MS into it. Both
    numbers checked here against aiortc's own Opus encoder, level and a decoder, fed 20 ms frames as the
    sink feeds them, a click at the start of one."""
    import re
    from pathlib import Path

    from aiortc import rtp
    from aiortc.codecs.opus import OpusDecoder, OpusEncoder
    from aiortc.jitterbuffer import JitterFrame

    page = (Path(__file__).resolve().parents[1] / "streaming" / "static" / "app.js").read_text()
    lookahead_ms = float(re.search(r"OPUS_LOOKAHEAD_MS = ([0-9.]+)", page).group(1))
    click_level = float(re.search(r"CLICK_LEVEL = ([0-9.]+)", page).group(1))
    encoder, decoder, packets = OpusEncoder(), OpusDecoder(), []
    for k in range(10):
        x = np.zeros(960, np.float32)
        if k == 5:
            x[:240] = 0.8 * np.cos(2 * np.pi * 1000 * np.arange(240) / 48000)
        frame = av.AudioFrame.from_ndarray((x * 32767).astype("<i2")[None], format="s16", layout="mono")
        frame.sample_rate, frame.pts, frame.time_base = 48000, 960 * k, Fraction(1, 48000)
        level = 10 ** (rtp.compute_audio_level_dbov(frame) / 20)       # -dBov on the wire; the page gets this
        payloads, timestamp = encoder.encode(frame)
        for payload in payloads:
            pcm = np.concatenate([f.to_ndarray().reshape(-1, 2)[:, 0] for f in decoder.decode(JitterFrame(payload, timestamp))])
            packets.append((level, np.flatnonzero(np.abs(pcm) > 0.2 * 32768)))
    marked = [i for i, (level, _) in enumerate(packets) if level > click_level]
    heard = [i for i, (_, loud) in enumerate(packets) if len(loud)]
    assert marked == [5] and heard[0] == 5, (marked, heard)
    assert packets[5][1][0] == round(lookahead_ms * 48), packets[5][1][:3]
