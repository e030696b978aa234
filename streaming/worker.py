"""The engine worker: one thread owns an Animator and does what the session gives it, in order.

Results go back to the event loop with call_soon_threadsafe. An engine that makes frames one at a time
(push_iter) has each frame handed over as soon as it exists, so the first frame of a hop can be shown
while the rest are drawn. Work queued under an older generation (before an interrupt) is skipped.

An exception from one item is reported and the worker goes on; the session then resets the engine.
FATAL_AFTER failures in a row (or running out of memory) mean the models cannot run: the worker reports
that as fatal and stops.
"""
from __future__ import annotations

import queue
import threading
import time

_STOP = object()
FATAL_AFTER = 3


class EngineWorker:
    """on_frame(gen, frame), on_done(gen, kind, samples, seconds), on_error(gen, exc, fatal) run on the
    loop's thread; on_done says how much audio the item held and how long it took on the clock ``now``."""

    def __init__(self, animator, loop, current_gen, on_frame, on_done, on_error, now=time.monotonic):
        self.animator, self.loop, self.current_gen, self.now = animator, loop, current_gen, now
        self.on_frame, self.on_done, self.on_error = on_frame, on_done, on_error
        self._q: queue.Queue = queue.Queue()
        self.sent = 0                   # items submitted
        self.done = 0                   # items answered (or discarded): sent - done are in the worker
        self._thread = threading.Thread(target=self._run, name="animator", daemon=True)

    def start(self) -> EngineWorker:
        self._thread.start()
        return self

    def submit(self, kind: str, gen: int, payload=None) -> None:
        self.sent += 1
        self._q.put((kind, gen, payload))

    def discard_queued(self) -> None:
        """Forget the items not started yet (an interrupt); they count as answered."""
        while True:
            try:
                item = self._q.get_nowait()
            except queue.Empty:
                return
            if item is _STOP:
                self._q.put(item)
                return
            self.done += 1

    def qsize(self) -> int:
        return self._q.qsize()

    def stop(self, timeout: float = 5.0) -> None:
        self._q.put(_STOP)
        if self._thread.is_alive():
            self._thread.join(timeout)

    # ---- the thread ----------------------------------------------------------------------------------
    def _run(self) -> None:
        failures = 0
        while True:
            item = self._q.get()
            if item is _STOP:
                return
            kind, gen, payload = item
            t0 = self.now()
            try:
                if gen == self.current_gen():        # skip work queued before an interrupt
                    self._do(kind, gen, payload)
                    if kind != "reset":              # the session resets after each failure
                        failures = 0
            except Exception as e:                   # noqa: BLE001 -- reported to the session, which decides
                failures += 1
                fatal = failures >= FATAL_AFTER or isinstance(e, MemoryError)
                self._answer(self.on_error, gen, e, fatal)
                if fatal:
                    self._answer(self.on_done, gen, kind, 0, 0.0)
                    return
            samples = len(payload.samples) if kind == "push" else 0
            if not self._answer(self.on_done, gen, kind, samples, self.now() - t0):
                return

    def _do(self, kind: str, gen: int, payload) -> None:
        a = self.animator
        if kind == "reset":
            a.reset(payload)
            return
        if kind == "push":
            frames = a.push_iter(payload) if hasattr(a, "push_iter") else a.push(payload)
        else:
            frames = a.flush_iter() if hasattr(a, "flush_iter") else a.flush()
        for frame in frames:
            if not self._answer(self.on_frame, gen, frame):
                return

    def _answer(self, fn, *args) -> bool:
        """Hand a result to the loop; False when the loop has closed (the session gave up waiting)."""
        try:
            self.loop.call_soon_threadsafe(fn, *args)
            return True
        except RuntimeError:
            return False
