"""The Triton kernels compiled ahead of time for sm_80 and sm_90, as tests/test_build.py checks
the CUDA kernels with ptxas: every launch the package makes (its launchers' block sizes, warps,
options and constexprs; fp32, fp16 and bf16 inputs) compiles with Triton's compiler, spills no
registers and fits the GPU's shared memory. The resource table is printed (pytest -s shows it).

tests/triton_aot.py does the work in a subprocess without TRITON_INTERPRET (this process has it,
and the launchers pick their GPU block size only without it), with a Triton cache of its own so
that every kernel is compiled in this run.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton", reason="the AOT compile needs triton (Linux)")

ROOT = Path(__file__).resolve().parents[1]
AOT = ROOT / "tests" / "triton_aot.py"


def _compile(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess, dict]:
    """tests/triton_aot.py as a GPU process runs (no TRITON_INTERPRET), on this checkout's mixedprec."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(PYTHONPATH=str(ROOT), TRITON_CACHE_DIR=str(tmp_path / "triton-cache"))
    out = tmp_path / "rows.json"
    proc = subprocess.run([sys.executable, str(AOT), "--json", str(out), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=1200)
    assert out.exists(), proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc, json.loads(out.read_text())


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    return _compile(tmp_path_factory.mktemp("aot"))


def test_every_launch_compiles_for_sm80_and_sm90_without_spills(compiled):
    proc, report = compiled
    print(proc.stdout)
    rows = report["rows"]
    assert proc.returncode == 0, proc.stdout[-8000:] + proc.stderr[-3000:]
    assert report["unlaunched"] == []
    by_config = {}
    for r in rows:
        by_config.setdefault((r["kernel"], r["config"]), set()).add(r["arch"])
        assert r["problems"] == [] and r["stack"] == r["local"] == 0 and r["registers"] > 0, r
    assert all(arches == {80, 90} for arches in by_config.values())
    # fp32, fp16 and bf16 inputs wherever a kernel takes them (lowbit_linear's kernels see fp32 x)
    dtypes = {}
    for kernel, config in by_config:
        dtypes.setdefault(kernel, set()).add(config.split()[0])
    for kernel, seen in dtypes.items():
        assert seen == ({"fp32"} if kernel.startswith("lowbit_linear.") else {"fp32", "fp16", "bf16"}), (kernel, seen)


def test_the_gpu_values_of_the_launchers_are_compiled(compiled):
    """A GPU process's BLOCK and launch options (mixedprec/backends/triton/common.py), not this process's
    (Triton's interpreter gets a larger BLOCK and no launch options)."""
    from mixedprec.backends.triton import common

    _, report = compiled
    gpu = report["gpu_constants"]
    assert common.BLOCK != gpu["BLOCK"] and common.LAUNCH_OPTIONS != gpu["LAUNCH_OPTIONS"]
    config = next(r["config"] for r in report["rows"] if r["kernel"] == "bit_sharing_quant._apply_kernel")
    assert f"BLOCK={gpu['BLOCK']} " in config and f"warps={gpu['LAUNCH_OPTIONS']['num_warps']} " in config, config


def test_planted_spills_and_oversized_shared_memory_are_reported(tmp_path):
    """The check's own check: lut_conv2d allowed 32 registers, and with 64 x 64 x 128 tiles."""
    proc, report = _compile(tmp_path, "--planted", "--arch", "80")
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    starved = next(r for r in report["rows"] if "BLOCK_K=16 " in r["config"])
    assert starved["registers"] <= 32 and starved["stack"] + starved["local"] > 0
    assert [p.split(":")[0] for p in starved["problems"]] == ["spills"]
    oversized = next(r for r in report["rows"] if "BLOCK_K=128 " in r["config"])
    assert any(p.startswith("shared memory") and "> 166912 B of sm_80" in p for p in oversized["problems"]), oversized
