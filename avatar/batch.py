"""The hops of several sessions computed together: one engine worker round (streaming/worker.py) as batches.

    round: session A push, session B push, ...
      accept (each: its audio, normalised)  --HuBERT windows of one length stacked, one model call-->  blocks
      wave j = the j-th block of every session:
        plan (each)  ->  windows  --sample_windows: same Window.key stacked, one DDIM loop-->  x0
        commit (each) -> codes    --one renderer call: codes and portrait features stacked-->  frames

A session's motion and frames are those it gets alone up to the rounding of batched kernels (fp32 on a
CPU: about 1e-6 in the codes, a grey level at most in the pictures; tests/test_engine.py). Failures stay
with their session: a batch that raises is redone one session at a time, so only the one that fails pays.
"""
from __future__ import annotations

from dataclasses import replace

import torch

from .device import Span, index, to_host
from .features import rows_of
from .motion import sample_windows
from .portrait import uint8_images


def can_batch(port, item) -> bool:
    """Audio for a phased engine (StreamingAnimator), of the current generation."""
    kind, gen, _ = item
    return kind in ("push", "flush") and hasattr(port.animator, "accept") and gen == port.current_gen()


class _Job:
    def __init__(self, port, item):
        self.port, self.item = port, item
        self.kind, self.gen, self.payload = item
        self.t0 = port.now()
        self.blocks = []
        self.hubert = []                # per block: (samples, first row, end row) for HuBERT, if deferred
        self.ok = True

    def fail(self, e: BaseException) -> None:
        self.ok = False
        self.port.fail(self.gen, self.kind, e)

    def frame(self, frame) -> None:
        if self.ok and not self.port.answer(self.port.on_frame, self.gen, frame):
            self.ok = False


@torch.inference_mode()
def run_together(work: list) -> list:
    """Do the batchable items of ``work`` [(port, (kind, gen, payload))] together; return the others,
    for the worker to do one by one."""
    jobs = [_Job(port, item) for port, item in work if can_batch(port, item)]
    rest = [(port, item) for port, item in work if not can_batch(port, item)]
    for job in jobs:
        features = job.port.animator.features
        features.deferred = [] if features.can_defer else None
        try:
            job.blocks = job.port.animator.accept(job.payload if job.kind == "push" else None)
            job.hubert = features.deferred or []
        except Exception as e:          # noqa: BLE001 -- this session's failure, reported to it
            job.fail(e)
        finally:
            features.deferred = None
    _hubert([job for job in jobs if job.ok])
    for j in range(max((len(job.blocks) for job in jobs), default=0)):
        _wave([(job, job.blocks[j]) for job in jobs if job.ok and j < len(job.blocks)])
    for job in jobs:
        if job.ok:
            job.port.failures = 0
        if not job.port.dead:
            samples = len(job.payload.samples) if job.kind == "push" else 0
            job.port.answer(job.port.on_done, job.gen, job.kind, samples, job.port.now() - job.t0)
    return rest


def _each(items, fn):
    """items [(job, ...)] -> [(job, ..., fn(job, ...))]; an item whose fn raises fails its job and is left
    out."""
    out = []
    for item in items:
        try:
            out.append((*item, fn(*item)))
        except Exception as e:          # noqa: BLE001 -- this session's failure, reported to it
            item[0].fail(e)
    return out


def _hubert(jobs) -> None:
    """The deferred HuBERT windows of every session: those of one length in one model call; each block
    then gets its rows (and its session its share of the time)."""
    groups: dict = {}
    for job in jobs:
        for i, (x, lo, hi) in enumerate(job.hubert):
            groups.setdefault((id(job.port.animator.features._raw.model), len(x)), []).append((job, i, x, lo, hi))
    for reqs in groups.values():
        a0 = reqs[0][0].port.animator
        with Span(a0.models.device, a0.now) as span:     # read after the first wave's wait
            try:
                with a0.models.autocast(), torch.inference_mode():
                    states = a0.features._raw.states_batch([x for _, _, x, _, _ in reqs])
            except Exception:           # noqa: BLE001 -- each alone, so only the failing session pays
                states = []
                for job, _, x, _, _ in reqs:
                    try:
                        with a0.models.autocast(), torch.inference_mode():
                            states.append(a0.features._raw.states_batch([x])[0])
                    except Exception as e:      # noqa: BLE001
                        states.append(None)
                        if job.ok:
                            job.fail(e)
        for (job, i, _, lo, hi), st in zip(reqs, states):
            if job.ok and st is not None:
                job.port.animator.timer.add("features", span, 1 / len(reqs))
                job.blocks[i] = replace(job.blocks[i], feats=rows_of(st, lo, hi))


def _wave(pairs) -> None:
    """One block of each session: plan, sample together, commit, render together, hand out the frames."""
    if not pairs:
        return
    a0 = pairs[0][0].port.animator
    with Span(a0.models.device, a0.now) as span:    # read after the wave's one wait (in _render)
        planned = _each(pairs, lambda job, block: job.port.animator.plan(block))      # (job, block, window)
        try:
            with a0.models.autocast(), torch.inference_mode():
                sampled = [(*p, x0) for p, x0 in zip(planned, sample_windows([w for _, _, w in planned]))]
        except Exception:               # noqa: BLE001 -- find whose window it is: each alone
            sampled = _each(planned, _sample_one)
    for job, *_ in sampled:
        job.port.animator.timer.add("motion", span)       # each session's hop waited for all of it
    committed = _each(sampled, lambda job, block, w, x0: job.port.animator.commit(block, w, x0))
    _render([(job, block, codes) for job, block, _, _, codes in committed])


def _sample_one(job, block, window):
    with job.port.animator.models.autocast(), torch.inference_mode():
        return sample_windows([window])[0]


def _render(hops) -> None:
    """Draw what every session's hop can still show in time, in one renderer call, then hand out frames
    (the pictures and every hop's codes come back from a GPU in one copy)."""
    if not hops:
        return
    draws = _each(hops, lambda job, block, codes: job.port.animator.to_draw(block, codes))
    a0 = hops[0][0].port.animator
    models = a0.models
    with Span(models.device, a0.now) as span:
        try:
            images = _draw_all(models, [(job.port.animator, codes, block.start, d)
                                        for job, block, codes, d in draws])
        except Exception:               # noqa: BLE001 -- each alone, so only the failing session pays
            images = {}
            for job, block, codes, d in draws:
                try:
                    images.update(_draw_all(models, [(job.port.animator, codes, block.start, d)]))
                except Exception as e:  # noqa: BLE001
                    job.fail(e)
    keys = list(images)
    # the wave's one wait: pictures and codes of every session, after which every Span can be read
    host = to_host(*(images[k] for k in keys), *(codes.float() for _, _, codes, _ in draws))
    images = dict(zip(keys, host))
    motions = host[len(keys):]
    n = sum(len(d) for *_, d in draws)
    for (job, block, codes, d), motion in zip(draws, motions):
        if not job.ok:
            continue
        a = job.port.animator
        a.timer.add("render", span, len(d) / max(n, 1))
        try:
            for frame in a.drawn_frames(block, motion, d, images.get(id(a), [])):
                job.frame(frame)
        except Exception as e:          # noqa: BLE001
            job.fail(e)


def _draw_all(models, hops) -> dict:
    """hops [(animator, codes, start, pts to draw)] -> {id(animator): uint8 images on the device}: one
    renderer call over every session's frames, each with its own portrait's latent and skip features."""
    hops = [h for h in hops if h[3]]
    if not hops:
        return {}
    wa, alphas, feats = [], [], []
    for a, codes, start, draw in hops:
        k = len(draw)
        idx = index([p - start for p in draw], codes.device)
        wa.append(a.code.wa.expand(k, -1))
        alphas.append(codes[idx])
        feats.append([f.expand(k, *f.shape[1:]) for f in a.code.feats])
    if len(hops) == 1:                  # one session: exactly its own render call
        wa, feats = [hops[0][0].code.wa], [hops[0][0].code.feats]
    with models.autocast(), torch.inference_mode():
        u8 = uint8_images(models._render(torch.cat(wa), torch.cat(alphas), [torch.cat(fs) for fs in zip(*feats)]))
    out, i = {}, 0
    for a, _, _, draw in hops:
        out[id(a)] = u8[i:i + len(draw)]
        i += len(draw)
    return out
