"""``anitalker`` subcommands for training: preprocess, train, extract-latents, export, plot-logs.

streaming/cli.py's build_parser() calls ``add_parsers(sub)``; the training modules are imported only
when one of these commands runs. Options after the command are ``key=value`` config overrides.
For several GPUs run the same command under torchrun, e.g.
``torchrun --nproc_per_node 4 $(which anitalker) train --config configs/train_stage2.yaml stage2 data=DATA``
(argparse wants options before the stage or after all KEY=VALUE overrides, not between them).
"""
from __future__ import annotations

import argparse
import sys

_STAGES = {"stage1": ("training.train_motion_encoder", "Stage1TrainConfig", "configs/train_stage1.yaml"),
           "stage2": ("training.train_motion_generator", "Stage2TrainConfig", "configs/train_stage2.yaml")}


def cmd_preprocess(args) -> int:
    from .config import load_config
    from .preprocess import PreprocessConfig, preprocess

    counts = preprocess(load_config(PreprocessConfig, args.config, args.overrides))
    print(f"{counts['done']} clip(s) prepared, {counts['rejected']} rejected (see rejected.jsonl), "
          f"{counts['skipped']} already done", file=sys.stderr)
    return 0


def cmd_train(args) -> int:
    import importlib

    from .config import load_config

    module, cls, default = _STAGES[args.stage]
    mod = importlib.import_module(module)
    res = mod.train(load_config(getattr(mod, cls), args.config or default, args.overrides))
    print(f"stopped at step {res['step']}", file=sys.stderr)
    return 0


def cmd_extract(args) -> int:
    from .extract_latents import extract

    print(f"encoded {extract(args.stage1, args.data, args.device, args.batch, args.overwrite)} clip(s)",
          file=sys.stderr)
    return 0


def cmd_export(args) -> int:
    from .export import export

    print(f"exported {export(args.checkpoint, args.out)} to {args.out}", file=sys.stderr)
    return 0


def cmd_plot(args) -> int:
    from .plot_logs import plot

    print(plot(args.log, args.out))
    return 0


def add_parsers(sub) -> None:
    """Add the training commands to an argparse subparsers object."""
    p = sub.add_parser("preprocess", help="videos -> training data (shards + manifest)",
                       description="Crop faces, extract audio, HuBERT, MFCC and controls; resumable.")
    p.add_argument("--config", default="configs/train_preprocess.yaml")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="e.g. src=VIDEOS out=DATA hubert=DIR")
    p.set_defaults(func=cmd_preprocess)

    t = sub.add_parser("train", help="train stage 1 (motion encoder/renderer) or stage 2 (motion generator)",
                       description="Train one stage; resumes from OUT/last.pt. Run under torchrun for DDP.")
    t.add_argument("stage", choices=list(_STAGES))
    t.add_argument("--config", help="YAML recipe (default configs/train_<stage>.yaml)")
    t.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="e.g. data=DATA out=RUN window=25")
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("extract-latents", help="per-frame stage-1 latents (wa, alpha) for stage-2 training")
    e.add_argument("--stage1", required=True, help="stage-1 checkpoint (official or project)")
    e.add_argument("--data", required=True, help="dataset folder")
    e.add_argument("--device", default="auto", help="cpu, cuda or auto (default: cuda when available)")
    e.add_argument("--batch", type=int, default=32)
    e.add_argument("--overwrite", action="store_true")
    e.set_defaults(func=cmd_extract)

    x = sub.add_parser("export", help="training checkpoint -> official key layout")
    x.add_argument("checkpoint")
    x.add_argument("out")
    x.set_defaults(func=cmd_export)

    g = sub.add_parser("plot-logs", help="loss curves of a run's log.csv -> PNG (needs matplotlib)")
    g.add_argument("log")
    g.add_argument("-o", "--out")
    g.set_defaults(func=cmd_plot)


def main(argv=None) -> int:
    """Standalone entry (python -m training.cli ...), the same commands as ``anitalker``."""
    parser = argparse.ArgumentParser(prog="anitalker-train")
    add_parsers(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
