"""The server: its WebSocket API with a real client, its guards, and the page in a real headless Chromium."""
from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import urllib.request

import numpy as np
import pytest

pytest.importorskip("aiortc")
pytest.importorskip("websockets")

from models.errors import AnitalkerError  # noqa: E402
from streaming.server import AvatarServer, check_bind  # noqa: E402
from streaming.session import Session  # noqa: E402
from streaming.testing import ToneAnimator  # noqa: E402
from streaming.webrtc import WebRTCSink  # noqa: E402


async def fake_tts(text, voice=None, speed=None):
    for _ in text.split("."):
        yield np.full(8000, 3000, np.int16), 8000          # 1 s per sentence


def served(coro_fn, animator=None, **server_kw):
    """Run coro_fn(server, session) against a live server on a free port; everything is closed after."""
    async def main():
        sink = WebRTCSink()
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
                        json.dumps({"op": "pose", "yaw": 10})):
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


def test_pose_reaches_an_animator_with_controls():
    from websockets.asyncio.client import connect

    from avatar.pipeline import Controls

    class Posed(ToneAnimator):
        controls = Controls(scale=0.5)

        def set_controls(self, controls):
            self.controls = controls

    animator = Posed()

    async def go(server, session):
        async with connect(f"ws://127.0.0.1:{server.port}/ws") as ws:
            await ws.recv()
            await ws.send(json.dumps({"op": "pose", "yaw": 45, "pitch": -9, "roll": None}))
            await ws.send(json.dumps({"op": "pose", "yaw": "left"}))
            assert (await reply(ws))["op"] == "error"        # replies come in order
            np.testing.assert_allclose(animator.controls.pose, [0.5, -0.1, 0])
            assert animator.controls.scale == 0.5
            await ws.send(json.dumps({"op": "pose", "yaw": None, "pitch": None, "roll": None}))
            await ws.send(json.dumps({"op": "nope"}))
            await reply(ws)
            assert animator.controls.pose is None
    served(go, animator)


def test_guards():
    from websockets.asyncio.client import connect
    from websockets.exceptions import InvalidStatus
    with pytest.raises(AnitalkerError, match="token"):
        check_bind("0.0.0.0", None)
    assert check_bind("0.0.0.0", "s3cret") == "s3cret"

    async def status_of(url, **kw):
        try:
            async with connect(url, **kw):
                return 101
        except InvalidStatus as e:
            return e.response.status_code

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


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (apt install chromium)")
def test_headless_chromium_plays_the_page(tmp_path):
    async def go(server, session):
        mic_in = []
        push = server._push
        server._push = lambda pcm, rate, **kw: (mic_in.append(len(pcm)), push(pcm, rate, **kw))  # count the mic
        flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 f"--user-data-dir={tmp_path}", "--autoplay-policy=no-user-gesture-required",
                 "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
                 "--remote-debugging-port=0"]
        browser = subprocess.Popen([CHROMIUM, *flags, f"http://127.0.0.1:{server.port}/?mic=1"],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            stats = {}
            for _ in range(250):            # 25 s at most; usually ~5 s
                await asyncio.sleep(0.1)
                stats = next((c.stats for c in server.clients if c.stats), {})
                if stats.get("framesDecoded", 0) >= 50 and stats.get("audioSamplesReceived", 0) >= 2 * 48000 \
                        and stats.get("currentTime", 0) >= 2 and mic_in:
                    break
            print("browser stats:", stats)
            assert stats.get("framesDecoded", 0) >= 50, stats                   # >= 2 s of video
            assert stats.get("audioSamplesReceived", 0) >= 2 * 48000, stats     # >= 2 s of audio
            assert stats["framesDropped"] <= stats["framesDecoded"] // 4, stats      # lenient: CPU may be busy
            assert (stats["width"], stats["height"]) == (128, 128)
            assert sum(mic_in) > 0            # the fake microphone reached the session
        finally:
            os.killpg(browser.pid, signal.SIGKILL)       # Chromium and its helpers: one group, started here
            browser.wait(10)
        for _ in range(100):                 # the dead peer's WebSocket and connection are freed
            if not server.clients and not server.sink.viewers:
                break
            await asyncio.sleep(0.1)
        assert not server.clients and not server.sink.viewers
    served(go)
