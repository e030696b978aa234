"""The ``anitalker`` command line.

Every user-fixable error is one line on stderr and exit status 1; ``--debug`` shows the traceback.
SIGINT (Ctrl-C) and SIGTERM stop a command the same way: partial files are removed, one line says so, and
the exit status is 130 or 143.
"""
from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

import numpy as np

from avatar.download import DEFAULT_INFER_TYPE, STAGE2, default_dir, download
from avatar.media import check_output
from models.errors import AnitalkerError, Interrupted

# torch is imported only when a command gets past its cheap checks (a missing output folder is reported in
# well under a second): the modules that need it are imported inside the functions below.


def _floats(text: str, n: int, what: str) -> list[float]:
    try:
        vals = [float(v) for v in text.split(",")]
    except ValueError:
        vals = []
    if len(vals) != n or not np.all(np.isfinite(vals)):
        want = "a finite number" if n == 1 else f"{n} comma-separated finite numbers"
        raise AnitalkerError(f"{what} takes {want}, got {text!r}")
    return vals


def _unit(text: str, what: str) -> float:
    v = _floats(text, 1, what)[0]
    if not 0.0 <= v <= 1.0:
        raise AnitalkerError(f"{what} must be between 0 and 1 (0.5 = centre / typical size), got {v}")
    return v


def read_pose_file(path) -> np.ndarray:
    """(T, 3) yaw, pitch, roll in degrees from .npy or text (.txt/.csv, comma or space separated)."""
    path = Path(path)
    try:
        a = np.load(path) if path.suffix == ".npy" else np.loadtxt(path, delimiter="," if path.suffix == ".csv" else None, ndmin=2)
    except FileNotFoundError:
        raise AnitalkerError(f"pose file not found: {path}") from None
    except Exception as e:
        raise AnitalkerError(f"cannot read pose file {path}: {e}") from None
    a = np.asarray(a, dtype=np.float32)
    if a.ndim != 2 or a.shape[1] != 3 or len(a) == 0:
        raise AnitalkerError(f"pose file {path} must hold rows of yaw,pitch,roll in degrees; got shape {a.shape}")
    bad = ~np.isfinite(a).all(axis=1)
    if bad.any():
        raise AnitalkerError(f"pose file {path} has {int(bad.sum())} rows that are not finite numbers (NaN or "
                             f"inf), the first is row {int(np.argmax(bad)) + 1}; give degrees in every row")
    return a


def controls_from_args(args):
    """Poses are given in degrees and normalised the way the model was trained (/90, clamped to [-1, 1])."""
    pose = None
    if args.pose is not None and args.pose_file is not None:
        raise AnitalkerError("give either --pose or --pose-file, not both")
    if args.pose is not None:
        pose = np.array(_floats(args.pose, 3, "--pose"), dtype=np.float32)
    elif args.pose_file is not None:
        pose = read_pose_file(args.pose_file)
    if pose is not None:
        pose = np.clip(pose / 90.0, -1.0, 1.0)
    from avatar.pipeline import Controls
    return Controls(pose=pose,
                    location=None if args.location is None else _unit(args.location, "--location"),
                    scale=None if args.scale is None else _unit(args.scale, "--scale"))


def add_model_args(p: argparse.ArgumentParser, audio: bool = True) -> None:
    """The model options of the commands that run the models; audio=False leaves out the stage-2 (audio to
    motion) ones, which reenactment does not use."""
    g = p.add_argument_group("model")
    g.add_argument("--checkpoints", metavar="DIR", help=f"folder with the official files (default {default_dir()}, "
                   "or $ANITALKER_CHECKPOINTS)")
    if audio:
        g.add_argument("--infer-type", default=DEFAULT_INFER_TYPE, choices=list(STAGE2),
                       help="which stage-2 model to use (default %(default)s)")
        g.add_argument("--steps", type=int, default=50, help="DDIM steps (default %(default)s; fewer is faster)")
        g.add_argument("--seed", type=int, default=0, help="seed of the motion noise (default %(default)s)")
        g.add_argument("--pose", metavar="YAW,PITCH,ROLL", help="head pose in degrees (pose_only/full_control "
                       "models)")
        g.add_argument("--pose-file", metavar="FILE", help="per-frame head pose, rows of yaw,pitch,roll in "
                       "degrees (.npy, .txt, .csv); shorter files hold their last row")
        g.add_argument("--location", metavar="X", help="horizontal face position 0..1 (full_control models)")
        g.add_argument("--scale", metavar="S", help="face size 0..1 (full_control models)")
    g.add_argument("--device", default="auto", help="cpu, cuda or auto (default)")
    g.add_argument("--precision", default=None, choices=["fp32", "bf16", "auto"],
                   help="default: bf16 on a GPU, fp32 on a CPU. fp32 computes what the official code computes; "
                   "bf16 is about 1.3-2x faster "
                   "on CPUs with native bf16 (AVX-512 BF16, AMX) and GPUs and differs by a few grey levels "
                   "(README), but much slower where bf16 is emulated; auto: bf16 where native, else fp32")
    g.add_argument("--compile", action="store_true", help="torch.compile the renderer (on a GPU the DDIM denoiser too, "
                   "both as CUDA graphs; for reenact the motion encoder): faster per frame after a one-off "
                   "warm-up of tens of seconds")
    g.add_argument("--upsampling", default="transposed", choices=["transposed", "subpixel", "auto"],
                   help="the renderer's upsampling convs as the official transposed convs (default) or as the "
                   "equal regular convs (subpixel); auto times both at start and keeps the faster per layer")
    g.add_argument("--denoiser", default="torch", choices=["torch", "openvino", "auto"],
                   help="the stage-2 denoiser step in torch (default) or on OpenVINO's CPU plugin (the [openvino] "
                   "extra; about 1.7x faster in bf16 on an AMX CPU); auto: OpenVINO where it is installed and "
                   "the CPU runs bf16")
    g.add_argument("--fast", action="store_true", help="the fastest mode on this machine: --precision auto, "
                   "--compile where bf16 is native, --upsampling auto, --denoiser auto (and --hubert "
                   "incremental when streaming); its error against fp32 is in the README")
    g.add_argument("--no-crop", action="store_true", help="use the whole portrait, squashed to 256x256, "
                   "instead of detecting and cropping the face")
    add_picture_args(p)


def add_picture_args(p: argparse.ArgumentParser) -> None:
    """What is done to every output picture, in every command that makes pictures."""
    g = p.add_argument_group("picture")
    g.add_argument("--paste-back", action="store_true", help="blend the rendered face back into the original "
                   "photo (the output has the photo's size)")
    g.add_argument("--watermark", metavar="TEXT", help="draw TEXT visibly on every output frame (files and live "
                   "outputs alike; off unless given)")


def check_steps(steps: int) -> None:
    """A DDIM step count the schedule reaches, or one line with the nearby ones (before any model loads)."""
    from models.sampler import nearby_step_counts, valid_step_counts
    if steps not in valid_step_counts():
        near = ", ".join(map(str, nearby_step_counts(steps)))
        raise AnitalkerError(f"--steps {steps} is not a count that a whole stride of the 1000-step schedule "
                             f"gives; nearby valid counts: {near}")


def speed_from_args(args):
    from avatar.pipeline import Speed
    if getattr(args, "fast", False):
        return Speed.fastest()
    return Speed(precision=args.precision, compile=args.compile, upsampling=args.upsampling,
                 denoiser=args.denoiser)


def cmd_render(args) -> int:
    check_output(args.output)            # the cheap checks first: a typo costs a second, not a model load
    check_steps(args.steps)
    from avatar.offline import render_file
    from avatar.pipeline import load_models
    from avatar.portrait import asset_path

    portrait = args.portrait or asset_path("portrait.jpg")
    audio = args.audio or asset_path("sentence.wav")
    controls = controls_from_args(args)
    models = load_models(args.checkpoints, args.infer_type, args.device, speed_from_args(args))
    mode = f"streaming, hop {stream_option(args, 'hop')}, lookahead {stream_option(args, 'lookahead')}" \
        if args.streaming else "one pass"
    print(f"rendering {portrait} + {audio} -> {args.output} ({models.infer_type}, {args.steps} steps, {mode}, "
          f"{models.device})", file=sys.stderr)
    if args.streaming:
        from avatar.offline import render_file_streaming
        from avatar.portrait import load_image, prepare_portrait

        original = load_image(portrait)
        prepared = prepare_portrait(original, crop=not args.no_crop)
        timings = render_file_streaming(make_animator(args, models, prepared), original, prepared.box, audio,
                                        args.output, paste_back=args.paste_back, watermark=args.watermark)
    else:
        timings = render_file(models, portrait, audio, args.output, controls=controls, steps=args.steps,
                              seed=args.seed, crop=not args.no_crop, paste_back=args.paste_back,
                              watermark=args.watermark)
    print(f"wrote {args.output}\n{timings.table()}", file=sys.stderr)
    return 0


class EngineDefault:
    """A streaming option's default, read from StreamConfig when it is needed (help, or making the engine):
    building the parser then imports no torch."""

    def __init__(self, name: str):
        self.name = name

    @property
    def value(self):
        from avatar.animator import StreamConfig
        return getattr(StreamConfig(), self.name)

    def __str__(self) -> str:
        return str(self.value)


class _Continuity:
    """avatar.motion.CONTINUITY, imported when --continuity is given or help is shown."""

    def _names(self):
        from avatar.motion import CONTINUITY
        return CONTINUITY

    def __contains__(self, name) -> bool:
        return name in self._names()

    def __iter__(self):
        return iter(self._names())


def stream_option(args, name: str):
    value = getattr(args, name)
    return value.value if isinstance(value, EngineDefault) else value


def add_stream_args(p: argparse.ArgumentParser) -> None:
    """The streaming engine's options (live, and render --streaming)."""
    g = p.add_argument_group("streaming")
    g.add_argument("--hop", type=int, default=EngineDefault("hop"), help="frames committed per motion window "
                   "(default %(default)s)")
    g.add_argument("--lookahead", type=int, default=EngineDefault("lookahead"), help="frames of future audio each "
                   "window waits for (default %(default)s)")
    g.add_argument("--context", type=int, default=EngineDefault("context"), help="committed frames each window "
                   "continues from (default %(default)s)")
    g.add_argument("--continuity", default=EngineDefault("continuity"), choices=_Continuity(), help="how windows "
                   "join (default %(default)s)")
    g.add_argument("--hubert", default=None, choices=["window", "incremental"], help="window: HuBERT re-runs "
                   "over [context | hop | lookahead] every hop; incremental: over the new rows only, attending to "
                   "cached rows (about 2.5x less compute, a similar error against whole-utterance features; "
                   "default window, incremental with --fast)")


def make_animator(args, models, portrait=None):
    """The streaming engine for ``portrait`` (default: prepared from args), with the options of args."""
    from avatar.animator import StreamConfig, StreamingAnimator
    from avatar.pipeline import encode_portrait
    from avatar.portrait import asset_path, load_image, prepare_portrait, to_tensor

    if portrait is None:
        portrait = prepare_portrait(load_image(args.portrait or asset_path("portrait.jpg")), crop=not args.no_crop)
    code = encode_portrait(models, to_tensor(portrait.image))
    hubert = args.hubert or ("incremental" if getattr(args, "fast", False) else "window")
    config = StreamConfig(hop=stream_option(args, "hop"), lookahead=stream_option(args, "lookahead"),
                          context=stream_option(args, "context"), steps=args.steps,
                          continuity=stream_option(args, "continuity"), seed=args.seed, hubert=hubert)
    return StreamingAnimator(models, code, config, controls_from_args(args))


def make_live_animator(args):
    """The streaming engine for ``live``, after saying what it reaches on this machine (a one-hop
    measurement); its frames leave pasted back and marked as the options ask."""
    from avatar.portrait import asset_path, load_image

    original = load_image(args.portrait or asset_path("portrait.jpg"))     # a bad photo fails before the load
    return finished_animator(args, load_live_models(args), original, measure=True)


def load_live_models(args):
    from avatar.pipeline import load_models

    check_steps(args.steps)
    controls_from_args(args)                 # bad controls say so before the models load
    return load_models(args.checkpoints, args.infer_type, args.device, speed_from_args(args))


def finished_animator(args, models, original, measure: bool = False):
    """The engine for one portrait photo over loaded models, its frames pasted back and marked as the
    options ask; measure: first say what this machine reaches (a one-hop measurement)."""
    from avatar.portrait import prepare_portrait
    from avatar.probe import measure_rate
    from avatar.watermark import FinishedAnimator, make_finish

    portrait = prepare_portrait(original, crop=not args.no_crop)      # no face: one clear error
    animator = make_animator(args, models, portrait)
    if measure:
        c = animator.config
        rate = measure_rate(models, animator.code, hop=c.hop, lookahead=c.lookahead, context=c.context,
                            audio_context=c.audio_context, steps=c.steps, hubert=c.hubert)
        print(f"speed: {models.describe()}; {rate.line()}", file=sys.stderr)
    finish = make_finish(original, portrait.box, paste_back=args.paste_back, watermark=args.watermark)
    return FinishedAnimator(animator, finish) if finish else animator


def make_live_pool(args):
    """`live --serve`: the models loaded (and measured) once; make_animator(portrait rgb or None) builds
    each client's engine over them (None: --portrait, else the bundled one)."""
    from avatar.portrait import asset_path, load_image

    default = load_image(args.portrait or asset_path("portrait.jpg"))
    models = load_live_models(args)
    finished_animator(args, models, default, measure=True)      # says the speed; a bad portrait fails here
    return lambda rgb=None: finished_animator(args, models, default if rgb is None else rgb)


def cmd_download(args) -> int:
    types = list(STAGE2) if "all" in args.infer_types else args.infer_types
    folder = download(args.checkpoints, types)
    print(f"checkpoints are in {folder}", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="anitalker", description="A talking avatar from one portrait photo.")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("render", help="render a portrait and an audio file to an mp4",
                       description="Render a talking-head video. Without arguments it uses the bundled "
                       "portrait and sentence.")
    r.add_argument("--portrait", metavar="IMAGE", help="portrait photo (default: the bundled one)")
    r.add_argument("--audio", metavar="FILE", help="speech, any format (default: the bundled sentence)")
    r.add_argument("-o", "--output", metavar="FILE", default="anitalker.mp4", help="output video: .mp4, .mov, "
                   ".mkv or .m4v (default %(default)s)")
    r.add_argument("--streaming", action="store_true", help="render through the streaming engine (windows of "
                   "--hop frames), to compare with the one-pass rendering")
    add_model_args(r)
    add_stream_args(r)
    r.set_defaults(func=cmd_render)

    d = sub.add_parser("download", help="fetch the official checkpoints",
                       description=f"Fetch the official AniTalker checkpoints into the cache folder "
                       f"(default {default_dir()}).")
    d.add_argument("--checkpoints", metavar="DIR", help="where to put them")
    d.add_argument("infer_types", nargs="*", default=[DEFAULT_INFER_TYPE], metavar="TYPE",
                   help=f"stage-2 models to fetch: {', '.join(STAGE2)} or all (default {DEFAULT_INFER_TYPE})")
    d.set_defaults(func=cmd_download)

    from .live import add_live_parser
    live, _ = add_live_parser(sub, animator_factory=make_live_animator, pool_factory=make_live_pool)
    add_model_args(live)
    add_stream_args(live)
    live.set_defaults(steps=10)   # per window; the offline default of 50 is too slow for realtime on a CPU

    from .reenact import add_reenact_parser
    add_model_args(add_reenact_parser(sub), audio=False)

    from training.cli import add_parsers as add_training_parsers   # preprocess, train, extract-latents, ...
    add_training_parsers(sub)
    return p


def _terminated(signum, _frame):
    raise Interrupted(signum)


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())       # a message that quotes a library's multi-line text stays one line


class _LineTracker:
    """stderr that remembers whether its cursor is at the start of a line: a signal can land while a
    progress bar is drawn (before its closing newline), and the one line that says so must not be glued
    to the bar."""

    def __init__(self, stream):
        self.stream, self.at_line_start = stream, True

    def write(self, text: str) -> int:
        if text:
            self.at_line_start = text.endswith("\n")
        return self.stream.write(text)

    def __getattr__(self, name):
        return getattr(self.stream, name)


def _say(line: str) -> None:
    """The command's one closing line, on a line of its own and last: progress bars still open (a
    generator's bar that the interrupt left suspended would close later, at garbage collection) are
    closed first."""
    from tqdm import tqdm
    for bar in list(tqdm._instances):
        bar.close()
    if not sys.stderr.at_line_start:
        print(file=sys.stderr)
    print(line, file=sys.stderr)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    stderr = sys.stderr
    sys.stderr = _LineTracker(stderr)
    # SIGTERM unwinds like Ctrl-C, so every writer removes its partial file on the way out
    previous = signal.signal(signal.SIGTERM, _terminated)
    try:
        return args.func(args)
    except (AnitalkerError, OSError) as e:   # OSError: a full disk, ...: the OS message names the file
        if args.debug:
            raise
        _say(f"error: {_one_line(e)}")
        return 1
    except (KeyboardInterrupt, Interrupted) as e:
        if not isinstance(e, Interrupted):
            e = Interrupted(signal.SIGINT)
        if not e.note and getattr(args, "output", None):
            e.note = f"nothing was written to {args.output}"
        _say(_one_line(e))
        return e.exit_code
    finally:
        signal.signal(signal.SIGTERM, previous)
        sys.stderr = stderr


if __name__ == "__main__":
    sys.exit(main())
