"""How long a command takes to refuse an output it cannot write (a missing folder), against the time of
importing torch alone: the cheap checks run before any model (or torch itself) loads.

    python bench/early_errors.py [--runs 3]

Writes bench/results/early_errors.json and prints a table (median wall seconds per command).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def wall(argv, cwd) -> tuple[float, str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, *argv], cwd=cwd, env=env, capture_output=True, text=True)
    return time.perf_counter() - t0, (p.stderr.strip().splitlines() or [""])[-1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "clip.mp4").write_bytes(b"")           # the video is looked at after the output
        cases = {
            "python -c 'import torch' (reference)": ["-c", "import torch"],
            "render -o missing/out.mp4": ["-m", "streaming.cli", "render", "-o", "missing/out.mp4"],
            "render --streaming -o missing/out.mp4": ["-m", "streaming.cli", "render", "--streaming", "-o",
                                                      "missing/out.mp4"],
            "live --audio a.wav -o missing/out.mp4": ["-m", "streaming.cli", "live", "--audio", "a.wav", "-o",
                                                      "missing/out.mp4"],
            "reenact --video clip.mp4 -o missing/out.mp4": ["-m", "streaming.cli", "reenact", "--video",
                                                            "clip.mp4", "-o", "missing/out.mp4"],
        }
        results = {}
        for name, argv in cases.items():
            times, line = [], ""
            for _ in range(args.runs):
                t, line = wall(argv, d)
                times.append(t)
            results[name] = {"median_s": round(statistics.median(times), 3), "runs_s": [round(t, 3) for t in times],
                             "said": line}
    out = ROOT / "bench" / "results" / "early_errors.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    width = max(map(len, results))
    print(f"{'command':<{width}}  median s  last line")
    for name, r in results.items():
        print(f"{name:<{width}}  {r['median_s']:8.2f}  {r['said'][:70]}")


if __name__ == "__main__":
    main()
