"""The kernels under the sanitizers, as standalone C++ programs built by CMake and run by ctest
(an instrumented library inside an uninstrumented Python would be noise):

- every CUDA kernel, compiled as C++ under the SIMT emulation, under AddressSanitizer+UBSan and
  under ThreadSanitizer (tests/csrc/simt_kernel_tests.cpp);
- every CPU kernel, linked against libtorch, under AddressSanitizer+UBSan
  (tests/csrc/cpu_kernel_tests.cpp).

Each build also runs a planted bug that its sanitizer must name, so a sanitizer that stays quiet
fails the test; any finding aborts its program (halt_on_error, -fno-sanitize-recover=all)."""
from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _tool(name: str) -> str | None:
    venv_tool = Path(sys.executable).parent / name  # pip's cmake and ninja land next to python
    return str(venv_tool) if venv_tool.exists() else shutil.which(name)


needs_cmake = pytest.mark.skipif(_tool("cmake") is None or _tool("ninja") is None, reason="cmake and ninja are needed")


def _build_and_test(build: Path, options: list[str], target: str | None, tests: str, planted: str) -> None:
    """Configures, builds (all, or one target) and runs the ctest tests matching ``tests``,
    which must all pass, the planted-bug test among them."""
    steps = [
        [_tool("cmake"), "-S", str(ROOT), "-B", str(build), "-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={_tool('ninja')}",
         *options],
        [_tool("cmake"), "--build", str(build), *(["--target", target] if target else [])],
        [_tool("ctest"), "--test-dir", str(build), "--output-on-failure", "-R", tests],
    ]
    env = dict(os.environ, ASAN_OPTIONS="halt_on_error=1", UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1",
               TSAN_OPTIONS="halt_on_error=1")
    for step in steps:
        result = subprocess.run(step, capture_output=True, text=True, timeout=900, env=env)
        assert result.returncode == 0, f"{' '.join(step)}\n{result.stdout[-6000:]}\n{result.stderr[-3000:]}"
    assert planted in result.stdout and "100% tests passed" in result.stdout, result.stdout[-3000:]


@needs_cmake
@pytest.mark.parametrize("sanitizer", ["address", "thread"])
def test_simt_kernels_under_sanitizer(sanitizer):
    planted = "tsan_names_missing_syncthreads" if sanitizer == "thread" else "asan_names_out_of_bounds"
    _build_and_test(ROOT / "build" / f"sanitize-{sanitizer}", [f"-DMIXEDPREC_SANITIZE={sanitizer}"], None, ".",
                    planted)


def _torch_cmake_options() -> list[str] | None:
    """What torch's CMake config needs here, or None where it cannot be satisfied: a CUDA build
    of torch wants the CUDA toolkit (nvcc) and nvrtc, which may come from the nvidia wheels."""
    options = [f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}"]
    if torch.version.cuda is None:
        return options
    homes = [os.environ.get("CUDA_HOME"), "/usr/local/cuda"]
    if not any(home and Path(home, "bin", "nvcc").exists() for home in homes):
        return None
    site = Path(torch.__file__).resolve().parents[1]
    nvrtc = sorted(glob.glob(str(site / "nvidia" / "cu*" / "lib" / "libnvrtc.so.*")))
    return options + [f"-DCUDA_nvrtc_LIBRARY={nvrtc[0]}"] if nvrtc else options


@needs_cmake
@pytest.mark.skipif(_torch_cmake_options() is None,
                    reason="torch is a CUDA build and its CMake config needs the CUDA toolkit (nvcc), not found")
@pytest.mark.parametrize("arch", [None, "x86-64-v3"], ids=["native", "avx2"])
def test_cpu_kernels_under_address_sanitizer(arch, monkeypatch):
    """The CPU kernels as this machine builds them (-march=native), and as a CPU with AVX2 but no
    AVX-512 builds them (x86-64-v3: 8-lane vectors, no AVX-512 paths), which this machine's own
    build never exercises: int8_nchw_epilogue's 16x16 tiles once read past 8-lane vectors there."""
    if arch is not None:
        if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
            pytest.skip("this CPU cannot run an AVX2 build")
        monkeypatch.setenv("MIXEDPREC_CPU_ARCH", arch)
    _build_and_test(ROOT / "build" / f"sanitize-address-cpu{'' if arch is None else '-' + arch}",
                    ["-DMIXEDPREC_SANITIZE=address", "-DMIXEDPREC_CPU_KERNEL_TESTS=ON", *_torch_cmake_options()],
                    "cpu_kernel_tests", "cpu", "asan_names_cpu_out_of_bounds")
