"""`anitalker render` end to end on tiny generated checkpoints: real files in, a real mp4 out."""
from __future__ import annotations

import subprocess
import sys

import av
import numpy as np
import pytest
from PIL import Image

from avatar.media import load_audio, read_video_info
from models.frontend import mfcc_features
from avatar.portrait import asset_path
from conftest import ROOT, tone
from streaming.cli import main


def write_wav(path, wave, rate=16000, channels=1):
    """A WAV through PyAV, as a user's file would be (any rate, mono or stereo)."""
    with av.open(str(path), "w") as f:
        s = f.add_stream("pcm_s16le", rate=rate, layout="stereo" if channels == 2 else "mono")
        data = (np.clip(wave, -1, 1) * 32767).astype(np.int16)
        data = np.repeat(data[None], channels, 0).T.reshape(1, -1) if channels == 2 else data[None]
        frame = av.AudioFrame.from_ndarray(data, format="s16", layout="stereo" if channels == 2 else "mono")
        frame.sample_rate = rate
        for p in s.encode(frame) if len(wave) else []:
            f.mux(p)
        for p in s.encode(None):
            f.mux(p)
    return path


@pytest.fixture(scope="module")
def speech(tmp_path_factory):
    d = tmp_path_factory.mktemp("audio")
    return write_wav(d / "speech.wav", tone(1.3, 22050), rate=22050, channels=2)   # 1.3 s -> 32 frames


def run(*argv):
    return main([str(a) for a in argv])


def test_render_writes_a_playable_mp4(tiny_checkpoints, speech, tmp_path):
    out = tmp_path / "out.mp4"
    assert run("render", "--checkpoints", tiny_checkpoints, "--audio", speech, "-o", out, "--steps", "5") == 0
    info = read_video_info(out)
    assert info["frames"] == 32 and (info["width"], info["height"]) == (256, 256) and info["fps"] == 25
    assert abs(info["audio_seconds"] - 32 / 25) < 0.03, info


def test_render_is_deterministic_per_seed(tiny_checkpoints, speech, tmp_path):
    def frames(seed, name):
        out = tmp_path / name
        assert run("render", "--checkpoints", tiny_checkpoints, "--audio", speech, "-o", out, "--steps", "3",
                   "--seed", seed) == 0
        with av.open(str(out)) as f:
            return np.stack([fr.to_ndarray(format="rgb24") for fr in f.decode(video=0)]).astype(int)
    a, b, c = frames(1, "a.mp4"), frames(1, "b.mp4"), frames(2, "c.mp4")
    assert np.array_equal(a, b)
    assert np.abs(a - c).mean() > 0.1


def test_render_controls_and_mfcc(tiny_checkpoints, speech, tmp_path):
    pose = tmp_path / "pose.csv"
    pose.write_text("10,0,0\n20,5,0\n30,5,-5\n")
    out = tmp_path / "ctl.mp4"
    assert run("render", "--checkpoints", tiny_checkpoints, "--audio", speech, "-o", out, "--steps", "2",
               "--infer-type", "hubert_full_control", "--pose-file", pose, "--location", "0.4",
               "--scale", "0.6") == 0
    assert read_video_info(out)["frames"] == 32
    out = tmp_path / "mfcc.mp4"
    assert run("render", "--checkpoints", tiny_checkpoints, "--audio", speech, "-o", out, "--steps", "2",
               "--infer-type", "mfcc_full_control", "--pose", "10,0,0") == 0
    # MFCC frames are floor(T100 / 4), which can be one less than HuBERT's (ANITALKER.md §10.7)
    assert read_video_info(out)["frames"] == len(mfcc_features(load_audio(speech))) // 4


def test_paste_back_keeps_the_photo_size(tiny_checkpoints, speech, tmp_path):
    photo = tmp_path / "photo.png"
    img = Image.open(asset_path("portrait.jpg")).convert("RGB")
    img.resize((img.width + 60, img.height)).save(photo)
    out = tmp_path / "paste.mp4"
    assert run("render", "--checkpoints", tiny_checkpoints, "--portrait", photo, "--audio", speech, "-o", out,
               "--steps", "2", "--paste-back") == 0
    info = read_video_info(out)
    assert abs(info["width"] - (img.width + 60)) <= 1 and abs(info["height"] - img.height) <= 1


def error_of(capsys, *argv):
    code = run(*argv)
    err = capsys.readouterr().err.strip().splitlines()
    return code, err[-1] if err else ""


@pytest.mark.parametrize("case", ["no-checkpoints", "missing-portrait", "no-face", "empty-audio",
                                  "missing-audio", "wrong-kind", "pose-on-audio-only", "bad-pose"])
def test_user_errors_are_one_line_and_leave_nothing(case, tiny_checkpoints, speech, tmp_path, capsys):
    out = tmp_path / "never.mp4"
    args = ["render", "--checkpoints", tiny_checkpoints, "--audio", speech, "-o", out, "--steps", "2"]
    expect = {"no-checkpoints": "anitalker download", "missing-portrait": "nope.png",
              "no-face": "--no-crop", "empty-audio": "empty.wav", "missing-audio": "nope.wav",
              "wrong-kind": "hubert_audio_only", "pose-on-audio-only": "no pose control",
              "bad-pose": "--pose"}[case]
    if case == "no-checkpoints":
        args[2] = tmp_path / "empty-folder"
    elif case == "missing-portrait":
        args += ["--portrait", tmp_path / "nope.png"]
    elif case == "no-face":
        noise = np.random.default_rng(0).integers(0, 255, (300, 300, 3), dtype=np.uint8)
        Image.fromarray(noise).save(tmp_path / "noise.png")
        args += ["--portrait", tmp_path / "noise.png"]
    elif case == "empty-audio":
        args[4] = write_wav(tmp_path / "empty.wav", np.zeros(0, np.float32))
    elif case == "missing-audio":
        args[4] = tmp_path / "nope.wav"
    elif case == "wrong-kind":
        bad = tmp_path / "bad"
        bad.mkdir()
        for f in tiny_checkpoints.iterdir():
            (bad / f.name).symlink_to(f)
        (bad / "stage2_audio_only_hubert.ckpt").unlink()
        (bad / "stage2_audio_only_hubert.ckpt").symlink_to(tiny_checkpoints / "stage2_full_control_hubert.ckpt")
        args[2] = bad
    elif case == "pose-on-audio-only":
        args += ["--pose", "10,0,0"]
    elif case == "bad-pose":
        args += ["--infer-type", "hubert_full_control", "--pose", "10,0"]
    code, line = error_of(capsys, *args)
    assert code == 1
    assert line.startswith("error: ") and expect in line, line
    assert "Traceback" not in capsys.readouterr().err
    assert not any(tmp_path.glob("*.mp4")) and not any(tmp_path.glob("*.tmp*"))


def test_console_script_without_weights(tmp_path):
    """The installed `anitalker` entry point: no weights -> one line that says how to get them, exit 1."""
    exe = ROOT / ".venv" / "bin" / "anitalker"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "streaming.cli"]
    r = subprocess.run(cmd + ["render", "-o", str(tmp_path / "x.mp4")], capture_output=True, text=True,
                       env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "ANITALKER_CHECKPOINTS": str(tmp_path / "none")},
                       cwd=tmp_path, timeout=120)
    assert r.returncode == 1
    assert r.stderr.strip().splitlines()[-1].startswith("error: the AniTalker checkpoints are not in")
    assert "anitalker download" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "x.mp4").exists()


def test_speed_modes_stay_close_to_fp32(tiny_checkpoints, speech, tmp_path):
    """bf16 and torch.compile are opt-in speed modes: same frame count, pictures close to exact fp32."""
    def frames(name, *extra):
        out = tmp_path / name
        assert run("render", "--checkpoints", tiny_checkpoints, "--audio", speech, "-o", out, "--steps", "2",
                   *extra) == 0
        with av.open(str(out)) as f:
            return np.stack([fr.to_ndarray(format="rgb24") for fr in f.decode(video=0)]).astype(int)
    ref = frames("fp32.mp4")
    for mode in (["--precision", "bf16"], ["--compile"]):
        got = frames("mode.mp4", *mode)
        assert got.shape == ref.shape
        # tiny random models magnify rounding (grid_sample), so the bound is loose; a broken mode
        # (NaN, black or garbage frames) is off by tens of levels
        assert np.abs(got - ref).mean() < 8.0, mode
        assert got.std() > 10


def test_render_streaming_through_the_engine(tiny_checkpoints, speech, tmp_path):
    out = tmp_path / "stream.mp4"
    assert run("render", "--checkpoints", tiny_checkpoints, "--audio", speech, "-o", out, "--steps", "5",
               "--streaming", "--hop", "8", "--lookahead", "3") == 0
    info = read_video_info(out)
    samples = len(load_audio(speech))
    assert info["frames"] == -(-samples // 640)      # every sample shown: the last frame padded with silence
    assert abs(info["audio_seconds"] - info["frames"] / 25) < 0.03


@pytest.mark.parametrize("hop,lookahead", [(10, 5), (25, 5), (7, 0)])
def test_render_streaming_writes_the_whole_stream(tiny_checkpoints, tmp_path, hop, lookahead):
    """A length that is not a multiple of the 20 ms push chunk nor of a frame: the last partial window is
    flushed, ceil(samples / 640) frames come out, and the audio is as long as the video."""
    wav, out = write_wav(tmp_path / "odd.wav", tone(3.963)), tmp_path / "odd.mp4"
    assert run("render", "--checkpoints", tiny_checkpoints, "--audio", wav, "-o", out, "--steps", "2",
               "--streaming", "--hop", str(hop), "--lookahead", str(lookahead)) == 0
    info = read_video_info(out)
    assert info["frames"] == -(-round(3.963 * 16000) // 640) == 100
    assert abs(info["audio_seconds"] - info["frames"] / 25) < 0.03
