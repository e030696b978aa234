"""The server: its WebSocket API with a real client, its guards, and the page in a real headless Chromium."""
from __future__ import annotations

import asyncio
import json
import shutil
import urllib.request

import numpy as np
import torch
import pytest

pytest.importorskip("aiortc")
pytest.importorskip("websockets")

from models.errors import AnitalkerError  # noqa: E402
from streaming.server import AvatarServer, check_bind  # noqa: E402
from streaming.session import Session  # noqa: E402
from streaming.testing import ToneAnimator, chromium, until  # noqa: E402,F401
from streaming.webrtc import WebRTCSink  # noqa: E402


async def fake_tts(text, voice=None, speed=None):
    for _ in text.split("."):
        yield np.full(8000, 3000, np.int16), 8000          # 1 s per sentence


def served(coro_fn, animator=None, sink=None, **server_kw):
    """Run coro_fn(server, session) against a live server on a free port (its WebRTC sink: `sink`, or a new
    one); everything is closed after."""
    async def main():
        nonlocal sink
        sink = sink or WebRTCSink()
        async with Session(animator or ToneAnimator(size=128), [sink]) as session:
            async with AvatarServer(session, sink, port=0, tts=fake_tts, **server_kw) as server:
                try:
                    await asyncio.wait_for(coro_fn(server, session), 60)
                finally:
                    await sink.aclose()
    asyncio.run(main())


async def loud_frames(session, n: int, timeout: float = 10) -> int:
    """Frames that carry sound among the next ones, until n are seen."""
    seen = 0

    async def count():
        nonlocal seen
        async for frame in session.frames():
            seen += float(np.abs(frame.audio).max()) > 0.05
            if seen >= n:
                return
    await asyncio.wait_for(count(), timeout)
    return seen


async def reply(ws) -> dict:
    """The next message that is not the once-a-second metrics."""
    while (msg := json.loads(await ws.recv()))["op"] == "metrics":
        pass
    return msg


def test_websocket_api_pushes_audio_and_survives_bad_messages():
    from websockets.asyncio.client import connect

    async def go(server, session):
        async with connect(f"ws://127.0.0.1:{server.port}/ws") as ws:
            assert json.loads(await ws.recv())["op"] == "config"
            for bad in (b"\x00\x01", "not json", json.dumps({"op": "dance"}), json.dumps([1]),
                        json.dumps({"op": "audio", "rate": 3}), json.dumps({"op": "say"}),
                        json.dumps({"op": "controls", "yaw": 10})):
                await ws.send(bad)
                assert (await reply(ws))["op"] == "error", bad
            await ws.send(json.dumps({"op": "audio", "rate": 48000, "format": "f32"}))
            await ws.send(b"\x00\x00\x80")                       # not whole samples
            assert "multiple of 4" in (await reply(ws))["error"]
            tone = 0.5 * np.sin(2 * np.pi * 440 * np.arange(48000) / 48000)
            for part in np.split(tone.astype("<f4"), 10):       # 1 s in 100 ms messages
                await ws.send(part.tobytes())
            assert await loud_frames(session, 20) == 20
            await ws.send(json.dumps({"op": "say", "text": "One. Two."}))
            assert await loud_frames(session, 20) == 20
            await ws.send(json.dumps({"op": "interrupt"}))
            msg = json.loads(await asyncio.wait_for(ws.recv(), 5))
            while msg["op"] != "metrics":
                msg = json.loads(await ws.recv())
            assert msg["frames"] > 0 and msg["clients"] == 1
        assert session.metrics.interrupts == 1
    served(go)


def test_controls_reach_an_animator_that_has_them():
    from websockets.asyncio.client import connect

    from avatar.pipeline import Controls

    class Posed(ToneAnimator):
        controls = Controls(scale=0.5)
        control_names = ("location", "scale", "pose")

        def set_controls(self, controls):
            self.controls = controls

    animator = Posed()

    async def go(server, session):
        async with connect(f"ws://127.0.0.1:{server.port}/ws") as ws:
            config = json.loads(await ws.recv())
            assert config["controls"] == ["location", "scale", "pose"]
            await ws.send(json.dumps({"op": "controls", "yaw": 45, "pitch": -9, "roll": None}))
            for bad in ({"yaw": "left"}, {"yaw": 120}, {"roll": float("nan")}, {"scale": True}, {"size": 1}):
                await ws.send(json.dumps({"op": "controls", **bad}))
                assert (await reply(ws))["op"] == "error"        # replies come in order
            np.testing.assert_allclose(animator.controls.pose, [0.5, -0.1, 0])
            assert animator.controls.scale == 0.5
            await ws.send(json.dumps({"op": "controls", "yaw": None, "pitch": None, "roll": None, "location": 0.3}))
            await ws.send(json.dumps({"op": "nope"}))
            await reply(ws)
            assert animator.controls.pose is None and animator.controls.location == 0.3
    served(go, animator)


def test_a_control_the_model_lacks_is_refused_and_the_server_goes_on(tiny_checkpoints):
    """The default audio-only model has no pose: the page's pose message is that client's error reply;
    it never reaches the engine, and the avatar keeps running for everyone."""
    from websockets.asyncio.client import connect

    from avatar.animator import StreamingAnimator
    from avatar.pipeline import encode_portrait, load_models

    models = load_models(tiny_checkpoints, "hubert_audio_only", "cpu")
    animator = StreamingAnimator(models, encode_portrait(models, torch.zeros(1, 3, 256, 256)))

    async def go(server, session):
        async with connect(f"ws://127.0.0.1:{server.port}/ws") as ws:
            assert json.loads(await ws.recv())["controls"] == []
            await ws.send(json.dumps({"op": "controls", "yaw": 10, "pitch": 0, "roll": 0}))
            msg = await reply(ws)
            assert msg["op"] == "error" and "no pose control" in msg["error"]
            frames = session.clock.stats.frames
            await asyncio.sleep(1.0)
            assert session.clock.stats.frames > frames + 10 and session.summary()["errors"] == 0
    served(go, animator)


def test_guards():
    from websockets.asyncio.client import connect

    from streaming.testing import ws_status as status_of
    with pytest.raises(AnitalkerError, match="token"):
        check_bind("0.0.0.0", None)
    assert check_bind("0.0.0.0", "s3cret") == "s3cret"

    async def go(server, session):
        base = f"127.0.0.1:{server.port}"
        page = await asyncio.to_thread(lambda: urllib.request.urlopen(f"http://{base}/").read().decode())
        assert "app.js" in page
        assert await status_of(f"ws://{base}/ws") == 401
        assert await status_of(f"ws://{base}/ws?token=nope") == 401
        assert await status_of(f"ws://{base}/ws?token=s3cret", origin="http://evil.example") == 403
        async with connect(f"ws://{base}/ws?token=s3cret", origin=f"http://{base}"):
            assert await status_of(f"ws://{base}/ws?token=s3cret") == 503      # max_clients=1
    served(go, token="s3cret", max_clients=1)


def count_pushes(server) -> list:
    """The sizes of the audio pieces the server pushes into the session (the page's microphone)."""
    sizes, push = [], server._push
    server._push = lambda client, pcm, rate, **kw: (sizes.append(len(pcm)), push(client, pcm, rate, **kw))
    return sizes


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (apt install chromium)")


def page_stats(server) -> dict:
    """The getStats figures the page last sent (one browser)."""
    return next((c.stats for c in server.clients if c.stats), {})


async def all_gone(server) -> None:
    """The dead browser's WebSocket and peer connection are freed."""
    assert await until(lambda: not server.clients and not server.sink.viewers, 10)


@needs_chromium
def test_headless_chromium_plays_the_page(tmp_path):
    async def go(server, session):
        mic_in = count_pushes(server)
        with chromium(f"http://127.0.0.1:{server.port}/?mic=1", tmp_path):
            stats = {}

            def played():
                nonlocal stats
                stats = page_stats(server)
                return stats.get("framesDecoded", 0) >= 50 and stats.get("audioSamplesReceived", 0) >= 2 * 48000 \
                    and stats.get("currentTime", 0) >= 2 and mic_in
            await until(played, 25)         # usually ~5 s
            print("browser stats:", stats)
            assert stats.get("framesDecoded", 0) >= 50, stats                   # >= 2 s of video
            assert stats.get("audioSamplesReceived", 0) >= 2 * 48000, stats     # >= 2 s of audio
            assert stats["framesDropped"] <= stats["framesDecoded"] // 4, stats      # lenient: CPU may be busy
            assert (stats["width"], stats["height"]) == (128, 128)
            assert stats["controlsShown"] == []   # this engine takes no controls: the page shows none
            assert sum(mic_in) > 0            # the fake microphone reached the session
        await all_gone(server)
    served(go)


@needs_chromium
def test_the_page_and_the_real_engine(tmp_path, tiny_checkpoints, one_thread):
    """Browser mic -> WebRTC -> session -> the tiny StreamingAnimator -> WebRTC -> the page; then the text box
    path (say) through the same engine."""
    from websockets.asyncio.client import connect

    from avatar.animator import StreamConfig, StreamingAnimator
    from avatar.pipeline import encode_portrait, load_models
    from avatar.portrait import asset_path, load_image, prepare_portrait, to_tensor
    from conftest import TINY

    models = load_models(tiny_checkpoints, "hubert_full_control", "cpu")
    code = encode_portrait(models, to_tensor(prepare_portrait(load_image(asset_path("portrait.jpg"))).image))
    animator = StreamingAnimator(models, code, StreamConfig(hop=5, context=5, lookahead=2, audio_context=10, steps=3))
    size = TINY["stage1"]["size"]

    async def go(server, session):
        made, shapes = [], set()   # the engine's frames as released (not the clock's repeats): (peak, mean) of audio

        async def collect():
            async for frame in session.frames():
                if not frame.meta.get("repeat"):
                    shapes.add(frame.image.shape)
                    made.append((float(np.abs(frame.audio).max()), float(frame.audio.mean())))
        collector = asyncio.create_task(collect())
        mic_in = count_pushes(server)
        try:
            with chromium(f"http://127.0.0.1:{server.port}/?mic=1", tmp_path):
                stats = {}

                def played():
                    nonlocal stats
                    stats = page_stats(server)
                    return stats.get("framesDecoded", 0) >= 50 and stats.get("audioSamplesReceived", 0) >= 2 * 48000 \
                        and sum(p > 0.1 for p, _ in made) >= 3
                await until(played, 30)
                print("browser stats:", stats)
                beeps = [p for p, _ in made if p > 0.1]      # the fake mic's beep (~full scale, twice a second)
                print(f"engine frames {len(made)}, with the beep {len(beeps)}, peaks {np.round(beeps, 3)}, "
                      f"mic pushed {sum(mic_in)} samples")
                assert stats.get("framesDecoded", 0) >= 50, stats                   # >= 2 s of the engine's video
                assert stats.get("audioSamplesReceived", 0) >= 2 * 48000, stats
                assert (stats["width"], stats["height"]) == (size, size), stats
                assert stats["controlsShown"] == ["yaw", "location", "scale"]   # full_control: all of them
                assert shapes == {(size, size, 3)}
                assert sum(mic_in) > 0                        # the fake microphone reached the session ...
                assert len(beeps) >= 3                        # ... and its beeps came out with the engine's frames
                m = session.summary()
                print("metrics:", m)
                for key in ("first_audio_to_frame_ms", "latency_p50_ms", "latency_p95_ms", "engine_p50_ms"):
                    assert m[key] is not None and m[key] > 0, (key, m)
            await all_gone(server)

            # the text box's path: {"op": "say"} -> TTS (fake: 1 s of a constant level per sentence) -> the engine
            said = len(made)
            async with connect(f"ws://127.0.0.1:{server.port}/ws") as ws:
                assert json.loads(await ws.recv())["op"] == "config"
                await ws.send(json.dumps({"op": "say", "text": "One. Two."}))
                spoken = lambda: sum(mean > 0.05 for _, mean in made[said:])     # noqa: E731  the TTS's level
                await until(lambda: spoken() >= 70, 30)
                print(f"spoken frames {spoken()} of {len(made) - said}")
                assert spoken() >= 70                         # 75: 3 s of speech ("One", " Two", ""), edges aside
        finally:
            collector.cancel()
    served(go, animator)
