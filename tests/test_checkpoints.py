"""Checkpoint loading: official layouts, type detection, the project format, safety and error messages."""
from __future__ import annotations

import os

import pytest
import torch

from avatar import download as dl
from conftest import TINY, make_checkpoint_folder, tiny_stage1, tiny_stage2
from models.checkpoints import (export_official, load_stage1, load_stage2, read_state_file, save_checkpoint,
                                stage1_from_state_dict)
from models.errors import AnitalkerError, CheckpointError
from models.stage1 import Stage1Dims

INFER_TYPES = ["hubert_audio_only", "hubert_pose_only", "hubert_full_control", "mfcc_pose_only",
               "mfcc_full_control"]


def same_weights(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_stage1_official_layout_with_and_without_lia_prefix(tmp_path, capsys):
    model = tiny_stage1()
    export_official(tmp_path / "plain.ckpt", model)
    assert same_weights(load_stage1(tmp_path / "plain.ckpt"), model)
    assert load_stage1(tmp_path / "plain.ckpt").dims == Stage1Dims(**TINY["stage1"])

    sd = {f"lia.{k}": v for k, v in model.state_dict().items()}
    sd["lia.dis.convs.0.0.weight"] = torch.zeros(3)     # training-only extras: reported, not fatal
    sd["lia.id_classifier.weight"] = torch.zeros(3)
    torch.save(sd, tmp_path / "lia.ckpt")
    capsys.readouterr()
    loaded = load_stage1(tmp_path / "lia.ckpt")
    assert same_weights(loaded, model)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "2 training-only" in err


@pytest.mark.parametrize("infer_type", INFER_TYPES)
def test_stage2_type_detected_from_keys_and_ema_preferred(tmp_path, infer_type):
    audio, control = infer_type.split("_", 1)
    ema, raw = tiny_stage2(audio, control, seed=1), tiny_stage2(audio, control, seed=2)
    sd = {**{f"model.{k}": v for k, v in raw.state_dict().items()},
          **{f"ema_model.{k}": v for k, v in ema.state_dict().items()}, "x_T": torch.zeros(32, 3, 256, 256)}
    path = tmp_path / "misleading_name_audio_only.ckpt"   # the name must not matter
    torch.save(sd, path)
    loaded = load_stage2(path)
    assert loaded.dims.infer_type == infer_type
    assert same_weights(loaded, ema)


def test_missing_and_misshaped_keys_name_the_file(tmp_path):
    sd = tiny_stage1().state_dict()
    del sd["dec.to_rgbs.3.bias"]
    torch.save(sd, tmp_path / "broken.ckpt")
    with pytest.raises(CheckpointError, match=r"broken\.ckpt is missing 1 weights: dec\.to_rgbs\.3\.bias"):
        load_stage1(tmp_path / "broken.ckpt")
    sd = {f"ema_model.{k}": v for k, v in tiny_stage2().state_dict().items()}
    sd["ema_model.out_proj.bias"] = torch.zeros(7)
    torch.save(sd, tmp_path / "shape.ckpt")
    with pytest.raises(CheckpointError, match=r"shape\.ckpt.*out_proj\.bias \(7,\)"):
        load_stage2(tmp_path / "shape.ckpt")


def test_wrong_kind_of_file(tmp_path):
    export_official(tmp_path / "stage2.ckpt", tiny_stage2())
    with pytest.raises(CheckpointError, match="not a stage-1"):
        load_stage1(tmp_path / "stage2.ckpt")
    export_official(tmp_path / "stage1.ckpt", tiny_stage1())
    with pytest.raises(CheckpointError, match="not a stage-2"):
        load_stage2(tmp_path / "stage1.ckpt")
    (tmp_path / "junk.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        load_stage1(tmp_path / "junk.ckpt")
    with pytest.raises(CheckpointError, match="not found"):
        load_stage1(tmp_path / "nope.ckpt")


class Payload:  # a class of ours: anything beyond tensors makes weights_only refuse the file
    pass


class SystemCall:
    """Unpickling this calls os.system (here: touch a marker file). The test only ever hands it to
    torch.load(weights_only=True), which must refuse it before calling anything."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_checkpoint_that_would_run_code_is_refused_as_unsafe(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "stage1.ckpt"
    torch.save({"enc.x": torch.zeros(1), "payload": SystemCall(marker)}, path)
    with pytest.raises(CheckpointError) as e:
        load_stage1(path)
    msg = str(e.value)
    assert str(path) in msg and "unsafe" in msg
    # torch 2.13's own words for a blocked module's function (os.system is posix.system on Linux)
    module = os.system.__module__
    assert f"Trying to load unsupported GLOBAL {module}.system whose module {module} is blocked" in msg
    assert not marker.exists()


def test_pickled_objects_are_refused(tmp_path):
    torch.save({"enc.x": torch.zeros(1), "obj": Payload()}, tmp_path / "evil.ckpt")
    with pytest.raises(CheckpointError, match=r"evil.ckpt is unsafe .*Unsupported global: GLOBAL \S*Payload"):
        read_state_file(tmp_path / "evil.ckpt")


def test_project_format_holds_dims(tmp_path):
    s1, s2 = tiny_stage1(seed=3), tiny_stage2("mfcc", "full_control", seed=3)
    save_checkpoint(tmp_path / "s1.pt", s1)
    save_checkpoint(tmp_path / "s2.pt", s2)
    assert same_weights(load_stage1(tmp_path / "s1.pt"), s1)
    back = load_stage2(tmp_path / "s2.pt")
    assert back.dims == s2.dims and same_weights(back, s2)
    with pytest.raises(CheckpointError, match="is a stage2 checkpoint, expected stage1"):
        stage1_from_state_dict(torch.load(tmp_path / "s2.pt", weights_only=True))
    assert not list(tmp_path.glob("*.tmp"))


def test_locate_explains_how_to_get_files(tmp_path):
    with pytest.raises(AnitalkerError, match=r"anitalker download.*stage1\.ckpt|stage1\.ckpt.*anitalker download"):
        dl.locate(tmp_path, "hubert_audio_only")
    folder = make_checkpoint_folder(tmp_path / "c", ("mfcc_full_control",))
    s1, s2, hubert = dl.locate(folder, "mfcc_full_control")
    assert s1.name == "stage1.ckpt" and s2.name == "stage2_full_control_mfcc.ckpt" and hubert is None
    with pytest.raises(AnitalkerError, match="stage2_audio_only_hubert.ckpt"):
        dl.locate(folder, "hubert_audio_only")


def test_default_dir_follows_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("ANITALKER_CHECKPOINTS", str(tmp_path / "x"))
    assert dl.default_dir() == tmp_path / "x"
    monkeypatch.delenv("ANITALKER_CHECKPOINTS")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert dl.default_dir() == tmp_path / "cache" / "anitalker"


def test_download_offline_says_what_to_fetch(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(AnitalkerError) as e:
        dl.download(tmp_path / "c", ["hubert_audio_only"])
    msg = str(e.value)
    assert "stage1.ckpt" in msg and "stage2_audio_only_hubert.ckpt" in msg and str(tmp_path / "c") in msg
    assert "\n" not in msg


def test_download_fetches_the_needed_files(monkeypatch, tmp_path):
    """The hub itself cannot be reached here: stand in for it with a function that writes the files."""
    import huggingface_hub

    calls = []

    def fake_snapshot(repo, local_dir, allow_patterns):
        calls.append((repo, allow_patterns))
        for f in allow_patterns:
            (local_dir / f).parent.mkdir(parents=True, exist_ok=True)
            (local_dir / f).write_bytes(b"x")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot)
    folder = dl.download(tmp_path / "c", ["hubert_full_control", "mfcc_pose_only"])
    assert calls[0][0] == "taocode/anitalker_ckpts"
    assert set(calls[0][1]) == {"stage1.ckpt", "stage2_full_control_hubert.ckpt", "stage2_pose_only_mfcc.ckpt",
                                "chinese-hubert-large/config.json", "chinese-hubert-large/preprocessor_config.json",
                                "chinese-hubert-large/pytorch_model.bin"}
    assert (folder / "stage2_pose_only_mfcc.ckpt").is_file()
