"""A session per client (streaming/avatars.py behind the server): real WebSocket and HTTP clients against
a live server; each client's avatar is its own, and one client's trouble is no other's."""
from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import json
import socket
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("aiortc")
pytest.importorskip("websockets")

from streaming.avatars import AvatarPool  # noqa: E402
from streaming.server import MAX_QUEUED_S, MAX_TEXTS, AvatarServer  # noqa: E402
from streaming.testing import PortraitAnimator, until  # noqa: E402
from streaming.worker import EngineWorker  # noqa: E402

RED, BLUE = (220, 30, 30), (30, 30, 220)


async def fake_tts(text, voice=None, speed=None):
    for _ in text.split("."):
        yield np.full(8000, 3000, np.int16), 8000          # 1 s per sentence


def pooled(coro_fn, make=None, max_sessions: int = 4, timeout: float = 60, engine=None, **server_kw):
    """Run coro_fn(server, pool) against a live server that gives each client its own session (on one
    shared engine worker when ``engine`` is given)."""
    async def main():
        pool = AvatarPool(make or (lambda rgb: PortraitAnimator(rgb, size=64)), max_sessions=max_sessions,
                          engine=engine)
        async with AvatarServer(avatars=pool, port=0, tts=fake_tts, **server_kw) as server:
            await asyncio.wait_for(coro_fn(server, pool), timeout)
        assert pool.count == 0                  # closing the server ended every session
    asyncio.run(main())


def photo(color, size=(96, 96), fmt="PNG") -> str:
    from PIL import Image
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, fmt)
    return base64.b64encode(buf.getvalue()).decode()


async def reply(ws, skip=("metrics",)) -> dict:
    while (msg := json.loads(await ws.recv()))["op"] in skip:
        pass
    return msg


def mine(server, ws):
    """The server's side of the client connected as ws."""
    return next(c for c in server.clients if c.ws.remote_address == ws.local_address)


async def next_frame(session):
    async for frame in session.frames():
        if not frame.meta.get("repeat"):
            return frame


async def loud_frames(session, n: int) -> bool:
    """n frames with sound come out (within 10 s)."""
    async def count():
        seen = 0
        async for frame in session.frames():
            seen += float(np.abs(frame.audio).max()) > 0.05
            if seen >= n:
                return True
    return await asyncio.wait_for(count(), 10)


def url(server, path="/ws") -> str:
    return f"ws://127.0.0.1:{server.port}{path}"


def test_each_client_has_its_own_session_portrait_and_controls_and_trouble_stays_its_own():
    from websockets.asyncio.client import connect

    async def go(server, pool):
        async with connect(url(server)) as a, connect(url(server)) as b:
            for ws in (a, b):
                config = json.loads(await ws.recv())
                assert config["op"] == "config" and config["portrait"] and config["own"]
            assert pool.count == 2
            ca, cb = (mine(server, ws) for ws in (a, b))
            assert ca.avatar.session is not cb.avatar.session and ca.avatar.sink is not cb.avatar.sink
            # each wears its own portrait
            await a.send(json.dumps({"op": "portrait", "image": photo(RED)}))
            assert await reply(a) == {"op": "portrait", "width": 96, "height": 96}
            await b.send(json.dumps({"op": "portrait", "image": photo(BLUE, fmt="JPEG")}))
            assert (await reply(b))["op"] == "portrait"
            fa, fb = await next_frame(ca.avatar.session), await next_frame(cb.avatar.session)
            assert np.abs(fa.image[4, 4].astype(int) - RED).max() < 4, fa.image[4, 4]
            assert np.abs(fb.image[4, 4].astype(int) - BLUE).max() < 12, fb.image[4, 4]   # JPEG
            # a's bad input, its interrupt and its departure: errors and changes for a alone
            for bad in ({"op": "portrait", "image": "%%%"}, {"op": "portrait", "image": base64.b64encode(b"no").decode()},
                        {"op": "portrait", "image": photo(RED, size=(3000, 70))},
                        {"op": "portrait", "image": photo(RED, size=(40, 40))},
                        {"op": "portrait"}, {"op": "controls", "yaw": 5}, {"op": "dance"}):
                await a.send(json.dumps(bad))
                assert (await reply(a))["op"] == "error", bad
            await a.send(b"\x00\x01")
            assert (await reply(a))["op"] == "error"
            assert (await next_frame(ca.avatar.session)).image[4, 4].tolist() == fa.image[4, 4].tolist()  # still red
            await b.send(json.dumps({"op": "say", "text": "One. Two. Three."}))
            await a.send(json.dumps({"op": "interrupt"}))
            await until(lambda: cb.avatar.session.metrics.interrupts or ca.avatar.session.metrics.interrupts, 5)
            assert ca.avatar.session.metrics.interrupts == 1 and cb.avatar.session.metrics.interrupts == 0
            assert await loud_frames(cb.avatar.session, 20)      # b's speech plays on
            frames_b = cb.avatar.session.clock.stats.frames
            await a.close()
            assert await until(lambda: pool.count == 1, 5)
            await asyncio.sleep(0.5)
            assert cb.avatar.session.clock.stats.frames > frames_b and cb.avatar.task and not cb.avatar.task.done()
            m = await reply(b, skip=("error",))
            while m["sessions"] != 1:                  # metrics sent before a left may still be queued
                m = await reply(b, skip=("error",))
            assert m["op"] == "metrics" and m["errors"] == 0 and m["sessions"] == 1 and m["clients"] == 1
    pooled(go)


def test_an_engine_that_fails_ends_its_own_client_only():
    """One client's engine fails on everything (its portrait is red): that client hears each error, then
    that its avatar stopped, and is closed; the other client's avatar plays on with no error."""
    from websockets.asyncio.client import connect
    from websockets.exceptions import ConnectionClosedError

    class Broken(PortraitAnimator):
        def push(self, chunk):
            raise RuntimeError("this engine is broken")

    def make(rgb):
        return (Broken if rgb is not None and rgb[0, 0, 0] > 150 else PortraitAnimator)(rgb, size=64)

    async def go(server, pool):
        async with connect(url(server)) as a, connect(url(server)) as b:
            await a.recv(), await b.recv()
            await a.send(json.dumps({"op": "portrait", "image": photo(RED)}))
            errors = []
            with pytest.raises(ConnectionClosedError):
                while True:
                    msg = await reply(a)
                    errors += [msg["error"]] if msg["op"] == "error" else []
            assert "this engine is broken" in errors[0] and "the avatar stopped" in errors[-1], errors
            assert a.close_code == 1011
            await b.send(json.dumps({"op": "say", "text": "Still here."}))
            cb = mine(server, b)
            assert await loud_frames(cb.avatar.session, 10)
            assert cb.avatar.session.summary()["errors"] == 0 and pool.count == 1
    pooled(go, make=make)


def test_a_client_beyond_capacity_is_refused_with_a_reason_and_a_place_frees_when_one_leaves():
    import urllib.error
    import urllib.request

    from websockets.asyncio.client import connect
    from websockets.exceptions import InvalidStatus

    async def go(server, pool):
        async with connect(url(server)) as a:
            await a.recv()
            async with connect(url(server)) as b:
                await b.recv()
                with pytest.raises(InvalidStatus) as refused:
                    async with connect(url(server)):
                        pass
                assert refused.value.response.status_code == 503
                assert b"The server is full: it runs 2 avatars at once" in refused.value.response.body

                def page():
                    try:
                        urllib.request.urlopen(f"http://127.0.0.1:{server.port}/")
                    except urllib.error.HTTPError as e:
                        return e.code, e.read().decode()
                status, text = await asyncio.to_thread(page)
                assert status == 503 and "The server is full" in text and "<h1>" in text
            assert await until(lambda: pool.count == 1, 5)
            async with connect(url(server)) as c:
                assert json.loads(await c.recv())["op"] == "config"
    pooled(go, max_sessions=2)


def test_an_idle_client_is_told_and_released_and_a_busy_one_is_not():
    from websockets.asyncio.client import connect
    from websockets.exceptions import ConnectionClosedOK

    async def go(server, pool):
        async with connect(url(server)) as idle, connect(url(server)) as busy:
            for ws in (idle, busy):
                await ws.recv()
            await busy.send(json.dumps({"op": "audio", "rate": 16000, "format": "s16"}))

            async def keep_busy():
                while True:
                    await busy.send(np.zeros(1600, "<i2").tobytes())     # 0.1 s every 0.1 s
                    await asyncio.sleep(0.1)
            sender = asyncio.create_task(keep_busy())
            msg = await reply(idle)
            assert msg["op"] == "idle" and "released" in msg["reason"], msg
            with pytest.raises(ConnectionClosedOK):
                await idle.recv()
            assert idle.close_code == 1000 and idle.close_reason == "idle"
            await asyncio.sleep(1.5)                  # past the timeout for busy too: it kept sending
            assert pool.count == 1 and len(server.clients) == 1
            sender.cancel()
    pooled(go, idle_timeout=1.0)


def test_queued_audio_and_texts_are_bounded_per_client_and_cancelled_when_it_leaves():
    from websockets.asyncio.client import connect

    async def go(server, pool):
        async with connect(url(server)) as ws:
            await ws.recv()
            client = mine(server, ws)
            await ws.send(json.dumps({"op": "audio", "rate": 16000, "format": "s16"}))
            second = np.zeros(16000, "<i2").tobytes()
            for _ in range(int(MAX_QUEUED_S)):
                await ws.send(second)
            await ws.send(second)
            msg = await reply(ws)
            assert msg["op"] == "error" and "queued already" in msg["error"], msg
            assert MAX_QUEUED_S - 2 < client.queued_s <= MAX_QUEUED_S
            await ws.send(json.dumps({"op": "audio", "rate": 16000, "format": "s16", "live": True}))
            await ws.send(second)                  # live audio is bounded by dropping, never refused
            await ws.send(json.dumps({"op": "interrupt"}))
            for _ in range(MAX_TEXTS + 1):
                await ws.send(json.dumps({"op": "say", "text": "Hello there. " * 300}))
            msg = await reply(ws)
            assert msg["op"] == "error" and f"{MAX_TEXTS} texts are waiting" in msg["error"], msg
            await ws.send(json.dumps({"op": "say", "text": "x" * 5001}))
            assert "1 to 5000 characters" in (await reply(ws))["error"]
            assert await until(lambda: client.queued_s > MAX_QUEUED_S - 2, 10)   # the texts wait for room
            tasks, avatar = set(client.speech), client.avatar
            assert len(tasks) == MAX_TEXTS
        # its texts are cancelled and its session ends now, its queued minute of speech unplayed
        assert await until(lambda: all(t.done() for t in tasks) and avatar.task.done(), 5)
        assert all(t.cancelled() for t in tasks) and pool.count == 0
        assert avatar.task.result()["frames"] < 25 * 30
    pooled(go)


def raw_http(port: int, request: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(request)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
    return out


def test_the_http_side_refuses_rebinding_other_methods_and_doubled_hosts():
    from streaming.testing import ws_status as status_of

    async def go(server, pool):
        port = server.port

        def get(host_lines: str, method="GET", path="/") -> tuple[int, list[str]]:
            head = raw_http(port, f"{method} {path} HTTP/1.1\r\n{host_lines}Connection: close\r\n\r\n".encode())
            lines = head.split(b"\r\n\r\n")[0].decode().split("\r\n")
            return int(lines[0].split()[1]), lines[1:]

        for host in (f"127.0.0.1:{port}", f"localhost:{port}", f"[::1]:{port}", f"LOCALHOST:{port}"):
            status, headers = await asyncio.to_thread(get, f"Host: {host}\r\n")
            assert status == 200, host
            assert sum(h.lower().startswith("content-type:") for h in headers) == 1, headers
        status, headers = await asyncio.to_thread(get, f"Host: 127.0.0.1:{port}\r\n", path="/app.js")
        assert status == 200 and [h for h in headers if h.lower().startswith("content-type")] == \
            ["Content-Type: text/javascript; charset=utf-8"]
        for host in (f"evil.example:{port}", "127.0.0.1", f"127.0.0.1:{port + 1}", f"127.0.0.1.evil.example:{port}"):
            assert (await asyncio.to_thread(get, f"Host: {host}\r\n"))[0] == 403, host
        assert (await asyncio.to_thread(get, f"Host: 127.0.0.1:{port}\r\nHost: evil.example:{port}\r\n"))[0] == 400
        for method in ("POST", "PUT", "DELETE", "OPTIONS"):
            status, headers = await asyncio.to_thread(get, f"Host: 127.0.0.1:{port}\r\n", method)
            assert status == 405 and "Allow: GET" in headers, method
        # DNS rebinding: the attacker's name resolves to 127.0.0.1, its page's Origin matches its Host
        evil = f"evil.example:{port}"
        assert await status_of(f"ws://{evil}/ws", host="127.0.0.1", port=port, origin=f"http://{evil}") == 403
        assert await status_of(url(server), origin="http://evil.example") == 403
        assert await status_of(url(server), origin=f"http://127.0.0.1:{port}") == 101
        assert await status_of(url(server)) == 101                 # programs send no Origin
        assert await until(lambda: pool.served == 2 and pool.count == 0, 5)
    pooled(go)


def test_an_oversized_message_closes_its_sender_alone_with_one_log_line(caplog):
    import logging

    from websockets.asyncio.client import connect
    from websockets.exceptions import ConnectionClosedError

    async def go(server, pool):
        async with connect(url(server)) as big, connect(url(server)) as other:
            await big.recv(), await other.recv()
            with caplog.at_level(logging.INFO, logger="streaming.server"):
                await big.send(bytes((1 << 20) + 1))
                with pytest.raises(ConnectionClosedError):
                    while True:
                        await big.recv()
                assert big.close_code == 1009                  # message too big
                assert await until(lambda: pool.count == 1, 5)
            await other.send(json.dumps({"op": "say", "text": "Still here."}))
            assert await loud_frames(mine(server, other).avatar.session, 10)
        said = [r for r in caplog.records if r.name == "streaming.server"]
        assert len(said) == 1 and "left without closing" in said[0].getMessage() and not said[0].exc_info
    pooled(go)


def test_a_token_server_takes_any_host_name_but_checks_the_token():
    from websockets.asyncio.client import connect
    from websockets.exceptions import InvalidStatus

    async def go(server, pool):
        host = f"avatar.example:{server.port}"
        there = {"host": "127.0.0.1", "port": server.port}       # the name resolves to this machine
        with pytest.raises(InvalidStatus) as e:
            async with connect(f"ws://{host}/ws", **there):
                pass
        assert e.value.response.status_code == 401
        async with connect(f"ws://{host}/ws?token=s3cret", origin=f"http://{host}", **there) as ws:
            assert json.loads(await ws.recv())["op"] == "config"
    pooled(go, token="s3cret")


def test_sessions_of_the_real_engine_share_the_loaded_models_and_wear_their_own_portraits(tiny_checkpoints, one_thread):
    """Two clients of the tiny StreamingAnimator: one loaded Models, two portraits, two different videos; each
    client's engine is made on the engine's thread (no other thread keeps an OpenMP pool: avatar/openmp.py)."""
    import threading

    from PIL import Image
    from websockets.asyncio.client import connect

    from avatar.animator import StreamConfig, StreamingAnimator
    from avatar.pipeline import encode_portrait, load_models
    from avatar.portrait import asset_path, load_image, prepare_portrait, to_tensor
    import torch

    models = load_models(tiny_checkpoints, "hubert_audio_only", "cpu")
    bundled = load_image(asset_path("portrait.jpg"))

    made_on = []

    def make(rgb):
        made_on.append(threading.current_thread())
        code = encode_portrait(models, to_tensor(prepare_portrait(bundled if rgb is None else rgb).image))
        return StreamingAnimator(models, code, StreamConfig(hop=5, context=5, lookahead=2, audio_context=10, steps=3))

    darker = Image.fromarray((bundled * 0.4).astype(np.uint8))
    buf = io.BytesIO()
    darker.save(buf, "JPEG")

    async def go(server, pool):
        async with connect(url(server)) as a, connect(url(server)) as b:
            await a.recv(), await b.recv()
            await b.send(json.dumps({"op": "portrait", "image": base64.b64encode(buf.getvalue()).decode()}))
            assert (await reply(b))["op"] == "portrait"
            ca, cb = mine(server, a), mine(server, b)
            assert ca.avatar.session.animator.models is cb.avatar.session.animator.models is models
            assert engine.sessions == 2                                      # one thread serves both
            code_a, code_b = ca.avatar.session.animator.code, cb.avatar.session.animator.code
            assert not torch.equal(code_a.feats[0], code_b.feats[0])          # each engine has its photo
            fa, fb = await next_frame(ca.avatar.session), await next_frame(cb.avatar.session)
            assert fa.image.shape == fb.image.shape and np.abs(fa.image.astype(int) - fb.image).mean() > 1
            await b.send(json.dumps({"op": "portrait", "image": photo(RED, size=(128, 128))}))
            msg = await reply(b)                      # no face in a red square: b's error, b's avatar stays
            assert msg["op"] == "error" and "face" in msg["error"], msg
            assert mine(server, b).avatar is cb.avatar and not cb.avatar.task.done()
    engine = EngineWorker().start()
    try:
        pooled(go, make=make, engine=engine)
        assert engine.sessions == 0                                          # both left, it runs on
        assert len(made_on) == 4 and all(t is engine._thread for t in made_on)   # 2 opened, 2 portraits
    finally:
        engine.stop()


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


FLOODER = """
import asyncio, json, sys
from websockets.asyncio.client import connect

async def main(port, what, counts):
    mib = bytes(1 << 20)                                  # 1 MiB of s16 silence: 33 s at 16 kHz
    text = ("Hello there. " * 400)[:5000]
    for n in counts:
        async with connect(f"ws://127.0.0.1:{port}/ws") as ws:
            await ws.recv()
            errors = 0

            async def read():
                nonlocal errors
                async for message in ws:
                    errors += json.loads(message)["op"] == "error"
            reader = asyncio.create_task(read())
            await ws.send(json.dumps({"op": "audio", "rate": 16000, "format": "s16"}))
            for _ in range(n):
                await ws.send(mib if what == "pcm" else json.dumps({"op": "say", "text": text}))
            while errors < n - 8:                         # every message beyond the bounds is answered
                await asyncio.sleep(0.05)
            print(errors, flush=True)
            reader.cancel()
        input()                                           # the test measures, then lets the next one go

asyncio.run(main(int(sys.argv[1]), sys.argv[2], [int(n) for n in sys.argv[3:]]))
"""


def test_memory_stays_bounded_under_floods_of_audio_and_texts():
    """The server's RSS (it runs here; the flooding client is another process) while one client sends
    500 x 1 MiB of non-live PCM, then 200 more twice, each time on a new connection that it then closes;
    then 400 say texts of 5,000 characters, three times. RSS is sampled every 20 ms: the peak during a
    flood and the level after it. The first flood lifts RSS to a high-water mark (allocator arenas,
    websockets' buffers); the later ones must not climb above it. Figures are printed (pytest -s)."""
    import subprocess
    import sys

    async def go(server, pool):
        for what, counts in (("pcm", (500, 200, 200)), ("say", (400, 400, 400))):
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-c", FLOODER, str(server.port), what, *map(str, counts),
                stdin=subprocess.PIPE, stdout=subprocess.PIPE)
            base = peak = rss_mb()
            peaks, after, refused = [], [], []
            for _ in counts:
                line = asyncio.ensure_future(proc.stdout.readline())
                while not line.done():
                    peak = max(peak, rss_mb())
                    await asyncio.sleep(0.02)
                refused.append(int(line.result()))
                assert await until(lambda: pool.count == 0, 10)       # it left: its session ended
                after.append(rss_mb())
                peaks.append(peak)
                peak = rss_mb()
                proc.stdin.write(b"\n")
            await proc.wait()
            print(f"{what}: RSS MB at start {base:.0f}; peak during each flood {[round(p) for p in peaks]}, "
                  f"after it {[round(a) for a in after]}; refused {refused} of {list(counts)}")
            # accepted: the first MiB (33 s; a second would pass the minute), the first MAX_TEXTS texts
            assert [n - r for n, r in zip(counts, refused)] == ([1] * 3 if what == "pcm" else [MAX_TEXTS] * 3)
            assert peaks[0] - base < 100
            assert max(peaks[1:]) - peaks[0] < 20 and max(after[1:]) - after[0] < 20
    pooled(go, timeout=240)


@contextlib.contextmanager
def serving(argv, err: Path, wait: float, env=None):
    """`anitalker live --serve ...` as a user starts it, on a free port: yields (process, port) once it says
    where it listens; killed if the test left it running."""
    import subprocess
    import sys
    import time

    from conftest import ROOT

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with open(err, "w") as f:
        proc = subprocess.Popen([sys.executable, "-m", "streaming.cli", "live", "--serve", "--port", str(port),
                                 *argv], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=f, env=env)
    try:
        deadline = time.monotonic() + wait
        while "open http://" not in err.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, err.read_text()
            time.sleep(0.1)
        yield proc, port
    finally:
        if proc.poll() is None:
            proc.kill()


def test_the_command_serves_a_session_per_client_up_to_max_sessions(tmp_path):
    """`anitalker live --serve --test-pattern --max-sessions 1`: one client gets an avatar, the next is
    refused with the reason; SIGINT ends it with 130 and how many sessions it served."""
    import signal
    import subprocess
    import sys
    import time

    from conftest import ROOT
    from websockets.exceptions import InvalidStatus
    from websockets.sync.client import connect

    bad = subprocess.run([sys.executable, "-m", "streaming.cli", "live", "--serve", "--test-pattern",
                          "--max-sessions", "0", "--port", "1"], cwd=ROOT, capture_output=True, text=True)
    assert bad.returncode == 1 and bad.stderr.strip() == "error: --max-sessions must be at least 1, got 0"
    err = tmp_path / "stderr.txt"
    with serving(["--test-pattern", "--max-sessions", "1", "--metrics-every", "0.5"], err, 60) as (proc, port):
        deadline = time.monotonic() + 60
        with connect(f"ws://127.0.0.1:{port}/ws") as ws:
            config = json.loads(ws.recv())
            assert config["own"] and not config["portrait"]        # the test pattern wears no portrait
            ws.send(json.dumps({"op": "portrait", "image": photo(RED)}))
            assert "takes no portrait" in json.loads(ws.recv())["error"]
            with pytest.raises(InvalidStatus) as refused:
                connect(f"ws://127.0.0.1:{port}/ws").close()
            assert refused.value.response.status_code == 503
            while "session 1/1:" not in err.read_text():
                assert time.monotonic() < deadline, err.read_text()
                time.sleep(0.1)
        proc.send_signal(signal.SIGINT)
        proc.wait(30)
    text = err.read_text()
    assert proc.returncode == 130 and "Traceback" not in text, text
    lines = text.strip().splitlines()
    assert lines[-2:] == ["metrics: sessions_served 1", "interrupted by SIGINT"], text


def test_the_command_with_the_real_engine_gives_a_client_its_own_portrait(tmp_path, tiny_checkpoints):
    """`anitalker live --serve` over the tiny checkpoints: the models load once, a client's photo becomes
    its avatar, a photo without a face is that client's error line."""
    import os
    import signal

    from PIL import Image
    from websockets.sync.client import connect

    from avatar.portrait import asset_path

    buf = io.BytesIO()
    Image.open(asset_path("portrait.jpg")).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(buf, "JPEG")
    err = tmp_path / "stderr.txt"
    with serving(["--checkpoints", str(tiny_checkpoints), "--device", "cpu", "--steps", "5", "--hop", "5",
                  "--lookahead", "2", "--context", "5"], err, 120,
                 env={**os.environ, "OMP_NUM_THREADS": "1"}) as (proc, port):
        with connect(f"ws://127.0.0.1:{port}/ws") as ws:
            assert json.loads(ws.recv())["portrait"]
            ws.send(json.dumps({"op": "portrait", "image": photo(RED, size=(200, 200))}))
            msg = json.loads(ws.recv())
            while msg["op"] == "metrics":
                msg = json.loads(ws.recv())
            assert msg["op"] == "error" and "face" in msg["error"], msg
            ws.send(json.dumps({"op": "portrait", "image": base64.b64encode(buf.getvalue()).decode()}))
            while msg["op"] != "portrait":
                msg = json.loads(ws.recv(timeout=60))
            while msg["op"] != "metrics" or not msg["frames"]:
                msg = json.loads(ws.recv(timeout=30))
            assert msg["sessions"] == 1 and msg["errors"] == 0, msg
        proc.send_signal(signal.SIGINT)
        proc.wait(60)
    text = err.read_text()
    assert proc.returncode == 130 and "Traceback" not in text, text
    assert text.count("speed: ") == 1                         # the models were loaded and measured once
    assert "metrics: sessions_served 2" in text               # the default avatar, then the photo's
