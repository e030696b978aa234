"""Many sessions on one engine worker: each gets the frames it gets alone, failures stay with their
session, and the worker serves every session in turn. Tiny random-weight models, fp32 on the CPU."""
from __future__ import annotations

import asyncio
from dataclasses import replace

import numpy as np
import pytest
import torch

from avatar.animator import StreamConfig, StreamingAnimator
from avatar.pipeline import encode_portrait, load_models
from avatar.portrait import asset_path, load_image, prepare_portrait, to_tensor
from avatar.timebase import AudioChunk
from conftest import tone
from streaming.testing import ToneAnimator
from streaming.worker import FATAL_AFTER, EngineWorker

pytestmark = pytest.mark.usefixtures("one_thread")
CONFIG = StreamConfig(steps=2, hop=5, context=5, lookahead=2, audio_context=10)
CHUNK = 1600                                    # 100 ms pushes: a hop every other push or so


@pytest.fixture(scope="module")
def tiny(tiny_checkpoints):
    models = load_models(tiny_checkpoints, "hubert_audio_only", "cpu")
    image = to_tensor(prepare_portrait(load_image(asset_path("portrait.jpg"))).image)
    # three portraits: the photo, its mirror image and a darker copy
    codes = [encode_portrait(models, im) for im in (image, image.flip(-1), image * 0.7)]
    return models, codes


def animators(tiny, n=3):
    models, codes = tiny
    return [StreamingAnimator(models, codes[i % len(codes)], replace(CONFIG, seed=i)) for i in range(n)]


def waves(n=3, seconds=1.3):
    return [tone(seconds, freq=150 + 70 * i) for i in range(n)]


def alone(animator, wave):
    """The reference: the animator driven directly, no worker."""
    frames = []
    for i in range(0, len(wave), CHUNK):
        frames += animator.push(AudioChunk(wave[i:i + CHUNK], i))
    return frames + animator.flush()


def on_worker(worker, animators, waves):
    """Push every wave through its own port of ``worker`` (all queued before it starts, so the rounds are
    deterministic) -> (frames per port, errors per port, (port index, kind) in the order answered)."""
    async def main():
        loop = asyncio.get_running_loop()
        frames, errors, order = [[] for _ in animators], [[] for _ in animators], []
        finished = asyncio.Event()
        ports = []

        def attach(i, a):
            def done(gen, kind, samples, seconds):
                ports[i].done += 1
                order.append((i, kind))
                if all(p.done >= p.sent or p.dead for p in ports):
                    finished.set()
            return worker.attach(a, loop, lambda: 0, lambda gen, f: frames[i].append(f), done,
                                 lambda gen, e, fatal: errors[i].append((str(e), fatal)))
        ports.extend(attach(i, a) for i, a in enumerate(animators))
        for port, wave in zip(ports, waves):
            for i in range(0, len(wave), CHUNK):
                port.submit("push", 0, AudioChunk(wave[i:i + CHUNK], i))
            port.submit("flush", 0)
        worker.start()
        await asyncio.wait_for(finished.wait(), 120)
        for p in ports:
            p.detach()
        worker.stop()
        return frames, errors, order
    return asyncio.run(main())


def same(a, b):
    return len(a) == len(b) and all(x.pts == y.pts and np.array_equal(x.image, y.image)
                                    and np.array_equal(x.audio, y.audio) for x, y in zip(a, b))


def test_a_session_on_a_shared_worker_gets_bit_identical_frames(tiny):
    ws = waves()
    reference = [alone(a, w) for a, w in zip(animators(tiny), ws)]
    frames, errors, _ = on_worker(EngineWorker(), animators(tiny), ws)
    assert errors == [[], [], []]
    assert all(len(f) == 33 for f in reference)
    for got, want in zip(frames, reference):
        assert same(got, want)
    assert not np.array_equal(reference[0][20].image, reference[1][20].image)   # the sessions do differ


def test_batched_sessions_match_alone_within_rounding(tiny):
    """Batching stacks the DDIM windows and the renderer's frames of all sessions: batched kernels round
    differently: codes agree to 1e-4 and pictures to 4 grey levels, in at most 0.1 % of their values
    (measured: codes 1.5e-6, pictures 3 grey levels at most, 0.02 % of the values differ at all)."""
    ws = waves()
    reference = [alone(a, w) for a, w in zip(animators(tiny), ws)]
    worker = EngineWorker(batch=True)
    batched = []
    import avatar.batch as batch
    run = batch.run_together
    batch.run_together = lambda work: (batched.append(len(work)), run(work))[1]
    try:
        frames, errors, _ = on_worker(worker, animators(tiny), ws)
    finally:
        batch.run_together = run
    assert errors == [[], [], []] and max(batched) == 3
    for got, want in zip(frames, reference):
        assert [f.pts for f in got] == [f.pts for f in want]
        for x, y in zip(got, want):
            assert np.array_equal(x.audio, y.audio)
            np.testing.assert_allclose(x.meta["motion"], y.meta["motion"], atol=1e-4)
            diff = np.abs(x.image.astype(int) - y.image.astype(int))
            assert diff.max() <= 4 and (diff > 0).mean() <= 1e-3


class Failing(StreamingAnimator):
    """Fails hops after their motion is committed (so, as after a session's reset, the next hop can go
    on): `fail` says which (a set of hop numbers; None: every hop)."""
    def __init__(self, *args, fail=None, **kw):
        super().__init__(*args, **kw)
        self.fail, self.hops = fail, 0

    def commit(self, *args):
        codes = super().commit(*args)
        self.hops += 1
        if self.fail is None or self.hops in self.fail:
            raise ValueError(f"bad window {self.hops}")
        return codes


class Broken(StreamingAnimator):
    """Cannot take any audio: every item fails, so its engine is declared dead after FATAL_AFTER."""
    def accept(self, chunk):
        raise ValueError("broken")


@pytest.mark.parametrize("batch", [False, True])
def test_a_failing_session_leaves_the_others_intact(tiny, batch):
    """Session 1 fails one hop; session 2 fails every item until its engine is declared dead. Session 0
    gets its frames as alone (bit-identical unbatched), and the worker serves it to the end."""
    models, codes = tiny
    ws = waves()
    reference = alone(animators(tiny)[0], ws[0])
    engines = [animators(tiny)[0], Failing(models, codes[1], replace(CONFIG, seed=1), fail={2}),
               Broken(models, codes[2], replace(CONFIG, seed=2))]
    frames, errors, _ = on_worker(EngineWorker(batch=batch), engines, ws)
    if batch:
        for x, y in zip(frames[0], reference):
            assert np.abs(x.image.astype(int) - y.image.astype(int)).max() <= 4
        assert [f.pts for f in frames[0]] == [f.pts for f in reference]
    else:
        assert same(frames[0], reference)
    assert errors[0] == []
    assert errors[1] == [("bad window 2", False)]
    assert len(frames[1]) == len(reference) - CONFIG.hop        # the failed hop's frames only are lost
    assert [fatal for _, fatal in errors[2]] == [False] * (FATAL_AFTER - 1) + [True]
    assert frames[2] == []


def test_the_worker_serves_sessions_in_turn():
    """A session that floods the worker with 40 items cannot starve one that sends 4 at the same time:
    rounds take one item per session, so the second session's 4 are answered among the first 8."""
    frames, errors, order = on_worker(EngineWorker(), [ToneAnimator(), ToneAnimator()],
                                      [np.full(40 * CHUNK, 0.1, np.float32), np.full(4 * CHUNK, 0.1, np.float32)])
    second = [k for k, (i, _) in enumerate(order) if i == 1]
    assert len(second) == 5 and max(second) <= 9              # 4 pushes and the flush
    assert len(frames[0]) == 40 * CHUNK // 640 and len(frames[1]) == 4 * CHUNK // 640


def test_call_runs_on_the_worker_thread_and_reports_errors():
    import threading

    worker = EngineWorker().start()
    try:
        assert worker.call(lambda: threading.current_thread().name).result(5) == "animator"
        with pytest.raises(ZeroDivisionError):
            worker.call(lambda: 1 / 0).result(5)
    finally:
        worker.stop()
    with pytest.raises(RuntimeError, match="stopped"):
        worker.call(print)


def test_sessions_on_one_engine_as_the_readme_shows(tiny):
    """The README's pattern: one EngineWorker, several Sessions on it, each with its own portrait (encoded
    on the worker's thread) and audio; a session's frames are those it gets alone."""
    from streaming.clock import FakeTime
    from streaming.session import Session

    models, _ = tiny
    image = to_tensor(prepare_portrait(load_image(asset_path("portrait.jpg"))).image)
    photos = [image, image.flip(-1), image * 0.7]

    async def client(engine, photo, pcm):
        code = await asyncio.wrap_future(engine.call(encode_portrait, models, photo))
        animator = StreamingAnimator(models, code, CONFIG, now=(clock := FakeTime()).now)
        async with Session(animator, time_source=clock, engine=engine) as avatar:
            avatar.push(pcm, rate=16000)
            frames = avatar.frames()
            out = [await frames.__anext__() for _ in range(45)]
            await frames.aclose()
        return out

    async def main(n):
        engine = EngineWorker().start()
        try:
            return await asyncio.gather(*(client(engine, photos[i], w) for i, w in enumerate(waves(n))))
        finally:
            engine.stop()

    together = asyncio.run(main(3))
    first_alone = asyncio.run(main(1))[0]
    assert sum(f.audio.any() for f in together[0]) >= 30          # the speech played
    assert same(together[0], first_alone)
    assert not same(together[0], together[1])
