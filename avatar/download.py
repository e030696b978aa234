"""Where the official checkpoints live on this machine, and how to fetch them.

The official files are in the Hugging Face model repo ``taocode/anitalker_ckpts`` (stage1.ckpt,
stage2_*.ckpt and the chinese-hubert-large folder). They are downloaded once into a cache folder:
``--checkpoints DIR`` beats ``$ANITALKER_CHECKPOINTS``, which beats ``$XDG_CACHE_HOME/anitalker``
(``~/.cache/anitalker``).
"""
from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

from models.errors import AnitalkerError

HUB_REPO = "taocode/anitalker_ckpts"
HUB_URL = f"https://huggingface.co/{HUB_REPO}"
HUBERT_DIR = "chinese-hubert-large"
STAGE1 = "stage1.ckpt"
# infer type -> the official file names (the first is the current name on the hub)
STAGE2 = {
    "hubert_audio_only": ["stage2_audio_only_hubert.ckpt"],
    "hubert_pose_only": ["stage2_pose_only_hubert.ckpt"],
    "hubert_full_control": ["stage2_full_control_hubert.ckpt"],
    "mfcc_pose_only": ["stage2_pose_only_mfcc.ckpt"],
    "mfcc_full_control": ["stage2_full_control_mfcc.ckpt", "stage2_more_controllable_mfcc.ckpt"],
}
DEFAULT_INFER_TYPE = "hubert_audio_only"
HUBERT_FILES = ["config.json", "preprocessor_config.json", "pytorch_model.bin"]


def default_dir() -> Path:
    env = os.environ.get("ANITALKER_CHECKPOINTS")
    if env:
        return Path(env).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "anitalker"


def needed_files(infer_types) -> list[str]:
    """Files (relative to the checkpoint folder) that these infer types need."""
    files = [STAGE1] + [STAGE2[t][0] for t in infer_types]
    if any(t.startswith("hubert") for t in infer_types):
        files += [f"{HUBERT_DIR}/{f}" for f in HUBERT_FILES]
    return files


def how_to_get(folder: Path, files) -> str:
    return (f"run `anitalker download` (or fetch {', '.join(files)} from {HUB_URL} by hand and put them "
            f"in {folder}, or point --checkpoints / $ANITALKER_CHECKPOINTS at a folder that has them)")


def locate(folder, infer_type: str) -> tuple[Path, Path, Path | None]:
    """Paths of (stage1, stage2, hubert folder or None) for an infer type, or one clear error."""
    folder = Path(folder).expanduser() if folder else default_dir()
    if infer_type not in STAGE2:
        raise AnitalkerError(f"unknown infer type {infer_type!r}; choose one of {', '.join(STAGE2)}")
    stage2 = next((folder / n for n in STAGE2[infer_type] if (folder / n).is_file()), None)
    hubert = folder / HUBERT_DIR if infer_type.startswith("hubert") else None
    missing = [f for f in needed_files([infer_type]) if not (folder / f).is_file()]
    missing = [m for m in missing if not (m.startswith("stage2_") and stage2 is not None)]
    if hubert is not None and (hubert / "model.safetensors").is_file():
        missing = [m for m in missing if m != f"{HUBERT_DIR}/pytorch_model.bin"]
    missing = [m for m in missing if m != f"{HUBERT_DIR}/preprocessor_config.json"]  # optional
    if missing:
        raise AnitalkerError(f"the AniTalker checkpoints are not in {folder} (missing {', '.join(missing)}): "
                             + how_to_get(folder, missing))
    return folder / STAGE1, stage2, hubert


def locate_stage1(folder) -> Path:
    """Path of stage1.ckpt alone (reenactment needs no stage-2 or HuBERT files), or one clear error."""
    folder = Path(folder).expanduser() if folder else default_dir()
    if not (folder / STAGE1).is_file():
        raise AnitalkerError(f"the AniTalker checkpoints are not in {folder} (missing {STAGE1}): "
                             + how_to_get(folder, [STAGE1]))
    return folder / STAGE1


def first_sentence(e: BaseException) -> str:
    """The first sentence (or line) of an exception's message, for a one-line reason."""
    text = str(e).strip()
    if not text:
        return type(e).__name__
    text = text.splitlines()[0].strip()
    end = re.search(r"[.!?](\s|$)", text)
    return (text[:end.start() + 1] if end else text)[:200]


def download(folder=None, infer_types=(DEFAULT_INFER_TYPE,)) -> Path:
    """Fetch the files for ``infer_types`` into ``folder`` with huggingface_hub (progress bars included)."""
    folder = Path(folder).expanduser() if folder else default_dir()
    for t in infer_types:
        if t not in STAGE2:
            raise AnitalkerError(f"unknown infer type {t!r}; choose from {', '.join(STAGE2)} or 'all'")
    files = needed_files(infer_types)
    made = next((p for p in reversed([folder, *folder.parents]) if not p.exists()), None)
    try:
        from huggingface_hub import snapshot_download

        folder.mkdir(parents=True, exist_ok=True)
        snapshot_download(HUB_REPO, local_dir=folder, allow_patterns=files)
    except BaseException as e:
        # A folder this call made and that holds no finished file goes again (the hub's own download
        # metadata in it included); a folder that was there, or finished files, stay.
        if made is not None and made.exists() and not any((folder / f).is_file() for f in files):
            shutil.rmtree(made, ignore_errors=True)
        if isinstance(e, PermissionError):
            raise AnitalkerError(f"cannot write to {folder}: {e.strerror}; choose another folder with "
                                 "--checkpoints") from None
        if not isinstance(e, Exception):          # Ctrl-C, SIGTERM
            raise
        # network errors come in many types (OSError, httpx, hub errors); the hub's first sentence says which
        raise AnitalkerError(f"download from {HUB_URL} failed: {first_sentence(e)}; fetch {', '.join(files)} "
                             f"by hand and put them in {folder}") from None
    missing = [f for f in files if not (folder / f).is_file()]
    if missing:
        raise AnitalkerError(f"the download finished but {', '.join(missing)} are missing from {folder}; "
                             f"check {HUB_URL} for the current file names")
    return folder
