"""OpenVINO's CPU plugin against today's fastest renderer (the frozen torch.compile of --fast), in one run.

    pip install openvino          # not a dependency of the project: this trial measures whether it should be
    python bench/openvino_trial.py [--rounds 5] [--threads 1,2] [--batches 1,2,5,10] [--frames 10]
                                   [--forms transposed] [--f32] [--inputs]

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
per baked model (paid per portrait), the first frozen call (paid per process). Writes JSON
(bench/results/openvino_trial.json) and prints tables.
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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", default="1,2")
    p.add_argument("--batches", default="1,2,5,10")
    p.add_argument("--frames", type=int, default=10, help="frames timed per variant and round")
    p.add_argument("--forms", default="transposed", help=f"comma-separated, of {','.join(FORMS)}")
    p.add_argument("--f32", action="store_true", help="also OpenVINO with INFERENCE_PRECISION_HINT f32 (batch 1)")
    p.add_argument("--inputs", action="store_true", help="also a batch-1 model with the portrait as inputs")
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

    samples: dict = {}
    loads = []
    for r in range(args.rounds + 1):
        loads.append(os.getloadavg()[0])
        for (name, t, b), fn in variants.items():
            torch.set_num_threads(t)
            a = codes[:1].repeat(b, 1)
            fn(a)                                   # untimed: whatever the previous variant left running settles
            t0 = time.perf_counter()
            for _ in range(max(1, args.frames // b)):
                fn(a)
            if r:
                samples.setdefault((name, t, b), []).append(
                    1000 * (time.perf_counter() - t0) / (b * max(1, args.frames // b)))
        print(f"round {r}: load {loads[-1]:.2f}", flush=True)

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
    result = dict(bench="openvino_trial", openvino=ov.__version__, torch=torch.__version__, cpu=cpu_name(),
                  rounds=args.rounds, frames=args.frames, loads=loads,
                  ms_per_frame=[dict(renderer=n, threads=t, batch=b, ms=v, speedup=speedup[(n, t, b)], samples=samples[(n, t, b)])
                                for (n, t, b), v in ms.items()],
                  errors=errors, setup=setup)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
