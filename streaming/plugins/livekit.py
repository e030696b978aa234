"""The avatar as a local LiveKit Agents avatar (livekit-agents 1.8; pip install "anitalker-live[livekit]").

Three lines in an agent's entrypoint (examples/livekit_agent.py is a whole agent):

    from streaming.plugins import load_animator
    from streaming.plugins.livekit import AvatarSession
    await AvatarSession(load_animator("me.jpg")).start(session, room=ctx.room)

AvatarSession wires it as bitHuman's local mode does: the agent's TTS audio goes to a QueueAudioOutput,
livekit's AvatarRunner feeds it to AvatarVideo (a VideoGenerator) and publishes what comes out as the
agent's own camera and microphone tracks through its AVSynchronizer.

Pacing. The runner's AVSynchronizer paces video at 25 fps and its AudioSource plays audio in real time,
yet AvatarVideo still takes its frames from a Session, which paces them too. Both run at real time, so the
runner's queues stay about one frame deep; and the Session's clock is what shows idle motion while nobody
speaks (silence is fed when nothing was pushed), bounds latency on an engine slower than real time, and
makes clear_buffer() effective within a frame: the runner does not empty its own queues on an interrupt,
so a generator that ran ahead of real time would keep talking for as long as it was ahead.

Audio. Each video frame that plays speech is followed by an AudioFrame with exactly its 1,920 samples at
48 kHz: the TTS's own sound (resampled once if it was not 48 kHz), the same 1/25 s the face was made from
(the models hear it as 16 kHz, which would sound muffled); frames in silence carry no audio, because the runner adds every
AudioFrame's duration to the playback position it reports. After the frame that holds a segment's last
sample comes AudioSegmentEnd, so playback_finished(position, interrupted=False) arrives when the speech
has been shown, with its duration rounded up to whole frames (at most 40 ms over).
"""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import numpy as np

try:
    from livekit import rtc
    from livekit.agents.voice.avatar import (AudioSegmentEnd, AvatarOptions, AvatarRunner, QueueAudioOutput,
                                             VideoGenerator)
    from livekit.agents.voice.avatar import AvatarSession as _AvatarSession
except ModuleNotFoundError as e:
    raise ModuleNotFoundError(f"{e.msg}: this adapter needs livekit-agents 1.8; "
                              'pip install "anitalker-live[livekit]"') from e

from avatar.timebase import FPS, OUT_RATE

from ..session import Session
from . import Speech, from_pcm16, pcm16, played

__all__ = ["AvatarVideo", "AvatarSession", "avatar_options"]


def _image_size(animator) -> tuple[int, int]:
    """(width, height) of the engine's frames: the renderer's size (256 for AniTalker), or what a test
    engine says."""
    size = getattr(animator, "size", None)
    if size is None:
        models = getattr(animator, "models", None)
        size = models.stage1.dims.size if models is not None else 256
    return (size, size) if isinstance(size, int) else tuple(size)


class AvatarVideo(VideoGenerator):
    """A livekit-agents VideoGenerator that runs the engine in this process.

    push_audio: rtc.AudioFrame at any rate and channel count, or AudioSegmentEnd. clear_buffer: drops
    queued speech; the next frame is silent. Iterating (once, by the runner) yields rtc.VideoFrame at
    25 fps, the rtc.AudioFrame it plays after each speaking frame, and AudioSegmentEnd after a segment's
    last frame. session: the Session it wraps (its metrics: session.summary()). video_size: publish at
    another size (frames are scaled). preempt_idle: see streaming.feed (an answer from idle does not wait behind idle silence)."""

    def __init__(self, animator, *, video_size: tuple[int, int] | None = None, time_source=None,
                 preempt_idle: bool = True, **session):
        self.session = Session(animator, time_source=time_source, preempt_idle=preempt_idle, **session)
        self.speech = Speech(self.session)
        self.size = tuple(video_size) if video_size else _image_size(animator)
        self._run: asyncio.Task | None = None
        self._iterated = False
        self._counted = asyncio.Event()     # set while no AudioFrame is out with the runner, uncounted
        self._counted.set()

    async def push_audio(self, frame: rtc.AudioFrame | AudioSegmentEnd) -> None:
        if isinstance(frame, AudioSegmentEnd):
            self.speech.end()
            return
        self.speech.push(from_pcm16(frame.data, frame.num_channels), frame.sample_rate)

    async def clear_buffer(self) -> None:
        """The runner reads its playback position right after this returns, but it adds an AudioFrame's
        duration only once its synchronizer has taken the frame (which awaits the AudioSource, and a barge-in
        can land in that await). The frame is played all the same, so wait until the runner comes back for
        the next item: the position then counts it, and the runner's reset to 0 is not undone by a late add."""
        self.speech.interrupt()
        try:                            # bounded: a runner that stopped iterating never comes back
            await asyncio.wait_for(self._counted.wait(), 1.0)
        except asyncio.TimeoutError:
            pass

    def __aiter__(self) -> AsyncIterator[rtc.VideoFrame | rtc.AudioFrame | AudioSegmentEnd]:
        return self._stream()

    async def _stream(self):
        if self._iterated:
            raise RuntimeError("an AvatarVideo is iterated once, by one AvatarRunner")
        self._iterated = True
        self._run = asyncio.create_task(self.session.run(stop_at_end=False))
        try:
            async for f in played(self.session, self._run):
                yield self._video_frame(f.image)
                if self.speech.live(f.meta.get("tags")):
                    hi = f.meta["audio48k"]
                    self._counted.clear()
                    yield rtc.AudioFrame(pcm16(hi), OUT_RATE, 1, len(hi))
                    self._counted.set()
                for _ in self.speech.finished(f.meta.get("ended")):
                    yield AudioSegmentEnd()
        finally:
            self._counted.set()         # a runner that stops iterating counts nothing more
            await self.aclose()

    def _video_frame(self, image: np.ndarray) -> rtc.VideoFrame:
        h, w = image.shape[:2]
        if (w, h) != self.size:        # the track was published at self.size; keep every frame at it
            import cv2
            image = cv2.resize(image, self.size, interpolation=cv2.INTER_AREA)
            w, h = self.size
        return rtc.VideoFrame(w, h, rtc.VideoBufferType.RGB24, np.ascontiguousarray(image).tobytes())

    async def aclose(self) -> None:
        """Stop the session (the worker thread ends with it)."""
        run, self._run = self._run, None
        if run is not None and not run.done():
            self.session.stop()
            await asyncio.shield(run)


def avatar_options(video: AvatarVideo) -> AvatarOptions:
    """What the runner publishes: the engine's frame size at 25 fps, 48 kHz mono audio."""
    return AvatarOptions(video_width=video.size[0], video_height=video.size[1], video_fps=FPS,
                         audio_sample_rate=OUT_RATE, audio_channels=1)


class AvatarSession(_AvatarSession):
    """The avatar in an AgentSession, published by the agent itself (no second participant, no cloud).

    start(agent_session, room) puts a QueueAudioOutput at the tail of the session's audio output (so
    transcript synchronisation and recording wrappers stay in place) and runs an AvatarRunner in this
    process. animator: the engine (streaming.plugins.load_animator(portrait) makes one)."""

    def __init__(self, animator, *, video_size: tuple[int, int] | None = None, **session) -> None:
        super().__init__()
        self.video = AvatarVideo(animator, video_size=video_size, **session)
        self.audio: QueueAudioOutput | None = None
        self.runner: AvatarRunner | None = None

    @property
    def avatar_identity(self) -> str:
        # the avatar's tracks are published by the agent's own participant
        return self._room.local_participant.identity if self._room is not None else ""

    @property
    def provider(self) -> str:
        return "anitalker"

    async def start(self, agent_session, room: rtc.Room) -> None:
        await super().start(agent_session, room)
        # any sample rate: the session resamples each segment once, on its own stream
        self.audio = QueueAudioOutput(sample_rate=None, wait_playback_start=True)
        self.runner = AvatarRunner(room, audio_recv=self.audio, video_gen=self.video,
                                   options=avatar_options(self.video))
        await self.runner.start()
        agent_session.output.replace_audio_tail(self.audio)

    async def aclose(self) -> None:
        if self.runner is not None:
            await self.runner.aclose()
            self.runner = None
        await self.video.aclose()
        # The base class would remove the avatar's participant from the room, which here is the agent
        # itself: detach the room first (what else it set up is undone by super().aclose()).
        if self._room is not None:
            self._room.off("connection_state_changed", self._on_connection_state_changed)
            self._room = None
        await super().aclose()
