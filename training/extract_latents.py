"""Per-frame stage-1 latents for stage-2 training: wa (T, S) and alpha (T, M) of every clip.

Writes ``<clip>.wa.npy`` and ``<clip>.alpha.npy`` next to the clip's frames and adds them to the
manifest. Clips that already have both are skipped, so an interrupted run resumes.

    python -m training.extract_latents --stage1 runs/stage1/last.pt --data DATA
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from models.checkpoints import load_stage1

from .data import manifest_path, open_array, read_manifest, to_image, write_manifest


@torch.inference_mode()
def extract(stage1, data, device="cpu", batch: int = 32, overwrite: bool = False, progress: bool = True) -> int:
    """Returns how many clips were encoded. device "auto": cuda when available, else cpu."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    net = load_stage1(stage1, device) if isinstance(stage1, (str, Path)) else stage1.to(device).eval()
    root = manifest_path(data).parent
    entries = read_manifest(data)
    done = 0
    for e in tqdm(entries, desc="latents", disable=not progress):
        if "frames" not in e["files"] or (not overwrite and {"wa", "alpha"} <= e["files"].keys()):
            continue
        frames = open_array(root, e, "frames")
        was, alphas = [], []
        for i in range(0, len(frames), batch):
            x = torch.stack([to_image(f, net.dims.size) for f in frames[i:i + batch]]).to(device)
            wa = net.enc.net_app(x)[0]
            was.append(wa.float().cpu())
            alphas.append(net.enc.motion_code(wa).float().cpu())
        base = Path(e["files"]["frames"]).as_posix().removesuffix(".frames.npy")
        for name, arr in (("wa", was), ("alpha", alphas)):
            rel = f"{base}.{name}.npy"
            np.save(root / rel, torch.cat(arr).numpy())
            e["files"][name] = rel
        done += 1
        write_manifest(data, entries)   # after every clip: an interrupted run keeps what it did
    return done


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="extract_latents", description=__doc__.split("\n\n")[0])
    p.add_argument("--stage1", required=True, help="stage-1 checkpoint (official or project)")
    p.add_argument("--data", required=True, help="dataset folder (manifest.jsonl)")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto (default: cuda when available)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--overwrite", action="store_true", help="re-encode clips that already have latents")
    a = p.parse_args(argv)
    n = extract(a.stage1, a.data, a.device, a.batch, a.overwrite)
    print(f"encoded {n} clip(s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
