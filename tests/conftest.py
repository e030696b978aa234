"""Shared fixtures: tiny models with the official module trees, written as official checkpoint files."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from models.checkpoints import export_official
from models.frontend import write_hubert_folder
from models.stage1 import Stage1, Stage1Dims
from models.stage2 import Stage2, Stage2Dims

ROOT = Path(__file__).resolve().parents[1]
TINY = yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text())


def tiny_stage1(seed: int = 0) -> Stage1:
    torch.manual_seed(seed)
    return Stage1(Stage1Dims(**TINY["stage1"])).eval()


def tiny_stage2(audio: str = "hubert", control: str = "audio_only", seed: int = 0) -> Stage2:
    torch.manual_seed(seed)
    return Stage2(Stage2Dims(audio=audio, control=control, **TINY["stage2"])).eval()


def tiny_hubert_state(seed: int = 0) -> dict:
    """A tiny HubertModel's weights in the official (transformers 4.19) naming."""
    from transformers import HubertConfig, HubertModel

    torch.manual_seed(seed)
    sd = HubertModel(HubertConfig(**TINY["hubert"])).state_dict()
    renamed = {}
    for k, v in sd.items():
        k = k.replace("pos_conv_embed.conv.parametrizations.weight.original0", "pos_conv_embed.conv.weight_g")
        k = k.replace("pos_conv_embed.conv.parametrizations.weight.original1", "pos_conv_embed.conv.weight_v")
        renamed[k] = v
    return renamed


def make_checkpoint_folder(folder: Path, infer_types=("hubert_audio_only",)) -> Path:
    """Official file names and layouts, tiny weights."""
    from avatar.download import STAGE2

    folder.mkdir(parents=True, exist_ok=True)
    export_official(folder / "stage1.ckpt", tiny_stage1())
    for t in infer_types:
        audio, control = t.split("_", 1)
        export_official(folder / STAGE2[t][0], tiny_stage2(audio, control))
    if any(t.startswith("hubert") for t in infer_types):
        write_hubert_folder(folder / "chinese-hubert-large", tiny_hubert_state(), TINY["hubert"])
    return folder


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run in milliseconds on one thread; a second OpenMP thread only adds spin-waits, which
    cost whole seconds per test when the cores are shared with other work."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory) -> Path:
    return make_checkpoint_folder(tmp_path_factory.mktemp("ckpts"),
                                  ("hubert_audio_only", "hubert_full_control", "mfcc_full_control"))


def tone(seconds: float, rate: int = 16000, freq: float = 220.0) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (0.3 * np.sin(2 * np.pi * freq * t) * (1 + 0.5 * np.sin(2 * np.pi * 3 * t))).astype(np.float32)
