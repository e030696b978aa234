"""How far streamed HuBERT features are from whole-utterance features, per context, lookahead and normalisation.

    python bench/features.py                      # tiny HuBERT (configs/tiny.yaml), random weights
    python bench/features.py --full --contexts 0,10,25 --lookaheads 0,5
        # HuBERT-large dims (24 layers, 1024 wide), generated random weights: slow on 2 CPU cores
    python bench/features.py --full --hubert window,incremental --modes running --contexts 25,50,100 --lookaheads 5
        # today's window recomputation against incremental HuBERT (cached keys/values, own rows only)

Speech comes from espeak-ng (a fixed English text, cut to --seconds, whole frames). The reference is the
official path, hubert_model_input(frontend.states(wave)): all L+1 states normalised over the whole
utterance. Every setting streams the same wave in 0.1 s chunks through avatar.features.StreamingFeatures
and compares the concatenated blocks with it. Modes: "running" and "window" are the engine's
normalisations; "oracle" pushes the wave already normalised with the whole-utterance statistics
(normalize="none"), so its error is the windowing alone. Metrics over all states and rows: relative L2
error, mean and 1st-percentile cosine similarity of the H-vectors, and compute time per block.
Writes JSON (bench/results/features.json, or features_full.json with --full) and prints a table.
On a shared 2-core CPU pass --threads 1: two threads spin-waiting on busy cores ran HuBERT-large 4x slower.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from avatar.features import StreamingFeatures  # noqa: E402
from avatar.media import load_audio  # noqa: E402
from models.frontend import HubertFrontend, hubert_model_input, normalize_wave  # noqa: E402
from models.precision import prepare_bf16  # noqa: E402

HUBERT_LARGE = dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
                    feat_extract_norm="layer", do_stable_layer_norm=True, conv_bias=True)
TEXT = ("The quick brown fox jumps over the lazy dog. A streaming avatar hears speech in small pieces and "
        "must move its lips before the sentence is over. Silence between sentences is audio too. "
        "Numbers such as three hundred and forty two, names like Alice and Bob, and questions: are we "
        "there yet? The model listens to a little context on each side of the frames it draws. "
        "Then it waits for the next words, and the next, until the speaker stops talking.")


def speech(seconds: float) -> np.ndarray:
    """espeak-ng speech, repeated or cut to whole frames of `seconds`; a synthetic babble without espeak."""
    n = int(seconds * 25) * 640
    try:
        with tempfile.TemporaryDirectory() as tmp:
            subprocess.run(["espeak-ng", "-v", "en-us", "-w", f"{tmp}/s.wav", TEXT], check=True,
                           capture_output=True)
            wave = load_audio(f"{tmp}/s.wav")
    except (OSError, subprocess.CalledProcessError):
        print("espeak-ng failed: using a synthetic signal", file=sys.stderr)
        t = np.arange(n) / 16000
        wave = (0.2 * np.sin(2 * np.pi * 180 * t) * (np.sin(2 * np.pi * 3 * t) > 0)).astype(np.float32)
    return np.tile(wave, -(-n // len(wave)))[:n].astype(np.float32)


def build(full: bool, seed: int = 0) -> HubertFrontend:
    from transformers import HubertConfig, HubertModel

    cfg = HUBERT_LARGE if full else yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text())["hubert"]
    torch.manual_seed(seed)
    return HubertFrontend(HubertModel(HubertConfig(**cfg)))


def compare(got: torch.Tensor, ref: torch.Tensor) -> dict:
    """got, ref: (L+1, T, H) -> error metrics."""
    got, ref = got.double(), ref.double()
    cos = torch.nn.functional.cosine_similarity(got, ref, dim=-1).flatten()
    per_state = ((got - ref).norm(dim=(1, 2)) / ref.norm(dim=(1, 2))).tolist()
    return dict(rel_l2=float((got - ref).norm() / ref.norm()), cos_mean=float(cos.mean()),
                cos_p1=float(cos.quantile(0.01)), rel_l2_per_state=per_state)


def run(frontend, wave, ref, mode: str, block: int, context: int, lookahead: int, chunk: int = 1600,
        hubert: str = "window") -> dict:
    sf = StreamingFeatures(frontend, "hubert", block, context, lookahead,
                           normalize="none" if mode == "oracle" else mode, hubert=hubert)
    x = normalize_wave(wave) if mode == "oracle" else wave
    blocks, seconds = [], 0.0
    for i in range(0, len(x) + chunk, chunk):
        t0 = time.perf_counter()
        if i < len(x):
            sf.push(x[i:i + chunk])
            blocks += sf.ready()
        else:
            blocks += sf.finish()
        seconds += time.perf_counter() - t0
    got = torch.cat([f for _, f in blocks], dim=1).cpu()
    return dict(mode=mode, hubert=hubert, block=block, context=context, lookahead=lookahead, blocks=len(blocks),
                ms_per_block=1000 * seconds / len(blocks), **compare(got, ref))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--full", action="store_true", help="HuBERT-large dims with random weights")
    p.add_argument("--seconds", type=float, default=20.0)
    p.add_argument("--block", type=int, default=10)
    p.add_argument("--contexts", default="0,5,10,25,50")
    p.add_argument("--lookaheads", default="0,2,5")
    p.add_argument("--modes", default="running,window,oracle")
    p.add_argument("--hubert", default="window", help="comma list of window (re-run [context | block | "
                   "lookahead] per block) and incremental (cached keys/values; context = attention context)")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"],
                   help="bf16: linear/conv weights prepared in bf16 once, run under autocast")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", help="JSON path (default bench/results/features.json, features_full.json with --full)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    wave = speech(args.seconds)
    frontend = build(args.full)
    frontend.model.to(args.device)
    t0 = time.perf_counter()
    ref, frames = hubert_model_input(frontend.states(wave))
    whole_s = time.perf_counter() - t0
    ref = ref[0].cpu()
    result = dict(model="hubert-large (random weights)" if args.full else "tiny hubert (random weights)",
                  seconds=args.seconds, frames=frames, block=args.block, device=args.device,
                  threads=torch.get_num_threads(), machine=platform.processor() or platform.machine(),
                  whole_utterance_s=whole_s, whole_utterance_ms_per_block=1000 * whole_s * args.block / frames,
                  rows=[])
    out = Path(args.out or ROOT / "bench" / "results" / ("features_full.json" if args.full else "features.json"))
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = result["rows"]
    bf16 = args.precision == "bf16"
    if bf16:                        # the reference stays the float32 whole-utterance features
        prepare_bf16(frontend.model)
    result["precision"] = args.precision
    for hubert in args.hubert.split(","):
        for mode in args.modes.split(","):
            for context in map(int, args.contexts.split(",")):
                for lookahead in map(int, args.lookaheads.split(",")):
                    with torch.autocast(args.device.split(":")[0], dtype=torch.bfloat16, enabled=bf16):
                        r = run(frontend, wave, ref, mode, args.block, context, lookahead, hubert=hubert)
                    r["load"] = os.getloadavg()[0]
                    rows.append(r)
                    out.write_text(json.dumps(result, indent=1))      # after every row: full runs are long
                    print(f"{hubert:11s} {mode:8s} context {context:3d} lookahead {lookahead:2d}: rel_l2 "
                          f"{r['rel_l2']:.4f} cos {r['cos_mean']:.4f} (p1 {r['cos_p1']:.4f}) "
                          f"{r['ms_per_block']:8.1f} ms/block (load {r['load']:.1f})", flush=True)

    print(f"\n{result['model']}, {args.seconds:.0f} s speech, block {args.block} frames, {args.device}, "
          f"{result['threads']} threads; whole utterance: {whole_s:.2f} s "
          f"({result['whole_utterance_ms_per_block']:.1f} ms per {args.block} frames)")
    print("| hubert | mode | context | lookahead | rel L2 | cos mean | cos p1 | ms/block | load |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['hubert']} | {r['mode']} | {r['context']} | {r['lookahead']} | {r['rel_l2']:.4f} | "
              f"{r['cos_mean']:.4f} | {r['cos_p1']:.4f} | {r['ms_per_block']:.1f} | {r['load']:.1f} |")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
