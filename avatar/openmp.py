"""The OpenMP worker threads torch leaves on a thread that is done with the models.

GNU OpenMP (the one torch's Linux wheels ship) spins only 100 times instead of 300,000 before a waiting
thread sleeps whenever it manages more threads than the machine has CPUs, and every thread that once ran
torch in parallel keeps its idle workers. The thread that loaded and measured the models (the event loop's)
keeps one such pool, the engine's thread makes another, and on 2 cores the engine's threads then sleep and
wake at each of the renderer's hundreds of barriers (5,200 context switches a second instead of 41): the
full-size fast engine rendered a frame in 62 ms instead of 51 and drew 7.3 of 25 frames/s instead of 11.0
(bench/omp_pools.py). Imports no torch: a process without it has no pool to release.
"""
from __future__ import annotations

import ctypes

OMP_PAUSE_SOFT = 1


def _libgomp():
    """GNU OpenMP as this process loaded it (torch's own copy), or None (another OpenMP, none, not Linux)."""
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if "libgomp" in line and "/" in line}
    except OSError:
        return None
    for path in sorted(paths):
        lib = ctypes.CDLL(path)                  # dlopen of a loaded path hands back that library
        if hasattr(lib, "omp_pause_resource_all"):
            return lib
    return None


def release_openmp_threads() -> bool:
    """Let the calling thread's idle OpenMP worker threads go (OpenMP 5's omp_pause_resource_all, soft; a
    later parallel region on this thread starts new ones) -> whether a GNU OpenMP was there to ask. The
    event loop's thread calls it when a session starts (Session.run): from then on the models run on the
    engine's thread."""
    lib = _libgomp()
    if lib is None:
        return False
    lib.omp_pause_resource_all(OMP_PAUSE_SOFT)
    return True
