"""The compiled bulk's thread count and ranges (torchbridge.pair_split) and relu_moments on them."""

from __future__ import annotations

import itertools
import os
import threading

import pytest
import torch

from torchbridge import moments, pair_split
from torchbridge.pair_split import Team, ranges


@pytest.mark.parametrize("n", [0, 1, 5, 65_536, 523_776])
@pytest.mark.parametrize("most", [None, 1, 7, 60_000])
def test_ranges_cover_in_order_and_keep_to_most(n, most):
    parts = ranges(n, most=most)
    if n == 0:
        assert parts == []
        return
    assert [a for a, _ in parts] == [0, *(b for _, b in parts[:-1])] and parts[-1][1] == n
    sizes = [b - a for a, b in parts]
    if most is None:
        assert len(parts) == 1
    else:  # each ``most`` but the last
        assert all(s == most for s in sizes[:-1]) and 0 < sizes[-1] <= most


def test_ranges_stop_only_at_the_given_bounds():
    """With ``bounds`` (here the starts of the rows of p = 700's strict upper triangle) every
    range stops at a bound, the first at or after ``most`` pairs."""
    p = 700
    bounds = list(itertools.accumulate(p - 1 - r for r in range(p)))
    rows = ranges(bounds[-1], bounds, most=5000)
    assert all(b in bounds and 5000 <= b - a < 5000 + p for a, b in rows[:-1])
    assert [a for a, _ in rows] == [0, *(b for _, b in rows[:-1])] and rows[-1][1] == bounds[-1]
    assert ranges(bounds[-1], bounds) == [(0, bounds[-1])]


def _cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def test_team_leaves_out_busy_cpus(monkeypatch):
    cpus = _cpus()
    monkeypatch.setattr(pair_split, "_cpu_quota", lambda: None)
    monkeypatch.setattr(pair_split, "_other_running", lambda: 0)
    assert Team(0).threads == 1 and Team(1).threads == 1
    assert Team(64).threads == min(64, cpus)
    monkeypatch.setattr(pair_split, "_other_running", lambda: 1)  # a busy process elsewhere
    assert Team(64).threads == max(1, cpus - 1)
    monkeypatch.setattr(pair_split, "_other_running", lambda: 10 * cpus)
    assert Team(64).threads == 1
    monkeypatch.setattr(pair_split, "_other_running", lambda: 1 / 0)  # never read at 1 thread
    assert Team(1).threads == 1 and Team(1).settle() == 1


def test_team_counts_only_tasks_both_reads_saw(monkeypatch):
    """After ``settle`` (the second read), a task counts only where both reads saw it: one that
    ran for a moment at either read takes no thread."""
    cpus = _cpus()
    monkeypatch.setattr(pair_split, "_cpu_quota", lambda: None)
    reads = iter([0, 1])  # gone by the second read... here: came by it
    monkeypatch.setattr(pair_split, "_other_running", lambda: next(reads))
    assert Team(64).settle() == min(64, cpus)
    reads = iter([1, 1])  # seen by both: busy
    assert Team(64).settle() == max(1, cpus - 1)
    reads = iter([1, 0])  # at the first read only
    team = Team(64)
    assert team.threads == max(1, cpus - 1) and team.settle() == min(64, cpus)


def test_team_step_sets_torch_threads_and_restores_them(monkeypatch):
    monkeypatch.setattr(pair_split, "_other_running", lambda: 0)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        team = Team(2)
        with team.step() as n:
            assert n == team.threads == min(2, _cpus()) and torch.get_num_threads() == n
        assert torch.get_num_threads() == 1
        with pytest.raises(KeyError), team.step():  # restored after an error too
            raise KeyError
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(old)


def test_a_slow_step_has_the_load_read_again(monkeypatch):
    """A load that comes after the second read (``Team._watch``): a watched step ``SLOW``
    times slower per unit of work than the fastest of its kind at its thread count reads the
    load again; a task seen then takes a thread. Noise (nothing seen) keeps the count, and
    reads stop after ``REREADS`` per call. Unwatched: 1 thread, too little work, no kind."""
    monkeypatch.setattr(pair_split, "_cpu_quota", lambda: None)
    monkeypatch.setattr(pair_split, "allowed_cpus", lambda: 2)
    monkeypatch.setattr(pair_split, "_FASTEST", {})
    busy, reads = [0], []
    monkeypatch.setattr(pair_split, "_other_running", lambda: reads.append(1) or busy[0])
    team = Team(2)
    assert team.settle() == 2 and len(reads) == 2
    team._watch("k", 1.0)  # the first of its kind: the reference
    team._watch("k", 1.9)  # within SLOW: no read
    assert len(reads) == 2 and pair_split._FASTEST == {"k": 1.0}
    team._watch("k", 2.5)  # slow, nothing seen (noise): read, the count kept
    assert len(reads) == 3 and team.threads == 2
    busy[0] = 1
    team._watch("k", 3.0)  # slow, a task seen: one thread from now on
    assert len(reads) == 4 and team.threads == 1
    other = Team(2)  # a new call: two reads, then at most REREADS after slow steps
    busy[0] = 0
    other.settle()
    for _ in range(5):
        other._watch("k", 9.0)
    assert len(reads) == 6 + Team.REREADS and other.threads == 2
    other._watch("k", 0.5)  # a faster one becomes the reference
    assert pair_split._FASTEST["k"] == 0.5
    watched = []
    monkeypatch.setattr(Team, "_watch", lambda self, key, per: watched.append(key))
    with other.step("band", Team.MIN_WORK) as n:
        assert n == 2
    with other.step("band", Team.MIN_WORK - 1), other.step(None, 10**9):
        pass
    one = Team(1)
    with one.step("band", 10**9):
        pass
    assert watched == [("band", 2)]


def test_a_load_after_the_second_read_sends_the_passes_to_one_thread(monkeypatch):
    """``relu_moments(..., compiled=True)`` at 2 threads: its band steps are watched, and
    where one is slow while another task runs, the rest of the call runs on 1 thread (the
    slow step and the load faked: the fastest band step on record made 10 times faster, a
    busy task seen from the third read on)."""
    from torchbridge.experiments.bench_kernels import random_problem

    monkeypatch.setattr(pair_split, "allowed_cpus", lambda: 2)
    mean, cov = random_problem(800, 2)  # two band steps of at least MIN_WORK pairs
    ref = moments.relu_moments(mean, cov, check_psd=False, compiled=True)[1]  # compiles
    reads, kinds, passes = [], [], []
    monkeypatch.setattr(pair_split, "_other_running", lambda: reads.append(1) or len(reads) > 2)
    real_watch, real_passes = Team._watch, moments._run_passes

    def watch(self, key, per_work):
        kinds.append(key)
        pair_split._FASTEST[key] = per_work / 10  # every band step now looks slow
        return real_watch(self, key, per_work)

    def run_passes(*args):
        passes.append(torch.get_num_threads())
        return real_passes(*args)

    monkeypatch.setattr(Team, "_watch", watch)
    monkeypatch.setattr(moments, "_run_passes", run_passes)
    monkeypatch.setattr(pair_split, "_FASTEST", {})
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        got = moments.relu_moments(mean, cov, check_psd=False, compiled=True)[1]
    finally:
        torch.set_num_threads(old)
    assert kinds == [(("band pass", torch.float64), 2)] and len(reads) == 3
    assert passes and set(passes) == {1}
    assert torch.equal(got, ref)


def test_relu_moments_reads_the_load_twice_and_checks_on_the_team(monkeypatch):
    """``relu_moments(..., compiled=True)`` at 2 threads reads the load at its start (its
    argument checks then run on the team) and again before the passes; at 1 thread it reads
    nothing and runs on 1 thread."""
    from torchbridge.experiments.bench_kernels import random_problem

    mean, cov = random_problem(24, 1)
    relu_moments = moments.relu_moments
    relu_moments(mean, cov, check_psd=False, compiled=True)  # compiles
    reads, checks, passes = [], [], []
    real_validate, real_passes = moments._validate, moments._run_passes

    def validate(*args):
        checks.append(torch.get_num_threads())
        return real_validate(*args)

    def run_passes(*args):
        passes.append(torch.get_num_threads())
        return real_passes(*args)

    monkeypatch.setattr(pair_split, "_other_running", lambda: reads.append(1) or 0)
    monkeypatch.setattr(moments, "_validate", validate)
    monkeypatch.setattr(moments, "_run_passes", run_passes)
    old = torch.get_num_threads()
    try:
        for t in (2, 1):
            torch.set_num_threads(t)
            reads.clear(), checks.clear(), passes.clear()
            relu_moments(mean, cov, check_psd=False, compiled=True)
            want = min(t, _cpus())
            assert len(reads) == (2 if t > 1 else 0) and checks == [want]
            assert passes and set(passes) == {want}
            assert torch.get_num_threads() == t
    finally:
        torch.set_num_threads(old)


def test_other_running_counts_runnable_tasks():
    """Linux: /proc/loadavg's runnable count less this process's, a count and never negative."""
    n = pair_split._other_running()
    assert isinstance(n, int) and n >= 0
    if os.path.exists("/proc/loadavg"):
        with open("/proc/loadavg", encoding="ascii") as f:
            running, total = map(int, f.read().split()[3].split("/"))
        assert running >= 1 and n < total


def test_other_running_leaves_out_this_process(monkeypatch):
    """Runnable threads of this process (torch's OpenMP workers spinning after a parallel op)
    are not other processes' load; where the count shows only the caller, no task is read."""
    monkeypatch.setattr(pair_split, "_read", lambda path: "0.50 0.40 0.30 3/200 12345\n")
    monkeypatch.setattr(pair_split, "_own_running", lambda most: 2)  # the caller and a worker
    assert pair_split._other_running() == 1
    monkeypatch.setattr(pair_split, "_own_running", lambda most: 3)
    assert pair_split._other_running() == 0
    monkeypatch.setattr(pair_split, "_own_running", lambda most: 0)  # unreadable: the caller
    assert pair_split._other_running() == 2
    monkeypatch.setattr(pair_split, "_read", lambda path: "0.50 0.40 0.30 1/200 12345\n")
    monkeypatch.setattr(pair_split, "_own_running", lambda most: 1 / 0)  # never called
    assert pair_split._other_running() == 0


def test_own_running_sees_a_busy_thread():
    """Linux: a thread of this process busy in a torch op and the caller are both counted
    (at most this process's threads)."""
    if not os.path.exists("/proc/self/task"):
        pytest.skip("no /proc/self/task on this platform")
    stop = threading.Event()
    x = torch.ones(1 << 22, dtype=torch.float64)

    def spin() -> None:  # torch ops release the GIL: runnable while the caller reads
        while not stop.is_set():
            torch.exp(x)

    spinner = threading.Thread(target=spin)
    spinner.start()
    try:
        seen = max(pair_split._own_running() for _ in range(50))
        capped = max(pair_split._own_running(1) for _ in range(50))
    finally:
        stop.set()
        spinner.join()
    assert 2 <= seen <= len(os.listdir("/proc/self/task")) + 1
    assert capped == 1  # counting stops at ``most``


def test_relu_moments_compiled_is_the_same_at_any_thread_count(monkeypatch):
    """p = 600: the compiled call at torch thread counts 1 and 2 gives bit-identical mean and
    covariance, exactly symmetric; the 2-thread call runs its passes on 2 threads where this
    process may run on 2 CPUs, and the caller's thread count is restored."""
    g = torch.Generator().manual_seed(7)
    w = torch.randn(600, 6, generator=g, dtype=torch.float64)
    cov = w @ w.T / 6 + 0.05 * torch.eye(600, dtype=torch.float64)
    mean = torch.randn(600, generator=g, dtype=torch.float64)
    calls = []
    real = moments._run_passes

    def recorded(*args):
        calls.append(torch.get_num_threads())
        return real(*args)

    monkeypatch.setattr(moments, "_run_passes", recorded)
    monkeypatch.setattr(pair_split, "_other_running", lambda: 0)  # as on an idle machine
    before = torch.get_num_threads()
    try:
        outs = {}
        for t in (1, 2, 1, 2):  # the first call compiles
            torch.set_num_threads(t)
            calls.clear()
            outs[t] = moments.relu_moments(mean, cov, check_psd=False, compiled=True)
            assert torch.get_num_threads() == t
    finally:
        torch.set_num_threads(before)
    assert torch.equal(outs[1][0], outs[2][0]) and torch.equal(outs[1][1], outs[2][1])
    assert torch.equal(outs[2][1], outs[2][1].T)
    assert calls and set(calls) == {min(2, _cpus())}  # the last call
    # ``chunk`` below p²: ranges of at most about 180,000 pairs (whole bands), each
    # mirrored after its passes; the same matrix
    torch.set_num_threads(2)
    try:
        blocks = moments.relu_moments(mean, cov, check_psd=False, compiled=True, chunk=300 * 600)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(blocks[1], outs[2][1])
    # the eager call (no passes, no threads): the same values to a few eps relative, entry
    # by entry (measured 11.7 eps)
    eager = moments.relu_moments(mean, cov, check_psd=False)[1]
    err = (outs[2][1] - eager).abs()
    assert bool((err <= 64 * torch.finfo(torch.float64).eps * eager.abs()).all())
    # in the caller's grad and inference modes (an inference tensor written outside inference
    # mode is an error)
    torch.set_num_threads(2)
    try:
        for mode in (torch.no_grad, torch.inference_mode):
            with mode():
                got = moments.relu_moments(mean, cov, check_psd=False, compiled=True)
            assert torch.equal(got[1], outs[2][1]), mode
    finally:
        torch.set_num_threads(before)


def test_compile_settings_are_per_thread():
    """dynamo's config is thread-local: ``compile_settings`` in one thread leaves another's
    ``specialize_float`` alone, and each thread's is restored when it leaves, in any order
    (a thread that calls a compiled function sets its own around the call)."""
    from nmruntime.torch_support import compile_settings

    config = torch._dynamo.config
    before = config.specialize_float
    a_in, b_in, a_out = threading.Event(), threading.Event(), threading.Event()
    seen = {}

    def thread_a():
        with compile_settings():
            seen["a inside"] = config.specialize_float
            a_in.set()
            b_in.wait(10)
        seen["a after"] = config.specialize_float
        a_out.set()

    def thread_b():
        a_in.wait(10)
        seen["b while a inside"] = config.specialize_float
        with compile_settings():
            b_in.set()
            a_out.wait(10)
            seen["b after a left"] = config.specialize_float
        seen["b after"] = config.specialize_float

    threads = [threading.Thread(target=thread_a), threading.Thread(target=thread_b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert seen == {
        "a inside": True,
        "b while a inside": False,
        "b after a left": True,
        "a after": False,
        "b after": False,
    }
    assert config.specialize_float == before
    # the recompile limit too (dynamo's default, 8, turned the compiled bulk off for a process
    # with a mixed workload), never lowered, restored after
    from nmruntime.torch_support import RECOMPILE_LIMIT

    limit = config.recompile_limit
    with compile_settings():
        assert config.recompile_limit == max(limit, RECOMPILE_LIMIT) >= 64
        with torch._dynamo.config.patch(recompile_limit=1000), compile_settings():
            assert config.recompile_limit == 1000
    assert config.recompile_limit == limit


@pytest.mark.parametrize(
    ("v2", "v1", "want"),
    [
        ("200000 100000\n", None, 2.0),
        ("150000 100000\n", None, 1.5),
        ("max 100000\n", ("50000", "100000"), None),  # v2 says none: v1 is not read
        (None, ("50000\n", "100000\n"), 0.5),
        (None, ("-1\n", "100000\n"), None),
        (None, None, None),
        ("garbage\n", None, None),
    ],
)
def test_cpu_quota_reads_the_cgroup_files(tmp_path, monkeypatch, v2, v1, want):
    def file(name, text):
        path = tmp_path / name
        if text is not None:
            path.write_text(text)
        return str(path)

    monkeypatch.setattr(pair_split, "CPU_MAX", file("cpu.max", v2))
    quota, period = v1 or (None, None)
    monkeypatch.setattr(pair_split, "CFS_QUOTA", (file("q", quota), file("p", period)))
    assert pair_split._cpu_quota() == want


def test_team_keeps_to_the_cpu_quota(monkeypatch):
    """A container limited to 1.5 CPUs that sees more: at most 2 threads; to 0.5: 1."""
    monkeypatch.setattr(pair_split, "_other_running", lambda: 0)
    cpus = _cpus()
    monkeypatch.setattr(pair_split, "_cpu_quota", lambda: 1.5)
    assert Team(64).threads == min(cpus, 2)
    monkeypatch.setattr(pair_split, "_cpu_quota", lambda: 0.5)
    assert Team(64).threads == 1
    monkeypatch.setattr(pair_split, "_cpu_quota", lambda: None)
    assert Team(64).threads == cpus


def test_relu_moments_compiled_with_a_block_per_row():
    """``chunk`` below 2p: one row per block, the last block the last row alone (no strict
    pair: it raised ValueError from ``torch.cat`` before). The same matrix as one block,
    exactly symmetric."""
    from torchbridge.experiments.bench_kernels import random_problem

    mean, cov = random_problem(40, 3)
    one = moments.relu_moments(mean, cov, check_psd=False, compiled=True)[1]
    for chunk in (1, 40, 79):
        rows = moments.relu_moments(mean, cov, check_psd=False, compiled=True, chunk=chunk)[1]
        assert torch.equal(rows, one) and torch.equal(rows, rows.T), chunk


def test_compiled_passes_give_a_lone_pair_the_bits_it_has_among_others():
    """A range or a pass left with one pair (dynamo compiles size 1 apart): every pair of a
    p = 40 problem, each alone through the compiled passes, gets bit for bit the value it
    gets with all the pairs at once."""
    from nmruntime.torch_support import compiled_bulk
    from torchbridge.experiments.bench_kernels import random_problem

    mean, cov = random_problem(40, 3)
    p = 40
    with compiled_bulk():
        moments.relu_moments(mean, cov, check_psd=False, compiled=True)  # compiles the passes
        passes = moments._pass_kernels(mean).pairs
        sigma = moments._safe_sqrt(cov.diagonal())
        shared = moments._shared(mean, cov, sigma, True)
        i, j = moments._row_pairs(p, 0, p, mean.device)
        together, alone = (torch.full((p * p,), float("nan"), dtype=mean.dtype) for _ in "ab")
        args = (together, sigma, cov.reshape(-1), shared.h, shared.cdf, p)
        left = moments._run_passes(passes, args, i, j)
        for k in range(i.numel()):
            args = (alone, *args[1:])
            moments._run_passes(passes, args, i[k : k + 1], j[k : k + 1])
    done = torch.ones(p * p, dtype=torch.bool)
    done[left[0] * p + left[1]] = False  # pairs for the general path: written by neither
    places = (i * p + j)[done[i * p + j]]
    assert places.numel() > 700
    assert torch.equal(alone[places], together[places])


@pytest.mark.parametrize(
    "dtype, exact",
    [(torch.float64, True), (torch.float32, True), (torch.float64, False), (torch.float32, False)],
)
def test_band_pass_gives_each_pair_the_bits_of_the_pair_pass(monkeypatch, dtype, exact):
    """The compiled call in bands of 8 rows (``moments._band_pass`` on the pairs right of each
    band, broadcasting; the diagonal blocks by the pass on pairs; p = 45: the last band takes
    the rows after it) against every strict pair through the passes on pairs (gathers): the
    same pairs left for the general path, and every other pair's value the same bit for bit.
    ``exact`` False: cov symmetric within the tolerance, not exactly (the passes then read
    (Σ_ij + Σ_ji)/2 from a symmetrised copy, formed here by hand)."""
    from nmruntime.torch_support import compiled_bulk
    from torchbridge.experiments.bench_kernels import random_problem

    p = 45
    mean, cov = random_problem(p, 11)
    mean, cov = mean.to(dtype), cov.to(dtype)
    if not exact:
        bump = torch.zeros_like(cov)
        bump[3, 30] = bump[12, 44] = 2 * torch.finfo(dtype).eps * float(cov.diagonal().max())
        cov = cov + bump
    symmetric = moments.check_full_covariance(cov, False)
    assert symmetric == exact
    monkeypatch.setattr(moments, "PASS_BAND", 8)
    assert moments._bands(p, 8).split(0, p)[-1] == (40, 45)
    general = []
    pair_covariances = moments._pair_covariances

    def recorded(*args):  # the pairs the passes leave
        general.append(torch.stack(args[6:8], 1))
        return pair_covariances(*args)

    bands = []
    pass_kernels = moments._pass_kernels

    def counted(like):  # the band pass's calls (rows, columns)
        runs = pass_kernels(like)

        def band(out, cr, sr, sc, *rest):
            bands.append((sr.numel(), sc.numel()))
            return runs.band(out, cr, sr, sc, *rest)

        return runs._replace(band=band)

    monkeypatch.setattr(moments, "_pair_covariances", recorded)
    monkeypatch.setattr(moments, "_pass_kernels", counted)
    got = moments.relu_moments(mean, cov, check_psd=False, compiled=True)[1].reshape(-1)
    assert bands == [(8, 37), (8, 29), (8, 21), (8, 13), (8, 5)]
    with compiled_bulk():
        passes = pass_kernels(mean)
        sigma = moments._safe_sqrt(cov.diagonal())
        sym = cov if exact else 0.5 * (cov + cov.T)  # (Σ_ij + Σ_ji)/2, the pairs' formula
        assert moments.check_full_covariance(sym, False)
        shared = moments._shared(mean, sym, sigma, True)
        i, j = moments._row_pairs(p, 0, p, mean.device)
        alone = torch.full((p * p,), float("nan"), dtype=dtype)
        args = (alone, sigma, sym.reshape(-1), shared.h, shared.cdf, p)
        li, lj = moments._run_passes(passes.pairs, args, i, j)
    left = torch.cat([torch.zeros(0, 2, dtype=torch.int64), *general])
    assert sorted(map(tuple, left.tolist())) == sorted(zip(li.tolist(), lj.tolist(), strict=True))
    done = torch.ones(p * p, dtype=torch.bool)
    done[li * p + lj] = False
    places = (i * p + j)[done[i * p + j]]
    assert places.numel() > 900
    assert torch.equal(got[places], alone[places])
