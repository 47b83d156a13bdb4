"""The build itself: the CUDA kernels are compiled and linked whenever they can be, and ptxas
reports no register spills for any of them."""
from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest
import torch

from mixedprec import _extension

ROOT = Path(__file__).resolve().parents[1]
CUDA_HOME = Path(os.environ.get("CUDA_HOME", "/usr/local/cuda"))
NVCC = CUDA_HOME / "bin" / "nvcc"


def kernel_sources() -> list[Path]:
    return sorted((ROOT / "csrc" / "ops").glob("*/*.cu"))  # as setup.py and CMakeLists.txt find them


def test_extension_loaded_with_every_backend_it_can_have():
    assert _extension.LOAD_ERROR is None, _extension.LOAD_ERROR
    assert _extension.CPU_BUILT and _extension.SIMT_BUILT
    if torch.version.cuda and NVCC.exists() and os.environ.get("MIXEDPREC_NO_CUDA", "0") != "1":
        assert _extension.CUDA_BUILT, "torch is a CUDA build and nvcc exists, but no CUDA kernels were linked"


@pytest.mark.skipif(not NVCC.exists(), reason=f"nvcc not found at {NVCC} (set CUDA_HOME)")
@pytest.mark.parametrize("source", kernel_sources(), ids=lambda p: p.name)
def test_ptxas_reports_no_spills(source, tmp_path):
    result = subprocess.run(
        [str(NVCC), "-std=c++20", "-O3", f"-I{ROOT / 'csrc' / 'include'}", "-Xptxas", "-v",
         "-gencode", "arch=compute_80,code=sm_80", "-gencode", "arch=compute_90,code=sm_90",
         "-c", str(source), "-o", str(tmp_path / "kernel.o")],
        capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    usage = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", result.stderr)
    functions = re.findall(r"Compiling entry function '([^']+)' for '(sm_\d+)'", result.stderr)
    assert usage and len(usage) == len(functions), result.stderr[-4000:]
    spilling = [f for f, (stores, loads) in zip(functions, usage) if stores != "0" or loads != "0"]
    assert not spilling, f"register spills in {spilling}"
