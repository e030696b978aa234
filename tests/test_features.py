"""avatar.features: streamed HuBERT and MFCC blocks against the whole-utterance front ends (tiny HuBERT)."""
import numpy as np
import pytest
import torch

from avatar.features import RunningStats, StreamingFeatures
from models.errors import AnitalkerError
from models.frontend import HubertFrontend, hubert_model_input, mfcc_features, mfcc_model_input, normalize_wave

from conftest import TINY, tone


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def frontend():
    from transformers import HubertConfig, HubertModel

    torch.manual_seed(0)
    return HubertFrontend(HubertModel(HubertConfig(**TINY["hubert"])))


def speech(n: int, seed: int = 0) -> np.ndarray:
    """A tone with noise and a quiet gap, so window and running statistics differ."""
    x = tone(n / 16000 + 0.01)[:n] + 0.05 * np.random.default_rng(seed).standard_normal(n).astype(np.float32)
    x[n // 3:n // 2] *= 0.01
    return x.astype(np.float32)


def stream(sf: StreamingFeatures, wave: np.ndarray, chunk: int) -> list:
    out = []
    for i in range(0, len(wave), chunk):
        sf.push(wave[i:i + chunk])
        out += sf.ready()
    return out + sf.finish()


def joined(blocks: list) -> torch.Tensor:
    """Blocks -> features of the whole stream, after checking the blocks are contiguous."""
    dim, rows = (1, 2) if blocks[0][1].dim() == 3 else (0, 4)     # hubert (L+1, 2F, H), mfcc (4F, 39)
    frame = 0
    for first, feats in blocks:
        assert first == frame
        frame += feats.shape[dim] // rows
    return torch.cat([f for _, f in blocks], dim=dim)


@pytest.mark.parametrize("audio,normalize", [("hubert", "running"), ("hubert", "window"), ("mfcc", "none")])
def test_chunking_does_not_change_blocks(frontend, audio, normalize):
    wave = speech(13 * 640 + 123)
    runs = [stream(StreamingFeatures(frontend, audio, block=4, context=3, lookahead=2, normalize=normalize),
                   wave, chunk) for chunk in (16, 1000, 16000)]
    rng = np.random.default_rng(1)
    sf, cuts, out = StreamingFeatures(frontend, audio, 4, 3, 2, normalize), [0], []
    while cuts[-1] < len(wave):
        cuts.append(cuts[-1] + int(rng.integers(1, 2000)))
        sf.push(wave[cuts[-2]:cuts[-1]])
        out += sf.ready()
    runs.append(out + sf.finish())
    for run in runs[1:]:
        assert [i for i, _ in run] == [i for i, _ in runs[0]] == [0, 4, 8, 12]
        assert all(torch.equal(a, b) for (_, a), (_, b) in zip(run, runs[0]))


def test_blocks_come_once_lookahead_and_receptive_field_are_in(frontend):
    sf = StreamingFeatures(frontend, block=4, context=3, lookahead=2)
    sf.push(np.zeros(6 * 640 + 79, np.float32))     # the last HuBERT row of frame 5 reaches 80 samples on
    assert sf.ready() == []
    sf.push(np.zeros(1, np.float32))
    assert [i for i, _ in sf.ready()] == [0] and sf.frames_done == 4


def test_lookahead_zero_keeps_real_rows(frontend):
    """Without lookahead the block's last row is computed (5 ms later), not repeated as at the stream end."""
    blocks = stream(StreamingFeatures(frontend, block=4, context=3, lookahead=0), speech(10 * 640), 640)
    assert [i for i, _ in blocks] == [0, 4, 8]
    assert all(not torch.equal(f[:, -1], f[:, -2]) for _, f in blocks[:-1])
    assert torch.equal(blocks[-1][1][:, -1], blocks[-1][1][:, -2])


def test_full_context_equals_whole_utterance(frontend):
    wave = speech(40 * 640)
    ref, frames = hubert_model_input(frontend.states(wave))
    assert frames == 40
    big = dict(block=7, context=100, lookahead=100)
    # window statistics over a window holding the whole utterance are the utterance statistics
    got = joined(stream(StreamingFeatures(frontend, normalize="window", **big), wave, 999))
    assert torch.equal(got, ref[0])
    # the caller may normalise: the frontend's own normalisation of the same wave, bit for bit
    got = joined(stream(StreamingFeatures(frontend, normalize="none", **big), normalize_wave(wave), 999))
    assert torch.equal(got, ref[0])
    # running statistics end at the stream end for every block here: float64 vs float32 statistics
    got = joined(stream(StreamingFeatures(frontend, normalize="running", **big), wave, 999))
    torch.testing.assert_close(got, ref[0], rtol=1e-4, atol=1e-4)


def test_frontend_without_normalisation_streams_raw(frontend):
    raw = HubertFrontend(frontend.model, do_normalize=False)
    wave = speech(20 * 640)
    got = joined(stream(StreamingFeatures(raw, block=5, context=50, lookahead=50), wave, 640))
    assert torch.equal(got, hubert_model_input(raw.states(wave))[0][0])


def test_short_context_stays_close(frontend):
    wave = speech(30 * 640)
    ref = hubert_model_input(frontend.states(wave))[0][0]
    got = joined(stream(StreamingFeatures(frontend, block=5, context=5, lookahead=3, normalize="window"),
                        wave, 640))
    assert got.shape == ref.shape and not torch.equal(got, ref)
    assert torch.nn.functional.cosine_similarity(got, ref, dim=-1).mean() > 0.9


@pytest.mark.parametrize("n", [1, 639, 640, 641, 4 * 640, 9 * 640 + 5])
def test_frame_count_is_ceil_samples(frontend, n):
    for audio, rows in (("hubert", 2), ("mfcc", 4)):
        sf = StreamingFeatures(frontend, audio, block=4, context=2, lookahead=1)
        blocks = stream(sf, speech(n), 300)
        frames = -(-n // 640)
        assert [i for i, _ in blocks] == list(range(0, frames, 4))
        assert sum(f.shape[-2] for _, f in blocks) == rows * frames == rows * sf.frames_done
        assert all(f.shape[-2] == rows * min(4, frames - i) for i, f in blocks)
        assert sf.samples_in == 0          # finish() started a new segment


@pytest.mark.parametrize("normalize", ["running", "window"])
def test_silence_gives_finite_blocks(frontend, normalize):
    for audio in ("hubert", "mfcc"):
        sf = StreamingFeatures(frontend, audio, block=5, context=5, lookahead=2, normalize=normalize)
        sf.push(np.zeros(16000, np.float32))
        blocks = sf.ready() + sf.finish()
        assert len(blocks) == 5 and all(torch.isfinite(f).all() for _, f in blocks)


def test_reset_drops_pending_audio_and_keeps_counting(frontend):
    sf = StreamingFeatures(frontend, block=4, context=3, lookahead=2, normalize="window")
    sf.push(speech(9 * 640 + 100))
    assert [i for i, _ in sf.ready()] == [0]          # block 4..8 still waits for its lookahead
    sf.reset()
    assert sf.frames_done == 4 and sf.samples_in == 0 and sf.finish() == []
    new = speech(9 * 640, seed=3)
    fresh = stream(StreamingFeatures(frontend, block=4, context=3, lookahead=2, normalize="window"), new, 640)
    after = stream(sf, new, 640)
    assert [i for i, _ in after] == [4 + i for i, _ in fresh] == [4, 8, 12]
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(after, fresh))   # no context across the cut
    assert sf.frames_done == 13


@pytest.mark.parametrize("lookahead", [0, 1])
def test_mfcc_equals_whole_utterance_rows(lookahead):
    n = 23 * 640 + 77
    wave = speech(n)
    padded = np.concatenate([wave, np.zeros(24 * 640 - n, np.float32)])
    ref = torch.as_tensor(mfcc_features(padded), dtype=torch.float32)          # (4*24 - 1, 39)
    got = joined(stream(StreamingFeatures(None, "mfcc", block=5, context=1, lookahead=lookahead), wave, 333))
    assert got.shape == (4 * 24, 39)
    assert torch.equal(got[:-1], ref) and torch.equal(got[-1], ref[-1])   # last row repeated: whole frames
    # the official model input keeps floor(rows / 4) frames: ours is the same rows plus the last frame
    model_in, frames = mfcc_model_input(mfcc_features(padded))
    assert frames == 23 and torch.equal(got[:4 * frames], model_in[0])


def test_mfcc_without_context_differs_only_near_block_starts():
    wave = speech(20 * 640)
    ref = torch.as_tensor(mfcc_features(wave), dtype=torch.float32)
    got = joined(stream(StreamingFeatures(None, "mfcc", block=5, context=0, lookahead=0), wave, 640))
    bad = sorted({int(r) for r in torch.nonzero((got[:-1] != ref).any(-1)).flatten()})
    # pre-emphasis of the window's first sample, its first MFCC row, and deltas reaching it (+-2 rows)
    assert bad and all(r % 20 in (0, 1, 2) and r >= 20 for r in bad)


def test_running_stats_match_numpy():
    x = np.random.default_rng(0).standard_normal(5000).astype(np.float32) * 3 + 1
    s = RunningStats()
    for part in np.split(x, [7, 640, 641, 3000]):
        s.add(part)
    assert s.n == x.size and abs(s.mean - x.mean(dtype=np.float64)) < 1e-12
    assert abs(s.m2 / s.n - x.var(dtype=np.float64)) < 1e-9
    np.testing.assert_allclose(s.normalize(x), normalize_wave(x), rtol=1e-5, atol=1e-5)


def test_bad_arguments_are_user_errors(frontend):
    with pytest.raises(AnitalkerError, match="normalisation"):
        StreamingFeatures(frontend, normalize="utterance")
    with pytest.raises(AnitalkerError, match="frontend"):
        StreamingFeatures(None, "hubert")
    with pytest.raises(AnitalkerError, match="block"):
        StreamingFeatures(frontend, block=0)


def block_stats(sf: StreamingFeatures, wave: np.ndarray, chunk: int = 640, idle: bool = False) -> list:
    """Push wave; the (mean, std) each HuBERT block that came out was normalised with."""
    out = []
    for i in range(0, len(wave), chunk):
        sf.push(wave[i:i + chunk], idle=idle)
        out += [sf.last_stats for _ in sf.ready()]
    return out


def test_idle_silence_does_not_change_how_speech_is_normalised(frontend):
    """Five minutes of idle silence (what a session feeds while nobody speaks) before an utterance: every
    block of the utterance is normalised exactly as without the idle stretch, and by the end of the
    utterance within float32 rounding of the whole-utterance statistics. Counted as audio, the idle zeros
    would have shrunk the statistics about 3.5-fold (the failure this guards against)."""
    wave = speech(16000 * 3)
    ref_std = float(np.sqrt(wave.astype(np.float64).var() + 1e-7))
    fresh = block_stats(StreamingFeatures(frontend), wave)
    after_idle = StreamingFeatures(frontend)
    block_stats(after_idle, np.zeros(16000 * 300, np.float32), chunk=6400, idle=True)
    idled = block_stats(after_idle, wave)
    assert len(idled) >= len(fresh) - 1 >= 4
    for (m0, s0), (m1, s1) in zip(fresh[-len(idled):], idled[-len(fresh):]):
        assert abs(s1 / s0 - 1) < 1e-9 and abs(m1 - m0) < 1e-9
    tail = after_idle.finish()
    assert tail and abs(after_idle.last_stats[1] / ref_std - 1) < 1e-4
    counted = StreamingFeatures(frontend)                 # the same idle stretch counted as speech
    block_stats(counted, np.zeros(16000 * 300, np.float32), chunk=6400)
    assert block_stats(counted, wave)[-1][1] < ref_std / 2


def test_running_statistics_follow_the_speaker_over_a_long_session(frontend):
    """The statistics keep about STATS_SECONDS of speech: after a minute at one level and then the same
    speech 4x louder for three such windows, blocks are normalised within 5 % of the loud speech's own
    statistics; averaging in the quiet minute, as statistics without forgetting do, is 20 % off."""
    from avatar.features import STATS_SECONDS
    quiet = speech(16000 * 60, seed=1) * 0.25
    loud = speech(16000 * 3 * STATS_SECONDS, seed=2)
    sf = StreamingFeatures(frontend)
    block_stats(sf, quiet, chunk=16000)
    last = block_stats(sf, loud, chunk=16000)[-1][1]
    own = np.sqrt(loud.astype(np.float64).var())
    assert abs(last / own - 1) < 0.05
    everything = np.sqrt(np.concatenate([quiet, loud]).astype(np.float64).var())
    assert abs(everything / own - 1) > 0.2
