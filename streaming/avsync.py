"""A/V sync measured where a receiver sees it.

The SyncAnimator (streaming/testing.py) makes a flash in the picture and a click in the audio at the same
pts once a second; these functions find them again at a sink's output, on the receiver's own clock, and
return click time - flash time per flash (seconds; positive: the sound is late):

- an mp4 as a player decodes it (PyAV: frame pts and sample times from the container's own timeline);
- a virtual camera and a speaker together: the camera's frames as its backend received them (timestamped)
  against the speaker's samples as the device reports playing them (PortAudio's outputBufferDacTime);
- WebRTC as a browser renders it: the page analyses its own stream with ?avsync=1 (video frames with
  requestVideoFrameCallback's expected display time; each click when the video element's audio renderer
  plays it, from the audio receiver's synchronization sources, and also as a WebAudio worklet finds it on
  the received track, which adds WebAudio's own capture path) and reports the lists back, on the same
  performance.now() clock (streaming/static/app.js explains both).

bench/avsync.py runs each of them through the real loop and prints a table; tests/test_avsync.py checks
them.
"""
from __future__ import annotations

import numpy as np

from .testing import av_offsets, click_times, flash_times


def mp4_offsets(path) -> list[float]:
    """Decode an mp4 as a player would and pair its flashes with its clicks."""
    import av
    with av.open(str(path)) as box:        # frame by frame: a long recording never sits in memory
        flashes = flash_times((float(f.pts * f.time_base), f.to_ndarray(format="rgb24")) for f in box.decode(video=0))
    with av.open(str(path)) as box:
        parts, t0, rate = [], None, None
        for f in box.decode(audio=0):
            if t0 is None:
                t0, rate = float(f.pts * f.time_base), f.sample_rate
            parts.append(f.to_ndarray().reshape(len(f.layout.channels), -1)[0] if f.format.is_planar
                         else f.to_ndarray().reshape(-1, len(f.layout.channels))[:, 0])
    return av_offsets(flashes, click_times(np.concatenate(parts), rate, t0))


def played_clicks(log, rate: int) -> list[float]:
    """Click onsets in what a SpeakerSink's device played: log of (DAC time of the block, its samples)."""
    if not log:
        return []
    audio = np.concatenate([block for _, block in log])
    starts = np.cumsum([0] + [len(block) for _, block in log])
    out = []
    for t in click_times(audio, rate):
        i = round(t * rate)
        b = int(np.searchsorted(starts, i, side="right") - 1)
        out.append(log[b][0] + (i - starts[b]) / rate)
    return out


def device_offsets(camera_sends, speaker_log, rate: int) -> list[float]:
    """camera_sends: (time, frame) as the virtual camera's backend received them, on the same clock as the
    speaker's DAC times."""
    return av_offsets(flash_times(camera_sends), played_clicks(speaker_log, rate))


def page_offsets(report: dict, clicks: str = "heard") -> list[float]:
    """The page's own lists (performance.now() milliseconds) -> offsets in seconds. clicks="heard": when the
    video element's audio renderer plays each click (the viewer's figure, +-5 ms); "clicks": the WebAudio
    worklet's onsets on the output clock (also counts WebAudio's capture path and output latency)."""
    flashes = [t / 1000 for t in report.get("flashes", [])]
    clicks = [t / 1000 for t in report.get(clicks, [])]
    return av_offsets(flashes, clicks)


def summary(offsets) -> dict:
    """Offsets in ms: how many, median, worst."""
    ms = 1000 * np.asarray(offsets, float)
    if not len(ms):
        return {"n": 0, "median_ms": None, "max_abs_ms": None}
    return {"n": int(len(ms)), "median_ms": round(float(np.median(ms)), 1),
            "max_abs_ms": round(float(np.abs(ms).max()), 1)}
