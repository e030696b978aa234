"""Export a training checkpoint (project format, e.g. ``runs/stage2/last.pt``) to the official key
layout (``stage1.ckpt`` / ``stage2_*.ckpt``). Stage 2 exports the EMA weights, the ones the
official sampler uses. Both files load in ``anitalker render`` through the same loader.

    python -m training.export runs/stage2/last.pt ckpts/stage2_audio_only_hubert.ckpt
"""
from __future__ import annotations

import argparse
import sys

from models.checkpoints import export_official, read_state_file, stage1_from_state_dict, stage2_from_state_dict
from models.errors import CheckpointError


def export(src, dst) -> str:
    """Returns what was exported ("stage1" or the stage-2 infer type)."""
    obj = read_state_file(src)
    kind = obj.get("kind")
    if kind == "stage1":
        model, what = stage1_from_state_dict(obj, str(src)), "stage1"
    elif kind == "stage2":
        model = stage2_from_state_dict(obj, str(src))
        what = model.dims.infer_type
    else:
        raise CheckpointError(f"{src} is not a project training checkpoint (no stage1/stage2 kind)")
    export_official(dst, model)
    return what


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="export", description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint")
    p.add_argument("out")
    a = p.parse_args(argv)
    print(f"exported {export(a.checkpoint, a.out)} to {a.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
