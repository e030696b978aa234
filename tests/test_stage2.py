"""Stage-2 denoiser: official key names, the cached path, per-control semantics, any length. Numerical parity
with the official code is in test_parity.py."""
from __future__ import annotations

import math
import re

import pytest
import torch

import parity_fixtures
from models.stage2 import Condition, RelSelfAttention, Stage2, Stage2Dims, rel_positions

TINY = dict(hubert_dim=64, hubert_layers=3, speech_dim=32, speech_layers=2, proj_dim=8, style_dim=32,
            lstm_hidden=8)
INFER_TYPES = [(a, c) for a in ("hubert", "mfcc") for c in ("audio_only", "pose_only", "full_control")]
ADAPTER = re.compile(r"^(pose|location|face_scale)_(predictor|encoder)\.")


def tiny(audio="hubert", control="audio_only", seed=0) -> Stage2:
    torch.manual_seed(seed)
    m = Stage2(Stage2Dims(audio=audio, control=control, **TINY)).eval()
    with torch.no_grad():  # non-trivial BatchNorm statistics, so eval-mode BN is really exercised
        for mod in m.modules():
            if isinstance(mod, torch.nn.BatchNorm1d):
                mod.running_mean.normal_(0, 0.1)
                mod.running_var.uniform_(0.5, 1.5)
    return m


def inputs(m: Stage2, F=6, B=1, seed=1):
    g = torch.Generator().manual_seed(seed)
    d = m.dims
    audio = (torch.randn(B, d.hubert_layers, 2 * F, d.hubert_dim, generator=g) if d.audio == "hubert"
             else torch.randn(B, 4 * F, d.mfcc_dim, generator=g))
    return dict(wa=torch.randn(B, d.style_dim, generator=g), alpha0=torch.randn(B, d.motion_dim, generator=g),
                audio=audio, location=torch.rand(B, F, 1, generator=g), scale=torch.rand(B, F, 1, generator=g),
                pose=torch.rand(B, F, 3, generator=g) * 2 - 1, x_t=torch.randn(B, F, d.motion_dim, generator=g))


def official_keys(audio: str, control: str) -> dict:
    """Key -> shape of the official ema_model, from the manifests (two infer types have none: derived)."""
    name = {"mfcc_audio_only": "mfcc_full_control", "mfcc_pose_only": "mfcc_full_control"}.get(
        f"{audio}_{control}", f"{audio}_{control}")
    man = parity_fixtures.manifest(parity_fixtures.CASE_A, f"manifest_stage2_{name}.json")
    keys = {k[len("ema_model."):]: tuple(v["shape"]) for k, v in man.items() if k.startswith("ema_model.")}
    keep = {"audio_only": (), "pose_only": ("pose",), "full_control": ("pose", "location", "face_scale")}[control]
    return {k: s for k, s in keys.items() if not ADAPTER.match(k) or ADAPTER.match(k).group(1) in keep}


def shapes(m: Stage2) -> dict:
    return {k: tuple(v.shape) for k, v in m.state_dict().items()}


@pytest.mark.parametrize("audio,control", INFER_TYPES)
def test_keys_are_the_official_ones(audio, control):
    with torch.device("meta"):  # full size without allocating it
        full = Stage2(Stage2Dims(audio=audio, control=control))
    assert shapes(full) == official_keys(audio, control)
    sd = tiny(audio, control).state_dict()
    block = lambda k: re.sub(r"encoders\.\d+\.", "encoders.N.", k)
    assert {block(k) for k in sd} == {block(k) for k in shapes(full)}
    assert sd["coarse_decoder.encoders.0.conv_module.norm.num_batches_tracked"].dtype == torch.int64
    assert full.dims.infer_type == f"{audio}_{control}" and full.dims.decoder_dim == 1024


def test_dims_are_validated():
    with pytest.raises(ValueError, match="audio"):
        Stage2Dims(audio="wav2vec")
    with pytest.raises(ValueError, match="control"):
        Stage2Dims(control="everything")
    with pytest.raises(ValueError, match="divisible"):
        Stage2Dims(speech_dim=30, heads=4)
    with pytest.raises(ValueError, match="odd"):
        Stage2Dims(conv_kernel=12)


@pytest.mark.parametrize("audio,control", INFER_TYPES)
@torch.no_grad()
def test_condition_then_eps_equals_forward(audio, control):
    m = tiny(audio, control)
    x = inputs(m)
    adapted = {"audio_only": set(), "pose_only": {"pose"}, "full_control": {"location", "scale", "pose"}}[control]
    for flag in (False, True):
        eps, *ctrl = m(x["wa"], x["alpha0"], x["audio"], x["location"], x["scale"], x["pose"], x["x_t"],
                       torch.tensor([500]), control=flag)
        given = {n: (x[n] if flag or n not in adapted else None) for n in ("location", "scale", "pose")}
        cond = m.condition(x["wa"], x["alpha0"], x["audio"], **given)
        assert isinstance(cond, Condition) and cond.frames == 6
        assert torch.equal(m.eps(cond, x["x_t"], torch.tensor([500])), eps)
        for name, out in zip(("location", "scale", "pose"), ctrl):
            if flag or name not in adapted:
                assert out is x[name]            # given controls come back unchanged
            else:
                assert out.shape == x[name].shape and not torch.equal(out, x[name])


@torch.no_grad()
def test_each_control_is_given_or_predicted_on_its_own():
    m = tiny("hubert", "full_control")
    x = inputs(m)
    base = m.condition(x["wa"], x["alpha0"], x["audio"])                     # all predicted
    # giving a control the value it would be predicted as changes nothing downstream
    same = m.condition(x["wa"], x["alpha0"], x["audio"], location=base.location)
    assert same.location is base.location
    torch.testing.assert_close(same.scale, base.scale, rtol=0, atol=0)
    torch.testing.assert_close(same.prefix, base.prefix, rtol=0, atol=0)
    # a different location feeds the scale and pose predictors (adapter order location -> scale -> pose)
    moved = m.condition(x["wa"], x["alpha0"], x["audio"], location=x["location"])
    assert moved.location is x["location"]
    assert not torch.equal(moved.scale, base.scale) and not torch.equal(moved.pose, base.pose)
    # giving the pose only leaves location and scale predicted exactly as before
    posed = m.condition(x["wa"], x["alpha0"], x["audio"], pose=x["pose"])
    assert torch.equal(posed.location, base.location) and torch.equal(posed.scale, base.scale)
    assert posed.pose is x["pose"] and not torch.equal(posed.prefix, base.prefix)
    with pytest.raises(ValueError, match="pose must be"):
        m.condition(x["wa"], x["alpha0"], x["audio"], pose=x["pose"][:, :4])
    # models without an adapter pass the controls through untouched (None stays None)
    p = tiny("mfcc", "pose_only")
    c = p.condition(x["wa"], x["alpha0"], inputs(p)["audio"], location=x["location"])
    assert c.location is x["location"] and c.scale is None and c.pose.shape == (1, 6, 3)


@torch.no_grad()
def test_batch_broadcast_and_timestep_dtype():
    m = tiny("hubert", "pose_only")
    x = inputs(m, B=1)
    cond = m.condition(x["wa"], x["alpha0"], x["audio"])
    xt = torch.randn(3, 6, 20, generator=torch.Generator().manual_seed(5))
    t = torch.tensor([980, 500, 0])
    both = m.eps(cond, xt, t)
    for i in range(3):
        torch.testing.assert_close(both[i:i + 1], m.eps(cond, xt[i:i + 1], t[i:i + 1]), rtol=1e-5, atol=1e-5)
    # the timestep enters as a raw float: int64 and float32 tensors give the same eps
    assert torch.equal(m.eps(cond, xt, t), m.eps(cond, xt, t.float()))
    with pytest.raises(ValueError, match="frames"):
        m.eps(cond, xt[:, :5], t)


@torch.no_grad()
def test_any_length():
    """The relative-position table is made on demand: any F works, and rows are positions T-1..-(T-1)."""
    d = 16
    small, big = rel_positions(5, d), rel_positions(300, d)
    assert small.shape == (1, 9, d) and big.shape == (1, 599, d)
    torch.testing.assert_close(small, big[:, 300 - 5:300 + 4], rtol=0, atol=0)
    assert torch.equal(big[0, 299, 0::2], torch.zeros(d // 2)) and torch.equal(big[0, 299, 1::2], torch.ones(d // 2))
    torch.testing.assert_close(big[0, 0, 0], torch.tensor(math.sin(299.0)))

    m = tiny("hubert", "audio_only")
    for F in (1, 3, 130):
        x = inputs(m, F=F)
        eps = m(x["wa"], x["alpha0"], x["audio"], None, None, None, x["x_t"], torch.tensor([20]), control=False)[0]
        assert eps.shape == (1, F, 20) and torch.isfinite(eps).all()


@torch.no_grad()
def test_relative_attention_matches_the_definition():
    """score[i, j] = ((q_i + u) . k_j + (q_i + v) . p_{i-j}) / sqrt(dk), p = linear_pos(table row of i-j)."""
    torch.manual_seed(0)
    att = RelSelfAttention(8, 2, 0.0).eval()
    T = 5
    x = torch.randn(2, T, 8)
    pe = rel_positions(T, 8)
    out = att(x, att.project_pos(pe))
    q = att.linear_q(x).view(2, T, 2, 4)
    k = att.linear_k(x).view(2, T, 2, 4)
    v = att.linear_v(x).view(2, T, 2, 4)
    p = att.linear_pos(pe[0]).view(2 * T - 1, 2, 4)                      # row r <-> position T-1-r
    ref = torch.empty(2, T, 2, 4)
    for i in range(T):
        s = torch.stack([((q[:, i] + att.pos_bias_u) * k[:, j]).sum(-1)
                         + ((q[:, i] + att.pos_bias_v) * p[T - 1 - (i - j)]).sum(-1) for j in range(T)], -1)
        w = torch.softmax(s / 2.0, dim=-1)                                 # (B, h, T)
        ref[:, i] = torch.einsum("bhj,bjhd->bhd", w, v)
    torch.testing.assert_close(out, att.linear_out(ref.reshape(2, T, 8)), rtol=1e-5, atol=1e-6)
