"""What the framework adapters share, without either framework: the core installs and imports without the
extras, and a TTS flood (a sentence as hundreds of tiny frames in one event-loop turn) neither overflows
the session's bounded input queue nor loses a sample."""
import asyncio
import subprocess
import sys

import numpy as np

from streaming.clock import FakeTime
from streaming.plugins import Speech, from_pcm16, pcm16
from streaming.session import Session
from streaming.testing import ToneAnimator

BLOCK = "import sys; sys.modules['livekit'] = sys.modules['pipecat'] = None; "


def test_core_imports_without_the_extras():
    ok = subprocess.run([sys.executable, "-c", BLOCK + "import streaming.cli, streaming.plugins, streaming.session"],
                        capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    for name, extra in (("livekit", "livekit"), ("pipecat", "pipecat")):
        r = subprocess.run([sys.executable, "-c", BLOCK + f"import streaming.plugins.{name}"],
                           capture_output=True, text=True)
        assert r.returncode != 0 and f'pip install "anitalker-live[{extra}]"' in r.stderr.splitlines()[-1]


def test_a_tts_flood_is_coalesced_and_played_in_full():
    """800 pushes of 10 ms at 24 kHz within one loop turn (the session's queue holds 64) and the segment
    end: every sample comes out, in order, and the frame holding the last one says the segment ended."""
    pcm = ((np.arange(24000 * 8) % 2000) - 1000).astype(np.int16)

    async def main():
        session = Session(ToneAnimator(), time_source=FakeTime(), input_chunks=64)
        speech = Speech(session)
        async with session:
            frames = session.frames()
            for i in range(0, len(pcm), 240):
                speech.push(from_pcm16(pcm[i:i + 240].tobytes()), 24000)
            tag = speech.end()
            got, ended_at = [], None
            async for f in frames:
                if f.meta.get("tags"):
                    got.append(f.audio)
                if tag in f.meta.get("ended", ()):
                    ended_at = len(got)
                    break
            await frames.aclose()
        return np.concatenate(got), ended_at, tag

    audio, ended_at, tag = asyncio.run(main())
    assert tag == 0 and ended_at == -(-len(audio) // 640)
    assert abs(len(audio) - 16000 * 8) < 640                 # all 8 s, resampled to 16 kHz
    ref = np.interp(np.arange(16000 * 8) * 1.5, np.arange(len(pcm)), pcm / 32768)
    assert np.corrcoef(audio[1000:120000], ref[1000:120000])[0, 1] > 0.95     # in order, nothing lost


def test_pcm16_round_trip_is_exact():
    x = np.array([-32768, -1, 0, 1, 12345, 32767], np.int16)
    assert pcm16(from_pcm16(x.tobytes())) == x.tobytes()
    stereo = np.array([[100, 300], [-200, -400]], np.int16)
    assert np.allclose(from_pcm16(stereo.tobytes(), channels=2) * 32768, [200, -300])
