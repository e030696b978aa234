"""Bad input and interrupts through the real command line, as a user meets them: each case runs
`anitalker ...` as a subprocess on the tiny checkpoints and checks the exit status, the one error line, that
no traceback is shown, and which files are left (no .part file, an existing output untouched)."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import av
import numpy as np
import pytest
import torch

from avatar.portrait import asset_path, load_image
from conftest import ROOT, tone

OLD = b"an earlier output that must survive"


def anitalker(*argv, cwd, env=None, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "streaming.cli", *map(str, argv)], cwd=cwd, env=command_env(env),
                          capture_output=True, text=True, timeout=timeout)


def command_env(extra=None) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", **(extra or {}))
    env.pop("ANITALKER_CHECKPOINTS", None)
    return env


def error_line(p, rc: int = 1) -> str:
    """The run failed with ``rc``, showed no traceback and said why in exactly one line, its last."""
    err = p.stderr
    assert p.returncode == rc, err
    assert "Traceback" not in err and "terminate called" not in err, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    said = [ln for ln in lines if ln.startswith(("error:", "interrupted by"))]
    assert len(said) == 1 and lines[-1] == said[0], err
    return said[0]


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".part") or ".anitalker-probe" in p.name)


def write_float_wav(path, wave, rate=16000):
    """A 32-bit float WAV (the kind that can hold NaN and inf)."""
    with av.open(str(path), "w") as f:
        s = f.add_stream("pcm_f32le", rate=rate, layout="mono")
        frame = av.AudioFrame.from_ndarray(np.asarray(wave, np.float32)[None], format="flt", layout="mono")
        frame.sample_rate = rate
        for p in list(s.encode(frame)) + list(s.encode(None)):
            f.mux(p)
    return path


def write_clip(path, frames, wave, rate=16000):
    """A Matroska clip: H.264 video and float PCM audio (which, unlike AAC, keeps NaN)."""
    from fractions import Fraction
    with av.open(str(path), "w", format="matroska") as f:
        v = f.add_stream("libx264", rate=25)
        v.width, v.height, v.pix_fmt = frames[0].shape[1], frames[0].shape[0], "yuv420p"
        a = f.add_stream("pcm_f32le", rate=rate, layout="mono")
        for i, img in enumerate(frames):
            vf = av.VideoFrame.from_ndarray(img, format="rgb24")
            vf.pts, vf.time_base = i, Fraction(1, 25)
            for p in v.encode(vf):
                f.mux(p)
        af = av.AudioFrame.from_ndarray(np.asarray(wave, np.float32)[None], format="flt", layout="mono")
        af.sample_rate, af.pts, af.time_base = rate, 0, Fraction(1, rate)
        for p in list(a.encode(af)) + list(a.encode(None)) + list(v.encode(None)):
            f.mux(p)
    return path


@pytest.fixture(scope="module")
def media(tmp_path_factory, tiny_checkpoints):
    d = tmp_path_factory.mktemp("bad_input")
    bad = tone(2.0)
    bad[8000:8010] = np.nan
    bad[12000] = np.inf
    write_float_wav(d / "nan.wav", bad)
    inf = tone(2.0)
    inf[4000] = -np.inf
    write_float_wav(d / "inf.wav", inf)
    write_float_wav(d / "ok.wav", tone(1.0))
    write_float_wav(d / "long.wav", tone(40.0))             # long enough to be stopped half way
    face = np.asarray(load_image(asset_path("portrait.jpg")).copy())
    import cv2
    face = cv2.resize(face, (192, 192))
    frames = [np.roll(face, i % 5, axis=1) for i in range(50)]
    write_clip(d / "nan_clip.mkv", frames, bad)
    write_clip(d / "long_clip.mkv", frames * 20, tone(40.0))  # 40 s
    (d / "pose_nan.csv").write_text("10,0,0\nnan,0,0\n5,0,0\n")
    return d


@pytest.fixture()
def work(tmp_path):
    """A folder with an earlier output in it, which no failed or interrupted run may replace."""
    (tmp_path / "out.mp4").write_bytes(OLD)
    return tmp_path


def untouched(work: Path) -> None:
    assert (work / "out.mp4").read_bytes() == OLD
    assert leftovers(work) == []


# ------------------------------------------------------------------------------------ NaN / inf samples

@pytest.mark.parametrize("name, when", [("nan.wav", "0.50 s"), ("inf.wav", "0.25 s")])
def test_render_refuses_audio_that_is_not_numbers(media, tiny_checkpoints, work, name, when):
    p = anitalker("render", "--checkpoints", tiny_checkpoints, "--audio", media / name, "-o", "out.mp4",
                  "--steps", 5, cwd=work)
    line = error_line(p)
    assert str(media / name) in line and "not numbers" in line and when in line
    untouched(work)


@pytest.mark.parametrize("argv", [
    ["render", "--streaming", "--audio", "nan.wav", "-o", "out.mp4", "--steps", 5],
    ["live", "--audio", "nan.wav", "-o", "out.mp4", "--steps", 5, "--metrics-every", 0],
    ["reenact", "--video", "nan_clip.mkv", "-o", "out.mp4"],                          # offline
    ["reenact", "--video", "nan_clip.mkv", "--to", "file:out.mp4,null", "--metrics-every", 0],   # live
], ids=["render-streaming", "live-file", "reenact-offline", "reenact-live"])
def test_every_command_refuses_audio_that_is_not_numbers(media, tiny_checkpoints, work, argv):
    argv = [media / a if a in ("nan.wav", "nan_clip.mkv") else a for a in argv]
    p = anitalker(*argv, "--checkpoints", tiny_checkpoints, cwd=work)
    line = error_line(p)
    assert "not numbers (NaN or infinite), the first at 0.50 s" in line
    untouched(work)           # the live session failed: its partial file is discarded, not renamed over


@pytest.mark.parametrize("argv, says", [
    (["--pose", "nan,0,0"], "--pose takes 3 comma-separated finite numbers"),
    (["--pose", "0,inf,0"], "--pose takes 3 comma-separated finite numbers"),
    (["--location", "nan"], "--location takes a finite number"),
    (["--scale", "inf"], "--scale takes a finite number"),
    (["--pose-file", "pose_nan.csv"], "rows that are not finite numbers (NaN or inf), the first is row 2"),
])
@pytest.mark.parametrize("command", ["render", "live"])
def test_controls_that_are_not_numbers_are_refused(media, tiny_checkpoints, work, argv, says, command):
    argv = [media / a if a.endswith(".csv") else a for a in argv]
    extra = ["--metrics-every", 0] if command == "live" else []
    p = anitalker(command, "--checkpoints", tiny_checkpoints, "--infer-type", "hubert_full_control",
                  "--audio", media / "ok.wav", "-o", "out.mp4", "--steps", 5, *argv, *extra, cwd=work)
    assert says in error_line(p)
    untouched(work)


# ------------------------------------------------------------------------------------ interrupts

def run_and_signal(argv, sig, marker: str, cwd: Path) -> subprocess.CompletedProcess:
    """Start the command, wait until stderr shows ``marker`` (the work is under way), send ``sig``."""
    err = cwd / "stderr.txt"
    with open(err, "w") as f:
        proc = subprocess.Popen([sys.executable, "-m", "streaming.cli", *map(str, argv)], cwd=cwd,
                                env=command_env(), stdout=subprocess.DEVNULL, stderr=f, text=True)
        deadline = time.monotonic() + 240
        while marker not in err.read_text(errors="replace"):
            assert proc.poll() is None, err.read_text()
            assert time.monotonic() < deadline, "the command never got going"
            time.sleep(0.05)
        time.sleep(0.3)
        proc.send_signal(sig)
        proc.wait(120)
    text = err.read_text(errors="replace")
    err.unlink()
    return subprocess.CompletedProcess(argv, proc.returncode, "", text)


INTERRUPTIBLE = {
    "render": (["render", "--audio", "long.wav", "-o", "out.mp4", "--steps", 5], "render:"),
    "render-streaming": (["render", "--streaming", "--audio", "long.wav", "-o", "out.mp4", "--steps", 5],
                         "stream:"),
    # live: stopped once a metrics line shows the session running (its signal handlers are in place)
    "live-file": (["live", "--audio", "long.wav", "-o", "out.mp4", "--steps", 5, "--metrics-every", 0.2],
                  "held, latency"),
    "live-to-file": (["live", "--audio", "long.wav", "--to", "file:out.mp4", "--steps", 5,
                      "--metrics-every", 0.2], "held, latency"),
    "reenact-offline": (["reenact", "--video", "long_clip.mkv", "-o", "out.mp4"], "reenact:"),
    "reenact-live": (["reenact", "--video", "long_clip.mkv", "--to", "file:out.mp4,null", "--metrics-every", 0.2],
                     "held, latency"),
}


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
@pytest.mark.parametrize("case", list(INTERRUPTIBLE))
def test_an_interrupt_leaves_nothing_half_written(media, tiny_checkpoints, work, case, sig):
    argv, marker = INTERRUPTIBLE[case]
    argv = [media / a if a in ("long.wav", "long_clip.mkv") else a for a in argv]
    p = run_and_signal([*argv, "--checkpoints", tiny_checkpoints], sig, marker, work)
    line = error_line(p, 128 + sig)
    assert line == f"interrupted by {sig.name}: nothing was written to out.mp4", p.stderr
    if case.startswith(("live", "reenact-live")):
        assert "metrics: frames" in p.stderr            # the session ended cleanly and said how it went
    untouched(work)
    assert sorted(os.listdir(work)) == ["out.mp4"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_an_interrupt_ends_an_endless_session_and_keeps_its_file(tmp_path):
    """A session fed by the server's clients (or a microphone, a camera) only ends by an interrupt: its
    recording is finished and kept, and the exit status still says it was interrupted."""
    pytest.importorskip("aiortc")
    p = run_and_signal(["live", "--test-pattern", "--serve", "--port", free_port(), "-o", "out.mp4",
                        "--metrics-every", 0.2], signal.SIGINT, "held, latency", tmp_path)
    line = error_line(p, 130)
    assert line == "interrupted by SIGINT: kept out.mp4" and "metrics: frames" in p.stderr
    from avatar.media import read_video_info
    assert read_video_info(tmp_path / "out.mp4")["frames"] >= 1
    assert leftovers(tmp_path) == []


# ------------------------------------------------------------------------------------ step counts

@pytest.mark.parametrize("argv", [["render"], ["render", "--streaming"], ["live", "--audio", "ok.wav"]])
def test_a_step_count_no_stride_reaches_is_one_line_with_the_nearby_counts(media, work, argv):
    argv = [media / a if a == "ok.wav" else a for a in argv]
    p = anitalker(*argv, "--steps", 300, "-o", "out.mp4", "--checkpoints", work / "none", cwd=work)
    line = error_line(p)
    assert line == ("error: --steps 300 is not a count that a whole stride of the 1000-step schedule gives; "
                    "nearby valid counts: 167, 200, 250, 334, 500, 1000")
    untouched(work)


# ------------------------------------------------------------------------------------ checkpoints

class SystemCall:
    """Unpickling it would call os.system; only ever given to torch.load(weights_only=True) here."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def folder_with(tmp_path, tiny_checkpoints, name: str, write) -> Path:
    """A copy (links) of the tiny checkpoint folder with one file replaced."""
    d = tmp_path / "ckpts"
    d.mkdir()
    for f in tiny_checkpoints.iterdir():
        (d / f.name).symlink_to(f)
    (d / name).unlink()
    write(d / name)
    return d


@pytest.mark.parametrize("command", ["render", "reenact"])
def test_a_checkpoint_that_would_run_code_is_refused_as_unsafe(media, tiny_checkpoints, work, command):
    marker = work / "payload-ran"
    ckpts = folder_with(work, tiny_checkpoints, "stage1.ckpt",
                        lambda p: torch.save({"enc.x": torch.zeros(1), "x": SystemCall(marker)}, p))
    argv = ["--video", media / "nan_clip.mkv"] if command == "reenact" else ["--audio", media / "ok.wav"]
    p = anitalker(command, "--checkpoints", ckpts, *argv, "-o", "out.mp4", cwd=work)
    line = error_line(p)
    module = os.system.__module__
    assert f"{ckpts / 'stage1.ckpt'} is unsafe to load and was refused" in line
    assert f"Trying to load unsupported GLOBAL {module}.system whose module {module} is blocked" in line
    assert not marker.exists()
    untouched(work)


@pytest.mark.parametrize("name, write, says", [
    ("stage1.ckpt", lambda p: p.write_bytes(b"\x80\x02 truncated"), "damaged or not a torch checkpoint"),
    ("stage1.ckpt", lambda p: torch.save(torch.zeros(3), p), "is not a state dict"),
    ("stage1.ckpt", lambda p: torch.save({"x": torch.zeros(1)}, p), "not a stage-1"),
    ("stage2_audio_only_hubert.ckpt", lambda p: torch.save({"enc.x": torch.zeros(1)}, p), "not a stage-2"),
    ("stage2_audio_only_hubert.ckpt", lambda p: p.write_bytes(b""), "cannot read checkpoint"),
], ids=["truncated", "tensor", "wrong-keys", "stage2-wrong-keys", "empty"])
def test_every_checkpoint_error_names_the_file(media, tiny_checkpoints, work, name, write, says):
    ckpts = folder_with(work, tiny_checkpoints, name, write)
    p = anitalker("render", "--checkpoints", ckpts, "--audio", media / "ok.wav", "-o", "out.mp4", cwd=work)
    line = error_line(p)
    assert str(ckpts / name) in line and says in line
    untouched(work)


# ------------------------------------------------------------------------------------ outputs

OUTPUT_COMMANDS = {
    "render": ["render", "--audio", "ok.wav"],
    "render-streaming": ["render", "--streaming", "--audio", "ok.wav"],
    "live": ["live", "--audio", "ok.wav"],
    "reenact-offline": ["reenact", "--video", "nan_clip.mkv"],
    "reenact-live": ["reenact", "--video", "nan_clip.mkv", "--to", "null"],
}


def output_run(media, command, out, cwd, **kw):
    argv = [media / a if a in ("ok.wav", "nan_clip.mkv") else a for a in OUTPUT_COMMANDS[command]]
    # a checkpoint folder that does not exist: the output must be refused before anything looks for models
    return anitalker(*argv, "-o", out, "--checkpoints", cwd / "no-models-here", cwd=cwd, **kw)


@pytest.mark.parametrize("command", list(OUTPUT_COMMANDS))
def test_a_missing_output_folder_is_named_before_the_models_load(media, work, command):
    line = error_line(output_run(media, command, work / "missing" / "out.mp4", work))
    assert line == f"error: output folder does not exist: {work / 'missing'}"


@pytest.mark.parametrize("command", list(OUTPUT_COMMANDS))
def test_a_name_that_is_not_a_video_container_is_refused(media, work, command):
    line = error_line(output_run(media, command, "x.txt", work))
    assert line.startswith("error: cannot write video to x.txt: the name must end in .mp4")
    assert not (work / "x.txt").exists()
    untouched(work)


def test_a_folder_given_as_the_output_is_refused(media, work):
    (work / "clips.mp4").mkdir()
    line = error_line(output_run(media, "render", "clips.mp4", work))
    assert line.startswith("error: clips.mp4 is a folder; give the output file's name")


def without_root_override():
    """Run in the child before exec: drop the capabilities that let root ignore file permissions
    (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH) from its bounding set, so a read-only folder is read-only."""
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (1, 2):
        if libc.prctl(24, cap, 0, 0, 0) != 0:           # PR_CAPBSET_DROP
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


@pytest.mark.parametrize("command", ["render", "live", "reenact-offline"])
def test_a_read_only_output_folder_is_named_before_the_models_load(media, work, command):
    locked = work / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    kw = {}
    if os.geteuid() == 0:                                   # root writes anywhere unless told not to
        try:
            subprocess.run(["true"], preexec_fn=without_root_override, check=True)
        except (OSError, subprocess.SubprocessError):
            pytest.skip("running as root without the right to drop CAP_DAC_OVERRIDE: no folder is read-only")
        kw = dict(preexec_fn=without_root_override)
    argv = [media / a if a in ("ok.wav", "nan_clip.mkv") else a for a in OUTPUT_COMMANDS[command]]
    try:
        p = subprocess.run([sys.executable, "-m", "streaming.cli", *map(str, argv), "-o", locked / "out.mp4",
                            "--checkpoints", work / "no-models-here"], cwd=work, env=command_env(),
                           capture_output=True, text=True, timeout=300, **kw)
        line = error_line(p)
        assert line == f"error: cannot write to the output folder {locked}: Permission denied", line
        assert os.listdir(locked) == []
    finally:
        locked.chmod(0o755)
    untouched(work)


def test_a_container_the_name_asks_for_is_written(media, tiny_checkpoints, work):
    p = anitalker("render", "--checkpoints", tiny_checkpoints, "--audio", media / "ok.wav", "-o", "out.mkv",
                  "--steps", 5, cwd=work)
    assert p.returncode == 0, p.stderr
    with av.open(str(work / "out.mkv")) as f:
        assert "matroska" in f.format.name and f.streams.video and f.streams.audio


# ------------------------------------------------------------------------------------ downloads

def test_a_failed_download_leaves_no_folder_and_says_why_in_one_sentence(tmp_path):
    port = free_port()                      # nothing listens there: the connection is refused
    target = tmp_path / "new" / "checkpoints"
    p = anitalker("download", "--checkpoints", target, cwd=tmp_path,
                  env={"HF_ENDPOINT": f"http://127.0.0.1:{port}", "HF_HUB_OFFLINE": "0"}, timeout=120)
    line = error_line(p)
    assert "Connection refused" in line and "stage1.ckpt" in line and str(target) in line
    assert "Please check your internet connection" not in line          # the hub's first sentence only
    assert not (tmp_path / "new").exists()
    # a folder that was there stays, with what it held
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    p = anitalker("download", "--checkpoints", tmp_path / "mine", cwd=tmp_path,
                  env={"HF_ENDPOINT": f"http://127.0.0.1:{port}", "HF_HUB_OFFLINE": "0"}, timeout=120)
    error_line(p)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"


# ------------------------------------------------------------------------------------ preview

def test_a_preview_that_cannot_open_says_how_to_get_it_before_the_models_load(media, work):
    from streaming.sinks import preview_problem
    problem = preview_problem()        # the default install's headless OpenCV, or no display
    if problem is None:
        pytest.skip("a window can open here: nothing to refuse")
    p = anitalker("live", "--audio", media / "ok.wav", "--to", "preview", "--checkpoints", work / "none", cwd=work)
    assert error_line(p) == f"error: {problem}"
    if "no GUI" in problem:
        assert "bash install.sh preview" in problem


def test_pushed_pcm_that_is_not_numbers_is_cleaned():
    """Audio pushed by another program (the server's clients, a TTS adapter) cannot be refused mid-stream:
    NaN becomes silence and inf full scale, so the models never see a non-number."""
    import asyncio

    from streaming.sources import PcmSource

    async def pcm():
        yield np.array([0.25, np.nan, np.inf, -np.inf, -0.5], np.float32), 16000

    async def collect():
        return [c.samples async for c in PcmSource(pcm())]

    assert np.concatenate(asyncio.run(collect())).tolist() == [0.25, 0.0, 1.0, -1.0, -0.5]


def test_the_closing_line_is_never_glued_to_a_progress_bar(monkeypatch):
    """A signal can land after a bar drew itself and before its closing newline: the one line that says
    what happened still stands on its own line (the bar's text would otherwise start it)."""
    import io

    from streaming import cli
    from tqdm import tqdm
    out = io.StringIO()
    monkeypatch.setattr(sys, "stderr", cli._LineTracker(out))
    print("\rrender:  40%|####      | 4/10", end="", file=sys.stderr, flush=True)
    cli._say("interrupted by SIGINT: nothing was written to out.mp4")
    cli._say("error: a second line starts where the first ended")
    lines = out.getvalue().splitlines()
    assert lines[-2:] == ["interrupted by SIGINT: nothing was written to out.mp4",
                          "error: a second line starts where the first ended"]
    # a bar inside a generator the interrupt left suspended: it closes at garbage collection, after the
    # handler; its last draw must come before the closing line, not after it
    bar = tqdm(total=10, desc="reenact", file=sys.stderr, mininterval=0)
    bar.update(4)
    cli._say("interrupted by SIGTERM: nothing was written to out.mp4")
    bar.close()
    assert out.getvalue().splitlines()[-1] == "interrupted by SIGTERM: nothing was written to out.mp4"
