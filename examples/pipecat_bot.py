"""A Pipecat voice bot whose face is the avatar, rendered in this process (no avatar cloud service).

    pip install "anitalker-live[pipecat]" "pipecat-ai[runner,webrtc,silero]"   # plus your STT/LLM/TTS extras
    anitalker download                                                          # the official weights
    python examples/pipecat_bot.py            # then open http://localhost:7860/client and press Connect

The avatar (AvatarVideoService) sits between the TTS and the transport's output: it replaces the TTS
audio by 25 fps images with the audio each one was made from. ANITALKER_PORTRAIT picks the photo.

STT, LLM and TTS are yours to choose; this file uses Deepgram, OpenAI and Cartesia
("pipecat-ai[deepgram,openai,cartesia]", keys in DEEPGRAM_API_KEY, OPENAI_API_KEY, CARTESIA_API_KEY).
Any pipecat STT/LLM/TTS service works the same (e.g. WhisperSTTService, OLLamaLLMService, PiperTTSService).
"""
import asyncio
import os

from pipecat.audio.vad.silero import SileroVADAnalyzer
from pipecat.frames.frames import LLMRunFrame
from pipecat.pipeline.pipeline import Pipeline
from pipecat.pipeline.worker import PipelineParams, PipelineWorker
from pipecat.processors.aggregators.llm_context import LLMContext
from pipecat.processors.aggregators.llm_response_universal import LLMContextAggregatorPair, LLMUserAggregatorParams
from pipecat.runner.types import RunnerArguments
from pipecat.runner.utils import create_transport
from pipecat.services.cartesia.tts import CartesiaTTSService
from pipecat.services.deepgram.stt import DeepgramSTTService
from pipecat.services.openai.llm import OpenAILLMService
from pipecat.transports.base_transport import TransportParams
from pipecat.workers.runner import WorkerRunner

from streaming.plugins import load_animator
from streaming.plugins.pipecat import AvatarVideoService

# The avatar's frames are 256x256 at 25 fps; the transport shows each image as it comes (is_live).
transport_params = {
    "webrtc": lambda: TransportParams(audio_in_enabled=True, audio_out_enabled=True, video_out_enabled=True,
                                      video_out_is_live=True, video_out_width=256, video_out_height=256,
                                      video_out_framerate=25),
}


async def bot(runner_args: RunnerArguments):
    transport = await create_transport(runner_args, transport_params)
    stt = DeepgramSTTService(api_key=os.environ["DEEPGRAM_API_KEY"])
    llm = OpenAILLMService(api_key=os.environ["OPENAI_API_KEY"], settings=OpenAILLMService.Settings(
        system_instruction="You are a friendly assistant in a voice call. Answer in one or two short sentences."))
    tts = CartesiaTTSService(api_key=os.environ["CARTESIA_API_KEY"], settings=CartesiaTTSService.Settings(
        voice="71a7ad14-091c-4e8e-a314-022ece01c121"))
    # the avatar: this line, its place in the pipeline and the import (models load once per process)
    avatar = AvatarVideoService(await asyncio.to_thread(load_animator, os.environ.get("ANITALKER_PORTRAIT")))

    context = LLMContext()
    user, assistant = LLMContextAggregatorPair(context, user_params=LLMUserAggregatorParams(
        vad_analyzer=SileroVADAnalyzer()))
    pipeline = Pipeline([transport.input(), stt, user, llm, tts, avatar, transport.output(), assistant])
    worker = PipelineWorker(pipeline, params=PipelineParams(enable_metrics=True),
                            idle_timeout_secs=runner_args.pipeline_idle_timeout_secs)
    runner = WorkerRunner(handle_sigint=runner_args.handle_sigint)
    await runner.add_workers(worker)

    @transport.event_handler("on_client_connected")
    async def on_client_connected(transport, client):
        await worker.queue_frames([LLMRunFrame()])          # greet first

    @transport.event_handler("on_client_disconnected")
    async def on_client_disconnected(transport, client):
        await runner.cancel()

    await runner.run()


if __name__ == "__main__":
    from pipecat.runner.run import main

    main()
