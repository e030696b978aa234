"""A LiveKit voice agent whose face is the avatar, rendered in this process (no avatar cloud service).

    pip install "anitalker-live[livekit]" livekit-plugins-silero     # plus the plugins of your STT/LLM/TTS
    anitalker download                                                # the official weights
    export LIVEKIT_URL=wss://... LIVEKIT_API_KEY=... LIVEKIT_API_SECRET=...
    python examples/livekit_agent.py dev

Then join the room from the Agents Playground or any LiveKit client: the agent publishes the avatar as
its camera and its voice as its microphone. ANITALKER_PORTRAIT picks the photo (default: the bundled one).

STT, LLM and TTS are yours to choose; this file names LiveKit Inference models (billed by LiveKit Cloud).
Any livekit-plugins-* service works the same, e.g. deepgram.STT(), openai.LLM(model="gpt-4.1-mini"),
cartesia.TTS() or a local piper/kokoro TTS.
"""
import asyncio
import os

from livekit.agents import Agent, AgentServer, AgentSession, JobContext, cli, inference
from livekit.plugins import silero

from streaming.plugins import load_animator
from streaming.plugins.livekit import AvatarSession

server = AgentServer()


@server.rtc_session()
async def entrypoint(ctx: JobContext) -> None:
    session = AgentSession(
        stt=inference.STT("deepgram/nova-3"),
        llm=inference.LLM("openai/gpt-4.1-mini"),
        tts=inference.TTS("cartesia/sonic-3.5"),
        vad=silero.VAD.load(),
    )
    # the avatar: these two lines and the import (the models load once per worker process)
    avatar = AvatarSession(await asyncio.to_thread(load_animator, os.environ.get("ANITALKER_PORTRAIT")))
    await avatar.start(session, room=ctx.room)
    await session.start(agent=Agent(instructions="You are a friendly assistant. Answer in one or two "
                                                 "short sentences."), room=ctx.room)
    session.generate_reply(instructions="Greet the user in one short sentence.")


if __name__ == "__main__":
    cli.run_app(server)
