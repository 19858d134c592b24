"""torchbridge.heap: freed memory kept in the process stops large temporaries page-faulting."""

from __future__ import annotations

import subprocess
import sys

import pytest

#: relu_moments and DVI alternating at p = 512 (130,816 pairs: 1 MiB temporaries), as in
#: `nm bench floor`'s interleaved check; prints (kept, minor faults per exact + DVI pair).
CHILD = """
import sys, torch
torch.set_num_threads(1)
from torchbridge.heap import keep_freed_memory, minor_faults
from torchbridge.moments import relu_moments
from torchbridge.propagate.approx import dvi_relu_moments
kept = keep_freed_memory() if sys.argv[1] == "keep" else False
g = torch.Generator().manual_seed(5)
p = 512
mu = torch.randn(p, generator=g, dtype=torch.float64)
w = torch.randn(p, 4, generator=g, dtype=torch.float64)
cov = w @ w.T / 4 + 0.05 * torch.eye(p, dtype=torch.float64)
for _ in range(2):
    relu_moments(mu, cov, check_psd=False), dvi_relu_moments(mu, cov)
f0 = minor_faults()
for _ in range(4):
    relu_moments(mu, cov, check_psd=False), dvi_relu_moments(mu, cov)
print(kept, (minor_faults() - f0) / 4)
"""


def _faults(mode: str) -> tuple[bool, float]:
    out = subprocess.run(
        [sys.executable, "-c", CHILD, mode], capture_output=True, text=True, check=True
    ).stdout.split()
    return out[0] == "True", float(out[1])


@pytest.mark.skipif(sys.platform != "linux", reason="glibc's mallopt")
def test_kept_heap_stops_the_page_faults():
    """Kept, the alternating calls reuse their freed temporaries: at most a few hundred faults
    per pair of calls (measured 1–129) out of the > 5,000 pages they allocate (twenty-odd 1 MiB
    temporaries). glibc's default heap varies with its adaptive thresholds: 750–11,800 faults
    measured on the same child, so it is not asserted on."""
    kept, with_keep = _faults("keep")
    assert kept
    assert with_keep < 500
