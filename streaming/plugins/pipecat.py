"""The avatar as a Pipecat video service (pipecat-ai 1.14; pip install "anitalker-live[pipecat]").

Put it after the TTS and before the output transport (examples/pipecat_bot.py is a whole bot):

    avatar = AvatarVideoService(load_animator("me.jpg"))
    Pipeline([transport.input(), stt, user_agg, llm, tts, avatar, transport.output(), assistant_agg])

It consumes TTSAudioRawFrame (any rate, mono or stereo) and emits, 25 times a second, an
OutputImageRawFrame followed, while it speaks, by a TTSAudioRawFrame with exactly that frame's 1,920
samples at 48 kHz (the TTS's own sound, resampled once if it was not 48 kHz: the models hear 16 kHz, which
would sound muffled), as pipecat's own video services emit the avatar's picture and
voice in place of the TTS audio. Between turns it keeps emitting images (idle motion) without audio, so
the transport's bot-speaking detection stays right.

Frames are paced by a Session (streaming/session.py) at real time, as the output transport plays them;
pacing here is what lets an interrupt take effect within one frame: InterruptionFrame and
UserStartedSpeakingFrame drop all queued speech and the next frame is silent.

Order. The transport handles frames in the order they arrive, so a TTSStoppedFrame (or an EndFrame) is
held back until the frame holding the last sample of the speech before it has been emitted, and frames
arriving after a held one wait behind it. Every other frame passes straight through; system frames never
wait. An EndFrame is passed on after the speech before it has played, and the session stops with it.
"""
from __future__ import annotations

import asyncio
import collections

try:
    from pipecat.frames.frames import (CancelFrame, EndFrame, Frame, InterruptionFrame, OutputImageRawFrame,
                                       StartFrame, SystemFrame, TTSAudioRawFrame, TTSStartedFrame,
                                       TTSStoppedFrame, UserStartedSpeakingFrame)
    from pipecat.processors.frame_processor import FrameDirection, FrameProcessor
except ModuleNotFoundError as e:
    raise ModuleNotFoundError(f"{e.msg}: this adapter needs pipecat-ai 1.14; "
                              'pip install "anitalker-live[pipecat]"') from e

from avatar.timebase import OUT_RATE

from ..session import Session
from . import Speech, from_pcm16, pcm16, played

__all__ = ["AvatarVideoService"]


class AvatarVideoService(FrameProcessor):
    """animator: the engine (streaming.plugins.load_animator(portrait) makes one). session: the Session
    it wraps (its metrics: service.session.summary()); preempt_idle: see streaming.feed (an answer from idle does not wait behind idle silence)."""

    def __init__(self, animator, *, time_source=None, preempt_idle: bool = True, name: str | None = None,
                 **session):
        super().__init__(name=name)
        self.session = Session(animator, time_source=time_source, preempt_idle=preempt_idle, **session)
        self.speech = Speech(self.session)
        self._contexts: dict[int, str | None] = {}   # segment tag -> TTS context id
        self._held = collections.deque()              # (tag to wait for or None, frame, direction)
        self._run: asyncio.Task | None = None
        self._play: asyncio.Task | None = None
        self._ended: dict[int, asyncio.Event] = {}    # segments an EndFrame waits for

    async def process_frame(self, frame: Frame, direction: FrameDirection):
        await super().process_frame(frame, direction)
        if isinstance(frame, StartFrame):
            await self.push_frame(frame, direction)
            self._start()
        elif isinstance(frame, (InterruptionFrame, UserStartedSpeakingFrame)):
            self._interrupt()
            await self.push_frame(frame, direction)
            await self._release_uninterruptible()
        elif isinstance(frame, CancelFrame):
            await self._stop()
            await self.push_frame(frame, direction)
        elif direction == FrameDirection.UPSTREAM or isinstance(frame, SystemFrame):
            await self.push_frame(frame, direction)
        elif isinstance(frame, TTSAudioRawFrame):
            tag = self.speech.push(from_pcm16(frame.audio, frame.num_channels), frame.sample_rate)
            self._contexts.setdefault(tag, frame.context_id)
        elif isinstance(frame, EndFrame):
            await self._wait_played(self.speech.end())
            await self._stop()
            await self.push_frame(frame, direction)
        elif isinstance(frame, (TTSStoppedFrame, TTSStartedFrame)):
            # a TTS that sends no TTSStoppedFrame still starts a new segment with its next TTSStartedFrame
            tag = self.speech.end()
            if tag is not None or self._held:
                self._held.append((tag, frame, direction))
            else:
                await self.push_frame(frame, direction)
        elif self._held:
            self._held.append((None, frame, direction))
        else:
            await self.push_frame(frame, direction)

    # ---- the session and the task that emits its frames --------------------------------------------
    def _start(self) -> None:
        if self._run is None:
            self._run = self.create_task(self.session.run(stop_at_end=False), "anitalker-session")
            self._play = self.create_task(self._emit(), "anitalker-frames")

    async def _emit(self) -> None:
        try:
            await self._emit_frames()
        except Exception as e:                  # the engine failed for good: say so upstream, fatally
            await self.push_error(f"the avatar engine stopped: {e}", exception=e,
                                  force_treat_as_permanent=True)

    async def _emit_frames(self) -> None:
        async for f in played(self.session, self._run):
            h, w = f.image.shape[:2]
            await self.push_frame(OutputImageRawFrame(image=f.image.tobytes(), size=(w, h), format="RGB"))
            tags = self.speech.live(f.meta.get("tags"))
            if tags:
                await self.push_frame(TTSAudioRawFrame(audio=pcm16(f.meta["audio48k"]), sample_rate=OUT_RATE,
                                                       num_channels=1, context_id=self._contexts.get(tags[0])))
            for tag in self.speech.finished(f.meta.get("ended")):
                self._contexts.pop(tag, None)
                await self._release(tag)

    async def _release(self, tag: int) -> None:
        """Segment `tag` has played: pass on what waited for it and what queued behind it."""
        if tag in self._ended:
            self._ended.pop(tag).set()
        while self._held and (self._held[0][0] is None or self._held[0][0] <= tag):
            _, frame, direction = self._held.popleft()
            await self.push_frame(frame, direction)

    async def _wait_played(self, tag: int | None) -> None:
        """Until segment `tag` (default: the last one held frames wait for) has played, or the session ended."""
        if tag is None:
            tag = max((t for t, _, _ in self._held if t is not None), default=None)
        if tag is not None and self._run is not None and not self._run.done():
            done = self._ended.setdefault(tag, asyncio.Event())
            waiter = asyncio.ensure_future(done.wait())
            await asyncio.wait({waiter, self._run}, return_when=asyncio.FIRST_COMPLETED)
            waiter.cancel()
        while self._held:                       # the session ended early: what waited goes on in order
            _, frame, direction = self._held.popleft()
            await self.push_frame(frame, direction)

    def _interrupt(self) -> None:
        self.speech.interrupt()
        self._contexts.clear()
        for event in self._ended.values():     # an EndFrame waiting for dropped speech goes on now
            event.set()
        self._ended.clear()

    async def _release_uninterruptible(self) -> None:
        """Interruptions drop queued data and control frames, as pipecat's own queues do; frames marked
        uninterruptible are passed on, since the speech they waited for is gone."""
        held, self._held = self._held, collections.deque()
        for _, frame, direction in held:
            if not frame.interruptible:
                await self.push_frame(frame, direction)

    async def _stop(self) -> None:
        if self._run is not None and not self._run.done():
            self.session.stop()
            await asyncio.wait({self._run})
        if self._play is not None:
            await self.cancel_task(self._play)
        self._run = self._play = None

    async def cleanup(self):
        await super().cleanup()
        await self._stop()
