"""Kernels and relu_moments on CUDA (issue #13, Deliver 4); skipped without a CUDA device.

On CUDA the runtime takes its sync-free path (masked arithmetic): the kernels are run under
``torch.cuda.set_sync_debug_mode("error")``, which raises on any host-device synchronisation.
"""

from __future__ import annotations

import argparse

import pytest
import torch
from nmgen.generated import torch_kernels as TK

from nmgen.pointcheck import check_file
from torchbridge.experiments.bench_floor import run_floor
from torchbridge.moments import relu_moments

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")

D = torch.float64
KERNELS_5 = ("relu_cross_moment", "relu_cross_covariance")


def _pairs(n: int, dtype) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    m1, m2 = torch.randn(2, n, generator=g, dtype=D) * 3
    s1, s2 = torch.rand(2, n, generator=g, dtype=D) + 0.05
    r = torch.rand(n, generator=g, dtype=D) * 2 - 1
    r[:4] = torch.tensor([1.0, -1.0, 0.0, 0.999999])
    return [v.to(dtype) for v in (m1, m2, s1, s2, r)]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_kernels_on_cuda_match_cpu_without_syncs(dtype):
    cpu = _pairs(4096, dtype)
    gpu = [v.cuda() for v in cpu]
    tol = 16 * torch.finfo(dtype).eps
    atol = 1e-12 if dtype == torch.float64 else 1e-6
    calls = [
        ("relu_mean", 2, ()),
        ("relu_mean_variance", 2, ()),
        ("bivariate_normal_cdf", 3, ()),
        ("relu_cross_moment_zero_mean", 3, ()),
        *((n, 5, ()) for n in KERNELS_5),
        ("relu_cross_moment_series", 5, (5,)),
    ]
    for name, nargs, extra in calls:
        f = getattr(TK, name)
        pick = {2: (0, 2), 3: (2, 3, 4), 5: (0, 1, 2, 3, 4)}[nargs]
        a_cpu = [cpu[i] for i in pick]
        a_gpu = [gpu[i] for i in pick]
        want = f(*a_cpu, *extra)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            got = f(*a_gpu, *extra, validate=False)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        for w, g in zip(
            want if isinstance(want, tuple) else (want,),
            got if isinstance(got, tuple) else (got,),
            strict=True,
        ):
            assert g.device.type == "cuda"
            err = (g.cpu() - w).abs()
            assert (err <= tol * w.abs() + 1e-300).all() or name.endswith("_series"), name
            assert (err <= atol * (1 + w.abs())).all(), name


def test_relu_moments_on_cuda_matches_cpu():
    p = 64
    g = torch.Generator().manual_seed(1)
    mean = torch.randn(p, generator=g, dtype=D)
    w = torch.randn(p, 4, generator=g, dtype=D)
    cov = w @ w.T / 4 + 0.05 * torch.eye(p, dtype=D)
    m_cpu, c_cpu = relu_moments(mean, cov)
    m_gpu, c_gpu = relu_moments(mean.cuda(), cov.cuda())
    assert c_gpu.device.type == "cuda"
    assert torch.allclose(m_gpu.cpu(), m_cpu, rtol=1e-14, atol=0)
    assert torch.allclose(c_gpu.cpu(), c_cpu, rtol=1e-13, atol=1e-16)


def test_bench_floor_on_cuda(tmp_path):
    """`nm bench floor --device cuda` (the H200 figures' command): every call on the GPU,
    the floor's torch.exp there too, and the GPU's float64 exact covariance within the
    issue's 1e-15 absolute bar of mpmath on its oracle entries."""
    args = argparse.Namespace(
        p=48, threads="1", dtypes="float64,float32", repeats=1, mc_samples=200,
        check_entries=4, seed=0, out=str(tmp_path), no_progress=True, heap="keep",
        device="cuda",
    )  # fmt: skip
    res = run_floor(args)
    assert res["device"].startswith("cuda:")
    for run in res["runs"]:
        assert run["exp_ns_per_element"] > 0 and run["floor_seconds"] > 0
        assert all(m["seconds"] > 0 for m in run["methods"].values())
    assert res["runs"][1]["exact_float32_vs_float64"] <= 1e-5
    groups = check_file(res["oracle_points"]["file"], progress=False)["groups"]
    assert [g["points"] for g in groups] == [4, 4]
    assert max(g["max_abs_diff"] for g in groups) <= 1e-15
    args.compiled = True  # the compiled bulk is CPU-only: refused, naming the flag
    with pytest.raises(ValueError, match="--compiled"):
        run_floor(args)
