"""OpenVINO's CPU plugin against today's fastest renderer (the frozen torch.compile of --fast), in one run.

    pip install openvino          # not a dependency of the project: this trial measures whether it should be
    python bench/openvino_trial.py [--rounds 5] [--threads 1,2] [--batches 1,2,5,10] [--frames 10]
                                   [--forms transposed] [--f32] [--inputs]
    python bench/openvino_trial.py --part denoiser [--rounds 5] [--threads 1,2]
    python bench/openvino_trial.py --part hubert [--rounds 5] [--threads 1]

Full-size Stage1 with generated (random) weights (seed 0) and the bundled portrait. The renderer
(``Stage1.render``) is converted with ``openvino.convert_model`` (TorchScript tracing) with the portrait's
features (wa and the 6 skip maps) baked in as constants, as a live session would do for its fixed portrait,
one static-shape model per batch size, and compiled for the CPU with INFERENCE_PRECISION_HINT bf16 (and
f32 with --f32), PERFORMANCE_HINT LATENCY and INFERENCE_NUM_THREADS per --threads. ``--inputs`` adds a
model that takes the portrait features as inputs (converted once per process, not per portrait).
``--forms`` picks the graph OpenVINO gets (the torch model's equal variants, see models/stage1.py):

  transposed      official transposed upsampling convs, constant kernels (style on the activations)
  subpixel        sub-pixel upsampling (regular 2x2 conv + shuffle), constant kernels: what --fast compiles
  folded          transposed, style and demodulation folded into per-frame kernels (the eager default)
  nchw            transposed + constant kernels, the 1x1 ToRGB/ToFlow matmuls traced in NCHW order, so the
                  graph has no NHWC permutes around them (OpenVINO chooses its own layouts)

The baseline is what ``--fast`` runs here: bf16 autocast, sub-pixel upsampling, constant kernels and
``avatar.pipeline.compile_frozen``, called one frame at a time as the live engine does at every batch size.
Every variant and thread count is timed round by round in one process (round 0 warms up), each variant
given one untimed call before its timed ones in a round; ms/frame is the median over rounds of a round's
mean. Errors: 6 motion codes near the portrait's own (as bench/errors.py), each variant against the exact
fp32 eager renderer, as grey levels after the demo's uint8 conversion. Compile cost: conversion + compile
per baked model (paid per portrait), the first frozen call (paid per process).

``--part denoiser``: the full-size stage-2 model, one streaming motion window as the engine samples it
(context 10 + hop 10 + lookahead 5 frames, 10 DDIM steps, inpainting; bench/stages.py's "motion"), with
the denoiser step in torch bf16 (today's --fast), in torch fp32 (the exact default) and on OpenVINO
(avatar/openvino_denoiser.py, bf16 and fp32 hints); errors of the window's committed codes and of one eps
call against torch fp32 (relative L2).

``--part hubert``: HuBERT-large (random weights) over one streaming window of the engine ([context 25 |
hop 10 | lookahead 5] frames of speech) on OpenVINO bf16, against torch bf16 over the same window and
torch's incremental features for a hop (bench/stages.py's "features": what --fast runs); the error of
OpenVINO's hidden states against torch fp32 (relative L2). Writes JSON (bench/results/openvino_trial[_denoiser].json) and
prints tables.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
import warnings
from pathlib import Path
from unittest import mock

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import models.stage1 as stage1_module  # noqa: E402
from avatar.pipeline import compile_frozen, cpu_name  # noqa: E402
from avatar.portrait import asset_path, load_image, prepare_portrait, to_tensor  # noqa: E402
from bench.errors import frame_errors  # noqa: E402
from models.stage1 import Stage1  # noqa: E402

FORMS = ("transposed", "subpixel", "folded", "nchw")
BASE = "torch frozen bf16 subpixel (--fast)"


class Baked(torch.nn.Module):
    """render(alpha) for one portrait: wa and the skip maps are constants of the traced graph."""

    def __init__(self, s1: Stage1, wa, feats):
        super().__init__()
        self.s1, self.wa, self.feats = s1, wa, feats

    def forward(self, alpha):
        return self.s1.render(self.wa, alpha, self.feats)


class Inputs(torch.nn.Module):
    """render(alpha, wa, *feats): the portrait as inputs, so one converted model serves every portrait."""

    def __init__(self, s1: Stage1):
        super().__init__()
        self.s1 = s1

    def forward(self, alpha, wa, f0, f1, f2, f3, f4, f5):
        return self.s1.render(wa, alpha, [f0, f1, f2, f3, f4, f5])


def set_form(s1: Stage1, form: str) -> None:
    s1.set_upsampling("subpixel" if form == "subpixel" else "transposed")
    s1.set_constant_kernels(form != "folded")


def convert(module: torch.nn.Module, example: tuple, form: str):
    """openvino.Model of module traced on example; seconds it took."""
    import openvino as ov

    with torch.no_grad():
        module(*example)       # fills the renderer's weight memos, so tracing sees the same graph twice
        t0 = time.perf_counter()
        # nchw: the 1x1 matmuls take their NCHW branch (models.stage1._pointwise), same sums, no permutes
        with mock.patch.object(stage1_module, "_is_channels_last", lambda x: False) if form == "nchw" \
                else contextlib.nullcontext(), warnings.catch_warnings():
            warnings.simplefilter("ignore", torch.jit.TracerWarning)    # the shape branches are fixed per model
            model = ov.convert_model(module, example_input=example)
    return model, time.perf_counter() - t0


def rss_gb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 30


def compile_ov(model, precision: str, threads: int):
    import openvino as ov

    t0 = time.perf_counter()
    compiled = ov.Core().compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": precision,
                                                      "PERFORMANCE_HINT": "LATENCY",
                                                      "INFERENCE_NUM_THREADS": threads})
    return compiled, time.perf_counter() - t0


def ov_runner(compiled, extra=()):
    """frames(alpha) through one infer request; the output as a torch tensor (no copy)."""
    req = compiled.create_infer_request()
    extra = [np.ascontiguousarray(e) for e in extra]

    def run(alpha: torch.Tensor) -> torch.Tensor:
        req.infer([alpha.numpy(), *extra])
        return torch.from_numpy(req.get_output_tensor(0).data)
    return run


class FrozenEps:
    """The denoiser step as a frozen torch.compile (avatar.pipeline.compile_frozen) of a copy of the model:
    what inductor makes of the same step, for comparison."""

    def __init__(self, stage2):
        import copy

        from models.stage2 import Condition

        self.model = copy.deepcopy(stage2)
        self.fn = compile_frozen(lambda prefix, x, t, pos: self.model.eps(Condition(prefix, None, None, None, pos), x, t))

    def __call__(self, cond, x, t):
        return self.fn(cond.prefix, x, t, cond.positions)


def interleaved(variants: dict, rounds: int, ms_of) -> tuple[dict, list]:
    """Every variant in turn, round after round (the load changes between rounds, so each round compares
    them under the same load): round 0 warms up untimed, rounds 1..rounds give ms_of(key, variant) each;
    key[1] is the torch thread count. -> ({key: [ms per round]}, [load average at each round's start])."""
    samples: dict = {}
    loads = []
    for r in range(rounds + 1):
        loads.append(os.getloadavg()[0])
        for key, v in variants.items():
            torch.set_num_threads(key[1])
            ms = ms_of(key, v)
            if r:
                samples.setdefault(key, []).append(ms)
        print(f"round {r}: load {loads[-1]:.2f}", flush=True)
    return samples, loads


def denoiser_part(args, threads: list[int]) -> None:
    import copy

    import openvino as ov

    from avatar.motion import MotionConfig, MotionStream
    from avatar.openvino_denoiser import OpenVinoDenoiser
    from bench.errors import rel
    from models.precision import prepare_bf16
    from models.stage2 import Stage2, Stage2Dims

    torch.manual_seed(0)
    s2 = Stage2(Stage2Dims()).eval()
    exact = copy.deepcopy(s2)
    prepare_bf16(s2)                                 # as load_models does for bf16
    g = torch.Generator().manual_seed(1)
    wa, alpha0 = torch.randn(1, 512, generator=g), torch.rand(1, 20, generator=g) * 2 - 1
    cfg = MotionConfig(hop=10, context=10, lookahead=5, steps=10)
    n = cfg.context + cfg.hop + cfg.lookahead
    fwin = torch.randn(1, 25, 2 * n, 1024, generator=g)
    backends = {}
    setup = {}
    for t in threads:
        for prec in ("bf16", "fp32"):
            t0 = time.perf_counter()
            backends[(prec, t)] = OpenVinoDenoiser(s2 if prec == "bf16" else exact, prec, threads=t)
            setup[f"openvino {prec} t{t} (copy)"] = time.perf_counter() - t0
    frozen = FrozenEps(s2)
    variants = {}
    for t in threads:
        variants[("torch bf16 (--fast today)", t)] = (s2, None, True)
        variants[("torch bf16, frozen compile", t)] = (s2, frozen, True)
        variants[("torch fp32 (default)", t)] = (exact, None, False)
        variants[("openvino bf16", t)] = (s2, backends[("bf16", t)], True)
        variants[("openvino fp32", t)] = (exact, backends[("fp32", t)], False)

    def window(model, backend, bf16):
        """Seconds of one primed window step, and its committed codes."""
        model.eps_backend = backend
        ms = MotionStream(model, wa, alpha0, cfg)
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            ms.step(0, fwin[:, :, :2 * (cfg.hop + cfg.lookahead)])
            t0 = time.perf_counter()
            codes = ms.step(cfg.hop, fwin)
            dt = time.perf_counter() - t0
        model.eps_backend = None
        return dt, codes

    torch.set_num_threads(max(threads))
    with torch.inference_mode():
        cond = exact.condition(wa, alpha0, fwin)
        x = torch.randn(1, n, 20, generator=g)
        ts = torch.tensor([980])
        eps_ref = exact.eps(cond, x, ts)
    ref_codes = window(exact, None, False)[1]
    errors = {}
    for (name, t), (model, backend, bf16) in variants.items():
        if t == max(threads):
            t0 = time.perf_counter()
            codes = window(model, backend, bf16)[1]
            if backend is not None:
                setup[f"{name} t{t}: first window (compiles its shapes)"] = time.perf_counter() - t0
            model.eps_backend = backend
            with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                c = cond if not bf16 else model.condition(wa, alpha0, fwin)
                e = model.eps(c, x, ts).float()
            model.eps_backend = None
            errors[name] = dict(codes=rel(codes, ref_codes), eps=rel(e, eps_ref))
    # each round: one untimed window first (in round 0 it converts new shapes), then the timed one
    samples, loads = interleaved(variants, args.rounds, lambda key, v: (window(*v), 1000 * window(*v)[0])[1])
    ms = {k: statistics.median(v) for k, v in samples.items()}
    base = "torch bf16 (--fast today)"
    speedup = {k: statistics.median(b / v for b, v in zip(samples[(base, k[1])], samples[k])) for k in samples}
    print(f"\nopenvino {ov.__version__}, torch {torch.__version__}, {cpu_name()}; one motion window (10 DDIM steps, "
          f"{n} frames); median of {args.rounds} rounds, load {min(loads[1:]):.2f}-{max(loads[1:]):.2f}")
    print("| denoiser | threads | ms/window | x faster than torch bf16 (median of per-round ratios) | "
          "error vs torch fp32: codes / eps |\n|---|---:|---:|---:|---|")
    for (name, t), v in sorted(ms.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        e = errors.get(name, {})
        print(f"| {name} | {t} | {v:.1f} | {speedup[(name, t)]:.2f} | "
              f"{e.get('codes', 0):.2g} / {e.get('eps', 0):.2g} |")
    print("\n| one-off cost | seconds |\n|---|---:|")
    for k, v in setup.items():
        print(f"| {k} | {v:.1f} |")
    result = dict(bench="openvino_trial", part="denoiser", openvino=ov.__version__, torch=torch.__version__,
                  cpu=cpu_name(), rounds=args.rounds, loads=loads, errors=errors, setup=setup,
                  ms_per_window=[dict(denoiser=nm, threads=t, ms=v, speedup=speedup[(nm, t)], samples=samples[(nm, t)])
                                 for (nm, t), v in ms.items()])
    out = Path(args.out)
    out = out.with_name(out.stem + "_denoiser" + out.suffix)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))


def ov_profile(model, threads: int, alpha: torch.Tensor, frames: int = 10) -> dict:
    """OpenVINO's per-op times of a bf16 frame, summed per (op type, kernel): ms per frame."""
    import openvino as ov

    compiled = ov.Core().compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "bf16", "PERFORMANCE_HINT": "LATENCY",
                                                      "INFERENCE_NUM_THREADS": threads, "PERF_COUNT": True})
    req = compiled.create_infer_request()
    rows: dict = {}
    for i in range(frames + 3):
        req.infer([alpha.numpy()])
        if i >= 3:
            for e in req.profiling_info:
                key = f"{e.node_type} ({e.exec_type})"
                rows[key] = rows.get(key, 0.0) + e.real_time.total_seconds() * 1000 / frames
    return dict(sorted(rows.items(), key=lambda kv: -kv[1]))


def hubert_part(args, threads: list[int]) -> None:
    import copy
    from types import SimpleNamespace

    import openvino as ov
    from transformers import HubertConfig, HubertModel

    from bench.errors import rel
    from bench.offline import HUBERT_LARGE
    from bench.stages import AUDIO_CONTEXT, HOP, LOOKAHEAD, FeatureStream
    from bench.stream import speech
    from models.frontend import HubertFrontend
    from models.precision import prepare_bf16

    torch.manual_seed(0)
    hub = HubertModel(HubertConfig(**HUBERT_LARGE)).eval()
    exact = copy.deepcopy(hub)
    prepare_bf16(hub)                                  # as load_models does for bf16

    class States(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.m = exact

        def forward(self, x):
            out = self.m(x, output_hidden_states=True)
            return torch.stack(list(out.hidden_states[:-1]) + [out.last_hidden_state])

    wave = speech(60.0)
    x = torch.from_numpy(np.asarray(wave[:(AUDIO_CONTEXT + HOP + LOOKAHEAD) * 640 + 80], dtype=np.float32))[None]
    t0 = time.perf_counter()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = ov.convert_model(States(), example_input=x)
    setup = {"openvino convert": time.perf_counter() - t0}
    reqs = {}
    for t in threads:
        compiled, setup[f"openvino compile t{t}"] = compile_ov(model, "bf16", t)
        reqs[t] = compiled.create_infer_request()
    with torch.inference_mode():
        ref = States()(x)
    reqs[threads[-1]].infer([x.numpy()])
    error = rel(torch.from_numpy(reqs[threads[-1]].get_output_tensor(0).data.copy()), ref)
    models = SimpleNamespace(hubert=HubertFrontend(hub),
                             autocast=lambda: torch.autocast("cpu", dtype=torch.bfloat16))
    streams = {m: FeatureStream(models, wave, m) for m in ("window", "incremental")}

    def torch_window():
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
            hub(x, output_hidden_states=True)
    variants = {}
    for t in threads:
        variants[("openvino bf16, window", t)] = lambda t=t: reqs[t].infer([x.numpy()])
        variants[("torch bf16, window", t)] = torch_window
        variants[("torch bf16, incremental hop (--fast)", t)] = lambda: streams["incremental"].hop()
    def timed(key, fn) -> float:
        t0 = time.perf_counter()
        fn()
        return 1000 * (time.perf_counter() - t0)
    samples, loads = interleaved(variants, args.rounds, timed)
    ms = {k: statistics.median(v) for k, v in samples.items()}
    print(f"\nopenvino {ov.__version__}, torch {torch.__version__}, {cpu_name()}; HuBERT-large, one hop of 10 frames "
          f"(window {x.shape[1]} samples); median of {args.rounds} rounds, load {min(loads[1:]):.2f}-{max(loads[1:]):.2f}; "
          f"OpenVINO bf16 states vs torch fp32: {error:.3g} (relative)")
    print("| features | threads | ms/hop |\n|---|---:|---:|")
    for (name, t), v in sorted(ms.items(), key=lambda kv: (kv[0][1], kv[1])):
        print(f"| {name} | {t} | {v:.1f} |")
    print("\n| one-off cost | seconds |\n|---|---:|")
    for k, v in setup.items():
        print(f"| {k} | {v:.1f} |")
    out = Path(args.out)
    out = out.with_name(out.stem + "_hubert" + out.suffix)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(dict(bench="openvino_trial", part="hubert", openvino=ov.__version__, cpu=cpu_name(),
                                   rounds=args.rounds, loads=loads, error=error, setup=setup,
                                   ms_per_hop=[dict(features=n, threads=t, ms=v, samples=samples[(n, t)])
                                               for (n, t), v in ms.items()]), indent=1))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", default="1,2")
    p.add_argument("--batches", default="1,2,5,10")
    p.add_argument("--frames", type=int, default=10, help="frames timed per variant and round")
    p.add_argument("--forms", default="transposed", help=f"comma-separated, of {','.join(FORMS)}")
    p.add_argument("--f32", action="store_true", help="also OpenVINO with INFERENCE_PRECISION_HINT f32 (batch 1)")
    p.add_argument("--inputs", action="store_true", help="also a batch-1 model with the portrait as inputs")
    p.add_argument("--part", default="renderer", choices=["renderer", "denoiser", "hubert"])
    p.add_argument("--profile", action="store_true", help="also OpenVINO's own per-op profile (PERF_COUNT) of "
                   "the first form's bf16 batch-1 model on the most threads")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "openvino_trial.json"))
    args = p.parse_args()
    try:
        import openvino as ov
    except ImportError:
        sys.exit("openvino_trial: openvino is not installed (pip install openvino)")
    forms = args.forms.split(",")
    if bad := [f for f in forms if f not in FORMS]:
        sys.exit(f"openvino_trial: unknown form {bad[0]!r}; use {', '.join(FORMS)}")
    threads = [int(t) for t in args.threads.split(",")]
    if args.part == "denoiser":
        return denoiser_part(args, threads)
    if args.part == "hubert":
        return hubert_part(args, threads)
    batches = [int(b) for b in args.batches.split(",")]

    torch.manual_seed(0)
    s1 = Stage1().eval()
    img = to_tensor(prepare_portrait(load_image(asset_path("portrait.jpg"))).image)
    with torch.inference_mode():
        wa, alpha0, feats = s1.encode(img)
    wa, alpha0, feats = wa.clone(), alpha0.clone(), [f.clone() for f in feats]   # normal tensors, traceable
    g = torch.Generator().manual_seed(1)
    codes = (alpha0 + 0.3 * torch.randn(6, alpha0.shape[1], generator=g)).clamp(-1, 1)   # as bench/errors.py
    alpha = codes[:1]

    torch.set_num_threads(max(threads))
    set_form(s1, "folded")                       # the exact fp32 eager renderer (the default mode)
    with torch.inference_mode():
        ref = torch.cat([s1.render(wa, c[None], feats).float() for c in codes])

    # variants: name -> dict(threads, batch, fn(alpha) -> frames, ...)
    variants: dict = {}
    setup: dict = {}
    for form in forms:
        set_form(s1, form)
        for b in batches:
            model, conv_s = convert(Baked(s1, wa, feats), (codes[:1].repeat(b, 1),), form)
            if args.profile and form == forms[0] and b == batches[0]:
                profile = ov_profile(model, max(threads), alpha)
            for t in threads:
                for prec in ("bf16",) + (("f32",) if args.f32 and b == 1 else ()):
                    compiled, comp_s = compile_ov(model, prec, t)
                    name = f"openvino {prec} {form}"
                    variants[(name, t, b)] = ov_runner(compiled)
                    setup[f"{name} b{b} t{t}"] = dict(convert_s=conv_s, compile_s=comp_s)
            del model                            # the compiled models keep their own weights
            print(f"converted {form} batch {b}: {rss_gb():.1f} GB resident", flush=True)
        if args.inputs:
            ins = (alpha, wa, *feats)
            model, conv_s = convert(Inputs(s1), ins, form)
            for t in threads:
                compiled, comp_s = compile_ov(model, "bf16", t)
                variants[(f"openvino bf16 {form}, portrait as inputs", t, 1)] = \
                    ov_runner(compiled, [x.contiguous().numpy() for x in ins[1:]])
                setup[f"openvino bf16 {form} inputs t{t}"] = dict(convert_s=conv_s, compile_s=comp_s)

    set_form(s1, "subpixel")                     # what --fast compiles here, from now on unchanged
    frozen = compile_frozen(s1.render)

    def torch_frozen(a):
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
            return torch.cat([frozen(wa, a[i:i + 1], feats).float() for i in range(a.shape[0])])
    t0 = time.perf_counter()
    torch_frozen(alpha)
    setup["torch frozen compile (first call)"] = dict(compile_s=time.perf_counter() - t0)
    for t in threads:
        variants[(BASE, t, 1)] = torch_frozen

    errors = {}
    for (name, t, b), fn in variants.items():
        if t == max(threads) and b == 1:
            torch.set_num_threads(t)
            got = torch.cat([fn(c[None]).float().clone() for c in codes])
            errors[name] = frame_errors(got, ref)

    def per_frame(key, fn) -> float:
        b = key[2]
        a = codes[:1].repeat(b, 1)
        fn(a)                                       # untimed: whatever the previous variant left running settles
        t0 = time.perf_counter()
        for _ in range(max(1, args.frames // b)):
            fn(a)
        return 1000 * (time.perf_counter() - t0) / (b * max(1, args.frames // b))
    samples, loads = interleaved(variants, args.rounds, per_frame)

    ms = {k: statistics.median(v) for k, v in samples.items()}
    base = {t: ms[(BASE, t, 1)] for t in threads}
    print(f"\nopenvino {ov.__version__}, torch {torch.__version__}, {cpu_name()}; median of {args.rounds} rounds, "
          f"load {min(loads[1:]):.2f}-{max(loads[1:]):.2f}")
    # the same round's frozen torch time over this variant's: robust to load that changes between rounds
    speedup = {k: statistics.median(b / v for b, v in zip(samples[(BASE, k[1], 1)], samples[k])) for k in samples}
    print("| renderer | threads | batch | ms/frame | x faster than frozen torch (ratio of medians / median of "
          "per-round ratios) |\n|---|---:|---:|---:|---:|")
    for (name, t, b), v in sorted(ms.items(), key=lambda kv: (kv[0][1], kv[0][0], kv[0][2])):
        print(f"| {name} | {t} | {b} | {v:.1f} | {base[t] / v:.2f} / {speedup[(name, t, b)]:.2f} |")
    print("\n| renderer (threads {}, batch 1) | grey levels mean | max | > 4 levels | max abs |\n"
          "|---|---:|---:|---:|---:|".format(max(threads)))
    for name, e in errors.items():
        print(f"| {name} | {e['u8_mean']:.2f} | {e['u8_max']} | {e['u8_over_4']:.1%} | {e['max_abs']:.2g} |")
    print("\n| one-off cost | seconds |\n|---|---:|")
    for k, v in setup.items():
        print(f"| {k} | {' + '.join(f'{x:.1f}' for x in v.values())} |")
    if args.profile:
        print(f"\nOpenVINO's profile, bf16 {forms[0]}, batch {batches[0]}, {max(threads)} threads "
              f"(PERF_COUNT, {sum(profile.values()):.1f} ms/frame in ops)\n| op (kernel) | ms/frame |\n|---|---:|")
        for k, v in list(profile.items())[:12]:
            print(f"| {k} | {v:.2f} |")
    result = dict(bench="openvino_trial", openvino=ov.__version__, torch=torch.__version__, cpu=cpu_name(),
                  rounds=args.rounds, frames=args.frames, loads=loads,
                  ms_per_frame=[dict(renderer=n, threads=t, batch=b, ms=v, speedup=speedup[(n, t, b)], samples=samples[(n, t, b)])
                                for (n, t, b), v in ms.items()],
                  errors=errors, setup=setup, profile=profile if args.profile else None)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
