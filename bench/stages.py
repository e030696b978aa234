"""Per-stage cost of the streaming engine, today's mode against the fastest, measured in one run.

    python bench/stages.py [--rounds 5] [--threads 1,2] [--precisions fp32[,bf16]] [--compile] [--pipeline]

Full-size models with generated (random) weights. For one streaming hop (10 frames = 400 ms of audio, the
engine's defaults: audio context 25, lookahead 5, motion context 10, 10 DDIM steps) it times

  features  HuBERT-large: "window" (today: re-run over [context | hop | lookahead] every hop) and
            "incremental" (the hop and lookahead rows only, attending to cached keys/values)
  motion    one stage-2 DDIM window
  render    one frame x 10: "transposed" (today's renderer) and "subpixel" (the upsampling convs as the
            equal regular convs); "compile" adds torch.compile of the transposed one and "frozen" what
            --fast compiles: sub-pixel upsampling, constant kernels (Stage1.set_constant_kernels) and
            inductor's freezing (avatar.pipeline.compile_frozen: weights pre-packed for oneDNN)

with each variant, torch thread count and precision interleaved round by round, so that the ratios hold
on a shared machine whose load changes (the 1-minute load average is recorded with every round). A
stage's real-time factor is its compute time / the 400 ms of audio it serves. ``--pipeline`` also runs
the engine two ways over the same hops: sequentially with 2 torch threads, and as two threads of one
torch thread each (features + motion of hop k+1 while hop k renders), and reports the wall time per hop.
bf16 is offered only where the CPU computes it natively (``--precisions bf16`` forces it; emulated bf16 is
many times slower than fp32). Writes JSON (bench/results/stages.json) and prints a table.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import queue
import statistics
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from avatar.features import StreamingFeatures  # noqa: E402
from avatar.motion import MotionConfig, MotionStream  # noqa: E402
from avatar.pipeline import (Models, Speed, compile_frozen, cpu_name, encode_portrait, native_bf16,  # noqa: E402
                             prepare_bf16_models)
from avatar.portrait import asset_path, load_image, prepare_portrait, to_tensor  # noqa: E402
from bench.offline import HUBERT_LARGE  # noqa: E402
from bench.stream import speech  # noqa: E402
from models.frontend import HubertFrontend  # noqa: E402
from models.stage1 import Stage1  # noqa: E402
from models.stage2 import Stage2, Stage2Dims  # noqa: E402

HOP, LOOKAHEAD, AUDIO_CONTEXT, CONTEXT, STEPS = 10, 5, 25, 10, 10
HOP_S = HOP / 25


def build(precision: str):
    """Full-size models (seed 0) prepared for ``precision``, and the portrait code."""
    from transformers import HubertConfig, HubertModel

    torch.manual_seed(0)
    hubert = HubertFrontend(HubertModel(HubertConfig(**HUBERT_LARGE)).eval())
    stage2 = Stage2(Stage2Dims()).eval()
    if precision == "bf16":
        prepare_bf16_models(stage2, hubert, torch.device("cpu"))     # as load_models does
    m = Models(Stage1().eval(), stage2, hubert, torch.device("cpu"), Speed(precision=precision))
    img = to_tensor(prepare_portrait(load_image(asset_path("portrait.jpg"))).image)
    with torch.inference_mode():
        code = encode_portrait(m, img)
    return m, code


class FeatureStream:
    """Pushes the speech hop by hop through StreamingFeatures; ``hop()`` times one hop's features."""

    def __init__(self, models, wave, mode):
        self.models, self.wave, self.mode = models, wave, mode
        self.sf = StreamingFeatures(models.hubert, "hubert", block=HOP, context=AUDIO_CONTEXT,
                                    lookahead=LOOKAHEAD, lookahead_rows=True, hubert=mode)
        self.pos = 0
        n = (HOP + LOOKAHEAD) * 640 + 80
        self._push(n)                              # the first block (no left context yet) is not timed
        for _ in range(3):                         # the window reaches its full context length
            self._push(HOP * 640)

    def _push(self, n):
        if self.pos + n > len(self.wave):
            self.__init__(self.models, self.wave, self.mode)   # start over: the speech is long enough
        with torch.inference_mode(), self.models.autocast():
            self.sf.push(self.wave[self.pos:self.pos + n])
            out = self.sf.ready()
        self.pos += n
        return out

    def hop(self):
        t0 = time.perf_counter()
        blocks = self._push(HOP * 640)
        return time.perf_counter() - t0, blocks


def motion_step(models, code, feats_window) -> float:
    """One DDIM window with a full motion context: the stream is primed with one window first."""
    ms = MotionStream(models.stage2, code.wa, code.alpha0,
                      MotionConfig(hop=HOP, context=CONTEXT, lookahead=LOOKAHEAD, steps=STEPS))
    with torch.inference_mode(), models.autocast():
        ms.step(0, feats_window[:, :, :2 * (HOP + LOOKAHEAD)])
        t0 = time.perf_counter()
        ms.step(HOP, feats_window)
    return time.perf_counter() - t0


def render_frame(models, code, fn, alpha) -> float:
    t0 = time.perf_counter()
    with torch.inference_mode(), models.autocast():
        fn(code.wa, alpha, code.feats).float().cpu()
    return time.perf_counter() - t0


def pipeline_run(models, code, fs: FeatureStream, hops: int, pipelined: bool) -> float:
    """Wall seconds per hop for `hops` hops: features + motion + HOP renders."""
    ms = MotionStream(models.stage2, code.wa, code.alpha0,
                      MotionConfig(hop=HOP, context=CONTEXT, lookahead=LOOKAHEAD, steps=STEPS))

    def produce(put):
        past = None
        for _ in range(hops):
            _, blocks = fs.hop()
            for _, f in blocks:
                if ms.n_ctx:             # the committed frames' features lead the window, as in the engine
                    f = torch.cat([past[:, past.shape[1] - 2 * ms.n_ctx:], f], 1)
                past = f
                with torch.inference_mode(), models.autocast():
                    put(ms.step(ms.next, f[None]))

    def consume(codes):
        for a in codes:
            render_frame(models, code, models._render, a[None])

    t0 = time.perf_counter()
    if not pipelined:
        torch.set_num_threads(2)
        produce(consume)
    else:
        q: queue.Queue = queue.Queue(maxsize=2)

        def producer():
            torch.set_num_threads(1)
            produce(q.put)
            q.put(None)

        th = threading.Thread(target=producer)
        torch.set_num_threads(1)
        th.start()
        while (codes := q.get()) is not None:
            consume(codes)
        th.join()
        torch.set_num_threads(2)
    return (time.perf_counter() - t0) / hops


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", default="1,2")
    p.add_argument("--precisions", default=None, help="default: fp32, and bf16 where it is native")
    p.add_argument("--compile", action="store_true", help="also time torch.compile of the renderer")
    p.add_argument("--pipeline", action="store_true", help="also compare a two-thread pipeline with sequential")
    p.add_argument("--pipeline-hops", type=int, default=3)
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "stages.json"))
    args = p.parse_args()
    native = native_bf16(torch.device("cpu"))
    precisions = (args.precisions or ("fp32,bf16" if native else "fp32")).split(",")
    threads = [int(t) for t in args.threads.split(",")]
    wave = speech(60.0)

    setups = {}
    for prec in precisions:
        models, code = build(prec)
        fwin = torch.randn(1, 25, 2 * (CONTEXT + HOP + LOOKAHEAD), 1024)
        s1 = models.stage1
        renders = {"transposed": s1.render}
        if args.compile:
            renders["compile"] = torch.compile(s1.render, dynamic=False)
            renders["frozen"] = compile_frozen(s1.render)
        setups[prec] = dict(models=models, code=code, fwin=fwin, renders=renders,
                            feats={m: FeatureStream(models, wave, m) for m in ("window", "incremental")})
    alpha = setups[precisions[0]]["code"].alpha0 + 0.05

    samples: dict = {}
    loads = []
    for r in range(args.rounds + 1):                      # round 0 warms everything up (and compiles)
        loads.append(os.getloadavg()[0])
        for prec, st in setups.items():
            m, code = st["models"], st["code"]
            for t in threads:
                torch.set_num_threads(t)
                rec = lambda key, v: r and samples.setdefault((prec, t) + key, []).append(v)  # noqa: E731
                for mode, fs in st["feats"].items():
                    rec(("features", mode), fs.hop()[0])
                rec(("motion", "ddim"), motion_step(m, code, st["fwin"]))
                for name in ("transposed", "subpixel") + (("compile", "frozen") if args.compile else ()):
                    m.stage1.set_upsampling("subpixel" if name in ("subpixel", "frozen") else "transposed")
                    m.stage1.set_constant_kernels(name == "frozen")
                    fn = st["renders"].get(name, st["renders"]["transposed"])
                    rec(("render", name), render_frame(m, code, fn, alpha))
                m.stage1.set_upsampling("transposed")
                m.stage1.set_constant_kernels(False)
        print(f"round {r}: load {loads[-1]:.1f}", flush=True)

    rows = []
    for (prec, t, stage, variant), v in samples.items():
        med = statistics.median(v)
        per_hop = med * (HOP if stage == "render" else 1)
        rows.append(dict(precision=prec, threads=t, stage=stage, variant=variant, ms=1000 * med,
                         ms_per_hop=1000 * per_hop, rtf=per_hop / HOP_S, samples=[1000 * x for x in v]))

    pipe = []
    if args.pipeline:
        st = setups[precisions[0]]
        for r in range(2):
            for pipelined in (False, True):
                s = pipeline_run(st["models"], st["code"], st["feats"]["incremental"], args.pipeline_hops, pipelined)
                pipe.append(dict(pipelined=pipelined, s_per_hop=s, rtf=s / HOP_S, load=os.getloadavg()[0]))
                print(f"pipeline {'2 threads x 1' if pipelined else 'sequential, 2 threads'}: {s:.2f} s/hop "
                      f"(RTF {s / HOP_S:.2f}, load {pipe[-1]['load']:.1f})", flush=True)

    result = dict(bench="stages", cpu=f"{platform.processor() or platform.machine()} ({cpu_name()})",
                  torch=torch.__version__, rounds=args.rounds, loads=loads, hop_frames=HOP, rows=rows,
                  pipeline=pipe)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"\nfull-size random weights, one hop = {HOP} frames = {1000 * HOP_S:.0f} ms of audio; {cpu_name()}; "
          f"load during the rounds {min(loads[1:]):.1f}-{max(loads[1:]):.1f}")
    print("| precision | threads | stage | variant | ms | ms per hop | RTF | vs today |")
    print("|---|---:|---|---|---:|---:|---:|---:|")
    today = {("features",): "window", ("motion",): "ddim", ("render",): "transposed"}
    for row in sorted(rows, key=lambda x: (x["precision"], x["threads"], x["stage"], x["variant"] != today[(x["stage"],)])):
        base = next(b for b in rows if b["precision"] == row["precision"] and b["threads"] == row["threads"]
                    and b["stage"] == row["stage"] and b["variant"] == today[(row["stage"],)])
        print(f"| {row['precision']} | {row['threads']} | {row['stage']} | {row['variant']} | {row['ms']:.0f} | "
              f"{row['ms_per_hop']:.0f} | {row['rtf']:.2f} | {row['ms_per_hop'] / base['ms_per_hop']:.2f} |")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
