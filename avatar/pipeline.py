"""The loaded models on one device, and the three steps every driver shares.

portrait image -> ``encode_portrait`` (stage-1 encoder, once) -> ``PortraitCode``
audio          -> ``Models.features``  (HuBERT or MFCC front end)
               -> ``generate_motion``  (stage-2 DDIM over the motion codes)
codes          -> ``render``           (stage-1 renderer, batched, encoder features cached)
"""
from __future__ import annotations

import functools
import importlib.util
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from models.checkpoints import load_stage1, load_stage2
from models.precision import can_pack, pack_linears, prepare_bf16
from models.errors import AnitalkerError
from models.frontend import HubertFrontend, hubert_model_input, load_hubert, mfcc_features, mfcc_model_input
from models.sampler import ddim_sample, ddim_schedule
from models.stage1 import Stage1
from models.stage2 import Stage2

from .download import DEFAULT_INFER_TYPE, locate, locate_stage1
from .motion import motion_noise


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise AnitalkerError("--device cuda was asked for but this torch build sees no CUDA GPU; use --device cpu")
    try:
        return torch.device(name)
    except RuntimeError:
        raise AnitalkerError(f"unknown device {name!r}; use auto, cpu or cuda") from None


@dataclass
class Controls:
    """Stage-2 controls, normalised as the model was trained. None = predicted from speech.

    pose: (3,) or (F,3) yaw, pitch, roll in [-1, 1] (degrees / 90); location, scale: in [0, 1].
    """
    pose: np.ndarray | None = None
    location: float | None = None
    scale: float | None = None

    def tensors(self, frames: int, device) -> dict:
        def per_frame(v, dim):
            if v is None:
                return None
            a = np.asarray(v, dtype=np.float32).reshape(-1, dim)
            if len(a) < frames:  # a pose file shorter than the audio holds its last row
                a = np.concatenate([a, np.repeat(a[-1:], frames - len(a), 0)])
            return torch.from_numpy(a[:frames].copy()).unsqueeze(0).to(device)
        return dict(pose=per_frame(self.pose, 3), location=per_frame(self.location, 1),
                    scale=per_frame(self.scale, 1))


@dataclass
class PortraitCode:
    """What the stage-1 encoder gives for one portrait; cached for every frame."""
    wa: torch.Tensor            # (1, S) appearance latent
    alpha0: torch.Tensor        # (1, M) the portrait's own motion code
    feats: list                 # 6 skip maps, batch 1


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes bf16 convolutions and matmuls natively: a CUDA GPU with bf16, or a CPU on
    which oneDNN has bf16 kernels (AVX-512 BF16 or AMX). Elsewhere bf16 is emulated, 3-50x slower than fp32
    (measured on an AVX2-only CPU), so the fastest mode there is fp32."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        try:
            return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except (AttributeError, RuntimeError):
            return False
    return False


def cpu_name() -> str:
    """What the CPU offers torch, for the start-up line: its vector ISA and whether bf16 is native."""
    isa = torch.backends.cpu.get_cpu_capability()
    return f"{isa}, {'native' if native_bf16(torch.device('cpu')) else 'no native'} bf16"


@dataclass(frozen=True)
class Speed:
    """How the models run. The default is exact fp32 (what the parity tests guard); the rest trade
    a measured error (README, bench/offline.py) for speed. ``Speed.fastest()`` picks per machine."""
    precision: str | None = "fp32"  # "fp32" | "bf16" (autocast, weights prepared in bf16 once) |
                                  # "auto" (bf16 where the device computes it natively, else fp32) |
                                  # None (the command line's default: bf16 on a GPU that computes it, where
                                  # fp32 would waste half its speed; fp32, the exact path, on a CPU)
    compile: bool | None = False  # torch.compile the renderer and the motion encoder (a one-off warm-up
                                  # of tens of seconds each); None: where bf16 is native (it only won there)
    upsampling: str = "transposed"  # the renderer's upsampling convs: "transposed" (official) | "subpixel"
                                  # (the same sums as regular convs) | "auto" (each layer timed both ways)
    denoiser: str = "torch"       # the stage-2 denoiser step: "torch" | "openvino" (its CPU plugin, in this
                                  # precision; optional extra: a bf16 window 1.67x faster than torch's on an
                                  # AMX CPU, bench/openvino_trial.py) | "auto" (openvino where it is
                                  # installed and the CPU runs bf16, else torch)

    def __post_init__(self):
        if self.precision not in ("fp32", "bf16", "auto", None):
            raise AnitalkerError(f"unknown precision {self.precision!r}; use fp32, bf16 or auto")
        if self.upsampling not in ("auto",) + Stage1.UPSAMPLING:
            raise AnitalkerError(f"unknown upsampling {self.upsampling!r}; use transposed, subpixel or auto")
        if self.denoiser not in ("torch", "openvino", "auto"):
            raise AnitalkerError(f"unknown denoiser {self.denoiser!r}; use torch, openvino or auto")

    @classmethod
    def fastest(cls) -> "Speed":
        return cls(precision="auto", compile=None, upsampling="auto", denoiser="auto")

    def resolve(self, device: torch.device) -> "Speed":
        """The concrete mode on ``device``: precision fp32 or bf16, compile True or False."""
        native = native_bf16(device)
        precision = self.precision
        if precision is None:
            precision = "auto" if device.type == "cuda" else "fp32"
        if precision == "auto":
            precision = "bf16" if native else "fp32"
        compile = (precision == "bf16" and native) if self.compile is None else self.compile
        denoiser = self.denoiser
        if denoiser == "auto":       # in fp32 OpenVINO's step was slower than torch's (bench/openvino_trial.py)
            usable = device.type == "cpu" and precision == "bf16" and importlib.util.find_spec("openvino")
            denoiser = "openvino" if usable else "torch"
        return replace(self, precision=precision, compile=compile, denoiser=denoiser)



@dataclass
class Models:
    """stage2 is None when only stage 1 was loaded (reenactment needs no audio model)."""
    stage1: Stage1
    stage2: Stage2 | None
    hubert: HubertFrontend | None
    device: torch.device
    speed: Speed = Speed()

    def __post_init__(self):
        self.speed = self.speed.resolve(self.device)
        if hasattr(self.stage1, "set_constant_kernels"):   # stand-in stage-1 models (tests) have none
            self.stage1.set_constant_kernels(bool(self.speed.compile))
        if self.speed.upsampling == "auto":
            self.upsampling = choose_upsampling(self)      # what the timing chose (may be "mixed")
        else:
            if hasattr(self.stage1, "set_upsampling"):     # stand-in stage-1 models (tests) have none
                self.stage1.set_upsampling(self.speed.upsampling)
            self.upsampling = self.speed.upsampling
        if self.speed.denoiser == "openvino" and self.stage2 is not None:
            if self.device.type != "cpu":
                raise AnitalkerError("the OpenVINO denoiser runs on the CPU; use the torch denoiser on a GPU")
            from .openvino_denoiser import OpenVinoDenoiser
            # converted now, with torch's thread count at load: a stream's first hop must not wait for it
            self.stage2.eps_backend = OpenVinoDenoiser(self.stage2, self.speed.precision).prepare()
        self._render = self.stage1.render
        # what renders a whole clip (render_file), clip_batch frames a call
        self._render_clip, self.clip_batch = self.stage1.render, 16 if self.device.type == "cuda" else 1
        self.denoiser = None            # a compiled stage2.eps (compile_graphs); None: stage2.eps itself
        self.static_shapes = False      # the engine pads windows and render batches to fixed shapes
        if self.speed.compile and self.device.type == "cuda":
            compile_graphs(self, mode="reduce-overhead")
            self._render_clip = self._render
        elif self.speed.compile:
            frozen = compile_frozen(self.stage1.render)
            # live: one frame a call, each frame drawn as soon as it can be
            self._render = _fixed_batch(frozen, 1)
            # a whole clip: pairs of frames, 0.85-0.89x the time a frame of single frames with 2 threads
            # (larger batches no faster: their activations outgrow the caches); a second graph, compiled at
            # the first clip only
            self._render_clip, self.clip_batch = _fixed_batch(frozen, 2), 2

    @functools.cached_property
    def _motion(self):
        """The stage-1 motion encoder of a driving frame (reenactment), compiled like the renderer."""
        return compile_frozen(self.stage1.motion) if self.speed.compile else self.stage1.motion

    def describe(self) -> str:
        """The mode in use, for the start-up line."""
        on = cpu_name() if self.device.type == "cpu" else torch.cuda.get_device_name(self.device)
        backend = getattr(self.stage2, "eps_backend", None)   # None also for stand-in models (tests)
        denoiser = f", stage-2 denoiser on OpenVINO {backend.version}" if backend else ""
        return (f"{self.speed.precision}{' + compile' if self.speed.compile else ''}, {self.upsampling} "
                f"upsampling{denoiser} on {self.device.type} ({on})")

    @property
    def infer_type(self) -> str:
        return self.stage2.dims.infer_type if self.stage2 is not None else STAGE1_ONLY

    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.speed.precision == "bf16")

    @torch.inference_mode()
    def features(self, wave: np.ndarray) -> tuple[torch.Tensor, int]:
        """Whole-utterance audio features as the model takes them, and the frame count F."""
        require_stage2(self)
        if self.stage2.dims.audio == "hubert":
            with self.autocast():
                states = self.hubert.states(wave)
            audio, frames = hubert_model_input(states)
        else:
            audio, frames = mfcc_model_input(mfcc_features(wave))
        return audio.to(self.device), frames


STAGE1_ONLY = "stage1_only"     # Models.infer_type when no stage-2 model is loaded


def _fixed_batch(render, size: int):
    """render(wa, alpha, feats) in calls of exactly ``size`` frames, with alpha an inference tensor: a
    compiled renderer (dynamic=False) would compile a graph for every batch size the live engine happens to
    draw (tens of seconds each, while the picture holds). A last group short of ``size`` is padded
    (_padded)."""
    @functools.wraps(render)
    def call(wa, alpha, feats):
        if torch.is_inference_mode_enabled() and not alpha.is_inference():
            # dynamo guards on it: a code made outside inference_mode (the live engine's) recompiled the
            # graph the start-up probe had compiled, which with freezing took ~20 s while the picture held
            alpha = alpha.clone()
        if alpha.shape[0] == size:
            return render(wa, alpha, feats)
        return torch.cat([_padded(render, wa, alpha, feats, a, size) for a in range(0, alpha.shape[0], size)])
    return call


def _padded(render, wa, alpha, feats, start: int, size: int):
    """The frames [start, start + size) of a batch rendered as exactly ``size`` rows: rows past alpha's
    are copies of its last frame, cut off again (a frame's picture depends on its own row only)."""
    k = alpha.shape[0]
    idx = torch.arange(start, start + size, device=alpha.device).clamp_(max=k - 1)
    rows = lambda t: t if t.shape[0] == 1 else t[idx]     # noqa: E731  (batch 1 broadcasts)
    return render(rows(wa), alpha[idx], [rows(f) for f in feats])[:min(size, k - start)]


def compile_graphs(models: Models, **options) -> None:
    """Compile the denoiser and the renderer for fixed shapes (dynamic=False, torch.compile ``options``),
    and have the engine pad its DDIM windows (avatar.motion) and render batches (``_bucketed``) to those
    shapes: with mode="reduce-overhead" on a GPU each shape is captured once as a CUDA graph and then
    replayed, one launch per call instead of a kernel launch per operation."""
    models.static_shapes = True
    if models.stage2 is not None:
        models.denoiser = torch.compile(models.stage2.eps, dynamic=False, **options)
    models._render = _bucketed(torch.compile(models.stage1.render, dynamic=False, **options))


def _bucketed(render, unit: int = 10, most: int = 80):
    """render(wa, alpha, feats) at a few batch sizes only: unit, 2 unit, 4 unit, ... frames (unit: a hop;
    several sessions' hops stack), at most ``most`` a call: more frames (32 sessions' hops) go in calls of
    ``most``, so one graph's activations stay a few GB and no new size is captured per session count
    (padded as _padded does)."""
    @functools.wraps(render)
    def call(wa, alpha, feats):
        k = len(alpha)
        if k > most:
            part = lambda t, a: t if t.shape[0] == 1 else t[a:a + most]     # noqa: E731
            return torch.cat([call(part(wa, a), alpha[a:a + most], [part(f, a) for f in feats])
                              for a in range(0, k, most)])
        return _padded(render, wa, alpha, feats, 0, min(most, unit * (1 << (-(-k // unit) - 1).bit_length())))
    return call


def compile_frozen(fn):
    """torch.compile(fn) with inductor's freezing: under inference_mode the module's parameters become
    constants, so the weight preparation (bf16 casts, NHWC copies, demodulation norms) is folded away at
    compile time and oneDNN convolutions get pre-packed weights with fused elementwise epilogues (with
    Stage1.set_constant_kernels: a compiled bf16 frame 0.61-0.65x the time of the unfrozen compile, measured
    with bench/stages.py). The weights are read at the first call: the compiled function does not see
    later changes to them. Freezing is a global inductor setting that torch.compile's ``options`` does
    not pass on (torch 2.13), so it is switched on around each call, when a (re)compile may happen."""
    import torch._inductor.config as inductor_config

    compiled = torch.compile(fn, dynamic=False)

    @functools.wraps(fn)
    def call(*args, **kwargs):
        with inductor_config.patch(freezing=True):
            return compiled(*args, **kwargs)
    return call


@torch.inference_mode()
def choose_upsampling(models: Models, rounds: int = 3) -> str:
    """Time every upsampling conv of the renderer both ways (official transposed conv, equal sub-pixel
    conv) at its frame-size input, in the models' precision, and keep the faster per layer: which wins
    depends on the CPU (on AVX2 fp32 the transposed conv is 2-3x faster, bf16 matrix units favour regular
    convs). Both compute the same sums, so the choice changes only speed. -> "transposed", "subpixel" or
    "mixed" (some of each)."""
    s1 = models.stage1
    g = torch.Generator().manual_seed(0)
    style = torch.randn(1, s1.dims.style_dim, generator=g).to(models.device)
    picks = []
    for i, layer in enumerate(s1.upsampling_layers()):
        size = 4 * 2 ** i
        x = torch.randn(1, layer.weight.shape[2], size, size, generator=g).to(models.device)
        x = x.contiguous(memory_format=torch.channels_last)
        best = {}
        for r in range(rounds + 1):             # round 0 warms up (weight copies, oneDNN primitives)
            for sub in (False, True):
                layer.subpixel = sub
                with models.autocast():
                    t0 = time.perf_counter()
                    layer(x, style)
                    if models.device.type == "cuda":
                        torch.cuda.synchronize()
                    dt = time.perf_counter() - t0
                if r:
                    best[sub] = min(best.get(sub, dt), dt)
        layer.subpixel = best[True] < best[False]
        picks.append(layer.subpixel)
    return "subpixel" if all(picks) else "mixed" if any(picks) else "transposed"


def require_stage2(models: Models) -> None:
    if models.stage2 is None:
        raise AnitalkerError("these models were loaded for reenactment only (stage 1); load them without "
                             "stage1_only to drive the portrait with audio")


def load_models(checkpoints: str | Path | None = None, infer_type: str = DEFAULT_INFER_TYPE,
                device: str = "auto", speed: Speed = Speed(), *, stage1_only: bool = False) -> Models:
    """Load stage 1, the stage-2 file for ``infer_type`` and (for hubert types) HuBERT.
    stage1_only: stage 1 alone (reenactment), so stage-2 and HuBERT files need not exist."""
    dev = pick_device(device)
    if stage1_only:
        return Models(load_stage1(locate_stage1(checkpoints), dev), None, None, dev, speed)
    stage1_path, stage2_path, hubert_dir = locate(checkpoints, infer_type)
    stage2 = load_stage2(stage2_path, dev)
    if stage2.dims.infer_type != infer_type:
        raise AnitalkerError(f"{stage2_path} holds a {stage2.dims.infer_type} model, not {infer_type}; "
                             f"pass --infer-type {stage2.dims.infer_type} or replace the file")
    hubert = load_hubert(hubert_dir, dev) if hubert_dir is not None else None
    if speed.resolve(dev).precision == "bf16":
        prepare_bf16_models(stage2, hubert, dev)
    return Models(load_stage1(stage1_path, dev), stage2, hubert, dev, speed)


def prepare_bf16_models(stage2: Stage2, hubert: HubertFrontend | None, device: torch.device) -> None:
    """In place, for the bf16 mode: the matmul weights of stage 2 and HuBERT cast once, not per autocast
    call; where oneDNN computes bf16 natively HuBERT's encoder linears also pre-packed (streamed HuBERT
    multiplies ~30 rows a hop, so oneDNN's per-call weight reorders dominated)."""
    prepare_bf16(stage2)
    if hubert is not None:
        prepare_bf16(hubert.model)
        if can_pack(device):
            pack_linears(hubert.model.encoder)


@torch.inference_mode()
def encode_portrait(models: Models, image: torch.Tensor) -> PortraitCode:
    """image: (1,3,256,256) in [-1,1]."""
    wa, alpha0, feats = models.stage1.encode(image.to(models.device))
    return PortraitCode(wa, alpha0, feats)


CONTROL_RANGES = {"pose": (-1.0, 1.0), "location": (0.0, 1.0), "scale": (0.0, 1.0)}


def control_names(models: Models) -> tuple[str, ...]:
    """The controls the loaded stage-2 model takes: () audio_only, (pose,) pose_only, all three full_control."""
    return tuple(name for name, _, _ in models.stage2.adapters) if models.stage2 is not None else ()


def check_controls(models: Models, controls: Controls) -> None:
    """Refuse, with one line that says what to do, a control the model lacks or a value it was not
    trained on (not finite, or outside the normalised range)."""
    require_stage2(models)
    kind = models.stage2.dims.control
    if controls.pose is not None and kind == "audio_only":
        raise AnitalkerError(f"the {models.infer_type} model has no pose control; use a pose_only or "
                             "full_control model (--infer-type hubert_pose_only)")
    if (controls.location is not None or controls.scale is not None) and kind != "full_control":
        raise AnitalkerError(f"the {models.infer_type} model has no face location/scale control; use a "
                             "full_control model (--infer-type hubert_full_control)")
    for name, (lo, hi) in CONTROL_RANGES.items():
        value = getattr(controls, name)
        if value is None:
            continue
        a = np.asarray(value, dtype=np.float64)
        if not np.isfinite(a).all():
            raise AnitalkerError(f"{name} must be finite numbers, got {value!r}")
        if a.min(initial=lo) < lo or a.max(initial=hi) > hi:
            unit = " (degrees / 90)" if name == "pose" else ""
            raise AnitalkerError(f"{name} must lie within [{lo:g}, {hi:g}]{unit}, got {value!r}")


@torch.inference_mode()
def generate_motion(models: Models, code: PortraitCode, audio: torch.Tensor, frames: int,
                    controls: Controls = Controls(), steps: int = 50, seed: int = 0,
                    on_step=None) -> torch.Tensor:
    """DDIM over the whole utterance, as the official code does: (1, F, M) motion codes in [-1, 1].

    The initial noise is ``avatar.motion.motion_noise``: drawn per frame on the CPU from ``seed``, so a seed
    gives the same motion on every device, and the streaming engine draws the same noise for each frame.
    """
    check_controls(models, controls)
    schedule = ddim_schedule(steps)
    x_T = motion_noise(seed, 0, frames, models.stage2.dims.motion_dim).to(models.device)
    with models.autocast():  # the network may run in bf16; the sampler's arithmetic stays fp32
        cond = models.stage2.condition(code.wa, code.alpha0, audio, **controls.tensors(frames, models.device))
        return ddim_sample(lambda x, t: models.stage2.eps(cond, x, t).float(), x_T, schedule, on_step=on_step)


@torch.inference_mode()
def render(models: Models, code: PortraitCode, alphas: torch.Tensor, batch: int | None = None):
    """Yield rendered frames (b, 3, 256, 256), pre-clamp, ``batch`` at a time (default: the models'
    clip_batch) through the models' clip renderer. alphas: (F, M)."""
    batch = batch or models.clip_batch
    for i in range(0, len(alphas), batch):
        with models.autocast():
            out = models._render_clip(code.wa, alphas[i:i + batch], code.feats)
        yield out
