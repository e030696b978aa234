"""The stage-2 denoiser step (``Stage2.eps``) on OpenVINO's CPU plugin: an optional backend
(``pip install 'anitalker-live[openvino]'``, ``Speed(denoiser="openvino")``).

Why only this part: side by side on a 2-core Xeon with AMX (``python bench/openvino_trial.py --part
denoiser``), a full-size bf16 motion window (10 DDIM steps over ~25 frames, where torch's per-op overhead
dominates) took 108 ms on OpenVINO against 172 ms in torch (1.67x; 154 ms as a frozen torch.compile). For
the renderer OpenVINO lost to the frozen torch.compile (0.69-0.78x), and for HuBERT to torch's incremental
features, so those stay in torch. The sampler, the inpainting and the condition (run once a window) stay in torch.

One model serves every window: converted and compiled once (``prepare``, about 2-3 s at full size), with
the batch and frame counts dynamic (measured as fast as a static-shape model: 7.4 ms an eps call either
way, one thread), so a new window length (the first window, the last, sessions batched together) never
stalls a stream for a conversion. The weights are read at construction: later changes to the torch module
are not seen.
"""
from __future__ import annotations

import copy
import warnings

import numpy as np
import torch

from models.errors import AnitalkerError
from models.stage2 import Condition, Stage2


class _Step(torch.nn.Module):
    """eps(prefix, x_t, t, positions...) with the condition's parts as inputs, for tracing."""

    def __init__(self, stage2: Stage2):
        super().__init__()
        self.stage2 = stage2

    def forward(self, prefix, x_t, t, *positions):
        return self.stage2.eps(Condition(prefix, None, None, None, list(positions)), x_t, t)


class OpenVinoDenoiser:
    """Stage2.eps(cond, x_t, t) computed by OpenVINO: ``precision`` "bf16" or "fp32" (its
    INFERENCE_PRECISION_HINT), ``threads`` its INFERENCE_NUM_THREADS (default: torch's thread count at
    the first call)."""

    def __init__(self, stage2: Stage2, precision: str, threads: int | None = None):
        try:
            import openvino
        except ImportError:
            raise AnitalkerError("the OpenVINO denoiser needs the openvino package: "
                                 "pip install 'anitalker-live[openvino]'") from None
        if precision not in ("bf16", "fp32"):
            raise AnitalkerError(f"unknown precision {precision!r} for the OpenVINO denoiser; use bf16 or fp32")
        self._ov = openvino
        # an fp32 copy to trace: bf16-prepared weights (models.precision) widen exactly, and OpenVINO
        # casts them back for bf16 itself
        backend = stage2.__dict__.get("eps_backend")     # a denoiser set before is not copied
        self._model = copy.deepcopy(stage2, {id(backend): None} if backend is not None else {}).float().eval()
        self._model.eps_backend = None
        self.precision, self.threads = precision, threads
        self._req = None
        self.conversions = 0

    @property
    def version(self) -> str:
        return self._ov.__version__.split("-")[0]

    def _request(self, inputs: list[torch.Tensor]):
        if self._req is None:
            ov = self._ov
            prefix, x_t, _, *positions = inputs
            # batch and frames dynamic: prefix (B|1, F, P), x_t (B, F, M), t (B,), positions (1, h, 2F-1, dk)
            shapes = [ov.PartialShape([-1, -1, prefix.shape[2]]), ov.PartialShape([-1, -1, x_t.shape[2]]),
                      ov.PartialShape([-1])] + [ov.PartialShape([p.shape[0], p.shape[1], -1, p.shape[3]])
                                                for p in positions]
            # traced without autocast (the engine samples under it): OpenVINO has no rule for autocast's
            # casts, and its precision hint sets the compute type itself
            with torch.no_grad(), torch.autocast("cpu", enabled=False), warnings.catch_warnings():
                # the tracer warns of values taken from the example's shapes; `input` makes batch and frames
                # dynamic, and other window lengths match torch (tests/test_openvino_denoiser.py)
                warnings.simplefilter("ignore", torch.jit.TracerWarning)
                # openvino's PyTorch frontend traces with torch.jit.trace, which torch 2.13 calls deprecated
                warnings.simplefilter("ignore", DeprecationWarning)
                model = ov.convert_model(_Step(self._model), example_input=tuple(inputs), input=shapes)
            config = {"INFERENCE_PRECISION_HINT": "bf16" if self.precision == "bf16" else "f32",
                      "PERFORMANCE_HINT": "LATENCY",
                      "INFERENCE_NUM_THREADS": self.threads or torch.get_num_threads()}
            self._req = ov.Core().compile_model(model, "CPU", config).create_infer_request()
            self.conversions += 1
        return self._req

    def prepare(self, frames: int = 25) -> "OpenVinoDenoiser":
        """Convert and compile now, on a zero window of ``frames`` (any length: the model is dynamic), so
        that a stream's first hop does not wait for it (about 2-3 s at full size)."""
        d = self._model.dims
        prefix = torch.zeros(1, frames, d.speech_dim + 2 * d.proj_dim)
        with torch.no_grad():
            positions = self._model.coarse_decoder.positions(frames, prefix)
        self(Condition(prefix, None, None, None, positions), torch.zeros(1, frames, d.motion_dim), torch.tensor([1]))
        return self

    def __call__(self, cond: Condition, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if x_t.device.type != "cpu":
            raise AnitalkerError("the OpenVINO denoiser runs on the CPU; use the torch denoiser on a GPU")
        b, frames, _ = x_t.shape
        if frames != cond.frames:
            raise ValueError(f"x_t has {frames} frames but the condition has {cond.frames}")
        t = torch.as_tensor(t).reshape(-1).expand(b)
        inputs = [cond.prefix, x_t, t, *cond.positions]
        inputs = [x.detach().float() if x.is_floating_point() else x.detach() for x in inputs]
        req = self._request(inputs)
        req.infer([np.ascontiguousarray(x.numpy()) for x in inputs])
        return torch.from_numpy(req.get_output_tensor(0).data.copy())   # the request reuses its buffer
