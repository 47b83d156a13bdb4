"""The SIMT-emulated CUDA kernels under AddressSanitizer+UBSan and ThreadSanitizer (CMake +
ctest), including the planted bugs each sanitizer must name. Standalone C++ programs: an
instrumented library inside an uninstrumented Python would be noise."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _tool(name: str) -> str | None:
    venv_tool = Path(sys.executable).parent / name  # pip's cmake and ninja land next to python
    return str(venv_tool) if venv_tool.exists() else shutil.which(name)


@pytest.mark.skipif(_tool("cmake") is None or _tool("ninja") is None, reason="cmake and ninja are needed")
@pytest.mark.parametrize("sanitizer", ["address", "thread"])
def test_simt_kernels_under_sanitizer(sanitizer):
    build = ROOT / "build" / f"sanitize-{sanitizer}"
    steps = [
        [_tool("cmake"), "-S", str(ROOT), "-B", str(build), "-G", "Ninja",
         f"-DCMAKE_MAKE_PROGRAM={_tool('ninja')}", f"-DMIXEDPREC_SANITIZE={sanitizer}"],
        [_tool("cmake"), "--build", str(build)],
        [_tool("ctest"), "--test-dir", str(build), "--output-on-failure"],
    ]
    for step in steps:
        result = subprocess.run(step, capture_output=True, text=True, timeout=900)
        assert result.returncode == 0, f"{' '.join(step)}\n{result.stdout[-6000:]}\n{result.stderr[-3000:]}"
    planted = "tsan_names_missing_syncthreads" if sanitizer == "thread" else "asan_names_out_of_bounds"
    assert planted in result.stdout and "100% tests passed" in result.stdout, result.stdout[-3000:]
