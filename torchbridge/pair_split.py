"""The thread count of ``relu_moments(..., compiled=True)``'s bulk (issue #13 thread policy) and
its ranges of pairs (a memory bound).

The bulk's steps (the argument checks' symmetry pass, each band of the first pass, the other
passes with the mirror image) run on the calling thread, each on torch's OpenMP team at
``Team.step``'s thread count: the compiled kernels take the calling thread's torch thread
count (inductor's ``cpp.dynamic_threads``, ``nmruntime.torch_support.KERNEL_OPTIONS``), as an
eager op does, and split each loop evenly between the team's threads.

Why torch's team. After any op torch runs on 2 threads, libgomp's worker spins for 7.7–9.9 ms
waiting for the next one (session 39). Python threads of our own, each at one intra-op thread
taking ranges as they came free, shared a core with that spinning worker after every 2-thread
torch op; the team's worker takes the next kernel's half instead. On the 2-core EPYC of issue
#13, p = 1024, 2 threads, medians of 25 (float32) and 15 (float64) calls interleaved with the
old way in one process (scratch ``/tmp/s40/ab.py``): float32 right after a 2-thread DVI call
11.84 vs 13.93 ms, after a 2-thread ``torch.exp`` 11.66 vs 13.75 ms, after 30 ms asleep 10.78
vs 11.44 ms, after another compiled call 11.35 vs 10.55 ms; float64 22.21 vs 26.09, 22.82 vs
26.87, 22.41 vs 25.25 and 22.73 vs 24.20 ms.

Why the load is read. An even split waits for its slowest thread: with a busy loop on the
other core and 2 threads forced, float64 took 97.5 ms against 41.8 ms at 1 thread (medians of
9, scratch ``/tmp/s40/load.py``); with the load read (``Team``), 41.7 ms at 2 threads.

Why the band steps are watched. A load that comes after the second read is not seen by it;
each band step then runs several times slower per pair than the fastest on record, and that
has the load read again (``Team.step``). A busy loop on the other core, unseen by both reads,
medians of 5–9 calls interleaved in one process (scratch ``/tmp/s41/mid.py``), 2 threads with
the watch / without it / 1 thread: float64 p = 1024 37.4 / 40.7 / 34.0 ms, p = 2048 181.5 /
291.9 / 161.7 ms, p = 4096 615.9 / 913.1 / 602.9 ms; float32 p = 2048 73.4 / 86.7 / 69.4 ms.
Without a load, 688 watched steps read the load again once (nothing seen, the count kept)."""

from __future__ import annotations

import bisect
import contextlib
import math
import os
import time
from collections.abc import Hashable, Iterator, Sequence

import torch


def allowed_cpus() -> int:
    """The CPUs this process may run on: its affinity mask where the platform has one, at most
    its cgroup's CPU quota (a container limited to 2 CPUs may see all the host's)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # no affinity masks on this platform
        cpus = os.cpu_count() or 1
    quota = _cpu_quota()
    if quota is not None:
        cpus = min(cpus, max(1, math.ceil(quota)))
    return cpus


class Team:
    """The thread count of one call's steps: ``requested`` (torch's count at the call), at most
    ``allowed_cpus()`` less the other processes' tasks running on the machine (Linux:
    ``/proc/loadavg``'s count of runnable tasks, this process's own left out:
    ``_other_running``), at least 1. One thread requested: 1, with no file read (a read takes
    85–135 µs on the 2-core EPYC of issue #13, whose procfs is slow).

    The load is read when the team is made (the call's start, before its argument checks) and
    again by ``settle`` (before the passes); from then on a task counts only where both reads
    saw it. A task that runs for a moment (a kernel worker, a shell) takes no thread from the
    whole call: float32 ``relu_moments(..., compiled=True)`` at p = 1024 and 2 threads, each
    call after a DVI call, ran on 1 thread in 7 of 20 calls with one read (session 36,
    ``/tmp/s36/usable.py``). A load that comes after the second read slows the watched steps
    down (``step``): a slow step has the load read again, and a task seen then counts."""

    #: a watched step this many times slower per unit of work than the fastest of its kind at
    #: its thread count in this process has the load read again (``step``)
    SLOW = 2.0
    #: such reads per call, at most (each 85–135 µs on the EPYC: noise cannot make many)
    REREADS = 2
    #: work below which a step is not watched (fixed costs and the team's wake-up dominate it)
    MIN_WORK = 65536

    def __init__(self, requested: int) -> None:
        self.requested = max(1, int(requested))
        self.cpus = allowed_cpus() if self.requested > 1 else 1
        self.seen = _other_running() if self.requested > 1 else 0
        self.threads = self._count(self.seen)
        self.rereads = 0

    def settle(self) -> int:
        """Read the load again; the thread count from now on counts only the tasks both reads
        saw. Returns it."""
        if self.requested > 1:
            self.threads = self._count(min(self.seen, _other_running()))
        return self.threads

    def _count(self, busy: int) -> int:
        return max(1, min(self.requested, self.cpus - busy))

    @contextlib.contextmanager
    def step(self, kind: Hashable = None, work: int = 0) -> Iterator[int]:
        """torch's intra-op thread count set to ``threads`` inside, the caller's restored
        after; yields it. ``kind`` (any key: e.g. the band pass and its dtype) and ``work``
        (e.g. its pairs): the step is watched where it ran on more than one thread and its
        work is at least ``MIN_WORK`` (``_watch``)."""
        n, old = self.threads, torch.get_num_threads()
        if n != old:
            torch.set_num_threads(n)
        watched = kind is not None and n > 1 and work >= self.MIN_WORK
        start = time.perf_counter() if watched else 0.0
        try:
            yield n
        finally:
            if n != old:
                torch.set_num_threads(old)
        if watched:
            self._watch((kind, n), (time.perf_counter() - start) / work)

    def _watch(self, key: tuple, per_work: float) -> None:
        """A load that came after ``settle``: an even split waits for the thread that shares
        its core, so each step takes several times its time. A step ``SLOW`` times slower per
        unit of work than the fastest of its key in this process has the load read again (at
        most ``REREADS`` times per call); a task that read sees then counts, the slow step
        being the second sign of it."""
        fastest = _FASTEST.get(key)
        if fastest is None or per_work < fastest:
            _FASTEST[key] = per_work
        if fastest is None or per_work <= self.SLOW * fastest or self.rereads >= self.REREADS:
            return
        self.rereads += 1
        busy = _other_running()
        if busy:
            self.threads = min(self.threads, self._count(busy))


#: the fastest time per unit of work of each watched kind of step and thread count
#: (``Team.step``): the process's own reference for a step run under no load
_FASTEST: dict[tuple, float] = {}


def ranges(
    n: int, bounds: Sequence[int] | None = None, most: int | None = None
) -> list[tuple[int, int]]:
    """[start, stop) ranges covering range(n) in order: one, or (``most``, a memory bound) each
    of at most that many. ``bounds``: the allowed stops, increasing, ending at n (each range then
    ends at the first allowed stop at or after its size; e.g. the ends of bands of rows)."""
    if n <= 0:
        return []
    out, start = [], 0
    while start < n:
        rest = n - start
        size = rest if most is None else min(rest, max(1, most))
        stop = start + size
        if bounds is not None:
            stop = bounds[bisect.bisect_left(bounds, stop)]
        out.append((start, stop))
        start = stop
    return out


#: cgroup v2's and v1's CPU quota files, as a container sees its own cgroup
CPU_MAX = "/sys/fs/cgroup/cpu.max"
CFS_QUOTA = ("/sys/fs/cgroup/cpu/cpu.cfs_quota_us", "/sys/fs/cgroup/cpu/cpu.cfs_period_us")


def _cpu_quota() -> float | None:
    """CPUs of the cgroup's CPU quota (v2 ``cpu.max``: "quota period" or "max period"; v1
    ``cpu.cfs_quota_us`` over ``cpu.cfs_period_us``, −1 for none), or None where there is
    no quota or it cannot be read."""
    try:
        quota, period = _read(CPU_MAX).split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota, period = (int(_read(path)) for path in CFS_QUOTA)
        return None if quota <= 0 or period <= 0 else quota / period
    except (OSError, ValueError):
        return None


def _read(path: str) -> str:
    with open(path, encoding="ascii") as f:
        return f.read()


def _other_running() -> int:
    """Runnable tasks of other processes on the machine (0 where unknown): ``/proc/loadavg``'s
    count less this process's own runnable threads (``_own_running``; the calling thread is
    one), read only where the count shows more than the caller. torch's OpenMP workers spin
    for a few ms after a parallel op: after a 2-thread DVI call, a float32 ``relu_moments``
    call at p = 1024 counted one of them as another task 10 times in 10 and ran on one
    thread: 18.6 ms per call, 14.5 ms with this process's threads left out (medians of 10,
    each after a DVI call)."""
    try:
        running = int(_read("/proc/loadavg").split()[3].split("/")[0])
    except (OSError, IndexError, ValueError):
        return 0
    return 0 if running <= 1 else max(0, running - max(1, _own_running(running)))


def _own_running(most: int | None = None) -> int:
    """This process's runnable threads, counted up to ``most`` (Linux: the state field of each
    ``/proc/self/task/*/stat``, in the order listed, the oldest threads first; 0 where
    unreadable). About 6 µs per thread read: 27 µs with 4 threads, 176 µs with 30."""
    n = 0
    try:
        tasks = os.listdir("/proc/self/task")
    except OSError:
        return 0
    for tid in tasks:
        if most is not None and n >= most:
            break
        try:
            with open(f"/proc/self/task/{tid}/stat", "rb") as f:
                stat = f.read()
        except OSError:  # the thread ended
            continue
        end = stat.rindex(b")")  # the state follows the name, which may hold spaces
        n += stat[end + 2 : end + 3] == b"R"
    return n
