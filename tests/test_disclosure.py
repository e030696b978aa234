"""Disclosure: every video file the project writes says in its metadata that it was generated from one photo,
and --watermark marks every output picture (files, the virtual camera, any live sink) when asked."""
from __future__ import annotations

import asyncio

import av
import numpy as np
import pytest

from avatar.media import DISCLOSURE, read_video_info
from avatar.watermark import Finish, FinishedAnimator, Watermark
from conftest import tone
from streaming.cli import main
from streaming.clock import FakeTime
from streaming.session import Session
from streaming.sinks import FileSink
from streaming.sources import FileSource
from streaming.testing import ToneAnimator, decode_pts, encode_pts
from test_render import write_wav

MARK = "AI-generated"


def metadata(path) -> dict:
    with av.open(str(path)) as f:
        return {k.lower(): v for k, v in f.metadata.items()}


def frames(path) -> np.ndarray:
    with av.open(str(path)) as f:
        return np.stack([fr.to_ndarray(format="rgb24") for fr in f.decode(video=0)]).astype(int)


def band(shape, text=MARK):
    """The slices of the watermark's band in a picture of this shape."""
    y0, x0, alpha = Watermark(text)._mask(*shape[:2])
    return slice(y0, y0 + alpha.shape[0]), slice(x0, x0 + alpha.shape[1])


def assert_marked(marked: np.ndarray, plain: np.ndarray):
    """(N, H, W, 3) decoded videos: the band differs a lot, the top half (far from it) hardly."""
    ys, xs = band(plain.shape[1:])
    assert np.abs(marked[:, ys, xs] - plain[:, ys, xs]).mean() > 25
    top = slice(0, plain.shape[1] // 2)
    assert np.abs(marked[:, top] - plain[:, top]).mean() < 2


@pytest.fixture(scope="module")
def speech(tmp_path_factory):
    return write_wav(tmp_path_factory.mktemp("disclosure") / "speech.wav", tone(1.0))


@pytest.mark.parametrize("name, extra", [("one.mp4", []), ("stream.mkv", ["--streaming"]), ("one.mov", [])])
def test_render_marks_its_files_and_draws_the_watermark(tiny_checkpoints, speech, tmp_path, one_thread, name, extra):
    plain, marked = tmp_path / name, tmp_path / f"marked-{name}"
    for out, mark in ((plain, []), (marked, ["--watermark", MARK])):
        assert main(["render", "--checkpoints", str(tiny_checkpoints), "--audio", str(speech), "-o", str(out),
                     "--steps", "5", *extra, *mark]) == 0
        assert metadata(out)["comment"] == DISCLOSURE
    assert "one photo" in DISCLOSURE and "anitalker-live" in DISCLOSURE
    assert_marked(frames(marked), frames(plain))


def test_live_sinks_all_show_the_watermark(tmp_path):
    """One mark for every sink: the file and a raw sink (what the virtual camera, WebRTC and the preview
    get) see the same marked picture; the file also carries the disclosure."""
    class Collect:                      # a sink that keeps what it is given
        shown = []

        async def open(self, spec): pass

        async def write(self, frame):
            self.shown.append(frame)

        async def aclose(self): pass

    wav = write_wav(tmp_path / "a.wav", tone(1.0))
    mark = Watermark(MARK)
    out = tmp_path / "live.mp4"
    animator = FinishedAnimator(ToneAnimator(size=128), Finish(watermark=mark))
    asyncio.run(Session(animator, [FileSink(out), Collect()], time_source=FakeTime()).run(FileSource(wav)))
    shown = Collect.shown
    assert len(shown) >= 25
    for f in shown:                     # the test pattern's own picture (its number reads mid-height), marked
        assert np.array_equal(f.image, mark(encode_pts(decode_pts(f.image), 128)))
    assert metadata(out)["comment"] == DISCLOSURE and read_video_info(out)["frames"] == len(shown)
    ys, xs = band((128, 128))
    decoded = frames(out)
    assert np.abs(decoded[:, ys, xs] - np.stack([f.image for f in shown])[:, ys, xs]).mean() < 8


def test_live_command_draws_the_watermark_and_marks_its_file(tmp_path, capsys):
    from streaming.cli import build_parser
    from streaming.live import cmd_live

    wav = write_wav(tmp_path / "a.wav", tone(1.0))
    outs = {}
    for name, mark in (("plain.mp4", []), ("marked.mp4", ["--watermark", MARK])):
        args = build_parser().parse_args(["live", "--test-pattern", "--audio", str(wav), "-o",
                                          str(tmp_path / name), "--metrics-every", "0", *mark])
        assert cmd_live(args, time_source=FakeTime()) == 0
        outs[name] = frames(tmp_path / name)
        assert metadata(tmp_path / name)["comment"] == DISCLOSURE
    assert_marked(outs["marked.mp4"], outs["plain.mp4"])


def test_reenact_marks_its_files_and_draws_the_watermark(tiny_checkpoints, tmp_path, one_thread):
    import cv2

    from avatar.media import write_mp4
    from avatar.portrait import asset_path, load_image

    face = cv2.resize(np.asarray(load_image(asset_path("portrait.jpg"))), (192, 192))
    clip = tmp_path / "clip.mp4"
    write_mp4(clip, [np.roll(face, i, axis=1) for i in range(10)], tone(0.4))
    assert metadata(clip)["comment"] == DISCLOSURE              # every file the project writes
    outs = {}
    for name, mark in (("plain.mp4", []), ("marked.mp4", ["--watermark", MARK])):
        assert main(["reenact", "--checkpoints", str(tiny_checkpoints), "--video", str(clip), "-o",
                     str(tmp_path / name), *mark]) == 0
        outs[name] = frames(tmp_path / name)
        assert metadata(tmp_path / name)["comment"] == DISCLOSURE
    assert_marked(outs["marked.mp4"], outs["plain.mp4"])


def test_watermark_is_refused_without_text():
    from models.errors import AnitalkerError
    with pytest.raises(AnitalkerError, match="--watermark needs a text"):
        Watermark("   ")
