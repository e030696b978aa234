"""Numerical parity with the official AniTalker implementation.

Every case directory that tests/parity_fixtures.py selects is checked: the project's copy in
tests/fixtures/parity/ by default, or those in $PARITY_CASES (same layout: manifests beside the cases).
A case holds case.json ({"seed": N}) and any of stage1.npz, stage2.npz, audio_frontend.npz; each part it
holds is tested, and the project's own case holds all three. The synthetic weights are built from the
manifests by the project's implementation of the fixtures' weight rule (proven bit-exact here against the
published checksums) and go through the same loaders that read the official files. Seeds, lengths, step
counts and run tags are read from the files.
"""
from __future__ import annotations

import functools
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from avatar.portrait import to_tensor, to_uint8
from models.checkpoints import stage1_from_state_dict, stage2_from_state_dict
from models.frontend import (hubert_model_input, load_hubert, mfcc_features, mfcc_model_input,
                             normalize_wave, write_hubert_folder)
from models.sampler import ddim_sample, ddim_schedule
from parity_fixtures import PARTS, ROOT, case_dirs, checksums, load, manifest, state_dict, synthetic_weights

CASES = case_dirs()


def with_part(part: str) -> list:
    return [pytest.param(c, id=c.name) for c in CASES if (c / part).is_file()]


def test_there_are_cases():
    """A missing fixture folder or file must fail loudly, not turn into fewer tests."""
    assert CASES, f"no parity case directories: set PARITY_CASES or restore {ROOT}/*/case.json"
    for case in CASES:
        assert (case / "case.json").is_file(), f"{case} has no case.json"
        assert any((case / p).is_file() for p in PARTS), f"{case} holds none of {', '.join(PARTS)}"
    if not os.environ.get("PARITY_CASES"):
        for part in PARTS:
            assert (ROOT / "case_a" / part).is_file(), f"the project's parity case lost {part}"


@pytest.mark.parametrize("name", ["stage1", "stage2_hubert_audio_only", "stage2_hubert_pose_only",
                                  "stage2_hubert_full_control", "stage2_mfcc_full_control", "hubert_tiny"])
def test_weight_rule_is_bit_exact(name):
    """The project's weight generator reproduces the fixtures' weights: per key the float64 sum, the sum
    of |x| and the first values equal the published checksums exactly."""
    ref = json.loads((ROOT / "weights_checksums_seed1.json").read_text())[name]
    ours = checksums(synthetic_weights(json.loads((ROOT / f"manifest_{name}.json").read_text()), seed=1))
    assert ours.keys() == ref.keys()
    wrong = [k for k in ref if ours[k] != ref[k]]
    assert not wrong, f"{len(wrong)} keys differ, first {wrong[0]}: {ours[wrong[0]]} != {ref[wrong[0]]}"


def close(ours, ref, tol: float, what: str):
    ours = ours.detach().cpu().to(torch.float64).numpy() if isinstance(ours, torch.Tensor) else np.asarray(ours)
    assert ours.shape == ref.shape, f"{what}: shape {ours.shape} != {ref.shape}"
    err = float(np.abs(ours.astype(np.float64) - ref.astype(np.float64)).max())
    assert err <= tol, f"{what}: max abs error {err:.3g} > {tol}"


def u8_close(ours: np.ndarray, ref: np.ndarray, what: str):
    diff = np.abs(ours.astype(int) - ref.astype(int))
    assert diff.max() <= 2, f"{what}: a pixel differs by {diff.max()} levels"
    assert (diff <= 1).mean() >= 0.999, f"{what}: {(diff > 1).mean():.4%} of values differ by >1 level"


# ------------------------------------------------------------------------------------------------ stage 1

@functools.lru_cache(maxsize=2)
def stage1_model(case: Path):
    return stage1_from_state_dict(state_dict(case, "manifest_stage1.json"), f"{case.name}/stage1")


@pytest.mark.parametrize("case", with_part("stage1.npz"))
@torch.inference_mode()
def test_stage1_encoder(case):
    a = load(case, "stage1.npz")
    m = stage1_model(case)
    img = to_tensor(a["image_u8"])
    close(img, a["image_in"], 0, "image_in (portrait conversion)")
    wa, alpha0, feats = m.encode(img)
    close(wa, a["wa"], 1e-4, "wa")
    close(alpha0, a["alpha0"], 1e-4, "alpha0")
    close(m.basis(), a["Q"], 1e-4, "Q")
    f64 = [f.double() for f in feats]
    close(torch.stack([f.mean() for f in f64]), a["feat_mean"], 1e-4, "feat_mean")
    close(torch.stack([f.std() for f in f64]), a["feat_std"], 1e-4, "feat_std")
    close(torch.cat([f.mean(dim=(0, 2, 3)) for f in f64]), a["feat_chan_mean"], 1e-4, "feat_chan_mean")
    close(feats[0], a["feat0_8x8"], 1e-4, "feat0_8x8")


@pytest.mark.parametrize("case", with_part("stage1.npz"))
@torch.inference_mode()
def test_stage1_render(case):
    a = load(case, "stage1.npz")
    m = stage1_model(case)
    wa, alpha0, feats = m.encode(torch.from_numpy(a["image_in"]))
    frames = m.render(wa, torch.from_numpy(a["alphas"]), feats)      # batched
    close(frames, a["frames"], 2e-3, "frames")
    u8_close(to_uint8(frames), a["frames_u8"], "frames_u8")
    one = m.render(wa, torch.from_numpy(a["alphas"][:1]), feats)     # one frame alone
    close(one, a["frames"][:1], 2e-3, "frames[0] rendered alone")
    rec = m.render(wa, alpha0, feats)
    close(rec, a["frame_alpha0"], 2e-3, "frame_alpha0")
    u8_close(to_uint8(rec)[0], a["frame_alpha0_u8"], "frame_alpha0_u8")


@pytest.mark.parametrize("case", with_part("stage1.npz"))
@torch.inference_mode()
def test_stage1_drive(case):
    """The motion code of another image (reenactment), rendered with the portrait's wa and features."""
    a = load(case, "stage1.npz")
    m = stage1_model(case)
    wa, _, feats = m.encode(torch.from_numpy(a["image_in"]))
    alpha = m.motion(to_tensor(a["drive_image_u8"]))
    close(alpha, a["drive_alpha"], 1e-4, "drive_alpha")
    frame = m.render(wa, alpha, feats)
    close(frame, a["drive_frame"], 2e-3, "drive_frame")
    u8_close(to_uint8(frame)[0], a["drive_frame_u8"], "drive_frame_u8")


# ------------------------------------------------------------------------------------------------ stage 2

def stage2_runs(z) -> list[str]:
    return sorted(k[:-len("__eps_t980")] for k in z.files if k.endswith("__eps_t980"))


@functools.lru_cache(maxsize=2)
def stage2_model(case: Path, infer_type: str):
    sd = state_dict(case, f"manifest_stage2_{infer_type}.json")
    m = stage2_from_state_dict(sd, f"{case.name}/stage2_{infer_type}")
    assert m.dims.infer_type == infer_type, "the infer type must be detected from the keys"
    return m


def stage2_inputs(z, tag: str):
    infer_type, _, ctrl = tag.partition("__")
    audio = z["hubert_audio_f16"].astype(np.float32) if infer_type.startswith("hubert") else z["mfcc_audio"]
    t = lambda k: torch.from_numpy(np.asarray(z[k], dtype=np.float32))
    return infer_type, ctrl == "ctrl", dict(wa=t("wa"), alpha0=t("alpha0"), audio=torch.from_numpy(audio),
                                            location=t("ctrl_face_location"), scale=t("ctrl_face_scale"),
                                            pose=t("ctrl_pose"))


def condition(m, control: bool, x: dict):
    """The official control_flag: True uses every given control, False predicts them all."""
    if control:
        return m.condition(x["wa"], x["alpha0"], x["audio"], location=x["location"] if m.dims.control == "full_control" else None,
                           scale=x["scale"] if m.dims.control == "full_control" else None,
                           pose=x["pose"] if m.dims.control != "audio_only" else None)
    return m.condition(x["wa"], x["alpha0"], x["audio"])


STAGE2_PARAMS = [pytest.param(p.values[0], tag, id=f"{p.id}-{tag}") for p in with_part("stage2.npz")
                 for tag in stage2_runs(load(p.values[0], "stage2.npz"))]


@pytest.mark.parametrize("case", with_part("stage2.npz"))
def test_stage2_schedule(case):
    z = load(case, "stage2.npz")
    s = ddim_schedule(int(z["step_T"]))
    assert s.timesteps.tolist() == z["ddim_timesteps"].tolist()
    assert np.array_equal(s.alphas_cumprod.numpy(), z["ddim_alphas_cumprod"]), "ddim_alphas_cumprod not bit-exact"


@pytest.mark.parametrize("case,tag", STAGE2_PARAMS)
@torch.inference_mode()
def test_stage2_denoiser(case, tag):
    z = load(case, "stage2.npz")
    infer_type, control, x = stage2_inputs(z, tag)
    m = stage2_model(case, infer_type)
    x_T = torch.from_numpy(z["x_T"])
    for t in (980, 500):
        eps, loc, scale, pose = m(x["wa"], x["alpha0"], x["audio"], x["location"], x["scale"], x["pose"],
                                  x_T, torch.tensor([t]), control=control)
        close(eps, z[f"{tag}__eps_t{t}"], 1e-4, f"{tag} eps t={t}")
        for name, val in (("location", loc), ("scale", scale), ("pose", pose)):
            if f"{tag}__pred_{name}" in z.files:
                close(val, z[f"{tag}__pred_{name}"], 1e-4, f"{tag} pred_{name}")
    # the cached path (condition once, eps per step) equals the official forward
    cond = condition(m, control, x)
    for i, t in enumerate(z[f"{tag}__traj_t"]):
        eps = m.eps(cond, torch.from_numpy(z[f"{tag}__traj_x_in"][i]), torch.tensor([int(t)]))
        close(eps, z[f"{tag}__traj_eps"][i], 1e-4, f"{tag} traj_eps[{i}] (t={t})")


@pytest.mark.parametrize("case,tag", STAGE2_PARAMS)
@torch.inference_mode()
def test_stage2_sampler(case, tag):
    z = load(case, "stage2.npz")
    traj_t, x_in, eps_ref = z[f"{tag}__traj_t"], z[f"{tag}__traj_x_in"], z[f"{tag}__traj_eps"]
    schedule = ddim_schedule(int(z["step_T"]))

    # replay: the fixture's eps through our sampler reproduces its x0 predictions and next inputs
    seen = []
    replay = lambda x, t: torch.from_numpy(eps_ref[len(seen)]).to(x.dtype)
    on_step = lambda i, t, x, eps, x0: seen.append((int(t[0]), x.clone(), x0.clone()))
    out = ddim_sample(replay, torch.from_numpy(z["x_T"]), schedule, on_step=on_step)
    assert [s[0] for s in seen] == traj_t.tolist()
    for i, (_, x, x0) in enumerate(seen):
        close(x, x_in[i], 1e-3, f"{tag} traj_x_in[{i}]")
        close(x0, z[f"{tag}__traj_pred_xstart"][i], 1e-3, f"{tag} traj_pred_xstart[{i}]")
    close(out, z[f"{tag}__sample"], 1e-3, f"{tag} sample (replayed eps)")

    # and the whole thing with our network
    infer_type, control, x = stage2_inputs(z, tag)
    m = stage2_model(case, infer_type)
    cond = condition(m, control, x)
    sample = ddim_sample(lambda xt, t: m.eps(cond, xt, t), torch.from_numpy(z["x_T"]), schedule)
    close(sample, z[f"{tag}__sample"], 1e-3, f"{tag} sample")


# ------------------------------------------------------------------------------------------------ front ends

@pytest.mark.parametrize("case", with_part("audio_frontend.npz"))
def test_mfcc_frontend(case):
    z = load(case, "audio_frontend.npz")
    feats = mfcc_features(z["wave"])
    ref = z["mfcc_features"]
    assert feats.shape == ref.shape
    np.testing.assert_allclose(feats, ref, rtol=1e-6, atol=1e-4)
    x, frames = mfcc_model_input(feats)
    assert frames == z["mfcc_model_input"].shape[1] // 4
    close(x, z["mfcc_model_input"], 1e-4, "mfcc_model_input")


@pytest.mark.parametrize("case", with_part("audio_frontend.npz"))
@torch.inference_mode()
def test_hubert_frontend(case, tmp_path):
    z = load(case, "audio_frontend.npz")
    close(normalize_wave(z["wave"]), z["hubert_input_values"][0], 1e-5, "hubert_input_values")
    config = manifest(case, "hubert_tiny_config.json")
    # the official folder layout and naming (pytorch_model.bin with weight_g / weight_v)
    write_hubert_folder(tmp_path / "hubert", state_dict(case, "manifest_hubert_tiny.json"), config)
    hubert = load_hubert(tmp_path / "hubert")
    states = hubert.states(z["wave"])
    close(states, z["hubert_tiny_states"], 1e-4, "hubert_tiny_states")
    x, frames = hubert_model_input(states)
    assert frames == int(z["hubert_tiny_frames"])
    close(x, z["hubert_tiny_model_input"], 1e-4, "hubert_tiny_model_input")
