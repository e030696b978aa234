"""Voice-agent plugins: latency from TTS audio in to the first frame out that carries it.

    python bench/plugins.py [--engines tiny,5/2/5/fp32] [--utterances 3] [--modes preempt,queued] [--threads N]

An engine is `tiny` (the test dims) or hop/lookahead/steps/precision at full size; all weights are
generated (random) of those sizes. For each engine and each framework adapter the avatar idles until its
frames flow, then a spoken sentence (espeak-ng, else a voice-like signal) arrives as a TTS delivers it:
20 ms frames as fast as they come, then the end of the segment. Timed per utterance:

  livekit  first audio frame given to QueueAudioOutput.capture_frame -> the first AudioFrame of that
           speech handed by the real AvatarRunner to its AVSynchronizer (the frame it publishes), stand-in room
  pipecat  first TTSAudioRawFrame entering the service -> the first TTSAudioRawFrame of that speech leaving
           it, in a real pipecat pipeline

--modes preempt,queued runs each case twice, alternately (compare them within one run: this machine is
shared and its speed varies by several times from minute to minute). `preempt` is what the adapters do
(preempt_idle=True: speech that starts while the avatar idles first drops the idle silence the session had
fed ahead of the clock); `queued` leaves it (preempt_idle=False), so speech waits behind that silence: the
session feeds idle silence up to its lead, and lends a late engine up to 2 s more.

Writes JSON (bench/results/plugins.json) and prints a table. This machine's figures are in the README.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from avatar.animator import StreamConfig, StreamingAnimator  # noqa: E402
from avatar.pipeline import Models, Speed, encode_portrait  # noqa: E402
from avatar.portrait import asset_path, load_image, prepare_portrait, to_tensor  # noqa: E402
from bench.stream import MODELS, speech  # noqa: E402

RATE = 16000
CHUNK = RATE // 50          # 20 ms


def tiny_models() -> Models:
    from transformers import HubertConfig, HubertModel

    from models.frontend import HubertFrontend
    from models.stage1 import Stage1, Stage1Dims
    from models.stage2 import Stage2, Stage2Dims

    tiny = yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text())
    torch.manual_seed(0)
    return Models(Stage1(Stage1Dims(**tiny["stage1"])).eval(), Stage2(Stage2Dims(**tiny["stage2"])).eval(),
                  HubertFrontend(HubertModel(HubertConfig(**tiny["hubert"]))), torch.device("cpu"))


def make_engine(spec: str):
    image = to_tensor(prepare_portrait(load_image(asset_path("portrait.jpg"))).image)
    if spec == "tiny":
        models, config = tiny_models(), StreamConfig(hop=5, context=5, lookahead=2, audio_context=10, steps=3)
    else:
        hop, lookahead, steps, precision = spec.split("/")
        base = MODELS.get("cpu")
        models = Models(base.stage1, base.stage2, base.hubert, base.device, Speed(precision=precision))
        config = StreamConfig(hop=int(hop), lookahead=int(lookahead), steps=int(steps))
    with torch.inference_mode():
        code = encode_portrait(models, image)
    return StreamingAnimator(models, code, config)


async def livekit_run(animator, wave, utterances: int, idle_s: float, preempt: bool):
    from livekit import rtc
    from livekit.agents.voice.avatar import AvatarRunner, QueueAudioOutput

    from streaming.plugins.livekit import AvatarVideo, avatar_options
    from streaming.testing import stand_in_room

    video = AvatarVideo(animator, preempt_idle=preempt)
    output = QueueAudioOutput(wait_playback_start=True)
    finished = asyncio.Queue()
    output.on("playback_finished", finished.put_nowait)
    runner = AvatarRunner(stand_in_room(), audio_recv=output, video_gen=video, options=avatar_options(video))
    first_out = []
    push = runner.av_sync.push

    async def stamping_push(frame, timestamp=None):
        if isinstance(frame, rtc.AudioFrame) and len(first_out) < len(first_in):   # idle frames have no audio
            first_out.append(time.perf_counter())
        await push(frame, timestamp)

    runner.av_sync.push = stamping_push
    first_in = []
    await runner.start()
    await asyncio.sleep(idle_s)
    pcm = (np.clip(wave, -1, 1) * 32767).astype(np.int16)
    for _ in range(utterances):
        first_in.append(time.perf_counter())
        for i in range(0, len(pcm), CHUNK):
            part = pcm[i:i + CHUNK]
            await output.capture_frame(rtc.AudioFrame(part.tobytes(), RATE, 1, len(part)))
        output.flush()
        await asyncio.wait_for(finished.get(), 600)    # a session that failed does not hang the bench
        await asyncio.sleep(idle_s)
    summary = video.session.summary()
    await runner.aclose()
    return [o - i for i, o in zip(first_in, first_out)], summary


def pipecat_run(animator, wave, utterances: int, idle_s: float, seconds: float, preempt: bool):
    from pipecat.frames.frames import TTSAudioRawFrame, TTSStartedFrame, TTSStoppedFrame
    from pipecat.pipeline.pipeline import Pipeline
    from pipecat.processors.frame_processor import FrameDirection, FrameProcessor
    from pipecat.tests.utils import SleepFrame, run_test

    from streaming.plugins.pipecat import AvatarVideoService

    class Stamp(FrameProcessor):
        """Time of the first TTSAudioRawFrame of each context passing here."""
        def __init__(self):
            super().__init__()
            self.first = {}

        async def process_frame(self, frame, direction):
            await super().process_frame(frame, direction)
            if isinstance(frame, TTSAudioRawFrame) and direction == FrameDirection.DOWNSTREAM:
                self.first.setdefault(frame.context_id, time.perf_counter())
            await self.push_frame(frame, direction)

    service = AvatarVideoService(animator, preempt_idle=preempt)
    before, after = Stamp(), Stamp()
    pcm = (np.clip(wave, -1, 1) * 32767).astype(np.int16)
    frames = [SleepFrame(idle_s)]
    for u in range(utterances):
        ctx = f"u{u}"
        frames += [TTSStartedFrame(context_id=ctx)]
        frames += [TTSAudioRawFrame(audio=pcm[i:i + CHUNK].tobytes(), sample_rate=RATE, num_channels=1,
                                    context_id=ctx) for i in range(0, len(pcm), CHUNK)]
        # the next answer comes once this one has surely played (the engine may be slower than real time)
        frames += [TTSStoppedFrame(context_id=ctx), SleepFrame(idle_s + seconds * 6)]
    asyncio.run(run_test(Pipeline([before, service, after]), frames_to_send=frames))
    lat = [after.first[c] - before.first[c] for c in before.first if c in after.first]
    return lat, service.session.summary()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--engines", default="tiny,5/2/5/fp32")
    p.add_argument("--frameworks", default="livekit,pipecat")
    p.add_argument("--utterances", type=int, default=3)
    p.add_argument("--seconds", type=float, default=2.0, help="length of each utterance")
    p.add_argument("--idle", type=float, default=3.0, help="idle seconds before each utterance")
    p.add_argument("--modes", default="preempt,queued", help="preempt (the default) and/or queued, see above")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (default 1: on a shared 2-core machine a second thread only spin-waits)")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "plugins.json"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    wave = speech(args.seconds)
    rows = []
    for spec in args.engines.split(","):
        for fw in args.frameworks.split(","):
            for mode in args.modes.split(","):
                animator = make_engine(spec)
                preempt = mode == "preempt"
                if fw == "livekit":
                    lat, summary = asyncio.run(livekit_run(animator, wave, args.utterances, args.idle, preempt))
                else:
                    lat, summary = pipecat_run(animator, wave, args.utterances, args.idle, args.seconds, preempt)
                ms = [round(1000 * x, 1) for x in lat]
                rows.append(dict(engine=spec, framework=fw, mode=mode, latency_ms=ms, median_ms=float(np.median(ms)),
                                 configured_ms=1000 * animator.latency_s, repeats=summary["repeats"],
                                 frames=summary["frames"], session=summary))
                print(f"{spec:<14} {fw:<8} {mode:<8} TTS in -> first frame out ms: {ms}", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(dict(bench="plugins", device=f"CPU, {args.threads} threads",
                                              torch=torch.__version__, seconds=args.seconds, rows=rows), indent=2))
    print(f"\n{'engine':<16}{'framework':<10}{'mode':<9}{'median ms':>10}{'min':>8}{'max':>8}{'configured':>12}"
          f"{'repeats':>9}")
    for r in rows:
        print(f"{r['engine']:<16}{r['framework']:<10}{r['mode']:<9}{r['median_ms']:>10.0f}{min(r['latency_ms']):>8.0f}"
              f"{max(r['latency_ms']):>8.0f}{r['configured_ms']:>12.0f}{r['repeats']:>9}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
