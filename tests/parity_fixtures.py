"""The parity fixtures (numbers computed with the official AniTalker code) and the synthetic weights they
were computed with. Every test that reads them goes through this module.

Layout (tests/fixtures/parity/, the project's copy; ``$PARITY_CASES`` selects other case directories of
the same layout, separated by os.pathsep):

    <root>/manifest_*.json            official key names -> shape, dtype, role (and value for fixed buffers)
    <root>/hubert_tiny_config.json    HubertConfig kwargs of the tiny HuBERT
    <root>/weights_checksums_seed1.json
    <root>/<case>/case.json           {"seed": N}
    <root>/<case>/{stage1,stage2,audio_frontend}.npz   any of them

The manifests and the config live beside the case directories and serve every case. A missing file is an
error, never a skip: a fixture that went missing must not turn into a passing suite.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent / "fixtures" / "parity"
PARTS = ("stage1.npz", "stage2.npz", "audio_frontend.npz")
CASE_A = ROOT / "case_a"        # the project's own case (seed 1), for tests that know its sizes


def case_dirs() -> list[Path]:
    """The case directories to check: $PARITY_CASES, else every case of the project's copy."""
    env = os.environ.get("PARITY_CASES")
    if env:
        return [Path(p) for p in env.split(os.pathsep) if p]
    return sorted(p.parent for p in ROOT.glob("*/case.json"))


def _need(path: Path) -> Path:
    if not path.is_file():
        raise FileNotFoundError(f"parity fixture missing: {path}")
    return path


def seed_of(case: Path) -> int:
    return int(json.loads(_need(case / "case.json").read_text())["seed"])


def load(case: Path, part: str):
    """One of the case's .npz files (an error if it is not there)."""
    return np.load(_need(case / part))


def manifest(case: Path, name: str) -> dict:
    """A manifest (or the HuBERT config) from beside the case directory."""
    return json.loads(_need(case.parent / name).read_text())


def state_dict(case: Path, manifest_name: str) -> dict:
    """The synthetic weights of a manifest at the case's seed, in the official key names."""
    return synthetic_weights(manifest(case, manifest_name), seed_of(case))


# ------------------------------------------------------------------------------- the weight rule
# Each key gets its own CPU generator seeded from sha256("<seed>:<key>") (first 15 hex digits), one
# float32 standard-normal draw r of the key's shape, and a role that maps r to the value. An optional
# "scale" multiplies the result (the timestep embedding, whose input is the raw timestep), and the value is
# cast to the entry's dtype. The arithmetic below is the rule's, operation for operation: a different but
# equivalent order (multiplying by 1/sqrt instead of dividing) changes the last bit.

def _draw(seed: int, key: str, shape: list[int]) -> torch.Tensor:
    digest = hashlib.sha256(f"{seed}:{key}".encode()).hexdigest()
    gen = torch.Generator(device="cpu").manual_seed(int(digest[:15], 16))
    return torch.randn(shape, generator=gen, dtype=torch.float32)


def _fan_in(shape: list[int]) -> int:
    return max(1, math.prod(shape[1:])) if len(shape) > 1 else max(1, shape[0] if shape else 1)


_FROM_NORMAL = {
    "eq_weight": lambda r, shape: r,
    "weight": lambda r, shape: r / math.sqrt(_fan_in(shape)),
    "bias": lambda r, shape: 0.1 * r,
    "vec": lambda r, shape: 0.1 * r,
    "bn_running_mean": lambda r, shape: 0.1 * r,
    "norm_weight": lambda r, shape: 1.0 + 0.1 * r,
    "bn_running_var": lambda r, shape: 1.0 + 0.1 * r.abs(),
}
_DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16,
           "int64": torch.int64, "int32": torch.int32}


def _value(seed: int, key: str, entry: dict) -> torch.Tensor:
    shape = [int(s) for s in entry["shape"]]
    role = entry.get("role")
    if role == "fixed":                             # the official buffer content, stored in the manifest
        value = torch.tensor(entry["value"], dtype=torch.float32).reshape(shape)
    elif role == "int_zeros":
        value = torch.zeros(shape, dtype=torch.int64)
    elif role == "zeros":
        value = torch.zeros(shape, dtype=torch.float32)
    elif role in _FROM_NORMAL:
        value = _FROM_NORMAL[role](_draw(seed, key, shape), shape)
        if "scale" in entry:
            value = value * float(entry["scale"])
    else:
        raise ValueError(f"manifest entry {key} has no known role ({role!r})")
    return value.to(_DTYPES[entry.get("dtype", "float32")])


def synthetic_weights(manifest: dict, seed: int) -> dict:
    """key -> tensor for every key of the manifest."""
    return {key: _value(seed, key, entry) for key, entry in manifest.items()}


def checksums(sd: dict) -> dict:
    """key -> float64 sum, sum of |x| and the first 3 values (the fields of weights_checksums_seed1.json)."""
    out = {}
    for key, v in sd.items():
        x = v.detach().to(torch.float64).reshape(-1)
        out[key] = {"sum": float(x.sum()), "abs_sum": float(x.abs().sum()), "first": x[:3].tolist()}
    return out
