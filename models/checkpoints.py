"""Checkpoint I/O: the official AniTalker files, unchanged, and the project's own format.

Official files are plain pickled state dicts:
- ``stage1.ckpt``: the LIA_Model keys ``enc.*`` / ``dec.*``, possibly prefixed ``lia.``, possibly with
  training-only extras (reported once, then ignored);
- ``stage2_*.ckpt``: ``model.*``, ``ema_model.*`` (the one the official sampler uses) and ``x_T``.
  Which model a file holds (hubert or mfcc; audio_only, pose_only or full_control) and its dims are read
  from the keys and shapes, never from the file name.

The project's own checkpoints (written by training) are a dict ``{"anitalker_live": 1, "kind": "stage1" |
"stage2", "dims": {...}, "state_dict": {...}}``: the dims travel with the weights, so no YAML is needed.

Every file is read with ``torch.load(weights_only=True)``: a file that needs arbitrary pickled objects
is refused.
"""
from __future__ import annotations

import dataclasses
import os
import pickle
import re
import sys
from pathlib import Path

import torch

from .errors import CheckpointError
from .stage1 import Stage1, Stage1Dims
from .stage2 import Stage2, Stage2Dims

FORMAT_KEY = "anitalker_live"
FORMAT_VERSION = 1


def read_state_file(path) -> dict:
    """torch.load a checkpoint safely, turning every failure into one clear CheckpointError."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if (why := unsafe_reason(e)) is None:  # not a pickle torch understands: a truncated download, ...
            raise CheckpointError(f"cannot read checkpoint {path}: it is damaged or not a torch checkpoint "
                                  "(download it again)") from None
        raise CheckpointError(f"{path} is unsafe to load and was refused: {why}; load only checkpoints of plain "
                              "tensors (the official files are), or re-save this one as a state dict") from None
    except Exception as e:  # truncated download, not a torch file, ...
        raise CheckpointError(f"cannot read checkpoint {path}: {type(e).__name__}: {e}"[:400]) from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} is not a state dict (it holds a {type(obj).__name__})")
    return obj


# torch.load(weights_only=True)'s refusals of a pickle that would run code or build arbitrary objects, as
# torch 2.13 words them: the first names a blocked module's function (os.system is posix.system), the
# second any other global, the rest objects it will not build. ("Unsupported operand" is not among them:
# that is a file that is not a pickle torch reads, e.g. a damaged download.)
_REFUSALS = (r"Trying to load unsupported GLOBAL [\w.]+ whose module [\w.]+ is blocked\.",
             r"Unsupported global: GLOBAL [\w.]+ was not an allowed global by default\.",
             r"Trying to call reduce for [^\n]*", r"Can only (?:create|build) [^\n]*")


def unsafe_reason(e: Exception) -> str | None:
    """torch's own sentence when a weights-only load refused a pickle for safety; None for other failures
    (a damaged or foreign file)."""
    for pattern in _REFUSALS:
        if found := re.search(pattern, str(e)):
            return "torch.load(weights_only=True) says: " + found.group(0).rstrip(".")
    return None


def _first(keys, n=5) -> str:
    keys = sorted(keys)
    more = f" (+{len(keys) - n} more)" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def _load_into(model: torch.nn.Module, sd: dict, source: str, extras_ok: bool) -> None:
    """Strict load with errors that name the file and the first offending keys."""
    own = model.state_dict()
    missing = own.keys() - sd.keys()
    if missing:
        raise CheckpointError(f"{source} is missing {len(missing)} weights: {_first(missing)}; "
                              "is it the right kind of checkpoint?")
    bad = [k for k in own if tuple(sd[k].shape) != tuple(own[k].shape)]
    if bad:
        k = bad[0]
        raise CheckpointError(f"{source}: {len(bad)} weights have the wrong shape, first {k} "
                              f"{tuple(sd[k].shape)} where the model expects {tuple(own[k].shape)}")
    extra = sd.keys() - own.keys()
    if extra and not extras_ok:
        raise CheckpointError(f"{source} has {len(extra)} unexpected weights: {_first(extra)}")
    if extra:
        print(f"note: {source}: ignoring {len(extra)} training-only weights ({_first(extra, 3)})",
              file=sys.stderr)
    model.load_state_dict({k: sd[k] for k in own}, strict=True)
    model.eval()


def _unwrap(obj: dict, kind: str, source: str):
    """Return (dims dict or None, state dict) for the project format or an official flat dict."""
    if FORMAT_KEY in obj:
        if obj.get("kind") != kind:
            raise CheckpointError(f"{source} is a {obj.get('kind')} checkpoint, expected {kind}")
        return obj["dims"], obj["state_dict"]
    if "state_dict" in obj and isinstance(obj["state_dict"], dict):  # a Lightning-style wrapper
        obj = obj["state_dict"]
    return None, {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}


# ----------------------------------------------------------------------------------------------- stage 1

def stage1_dims_from_keys(sd: dict) -> Stage1Dims:
    """Stage-1 dims from the shapes of an official-layout state dict."""
    try:
        style_dim, motion_dim = sd["dec.direction.weight"].shape
        n_res = sum(1 for k in sd if k.startswith("enc.net_app.convs.") and k.endswith(".conv1.0.weight"))
        enc_first = sd["enc.net_app.convs.0.0.weight"].shape[0]        # encoder channels at full size
        dec_last = sd[f"dec.to_rgbs.{n_res - 1}.conv.0.weight"].shape[1]  # decoder channels at full size
    except KeyError as e:
        raise CheckpointError(f"not a stage-1 (motion encoder/renderer) checkpoint: no key {e}") from None
    except IndexError:                     # keys that look like stage 1 but with a wrong count of blocks
        raise CheckpointError("not a stage-1 (motion encoder/renderer) checkpoint: its blocks are not "
                              "the official ones") from None
    size = 4 * 2 ** n_res
    divisor = max(1, Stage1Dims(size=size).enc_channels(size) // enc_first)
    return Stage1Dims(size=size, style_dim=int(style_dim), motion_dim=int(motion_dim),
                      channel_multiplier=max(1, dec_last // enc_first), channel_divisor=divisor)


def _in(source: str, read):
    """read() with the file's name put in front of a CheckpointError that lacks it."""
    try:
        return read()
    except CheckpointError as e:
        raise CheckpointError(f"{source}: {e}" if source not in str(e) else str(e)) from None
    except (TypeError, ValueError) as e:          # dims of the wrong kind in a project checkpoint
        raise CheckpointError(f"{source}: its model dims are not valid ({e})") from None


def stage1_from_state_dict(obj: dict, source: str = "stage-1 checkpoint") -> Stage1:
    dims, sd = _unwrap(obj, "stage1", source)
    sd = {k[4:] if k.startswith("lia.") else k: v for k, v in sd.items()}
    dims = _in(source, lambda: Stage1Dims(**dims) if dims is not None else stage1_dims_from_keys(sd))
    model = Stage1(dims)
    _load_into(model, sd, source, extras_ok=True)
    return model


def load_stage1(path, device="cpu") -> Stage1:
    """Load ``stage1.ckpt`` (official, with or without ``lia.``) or a project stage-1 checkpoint."""
    return stage1_from_state_dict(read_state_file(path), str(path)).to(device)


# ----------------------------------------------------------------------------------------------- stage 2

def _prefixed(sd: dict) -> dict:
    """The official file holds model.* and ema_model.*; the sampler uses the EMA weights."""
    for prefix in ("ema_model.", "model."):
        sub = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
        if sub:
            return sub
    return {k: v for k, v in sd.items() if k != "x_T"}


def stage2_dims_from_keys(sd: dict) -> Stage2Dims:
    """Stage-2 dims and infer type from the keys and shapes of an (unprefixed) state dict."""
    try:
        if "down_sample2.weight" in sd:
            audio = "mfcc"
            mfcc_dim = sd["down_sample1.weight"].shape[1]
            speech_dim = sd["down_sample2.weight"].shape[0]
            hubert = {}
        else:
            audio = "hubert"
            mfcc_dim = 39
            speech_dim, hubert_dim, _ = sd["down_sample1.weight"].shape
            hubert = dict(hubert_dim=int(hubert_dim), hubert_layers=int(sd["weights"].shape[0]))
        if "location_predictor.fc.weight" in sd:
            control = "full_control"
        elif "pose_predictor.fc.weight" in sd:
            control = "pose_only"
        else:
            control = "audio_only"
        proj_dim, style_dim = sd["init_code_proj.0.weight"].shape
        blocks = lambda name: len({k.split(".")[2] for k in sd if k.startswith(f"{name}.encoders.")})
        pos_u = sd["coarse_decoder.encoders.0.self_attn.pos_bias_u"]
        lstm = dict(lstm_hidden=int(sd["pose_predictor.fc.weight"].shape[1]),
                    lstm_layers=sum(1 for k in sd if k.startswith("pose_predictor.lstm.weight_ih_l"))) \
            if control != "audio_only" else {}
        return Stage2Dims(
            audio=audio, control=control, mfcc_dim=int(mfcc_dim), speech_dim=int(speech_dim),
            speech_layers=blocks("speech_encoder"), decoder_layers=blocks("coarse_decoder"),
            proj_dim=int(proj_dim), motion_dim=int(sd["out_proj.weight"].shape[0]), style_dim=int(style_dim),
            heads=int(pos_u.shape[0]),
            conv_kernel=int(sd["coarse_decoder.encoders.0.conv_module.depthwise_conv.weight"].shape[2]),
            **hubert, **lstm)
    except KeyError as e:
        raise CheckpointError(f"not a stage-2 (motion generator) checkpoint: no key {e}") from None


def stage2_from_state_dict(obj: dict, source: str = "stage-2 checkpoint") -> Stage2:
    dims, sd = _unwrap(obj, "stage2", source)
    if dims is None:
        sd = _prefixed(sd)
        dims = _in(source, lambda: stage2_dims_from_keys(sd))
    else:
        dims = _in(source, lambda: Stage2Dims(**dims))
    model = Stage2(dims)
    _load_into(model, sd, source, extras_ok=False)
    return model


def load_stage2(path, device="cpu") -> Stage2:
    """Load any official ``stage2_*.ckpt`` or a project stage-2 checkpoint; ``model.dims`` tells its type."""
    return stage2_from_state_dict(read_state_file(path), str(path)).to(device)


# ----------------------------------------------------------------------------------------------- saving

def save_checkpoint(path, model: Stage1 | Stage2, extra: dict | None = None) -> None:
    """Write the project format (dims + weights), atomically. ``extra`` may hold tensors/plain values."""
    kind = "stage1" if isinstance(model, Stage1) else "stage2"
    obj = {FORMAT_KEY: FORMAT_VERSION, "kind": kind, "dims": dataclasses.asdict(model.dims),
           "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()}, **(extra or {})}
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def export_official(path, model: Stage1 | Stage2) -> None:
    """Write the official key layout (stage 2: model.*, ema_model.* and x_T, as the released files)."""
    sd = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    if isinstance(model, Stage2):
        sd = {**{f"model.{k}": v for k, v in sd.items()}, **{f"ema_model.{k}": v for k, v in sd.items()},
              "x_T": torch.zeros(32, 3, 256, 256)}
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(sd, tmp)
    os.replace(tmp, path)
