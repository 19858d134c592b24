"""The generator: deterministic bytes, staleness check, headers, import hygiene."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from nmgen import generate

ROOT = Path(__file__).resolve().parent.parent


def test_generated_is_up_to_date():
    ok, report = generate.check()
    assert ok, report


def test_generation_is_deterministic(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    generate.write(a)
    generate.write(b)
    for f in ("numpy_kernels.py", "torch_kernels.py"):
        assert (a / f).read_bytes() == (b / f).read_bytes()


def test_check_fails_with_diff_on_a_tampered_copy(tmp_path):
    copy = tmp_path / "generated"
    shutil.copytree(ROOT / "generated", copy)
    target = copy / "torch_kernels.py"
    target.write_text(target.read_text().replace("0.3989422804014327", "0.3989422804014328", 1))
    ok, report = generate.check(copy)
    assert not ok
    assert "-" in report and "0.3989422804014328" in report
    assert "nmgen generate" in report
    proc = subprocess.run(
        [sys.executable, "-m", "nmgen", "generate", "--check", "--out", str(copy)],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert proc.returncode == 1 and "stale or hand-edited" in proc.stdout


def test_headers_name_sources_command_and_hash():
    for f in ("numpy_kernels.py", "torch_kernels.py"):
        head = (ROOT / "generated" / f).read_text().splitlines()[:3]
        assert "derivations/theorem1.py" in head[0]
        assert "DO NOT EDIT BY HAND" in head[1] and "nmgen generate" in head[1]
        assert "sha256" in head[2]


def test_importing_kernels_does_not_import_sympy_or_mpmath():
    code = (
        "import sys; import nmgen.generated.torch_kernels, nmgen.generated.numpy_kernels, "
        "torchbridge.network, torchbridge.moments; "
        "bad = [m for m in ('sympy', 'mpmath') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
