"""models.frontend: MFCC and HuBERT front ends against the official fixtures, and the HuBERT loader.

Fixtures: the project's parity case A (tests/parity_fixtures.py): audio_frontend.npz (official demo,
transformers 4.19.2) and the tiny HuBERT manifest beside it, with the case's seed.
"""
import argparse
import logging

import numpy as np
import pytest
import torch

import parity_fixtures
from models.errors import AnitalkerError, CheckpointError
from models.frontend import (IncrementalHubert, hubert_model_input, load_hubert, mfcc_features,
                             mfcc_model_input, normalize_wave, write_hubert_folder)
from models.precision import PackedLinear, can_pack, pack_linears, prepare_bf16

CASE = parity_fixtures.CASE_A
NEW_G = "encoder.pos_conv_embed.conv.parametrizations.weight.original0"


@pytest.fixture(scope="module")
def fx():
    return parity_fixtures.load(CASE, "audio_frontend.npz")


@pytest.fixture(scope="module")
def tiny():
    """(official-named seed state dict, HubertConfig kwargs) of the parity tiny HuBERT."""
    return (parity_fixtures.state_dict(CASE, "manifest_hubert_tiny.json"),
            parity_fixtures.manifest(CASE, "hubert_tiny_config.json"))


@pytest.fixture(scope="module")
def hubert(tiny, tmp_path_factory):
    folder = tmp_path_factory.mktemp("hubert")
    write_hubert_folder(folder, *tiny)
    return load_hubert(folder)


def assert_close(a, b, tol):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert a.shape == b.shape
    assert np.abs(a - b).max() <= tol, np.abs(a - b).max()


# ---------------------------------------------------------------- MFCC


def test_mfcc_matches_official(fx):
    feats = mfcc_features(fx["wave"])
    ref = fx["mfcc_features"]
    assert feats.dtype == np.float64 and feats.shape == ref.shape == (99, 39)
    np.testing.assert_allclose(feats, ref, rtol=1e-6, atol=1e-4)
    assert np.abs(feats - ref).max() < 1e-9          # measured 1.5e-13
    x, frames = mfcc_model_input(feats)
    assert frames == int(fx["mfcc_frames"]) == 24
    assert x.dtype == torch.float32
    assert_close(x, fx["mfcc_model_input"], 0)


@pytest.mark.parametrize("n,rate", [(16000, 16000), (399, 16000), (1, 16000), (12345, 8000)])
def test_mfcc_matches_python_speech_features(n, rate):
    psf = pytest.importorskip("python_speech_features")
    wave = np.random.default_rng(n).standard_normal(n).astype(np.float32) * 0.1
    wave[: n // 3] = 0                               # silent frames take the eps branch
    m = psf.mfcc(wave, rate, numcep=13, winlen=0.025, winstep=0.01)
    ref = np.hstack([m, psf.delta(m, 1), psf.delta(m, 2)])
    np.testing.assert_allclose(mfcc_features(wave, rate), ref, rtol=1e-6, atol=1e-8)


def test_mfcc_empty_audio_is_a_user_error():
    with pytest.raises(AnitalkerError, match="empty"):
        mfcc_features(np.zeros(0, np.float32))


# ---------------------------------------------------------------- HuBERT


def test_normalize_wave_matches_feature_extractor(fx):
    x = normalize_wave(fx["wave"])
    assert x.dtype == np.float32
    assert_close(x, fx["hubert_input_values"][0], 0)


def test_hubert_tiny_matches_official(hubert, fx):
    """Needs the weight_g/weight_v remap and the 4.19 last state (after the final LayerNorm)."""
    states = hubert.states(fx["wave"])
    assert states.shape == (3, 50, 64) and states.dtype == torch.float32
    assert_close(states, fx["hubert_tiny_states"], 1e-4)       # measured 3.6e-6 (sdpa vs eager)
    x, frames = hubert_model_input(states)
    assert frames == int(fx["hubert_tiny_frames"]) == 25
    assert_close(x, fx["hubert_tiny_model_input"], 1e-4)
    assert torch.equal(states[:, -1], states[:, -2])           # the edge-copied frame


def test_incremental_hubert_one_block_matches_official(hubert, fx):
    """One block holding the whole utterance is the official computation (parity weights)."""
    inc = IncrementalHubert(hubert.model)
    states = inc.block(normalize_wave(fx["wave"]), commit=0)
    assert_close(states, fx["hubert_tiny_states"], 1e-4)
    assert torch.equal(states[:, -1], states[:, -2])


def test_incremental_hubert_later_blocks_attend_to_the_committed_rows(hubert, fx):
    """Block 1 = the whole wave, k rows committed; block 2 = the rows from k on: they equal the whole-utterance
    rows (their keys/values and the positional convolution's past come from the cache). Cutting the cache
    to fewer rows than were committed changes them."""
    x = normalize_wave(fx["wave"])
    ref = IncrementalHubert(hubert.model).block(x, 0)
    for k in (1, 20, 48):
        inc = IncrementalHubert(hubert.model, context=100)
        inc.block(x, commit=k)
        got = inc.block(x[320 * k:], commit=0)
        assert got.shape[1] == ref.shape[1] - k
        assert_close(got, ref[:, k:], 2e-5)
    inc = IncrementalHubert(hubert.model, context=5)
    inc.block(x, commit=30)
    got = inc.block(x[320 * 30:], commit=0)
    assert np.abs(got.numpy() - ref[:, 30:].numpy()).max() > 1e-3
    inc.reset()                                          # no cache: the rows as a fresh utterance
    assert torch.equal(inc.block(x[320 * 30:], 0), IncrementalHubert(hubert.model).block(x[320 * 30:], 0))
    with pytest.raises(ValueError, match="commit"):
        inc.block(x[:3200], commit=11)      # 3200 samples: 9 rows (+ the repeated one)


@pytest.mark.parametrize("samples", [400, 3200, 9680])
def test_incremental_front_end_is_the_models_feature_extractor(hubert, samples):
    """The conv front end run in channels_last memory (layer norms over contiguous channels) gives the
    model's own feature_extractor rows."""
    x = torch.from_numpy(np.random.default_rng(samples).standard_normal((1, samples)).astype(np.float32))
    with torch.no_grad():
        ref = hubert.model.feature_extractor(x).transpose(1, 2)
        got = IncrementalHubert(hubert.model)._front_end(x)
    assert got.shape == ref.shape and got.dtype == torch.float32
    assert_close(got, ref, 1e-5)


@pytest.mark.parametrize("past,n", [(0, 1), (0, 30), (3, 7), (64, 30)])
def test_incremental_positions_are_the_grouped_conv(hubert, past, n):
    """The positional convolution of the new rows, computed as one batched matmul over their windows,
    equals the official grouped conv1d (its weight norm evaluated) over [cached rows | new rows | zeros]."""
    inc = IncrementalHubert(hubert.model)
    conv = hubert.model.encoder.pos_conv_embed.conv
    g = torch.Generator().manual_seed(past + n)
    hidden = conv.in_channels
    proj = torch.randn(1, n, hidden, generator=g)
    inc._proj = torch.randn(1, past, hidden, generator=g)[:, -inc.pos_left:] if past else None
    kept = 0 if inc._proj is None else inc._proj.shape[1]
    seq = torch.cat([inc._proj, proj], 1) if kept else proj
    seq = torch.nn.functional.pad(seq.transpose(1, 2), (inc.pos_left - kept, inc.pos_kernel - 1 - inc.pos_left))
    with torch.no_grad():
        ref = torch.nn.functional.conv1d(seq, conv.weight, conv.bias, groups=conv.groups)
        ref = hubert.model.encoder.pos_conv_embed.activation(ref).transpose(1, 2)
    got = inc._positions(proj)
    assert got.shape == (1, n, hidden)
    assert_close(got, ref, 1e-5)


def test_incremental_hubert_bf16_weights_stay_close(hubert, fx):
    """Linear and conv weights prepared in bf16 once (the fastest mode on CPUs with bf16): the block runs in
    bf16 without casting weights, residual stream and layer norms in float32."""
    import copy
    from models.precision import prepare_bf16

    model = copy.deepcopy(hubert.model)
    prepare_bf16(model)
    assert model.encoder.layers[0].attention.q_proj.weight.dtype == torch.bfloat16
    x = normalize_wave(fx["wave"])
    ref = IncrementalHubert(hubert.model).block(x, 0)
    got = IncrementalHubert(model).block(x, 0)
    assert got.dtype == torch.float32
    rel = float((got - ref).norm() / ref.norm())
    assert 0 < rel < 0.05, rel


def test_incremental_hubert_needs_per_row_convolutions(tiny):
    from transformers import HubertConfig, HubertModel

    cfg = dict(tiny[1], feat_extract_norm="group", do_stable_layer_norm=False)
    with pytest.raises(AnitalkerError, match="incremental"):
        IncrementalHubert(HubertModel(HubertConfig(**cfg)))


def test_hubert_model_input_cuts_to_even_frames():
    x, frames = hubert_model_input(torch.arange(3 * 51 * 2.0).reshape(3, 51, 2))
    assert frames == 25 and x.shape == (1, 3, 50, 2)


def reload(folder, sd, config, **kw):
    write_hubert_folder(folder, sd, config, **kw)
    return load_hubert(folder)


def test_hubert_folder_variants_give_same_states(tiny, hubert, fx, tmp_path):
    sd, config = tiny
    ref = hubert.states(fx["wave"])
    # safetensors with the official names
    assert torch.equal(reload(tmp_path / "st", sd, config, safetensors=True).states(fx["wave"]), ref)
    # newer transformers naming, saved from a HubertForCTC-like wrapper ("hubert." prefix)
    renamed = {"hubert." + k.replace("encoder.pos_conv_embed.conv.weight_g", NEW_G)
               .replace("conv.weight_v", "conv.parametrizations.weight.original1"): v
               for k, v in sd.items()}
    assert torch.equal(reload(tmp_path / "new", renamed, config).states(fx["wave"]), ref)


def test_hubert_missing_key_fails_loudly(tiny, tmp_path):
    sd, config = tiny
    partial = {k: v for k, v in sd.items() if not k.endswith("weight_g")}
    with pytest.raises(CheckpointError, match=rf"{tmp_path.name}.*{NEW_G}"):
        reload(tmp_path / "missing", partial, config)


def test_hubert_unexpected_keys_are_reported(tiny, tmp_path, caplog):
    sd, config = tiny
    with caplog.at_level(logging.WARNING, logger="models.frontend"):
        fe = reload(tmp_path / "extra", {**sd, "final_proj.weight": torch.zeros(2, 2)}, config)
    assert fe.unexpected_keys == ["final_proj.weight"]
    assert "final_proj.weight" in caplog.text


def test_hubert_refuses_unsafe_pickle(tiny, tmp_path):
    sd, config = tiny
    folder = tmp_path / "unsafe"
    write_hubert_folder(folder, sd, config)
    torch.save({**sd, "args": argparse.Namespace(lr=1)}, folder / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="refused.*unsafe"):
        load_hubert(folder)


def test_hubert_folder_errors(tiny, tmp_path):
    sd, config = tiny
    with pytest.raises(CheckpointError, match="not found"):
        load_hubert(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="config.json"):
        load_hubert(tmp_path / "empty")
    folder = tmp_path / "noweights"
    write_hubert_folder(folder, sd, config)
    (folder / "pytorch_model.bin").unlink()
    with pytest.raises(CheckpointError, match="no HuBERT weights"):
        load_hubert(folder)
    with pytest.raises(CheckpointError, match="do not fit"):
        reload(tmp_path / "wide", sd, {**config, "intermediate_size": 256})


def test_hubert_do_normalize_comes_from_preprocessor_config(tiny, hubert, fx, tmp_path):
    sd, config = tiny
    raw = reload(tmp_path / "raw", sd, config, do_normalize=False)
    assert hubert.do_normalize and not raw.do_normalize
    wave = fx["wave"] * 3 + 0.1
    assert_close(raw.states(normalize_wave(wave)), hubert.states(wave), 1e-5)
    assert np.abs(raw.states(wave).numpy() - hubert.states(wave).numpy()).max() > 1e-2
    (tmp_path / "raw" / "preprocessor_config.json").unlink()      # absent: class default True
    assert load_hubert(tmp_path / "raw").do_normalize


def test_hubert_too_short_audio(hubert):
    assert hubert.states(np.zeros(400, np.float32)).shape == (3, 2, 64)
    with pytest.raises(AnitalkerError, match="too short"):
        hubert.states(np.zeros(399, np.float32))


@pytest.mark.skipif(not can_pack(torch.device("cpu")), reason="this CPU has no native bf16 matmul (oneDNN)")
def test_packed_linears_are_bitwise_the_plain_bf16_ones(hubert, fx):
    """Weights reordered once for oneDNN (pack_linears) give the products F.linear gives under bf16 autocast,
    bit for bit, for any number of rows and for float32 or bf16 inputs; the streamed block over a packed
    HuBERT equals the block over the same bf16 weights unpacked."""
    import copy

    lin = torch.nn.Linear(48, 80).to(torch.bfloat16)
    packed = PackedLinear(lin, rows=30)
    for rows in (1, 7, 30, 130):
        x = torch.randn(2, rows, 48)
        with torch.autocast("cpu", torch.bfloat16):
            want = lin(x)
        assert torch.equal(packed(x), want) and torch.equal(packed(x.bfloat16()), want)

    plain = prepare_bf16(copy.deepcopy(hubert.model))
    packed_model = copy.deepcopy(plain)
    n = pack_linears(packed_model.encoder)
    assert n == 6 * len(plain.encoder.layers)            # q, k, v, out; the two feed-forward layers
    assert pack_linears(packed_model.encoder) == 0       # nothing left to pack
    x = normalize_wave(fx["wave"])
    def blocks(model):                                   # two blocks: the second attends to the first's cache
        inc = IncrementalHubert(model, context=10)
        with torch.autocast("cpu", torch.bfloat16):
            return [inc.block(x[a:a + 320 * 12], 10) for a in (0, 320 * 10)]
    for got, want in zip(blocks(packed_model), blocks(plain)):
        assert torch.equal(got, want)
