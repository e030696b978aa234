"""The event loop's thread lets its idle OpenMP workers go when a session starts (avatar/openmp.py): with
them, GNU OpenMP manages more threads than a 2-core machine has CPUs and throttles the engine's threads.
Checked on the process's own threads, in a fresh interpreter (no pool from other tests)."""
from __future__ import annotations

import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="GNU OpenMP: Linux builds of torch")

SCRIPT = r"""
import asyncio, os, time
import torch
from avatar.openmp import release_openmp_threads

def tasks():
    return set(os.listdir("/proc/self/task"))

def ended(tids, timeout=5.0):
    # waits until some of tids have ended -> those that did
    end = time.monotonic() + timeout
    while not tids - tasks() and time.monotonic() < end:
        time.sleep(0.01)
    return tids - tasks()

def team():
    # a parallel region on this thread: GNU OpenMP starts a worker and keeps it (the pool); torch may
    # start a thread of its own with the first one
    before = tasks()
    torch.set_num_threads(2)
    torch.full((1 << 22,), 1.0).add_(1.0)
    return tasks() - before

new = team()
assert new, "no OpenMP worker appeared"
assert not ended(new, 0.2), "the worker went away by itself"
assert release_openmp_threads(), "torch's GNU OpenMP was not found"
assert ended(new), "release_openmp_threads left the workers running"
workers = team()                      # a later parallel region starts a new worker
assert workers, "no new OpenMP worker"

from streaming.clock import FakeTime
from streaming.session import Session
from streaming.testing import ToneAnimator

async def main():
    clock = FakeTime()
    async with Session(ToneAnimator(hop=10, latency_frames=10), time_source=clock) as session:
        frames = session.frames()
        await frames.__anext__()
        await frames.aclose()

asyncio.run(main())
assert ended(workers) == workers, "a session left the loop thread's OpenMP workers running"
print("ok")
"""


def test_idle_openmp_workers_are_released_when_a_session_starts():
    r = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]
