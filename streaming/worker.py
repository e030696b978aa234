"""The engine worker: one thread owns the models and does the work of every session attached to it.

    session A --Port.submit--> queue A -+
    session B --Port.submit--> queue B -+--> rounds: at most one item per port --> results on each loop
    worker.call(fn) -------------------+     (one session's flood cannot starve another)

A session attaches its Animator (the engine state that is its own; the models are shared) with the
callbacks that take its results; results go back to the session's event loop with call_soon_threadsafe.
An engine that makes frames one at a time (push_iter) has each frame handed over as soon as it exists,
so the first frame of a hop can be shown while the rest are drawn. Work queued under an older generation
(before an interrupt) is skipped.

Batching (``batch=True``): within a round, the hops of all sessions are computed together where the
animator offers its phases (accept / plan / commit / frames, avatar/animator.py): DDIM windows with the
same key are sampled as one stacked batch and the frames of all sessions are rendered in one call
(avatar/batch.py). The default is to batch on CUDA only, where one call over many sessions' rows fills the GPU.
On a CPU a batch ends every session's hop when the last one's ends and holds every session's activations at
once: measured with 8 tiny sessions on 2 cores (README, "Many avatars on one engine"), batching drew more
pictures in all but the first frame after speech came about 3 s late instead of about 1 s, at 3x the memory.

Failures are per port: an exception from one item is reported to its session and the worker goes on (the
session then resets its engine). FATAL_AFTER failures in a row (or running out of memory) mean that
session's engine cannot run: it is told so (fatal) and its port serves no more; other sessions go on.
"""
from __future__ import annotations

import collections
import concurrent.futures
import threading
import time

FATAL_AFTER = 3


class Port:
    """One session's place on a worker. sent / done count items submitted / answered (or discarded), so
    sent - done are still in the worker; the session increments done when the answer arrives.
    on_frame(gen, frame), on_done(gen, kind, samples, seconds), on_error(gen, exc, fatal) run on the
    session's loop; on_done says how much audio the item held and how long it took on the clock ``now``."""

    def __init__(self, worker, animator, loop, current_gen, on_frame, on_done, on_error, now):
        self.worker, self.animator, self.loop, self.current_gen, self.now = worker, animator, loop, current_gen, now
        self.on_frame, self.on_done, self.on_error = on_frame, on_done, on_error
        self._q: collections.deque = collections.deque()
        self.sent = 0
        self.done = 0
        self.failures = 0               # failed items in a row
        self.dead = False               # fatal failure, or the loop closed: served no more

    def submit(self, kind: str, gen: int, payload=None) -> None:
        self.sent += 1
        self.worker._put(self, (kind, gen, payload))

    def discard_queued(self) -> None:
        """Forget the items not started yet (an interrupt); they count as answered."""
        with self.worker._cv:
            n = len(self._q)
            self._q.clear()
        self.done += n

    def qsize(self) -> int:
        return len(self._q)

    def detach(self, timeout: float = 5.0) -> None:
        """Leave the worker: queued items are dropped; returns once an item in progress has finished, so
        the animator is no longer in use (or after ``timeout``)."""
        self.worker._detach(self, timeout)

    def answer(self, fn, *args) -> bool:
        """Hand a result to the loop; False (and the port is dead) when the loop has closed."""
        try:
            self.loop.call_soon_threadsafe(fn, *args)
            return True
        except RuntimeError:
            self.dead = True
            return False

    def fail(self, gen: int, kind: str, e: BaseException) -> None:
        """An item failed: reported to the session; fatal after FATAL_AFTER in a row or out of memory."""
        self.failures += 1
        fatal = self.failures >= FATAL_AFTER or isinstance(e, MemoryError)
        self.answer(self.on_error, gen, e, fatal)
        if fatal:
            self.answer(self.on_done, gen, kind, 0, 0.0)
            self.dead = True


class EngineWorker:
    """A thread that serves every attached Port in fair rounds. batch: compute a round's hops together
    (None: on CUDA only, see the module doc); the models' device is read from the first animator."""

    def __init__(self, *, batch: bool | None = None):
        self.batch = batch
        self._ports: list[Port] = []
        self._calls: list = []
        self._serving: set = set()
        self._stopping = False
        self._cv = threading.Condition()
        self.rounds = 0
        self._thread = threading.Thread(target=self._run, name="animator", daemon=True)

    def start(self) -> EngineWorker:
        self._thread.start()
        return self

    def attach(self, animator, loop, current_gen, on_frame, on_done, on_error, now=time.monotonic) -> Port:
        port = Port(self, animator, loop, current_gen, on_frame, on_done, on_error, now)
        with self._cv:
            self._ports.append(port)
        return port

    @property
    def sessions(self) -> int:
        return len(self._ports)

    def call(self, fn, *args) -> concurrent.futures.Future:
        """Run fn(*args) on the worker's thread, between rounds (e.g. encode a new portrait with the
        models the worker owns) -> a Future of its result."""
        fut: concurrent.futures.Future = concurrent.futures.Future()
        with self._cv:
            if self._stopping:
                raise RuntimeError("the engine worker has stopped")
            self._calls.append((fn, args, fut))
            self._cv.notify_all()
        return fut

    def stop(self, timeout: float = 5.0) -> None:
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _put(self, port: Port, item) -> None:
        with self._cv:
            port._q.append(item)
            self._cv.notify_all()

    def _detach(self, port: Port, timeout: float) -> None:
        with self._cv:
            if port in self._ports:
                self._ports.remove(port)
            port._q.clear()
            if threading.current_thread() is not self._thread:
                self._cv.wait_for(lambda: port not in self._serving, timeout)

    # ---- the thread ----------------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._cv:
                self._cv.wait_for(lambda: self._stopping or self._calls or any(p._q for p in self._ports))
                if self._stopping:
                    for _, _, fut in self._calls:
                        fut.cancel()
                    return
                calls, self._calls = self._calls, []
                # one item per port, starting one port further each round so no session is always first
                k = self.rounds % len(self._ports) if self._ports else 0
                work = [(p, p._q.popleft()) for p in self._ports[k:] + self._ports[:k] if p._q and not p.dead]
                self._serving = {p for p, _ in work}
                self.rounds += 1
            for fn, args, fut in calls:
                if fut.set_running_or_notify_cancel():
                    try:
                        fut.set_result(fn(*args))
                    except BaseException as e:      # noqa: BLE001 -- handed to the caller
                        fut.set_exception(e)
            try:
                if work:
                    self._round(work)
            except Exception as e:              # noqa: BLE001 -- a fault of the worker itself, not of one
                for port, (kind, gen, _) in work:   # item: its sessions end with it rather than wait forever
                    if not port.dead:
                        port.answer(port.on_error, gen, e, True)
                        port.dead = True
            finally:
                with self._cv:
                    self._serving = set()
                    self._cv.notify_all()

    def _batching(self, work) -> bool:
        if self.batch is None:
            models = getattr(work[0][0].animator, "models", None)
            self.batch = models is not None and models.device.type == "cuda"
        return self.batch and len(work) > 1

    def _round(self, work) -> None:
        if self._batching(work):
            from avatar.batch import run_together
            work = run_together(work)           # what it could not batch comes back, done one by one
        for port, item in work:
            self._serve(port, item)

    def _serve(self, port: Port, item) -> None:
        kind, gen, payload = item
        t0 = port.now()
        try:
            if gen == port.current_gen():        # skip work queued before an interrupt
                self._do(port, kind, gen, payload)
                if kind != "reset":              # the session resets after each failure
                    port.failures = 0
        except Exception as e:                   # noqa: BLE001 -- reported to the session, which decides
            port.fail(gen, kind, e)
            if port.dead:
                return
        samples = len(payload.samples) if kind == "push" else 0
        port.answer(port.on_done, gen, kind, samples, port.now() - t0)

    @staticmethod
    def _do(port: Port, kind: str, gen: int, payload) -> None:
        a = port.animator
        if kind == "reset":
            a.reset(payload)
            return
        if kind == "push":
            frames = a.push_iter(payload) if hasattr(a, "push_iter") else a.push(payload)
        else:
            frames = a.flush_iter() if hasattr(a, "flush_iter") else a.flush()
        for frame in frames:
            if not port.answer(port.on_frame, gen, frame):
                return
