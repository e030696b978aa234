"""Plot the loss curves of a run's ``log.csv`` to a PNG (one panel per column).

    python -m training.plot_logs runs/stage2/log.csv [-o curves.png]

Needs matplotlib (``pip install matplotlib``); without it the command says so and exits 1.
"""
from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path


def read_log(path) -> dict[str, list[float]]:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise SystemExit(f"{path} has no rows yet")
    return {k: [float(r[k]) for r in rows if r.get(k) not in (None, "")] for k in rows[0]}


def plot(path, out=None) -> Path:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("plotting needs matplotlib, which is not installed: pip install matplotlib "
                         f"(the numbers are in {path})") from None
    cols = read_log(path)
    names = [k for k in cols if k not in ("step", "time_s", "epoch", "lr")]
    fig, axes = plt.subplots(len(names), 1, figsize=(8, 2.2 * len(names)), sharex=True, squeeze=False)
    for ax, k in zip(axes[:, 0], names):
        ax.plot(cols["step"][: len(cols[k])], cols[k], lw=0.8)
        ax.set_ylabel(k)
        if k != "adv" and k != "d_loss" and min(cols[k]) > 0:
            ax.set_yscale("log")   # diffusion and reconstruction losses span decades
        ax.grid(alpha=0.3)
    axes[-1, 0].set_xlabel("step")
    out = Path(out) if out else Path(path).with_suffix(".png")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="plot_logs", description=__doc__.split("\n\n")[0])
    p.add_argument("log", help="log.csv of a run")
    p.add_argument("-o", "--out", help="PNG path (default: next to the log)")
    a = p.parse_args(argv)
    print(plot(a.log, a.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
