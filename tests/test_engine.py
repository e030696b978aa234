"""Many sessions on one engine worker: each gets the frames it gets alone, failures stay with their
session, and the worker serves every session in turn. Tiny random-weight models, fp32 on the CPU."""
from __future__ import annotations

import asyncio
import time
import warnings
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


def test_batched_sessions_match_alone_within_rounding(tiny, monkeypatch):
    """Batching stacks the HuBERT windows, the DDIM windows and the renderer's frames of all sessions
    (each seen here in batches of 3): batched kernels round
    differently: codes agree to 1e-4 and pictures to 4 grey levels, in at most 0.1 % of their values
    (measured: codes 1.5e-6, pictures 3 grey levels at most, 0.02 % of the values differ at all)."""
    ws = waves()
    reference = [alone(a, w) for a, w in zip(animators(tiny), ws)]
    sizes = {"hubert": [], "ddim": [], "render": []}

    def spy(name, owner, attr, size):
        original = getattr(owner, attr)
        monkeypatch.setattr(owner, attr, lambda *a, **k: (sizes[name].append(size(*a, **k)), original(*a, **k))[1])
    from avatar import batch
    from models.frontend import HubertFrontend
    spy("hubert", HubertFrontend, "states_batch", lambda self, waves: len(waves))
    spy("ddim", batch, "sample_windows", lambda windows: len(windows))
    models = tiny[0]
    spy("render", models, "_render", lambda wa, alphas, feats: len(alphas))
    frames, errors, _ = on_worker(EngineWorker(batch=True), animators(tiny), ws)
    assert errors == [[], [], []]
    assert max(sizes["hubert"]) == 3 and max(sizes["ddim"]) == 3 and max(sizes["render"]) == 3 * CONFIG.hop
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


# ---- ready for a GPU ------------------------------------------------------------------------------------
SYNCS = ("item", "tolist", "numpy", "cpu", "__int__", "__float__", "__bool__", "__index__")


def test_the_ddim_loop_never_reads_a_value_back(tiny, monkeypatch):
    """On a GPU, reading a tensor's value on the host (item(), int(t), float(t), a branch on a tensor, a
    copy to the CPU) waits for every queued kernel. Sampling a window (three sessions' windows batched,
    with inpainting) must not do it at all: every such call on a tensor is counted here."""
    from avatar.motion import sample_windows

    engines = animators(tiny)
    for a, w in zip(engines, waves()):
        a.push(AudioChunk(w[:8000], 0))                       # a hop or two: the windows now have context
    blocks = [a.accept(AudioChunk(w[8000:12000], 8000)) for a, w in zip(engines, waves())]
    windows = [a.plan(b[0]) for a, b in zip(engines, blocks)]
    assert windows[0].n_ctx > 0 and len({w.key for w in windows}) == 1
    calls = []
    for name in SYNCS:
        original = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda self, *a, _f=original, _n=name, **k:
                            (calls.append(_n), _f(self, *a, **k))[1])
    with torch.inference_mode():
        x0 = sample_windows(windows)
        single = sample_windows(windows[:1])
    monkeypatch.undo()
    assert calls == []
    assert len(x0) == 3 and x0[0].shape == single[0].shape


def test_the_command_line_default_precision_is_bf16_on_a_gpu_only(monkeypatch):
    import avatar.pipeline as pipeline
    from avatar.pipeline import Speed
    from streaming.cli import build_parser, speed_from_args

    speed = speed_from_args(build_parser().parse_args(["render", "--audio", "a.wav"]))
    monkeypatch.setattr(pipeline, "native_bf16", lambda device: True)
    assert speed.resolve(torch.device("cpu")).precision == "fp32"         # the exact path stays the CPU's
    assert speed.resolve(torch.device("cuda")).precision == "bf16"
    assert Speed(precision="fp32").resolve(torch.device("cuda")).precision == "fp32"   # --precision fp32
    monkeypatch.setattr(pipeline, "native_bf16", lambda device: False)
    assert speed.resolve(torch.device("cuda")).precision == "fp32"        # an old GPU without bf16


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_a_gpu_sessions_share_one_engine_in_bf16(tiny_checkpoints):
    """On CUDA: bf16 by default, batching on, three sessions' frames come out of one worker."""
    from avatar.pipeline import Speed

    models = load_models(tiny_checkpoints, "hubert_audio_only", "cuda", Speed(precision=None))
    assert models.speed.precision == "bf16"
    image = to_tensor(prepare_portrait(load_image(asset_path("portrait.jpg"))).image)
    code = encode_portrait(models, image)
    engines = [StreamingAnimator(models, code, replace(CONFIG, seed=i)) for i in range(3)]
    worker = EngineWorker()
    frames, errors, _ = on_worker(worker, engines, waves())
    assert worker.batch is True and errors == [[], [], []]
    assert all(len(f) == 33 and f[-1].image.dtype == np.uint8 for f in frames)


class FakeEvent:
    """A CUDA event on the CPU: its time is taken at record() (a CPU's work has run by then) and, as a real
    event's, it can be read only after the host has waited for the stream (to_host)."""
    recorded: list = []

    def __init__(self, enable_timing=False):
        assert enable_timing
        self.t, self.done = None, False

    def record(self, stream=None):
        self.t, self.done = time.perf_counter(), False
        FakeEvent.recorded.append(self)

    def elapsed_time(self, end):
        if not (self.done and end.done):
            raise RuntimeError("a span was read before the wait that follows its work")
        return 1000 * (end.t - self.t)


def caller() -> str:
    """file:line of the code that called the patched function (for the failure message)."""
    import traceback
    frame = traceback.extract_stack(limit=3)[0]
    return f"{frame.filename}:{frame.lineno}"


@pytest.fixture
def gpu_books(tiny, monkeypatch):
    """The engine's GPU bookkeeping on the CPU: Spans use (fake) CUDA events; every wait for the device
    (to_host), every value read back to the host outside it and every copy to the device that would wait
    (a pageable .to(device), torch.tensor(..., device=)) is counted. The DDIM tables are already on the
    device (once a process: models.sampler.Schedule.tables)."""
    import avatar.animator
    import avatar.batch
    import avatar.device
    from models.sampler import ddim_schedule

    ddim_schedule(CONFIG.steps).tables(tiny[0].device)
    books = {"waits": 0, "reads": [], "blocking_copies": []}
    FakeEvent.recorded = []
    monkeypatch.setattr(avatar.device, "uses_events", lambda device: True)
    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: None)
    inside = []
    original_to_host = avatar.device.to_host

    def to_host(*tensors):
        books["waits"] += 1
        for e in FakeEvent.recorded:       # what a real wait guarantees: every recorded event has run
            e.done = True
        inside.append(1)
        try:
            return original_to_host(*tensors)
        finally:
            inside.pop()
    monkeypatch.setattr(avatar.animator, "to_host", to_host)
    monkeypatch.setattr(avatar.batch, "to_host", to_host)
    for name in SYNCS:
        original = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda self, *a, _f=original, _n=name, **k:
                            (inside or books["reads"].append(f"{_n} at {caller()}"), _f(self, *a, **k))[1])
    to = torch.Tensor.to

    def checked_to(self, *args, **kw):
        target = [a for a in args if isinstance(a, (torch.device, str))] + [kw.get("device")]
        if self.device.type == "cpu" and any(d is not None for d in target) and not kw.get("non_blocking"):
            books["blocking_copies"].append(f".to{args} at {caller()}")
        return to(self, *args, **kw)
    monkeypatch.setattr(torch.Tensor, "to", checked_to)
    for name in ("tensor", "as_tensor"):
        make = getattr(torch, name)

        def checked(data, *args, _make=make, _n=name, **kw):
            if kw.get("device") is not None and not (isinstance(data, torch.Tensor) and data.device == kw["device"]):
                books["blocking_copies"].append(f"torch.{_n}(..., device=) at {caller()}")
            return _make(data, *args, **kw)
        monkeypatch.setattr(torch, name, checked)
    return books


@pytest.mark.parametrize("static", [False, True])
def test_a_hop_waits_for_the_device_once_and_times_it_with_events(tiny, gpu_books, monkeypatch, static):
    """As on a GPU (Spans on events, the whole hop rendered in one batch): over a stream, the engine waits
    for the device once per hop (the copy of its pictures and codes to the host), reads no value back
    otherwise, copies nothing to the device in a way that would wait, and reads every stage's time only
    after that wait; the times are those of the work (a renderer made 40 ms slower per call is seen so).
    static: windows and render batches padded to fixed shapes (as for CUDA graphs)."""
    from avatar.pipeline import _bucketed

    models, codes = tiny
    models = replace(models)                        # its own _render, the shared modules
    draw, calls = models._render, []

    def slow_render(*args):
        calls.append(len(args[1]))
        time.sleep(0.04)
        return draw(*args)
    models._render = _bucketed(slow_render) if static else slow_render
    models.static_shapes = static
    animator = StreamingAnimator(models, codes[0], replace(CONFIG, render_batch=CONFIG.hop))
    hops = []
    commit = animator.commit
    monkeypatch.setattr(animator, "commit", lambda *a: (hops.append(1), commit(*a))[1])
    frames = alone(animator, waves(1)[0])
    assert len(frames) == 33 and len(hops) == 7 and len(calls) == 7
    assert gpu_books["waits"] == len(hops)
    assert gpu_books["reads"] == [] and gpu_books["blocking_copies"] == []
    t = animator.timings
    assert t["features"] > 0 and t["motion"] > 0 and t["render"] >= 0.04 * len(calls)
    assert min(animator._render_cost) >= 0.04 / CONFIG.hop         # seconds per frame of a 5-frame batch
    assert len(animator._hop_cost) == 4 and min(animator._hop_cost) > 0


def test_batched_sessions_wait_for_the_device_once_per_wave(tiny, gpu_books):
    """Three sessions batched on one worker: one wait per wave (the j-th hop of every session, sampled and
    rendered together), no other read back or waiting copy, and each session's stages still timed."""
    engines = animators(tiny)
    frames, errors, _ = on_worker(EngineWorker(batch=True), engines, waves())
    assert errors == [[], [], []] and all(len(f) == 33 for f in frames)
    assert 1 <= gpu_books["waits"] <= 7                           # 7 hops a session, in waves of 3
    assert gpu_books["reads"] == [] and gpu_books["blocking_copies"] == []
    for a in engines:
        assert min(a.timings.values()) > 0 and a._render_cost and a._hop_cost


def test_padded_windows_and_render_batches_keep_the_real_frames(tiny):
    """Padding a window to the full length (its last frames masked out of attention and the convolutions)
    and a render batch to a fixed size leaves the real frames as they were, up to the rounding of longer
    sums: the denoiser's eps, and a whole stream's codes and pictures."""
    from avatar.pipeline import _bucketed
    from models.sampler import ddim_schedule

    models, codes = tiny
    s2 = models.stage2
    g = torch.Generator().manual_seed(0)
    audio = torch.randn(1, s2.dims.hubert_layers, 2 * 7, s2.dims.hubert_dim, generator=g)
    with torch.inference_mode():
        cond = s2.condition(codes[0].wa, codes[0].alpha0, audio)
        x = torch.randn(1, 7, s2.dims.motion_dim, generator=g)
        t = ddim_schedule(CONFIG.steps).timesteps[-1:]
        eps = s2.eps(cond, x, t)
        padded = s2.eps(s2.pad(cond, 12), torch.cat([x, torch.randn(1, 5, x.shape[2], generator=g)], 1), t)
    assert padded.shape[1] == 12
    np.testing.assert_allclose(padded[:, :7], eps, atol=1e-5)

    static = replace(models)
    static.static_shapes, static._render = True, _bucketed(static.stage1.render)
    config = replace(CONFIG, render_batch=CONFIG.hop)
    want = alone(StreamingAnimator(models, codes[0], config), waves(1)[0])
    got = alone(StreamingAnimator(static, codes[0], config), waves(1)[0])
    assert [f.pts for f in got] == [f.pts for f in want]
    for a, b in zip(got, want):
        np.testing.assert_allclose(a.meta["motion"], b.meta["motion"], atol=1e-5)
        assert np.abs(a.image.astype(int) - b.image.astype(int)).max() <= 1


def test_render_batches_take_few_sizes_and_at_most_80_frames_a_call():
    """Many sessions' frames in one call: padded to 10, 20, 40 or 80 rows, more than 80 split into calls
    of 80 (the last one padded too), each frame's own row rendered and nothing else returned."""
    from avatar.pipeline import _bucketed

    sizes = []

    def render(wa, alpha, feats):          # a frame's picture from its own rows only
        sizes.append(len(alpha))
        return alpha * 2 + wa + feats[0]

    for k, want in [(1, [10]), (10, [10]), (11, [20]), (45, [80]), (80, [80]), (81, [80, 10]),
                    (200, [80, 80, 40])]:
        sizes.clear()
        alpha, wa, feat = torch.arange(k * 3.0).reshape(k, 3), torch.randn(k, 3), torch.randn(1, 3)
        out = _bucketed(render)(wa, alpha, [feat])
        assert sizes == want, k
        torch.testing.assert_close(out, alpha * 2 + wa + feat)


def test_compiled_windows_and_renders_keep_one_shape_over_a_stream(tiny):
    """With Models compiled for fixed shapes (compile_graphs, as on a GPU, here with a backend that only
    counts what dynamo compiles): after a first utterance, another of a different length and one after an
    interrupt compile nothing more, so no window (the first without context, the final partial one) and
    no render batch has a shape of its own. Batched sessions: windows stack in batches of 1, 2, 4, ...,
    so a second round of as many sessions compiles nothing either."""
    from avatar.pipeline import compile_graphs

    models, codes = tiny
    graphs, windows = [], []

    def counting(gm, inputs):
        graphs.append([tuple(t.shape) for t in inputs if isinstance(t, torch.Tensor)])
        return gm.forward
    static = replace(models)
    torch._dynamo.reset()
    compile_graphs(static, backend=counting)
    denoiser = static.denoiser
    static.denoiser = lambda cond, x, t: (windows.append(tuple(x.shape)), denoiser(cond, x, t))[1]
    config = replace(CONFIG, render_batch=CONFIG.hop)
    animator = StreamingAnimator(static, codes[0], config)
    first = alone(animator, waves(1, seconds=1.3)[0])
    warm = len(graphs)
    assert warm >= 2 and len(first) == 33
    second = alone(animator, waves(1, seconds=0.9)[0])          # another final window length
    animator.reset(second[-1])
    third = alone(animator, waves(1, seconds=1.1)[0])           # after an interrupt: no context
    assert len(second) == 23 and len(third) == 28 and len(graphs) == warm
    n = CONFIG.context + CONFIG.hop + CONFIG.lookahead
    assert set(windows) == {(1, n, windows[0][2])}

    def batched(k, seconds):
        engines = [StreamingAnimator(static, codes[i % 3], replace(config, seed=i)) for i in range(k)]
        frames, errors, _ = on_worker(EngineWorker(batch=True), engines, waves(k, seconds))
        assert errors == [[]] * k and len(frames[0]) > 20
    batched(3, 1.3)
    warm = len(graphs)
    batched(3, 0.9)
    assert len(graphs) == warm
    assert {b for b, *_ in windows} == {1, 4} and {f for _, f, _ in windows} == {n}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_a_gpu_compiled_hops_keep_one_shape_and_wait_once(tiny_checkpoints, monkeypatch):
    """On CUDA with Speed.compile: the denoiser and the renderer run as CUDA graphs at fixed shapes. After
    a first utterance (compiling and capturing), another of a different length and one after an interrupt
    compile nothing more; torch's sync debug mode sees at most one synchronising call a hop; the frames
    match the uncompiled engine (fp32, TF32 off); the stages' times are non-zero."""
    from avatar.pipeline import Speed
    from torch._dynamo.utils import counters

    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    torch._dynamo.reset()
    fast = load_models(tiny_checkpoints, "hubert_audio_only", "cuda", Speed(precision="fp32", compile=True))
    plain = load_models(tiny_checkpoints, "hubert_audio_only", "cuda", Speed(precision="fp32"))
    assert fast.static_shapes and not plain.static_shapes
    image = to_tensor(prepare_portrait(load_image(asset_path("portrait.jpg"))).image)
    out = {}
    for name, models in (("fast", fast), ("plain", plain)):
        animator = StreamingAnimator(models, encode_portrait(models, image), CONFIG)
        first = alone(animator, waves(1, seconds=1.3)[0])
        graphs = counters["stats"]["unique_graphs"]
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                second = alone(animator, waves(1, seconds=0.9)[0])
        finally:
            torch.cuda.set_sync_debug_mode(0)
        animator.reset(second[-1])
        third = alone(animator, waves(1, seconds=1.1)[0])
        assert counters["stats"]["unique_graphs"] == graphs
        syncs = [w for w in caught if "synchroniz" in str(w.message)]
        assert len(syncs) <= -(-len(second) // CONFIG.hop), [str(w.message) for w in syncs[:3]]
        assert min(animator.timings.values()) > 0
        out[name] = first + second + third
    for a, b in zip(out["fast"], out["plain"]):
        np.testing.assert_allclose(a.meta["motion"], b.meta["motion"], atol=1e-4)
        assert np.abs(a.image.astype(int) - b.image.astype(int)).max() <= 2
