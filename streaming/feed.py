"""The feed policy of one session: which audio the engine gets, and when.

Audio waits here (pushed pieces and a source's chunks) until the clock's tick asks for it. Each tick the
engine is given audio only while fewer than ``lead`` frames are in flight (fed but not yet shown), so
nothing is ever computed further ahead of the viewer than the lead, idle silence included, and a file or
TTS plays at exactly 25 fps with no second pacer.

- Lead: the engine's own latency (hop + lookahead) plus a jitter margin. Every slot the engine misses
  lends it one more frame, up to ``max_lead``, so an engine whose compute takes longer than declared is
  still fed early enough; once a second, lead the output did not need all second long is paid back.
- Idle: when no audio waits, silence is fed (marked idle) so the avatar keeps moving from the same model.
  Pushed and live audio come in pieces; a gap of a few frames between them is not idle. When speech
  arrives while only idle silence is in flight (fed, not shown yet), that silence is dropped (preempted)
  and the engine starts the speech at once, from the picture shown last: an answer does not wait behind
  up to a lead of idling.
- Live audio (a microphone) is bounded: beyond LIVE_SLACK_FRAMES waiting, its oldest samples are dropped
  and counted. Other audio (TTS, files, whole utterances) always plays in full.
- Output sound: audio that came at another rate than 16 kHz carries its 48 kHz version along (Piece.hi, three
  samples for each one); a shown frame is told it (Released.hi) when the whole frame had one.
- Tags: pushed audio may carry a tag; the frames that hold it report it, and ``end_segment`` marks the
  last sample of a tag, so a caller learns when a segment has been played (and up to where).
"""
from __future__ import annotations

import asyncio
import collections
from dataclasses import dataclass

import numpy as np

from avatar.timebase import FPS, SAMPLE_RATE, SAMPLES_PER_FRAME, AudioChunk

END = object()             # the source is exhausted (reader -> feed)
JITTER_FRAMES = 3          # lead beyond the engine's own latency, against scheduling jitter
MAX_EXTRA_FRAMES = 50      # lead an engine slower than it declared may borrow (2 s): latency stays bounded
LIVE_SLACK_FRAMES = 5      # a live source may queue this much before its oldest audio is dropped
PREEMPT_FRAMES = 3         # idle silence in flight worth dropping for speech that waits behind it


@dataclass
class Piece:
    samples: np.ndarray
    arrival: float          # when it reached the session (the time source's clock); a file's: when taken
    live: bool = False
    tag: object = None
    mark: bool = False      # no samples: the end of `tag`'s segment
    hi: np.ndarray | None = None    # the same audio at 48 kHz, 3 samples for each one (or None)


@dataclass
class Released:
    """What one shown engine frame held: when its newest source audio arrived (None: idle silence only),
    the tags of that audio, and the tags whose segment ended in it."""
    arrival: float | None
    tags: frozenset
    ended: tuple
    lo: np.ndarray | None = None    # the 640 samples fed, and their 1,920 at 48 kHz, when all of them had it
    hi: np.ndarray | None = None


class Feed:
    def __init__(self, time_source, lead: int, max_lead: int | None = None, input_chunks: int = 64):
        self.time = time_source
        self.lead = lead
        self.max_lead = max(lead, lead + MAX_EXTRA_FRAMES if max_lead is None else max_lead)
        self.extra = 0                          # frames of lead borrowed after missed slots
        self.inq: asyncio.Queue = asyncio.Queue(maxsize=input_chunks)
        self.paced = True                       # input arrives in real time (pushed, live): take it all
        self.pending: collections.deque[Piece] = collections.deque()
        self.arrivals = collections.deque()     # (first, end sample, arrival, tag) of fed source audio
        self.marks = collections.deque()        # (end sample, tag) of fed segment ends
        self.his = collections.deque()          # (first sample, samples, their 48 kHz) of fed pieces with hi
        self.fed = 0                            # samples given to the engine (the next chunk's pts)
        self.released = 0                       # engine samples shown
        self.slot_time = 0.0
        self.source_done = False
        self.flushing = False
        self.dropped_samples = 0
        self._last_arrival = None
        self._min_out = 0
        self._work = collections.deque(maxlen=64)   # (samples, seconds) of the engine's recent items

    @property
    def in_flight(self) -> int:
        return self.fed - self.released

    @property
    def lead_now(self) -> int:
        return self.lead + self.extra

    # ---- input ---------------------------------------------------------------------------------------
    def put_nowait(self, piece: Piece) -> None:
        self.inq.put_nowait(piece)

    def _take(self) -> bool:
        """Move one queued piece to pending; False when there is none."""
        if self.source_done or self.inq.empty():
            return False
        item = self.inq.get_nowait()
        if item is END:
            self.source_done = True
            return False
        if not self.paced:
            # A file is read ahead into the input queue and taken as the lead allows: its audio arrives
            # when it is taken, not when it was read (else latency would count the read-ahead, ~5 s)
            item.arrival = self.time.now()
        self.pending.append(item)
        if not item.mark:
            self._last_arrival = item.arrival
        return True

    def _drop_late_live(self) -> None:
        """Bounded latency beats completeness for live audio: beyond a few frames waiting, its oldest goes."""
        excess = sum(len(p.samples) for p in self.pending if p.live) - LIVE_SLACK_FRAMES * SAMPLES_PER_FRAME
        if excess <= 0:
            return
        kept = collections.deque()
        for p in self.pending:
            if p.live and excess > 0:
                cut = min(len(p.samples), excess)
                excess -= cut
                self.dropped_samples += cut
                p.samples = p.samples[cut:]
                p.hi = p.hi[3 * cut:] if p.hi is not None else None
                if not len(p.samples):
                    continue
            kept.append(p)
        self.pending = kept

    # ---- each slot -----------------------------------------------------------------------------------
    def note_work(self, samples: int, seconds: float) -> None:
        self._work.append((samples, seconds))

    @property
    def load(self) -> float | None:
        """The engine's compute time per second of audio, over its recent work (at least 1 s of audio);
        1 or more: it cannot keep up with real time, and more lead would only add latency."""
        samples = sum(n for n, _ in self._work)
        return sum(t for _, t in self._work) * SAMPLE_RATE / samples if samples >= SAMPLE_RATE else None

    def adapt(self, k: int, out_len: int, missed: bool, engine_idle: bool = False, started: bool = True) -> None:
        """Learn the lead from the slot just decided. A slot the engine missed although it had been given
        its whole lead lends it a frame (bounded), when more audio is what it waits for (it is idle), or
        when it is still computing but keeps up on average (its load < 1: more lead hides its compute
        time; an engine slower than real time gains nothing from more lead, nor does one still starting
        up, before the first frame is shown). A slot missed for want of input is not the engine's. Once
        a second, output the engine kept beyond the jitter margin all second long is paid back."""
        self._min_out = min(self._min_out, out_len)
        if k % FPS == 0:
            self.extra -= min(self.extra, max(0, self._min_out - JITTER_FRAMES))
            self._min_out = out_len
        starved = self.in_flight < self.lead_now * SAMPLES_PER_FRAME
        load = self.load
        waits = engine_idle or (started and (load is None or load < 1))
        if missed and not starved and waits and self.lead_now < self.max_lead:
            self.extra += 1

    def take_input(self) -> None:
        """Pushed and live audio is in memory already: take all of it (a file is read as the lead allows)."""
        if self.paced:
            while self._take():
                pass
            self._drop_late_live()

    def should_preempt(self) -> bool:
        """Speech waits while what is in flight is idle silence only (PREEMPT_FRAMES of it at least)."""
        if self.in_flight < PREEMPT_FRAMES * SAMPLES_PER_FRAME:
            return False
        if any(end > self.released for _, end, _, _ in self.arrivals):
            return False
        return any(not p.mark and len(p.samples) for p in self.pending)

    def tick(self, slot_time: float, stop_at_end: bool) -> list[tuple[str, AudioChunk | None]]:
        """The engine's work for this slot: at most one push of source audio (one worker round trip per
        slot, however small the pieces), then idle silence up to the lead, or the final flush."""
        self.slot_time = slot_time
        self.take_input()
        jobs = []
        budget = self.lead_now * SAMPLES_PER_FRAME - self.in_flight
        pieces, start = [], self.fed
        while (self.pending or self._take()) and (budget > 0 or self.pending[0].mark):
            p = self.pending.popleft()
            at = start + sum(len(x) for x in pieces)
            if p.mark:
                self.marks.append((at, p.tag))
                continue
            x, hi = p.samples, p.hi
            if len(x) > budget:
                self.pending.appendleft(Piece(x[budget:], p.arrival, p.live, p.tag,
                                              hi=hi[3 * budget:] if hi is not None else None))
                x, hi = x[:budget], hi[:3 * budget] if hi is not None else None
            self.arrivals.append((at, at + len(x), p.arrival, p.tag))
            if hi is not None:
                self.his.append((at, x, hi))
            pieces.append(x)
            budget -= len(x)
        if pieces:
            jobs.append(("push", self._chunk(np.concatenate(pieces) if len(pieces) > 1 else pieces[0])))
        if self.pending or self.flushing:
            return jobs
        if self.source_done and stop_at_end:
            self.flushing = True
            return jobs + [("flush", None)]
        # A source that has said nothing yet is waited for (a file starts with its first sample, not with
        # idle silence); pushed input idles from the start. Then a gap of a few frames is not a pause.
        if self._last_arrival is None:
            quiet = self.paced
        else:
            quiet = self.time.now() - self._last_arrival > JITTER_FRAMES / FPS
        if quiet and budget >= SAMPLES_PER_FRAME:
            n = budget // SAMPLES_PER_FRAME * SAMPLES_PER_FRAME
            # silence is silence at 48 kHz too: the frame that ends an utterance keeps its 48 kHz speech
            self.his.append((self.fed, np.zeros(n, np.float32), np.zeros(3 * n, np.float32)))
            jobs.append(("push", self._chunk(np.zeros(n, np.float32), idle=True)))
        return jobs

    def _chunk(self, x: np.ndarray, idle: bool = False) -> AudioChunk:
        chunk = AudioChunk(x, self.fed, self.due(self.fed), idle)
        self.fed += len(x)
        return chunk

    def due(self, sample: int) -> float:
        """When the frame holding this sample is to be shown: the frame holding `released` goes out at this
        slot, the ones after it a period apart."""
        return self.slot_time + (sample // SAMPLES_PER_FRAME - self.released // SAMPLES_PER_FRAME) / FPS

    def release(self) -> Released:
        """One engine frame was shown (or refused): account its samples, say what it held."""
        start = self.released
        self.released += SAMPLES_PER_FRAME
        while self.arrivals and self.arrivals[0][1] <= start:
            self.arrivals.popleft()
        arrival, tags = None, set()
        for first, _, t_in, tag in self.arrivals:
            if first >= self.released:
                break
            arrival = t_in
            if tag is not None:
                tags.add(tag)
        ended = []
        while self.marks and self.marks[0][0] <= self.released:
            ended.append(self.marks.popleft()[1])
        return Released(arrival, frozenset(tags), tuple(ended), *self._hi(start))

    def _hi(self, start: int) -> tuple:
        """(lo, hi) of the frame [start, start + 640) when fed pieces with hi cover all of it, else (None, None)."""
        while self.his and self.his[0][0] + len(self.his[0][1]) <= start:
            self.his.popleft()
        lo, hi, at = [], [], start
        for first, x, h in self.his:
            if first > at or at >= self.released:
                break
            a, b = at - first, min(len(x), self.released - first)
            lo.append(x[a:b])
            hi.append(h[3 * a:3 * b])
            at = first + b
        if at < self.released:
            return None, None
        return np.concatenate(lo), np.concatenate(hi)

    def clear(self, queued: bool = True) -> None:
        """Drop every in-flight sample (the engine restarts from what was shown) and, for an interrupt,
        every queued one too (queued=False: an engine error lost only what it was computing)."""
        while queued and not self.inq.empty():
            if self.inq.get_nowait() is END:
                self.source_done = True
        if queued:
            self.pending.clear()
        self.arrivals.clear()
        self.marks.clear()
        self.his.clear()
        self.fed = self.released
        self.flushing = False
