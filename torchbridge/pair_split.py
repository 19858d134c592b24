"""Ranges of pairs split between threads as they come free (issue #13 thread policy).

``relu_moments(..., compiled=True)`` runs its bulk (the compiled passes over the strict pairs,
which release the GIL: ``nmruntime.torch_support.compiled(..., releases_gil=True)``) through
``run_split``: the calling thread and up to ``threads - 1`` pool threads each take the next
range of pairs when they are done with the last (a guided schedule: ranges shrink as the work
runs out), each at one intra-op thread. A thread that gets less CPU takes fewer ranges, and
the call waits at most for the range it holds; OpenMP threads over each kernel split every
pass evenly and wait for the slowest, which made the compiled passes 2.5–2.9× slower at 2
threads with the other core busy (session 24). The thread count leaves out the CPUs other
processes keep busy at the call (``usable_threads``), as libgomp's ``OMP_DYNAMIC`` leaves
out its load average: there a second thread would share a core with the first.
"""

from __future__ import annotations

import bisect
import concurrent.futures
import math
import os
import threading
from collections.abc import Callable, Sequence
from typing import TypeVar

import torch

T = TypeVar("T")

#: the fewest pairs in a range (about 3 ms of the float64 passes on the 2-core Xeon of
#: issue #13): below it, a range's fixed cost (a kernel call per pass, a nonzero, two gathers:
#: about 0.2 ms) is not amortised. p = 1024's 523,776 strict pairs make 4 ranges at 2 threads.
MIN_RANGE = 1 << 16

_POOL: list = [None]
_POOL_LOCK = threading.Lock()


def _forget_pool() -> None:
    """A forked child has none of its parent's pool threads: it starts a pool of its own
    (the parent's would queue the ranges for threads that do not exist, and the call would
    wait for them forever)."""
    global _POOL_LOCK
    _POOL[0] = None
    _POOL_LOCK = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool)


def usable_threads(requested: int, earlier: int | None = None) -> int:
    """``requested`` (torch's thread count at the call), at most the CPUs this process may run
    on (its affinity mask where the platform has one, and its cgroup's CPU quota: a container
    limited to 2 CPUs may see all the host's) less the other processes' tasks running on
    the machine right now (Linux: ``/proc/loadavg``'s count of runnable tasks, this process's
    own excluded: ``_other_running``), at least 1. Where another process keeps a core busy, a
    second thread of ours shares a core and only adds each range's fixed cost: with a busy
    loop on the other core of the 2-core machine of issue #13, 2 threads took 1.05–1.07× the
    time of 1 (p = 1024). One thread requested: 1, with no file read (the reads take about
    25 µs per call).

    ``earlier``: ``_other_running()`` read earlier in the same call (``other_tasks``); a task
    counts only where both reads saw it. A task that runs for a moment (a kernel worker, a
    shell) no longer takes a thread from the whole call: on the 2-core EPYC, float32
    ``relu_moments(..., compiled=True)`` at p = 1024 and 2 threads, each call after a DVI
    call, ran on 1 thread in 7 of 20 calls with one read (``/tmp/s36/usable.py``)."""
    if requested <= 1:
        return 1
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # no affinity masks on this platform
        cpus = os.cpu_count() or 1
    quota = _cpu_quota()
    if quota is not None:
        cpus = min(cpus, max(1, math.ceil(quota)))
    busy = _other_running()
    if earlier is not None:
        busy = min(busy, earlier)
    return max(1, min(int(requested), cpus - busy))


def other_tasks(requested: int) -> int | None:
    """``_other_running()`` where ``requested`` > 1 (the first of ``usable_threads``' two
    reads), else None (no file read)."""
    return _other_running() if requested > 1 else None


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


def ranges(
    n: int, threads: int, bounds: Sequence[int] | None = None, most: int | None = None
) -> list[tuple[int, int]]:
    """[start, stop) ranges covering range(n) in order: each the rest's 1/threads, at least
    ``MIN_RANGE`` (the last: what is left); one range where ``threads`` is 1. ``most``: at
    most that many (a memory bound; then several at 1 thread too). ``bounds``: the allowed
    stops, increasing, ending at n (each range then ends at the first allowed stop at or
    after its size; e.g. the starts of rows).

    Each the rest's 1/(2·threads) (7 ranges for p = 1024 at 2 threads, 28 compiled pass calls)
    was slower: compiled ``relu_moments`` at p = 1024, 2 threads, medians of 21 calls
    alternating with 1 thread, two runs: float64 22.4 / 22.7 vs 21.3 / 20.3 ms, float32
    11.1 / 11.0 vs 10.5 / 10.4 ms; each call right after a DVI call: float64 28.1 / 26.7 vs
    26.0 / 25.0 ms. With a busy loop on the other core and 2 threads forced, 2 threads took
    1.10–1.13× the time of 1 thread that way, 1.04–1.07× this way (float64)."""
    if n <= 0:
        return []
    out, start = [], 0
    while start < n:
        rest = n - start
        size = rest if threads <= 1 else max(MIN_RANGE, rest // threads)
        if most is not None:
            size = min(size, max(1, most))
        stop = start + min(rest, size)
        if bounds is not None:
            stop = bounds[bisect.bisect_left(bounds, stop)]
        out.append((start, stop))
        start = stop
    return out


def _pool() -> concurrent.futures.ThreadPoolExecutor:
    """The process's pool of helper threads (created on first use, threads started as
    needed, never more than the CPUs)."""
    with _POOL_LOCK:
        if _POOL[0] is None:
            _POOL[0] = concurrent.futures.ThreadPoolExecutor(
                max_workers=max(1, (os.cpu_count() or 2) - 1), thread_name_prefix="nm-pairs"
            )
        return _POOL[0]


def start_beside(fn: Callable[[], T], threads: int) -> Callable[[], T]:
    """Start ``fn()`` on the pool's thread where ``threads`` > 1 (it takes ``run_split``'s ranges
    after it, as it comes free), in the caller's grad and inference modes; returns the function
    that waits for its result (raising its error). At 1 thread ``fn()`` runs when the result is
    asked for: the same work, in the same thread."""
    if threads <= 1:
        return fn
    return _pool().submit(_in_callers_modes(fn)).result


def _in_callers_modes(fn: Callable[[], T]) -> Callable[[], T]:
    """``fn`` to run on another thread in the calling thread's grad and inference modes
    (torch keeps them per thread)."""
    grad, inference = torch.is_grad_enabled(), torch.is_inference_mode_enabled()

    def run() -> T:
        with torch.inference_mode(inference), torch.set_grad_enabled(grad):
            return fn()

    return run


def run_split(
    fn: Callable[[int, int], T],
    n: int,
    threads: int,
    bounds: Sequence[int] | None = None,
    most: int | None = None,
) -> list[T]:
    """[fn(start, stop) for each of ``ranges(n, threads, bounds, most)``], in range order: the calling
    thread and up to ``threads - 1`` pool threads take the next range as they come free, in
    the caller's grad and inference modes. ``fn`` must write only what its range owns.
    Returns after every range is done, or raises the first error (the ranges not started by
    then are skipped; the started ones finish)."""
    parts = ranges(n, threads, bounds, most)
    helpers = min(threads, len(parts)) - 1
    if helpers <= 0:
        return [fn(a, b) for a, b in parts]
    results: list = [None] * len(parts)
    nxt, lock, failed = [0], threading.Lock(), threading.Event()

    def _take_ranges() -> None:
        while not failed.is_set():
            with lock:
                k = nxt[0]
                nxt[0] += 1
            if k >= len(parts):
                return
            try:
                results[k] = fn(*parts[k])
            except BaseException:
                failed.set()
                raise

    work = _in_callers_modes(_take_ranges)
    futures = [_pool().submit(work) for _ in range(helpers)]
    try:
        work()
    finally:  # the helpers write into the caller's tensors: never return before they stop
        concurrent.futures.wait(futures)
    for f in futures:
        f.result()  # a helper's error, raised here
    return results
