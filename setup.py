"""Builds mixedprec._C from csrc/ (see csrc/README.md): the CPU kernels always, the SIMT-emulated
CUDA kernels always, and the real CUDA kernels (sm_80, sm_90) when torch is a CUDA build and nvcc
is found. Set MIXEDPREC_NO_CUDA=1 to skip the CUDA kernels."""
from __future__ import annotations

import os
import platform
from pathlib import Path

ROOT = Path(__file__).resolve().parent
CSRC = ROOT / "csrc"


def _cuda_home() -> str | None:
    # torch guesses CUDA_HOME from the `nvcc` on PATH, which can be a wrapper script; the
    # standard install location is the better guess, so decide before torch does.
    for candidate in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if candidate and (Path(candidate) / "bin" / "nvcc").exists():
            return candidate
    return None


if _cuda_home():
    os.environ["CUDA_HOME"] = _cuda_home()

import torch  # noqa: E402
from setuptools import setup  # noqa: E402
from torch.utils import cpp_extension  # noqa: E402


def read_sources() -> dict[str, list[str]]:
    """csrc/sources.txt grouped by kind, as paths relative to the repository root."""
    groups: dict[str, list[str]] = {"torch": [], "kernel": [], "cuda": []}
    for line in (CSRC / "sources.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            kind, path = line.split()
            groups[kind].append(f"csrc/{path}")
    return groups


def simt_wrappers(kernels: list[str]) -> list[str]:
    """One generated C++ file per .cu: the SIMT header, then the kernel source."""
    out_dir = ROOT / "build" / "simt_src"
    out_dir.mkdir(parents=True, exist_ok=True)
    wrappers = []
    for cu in kernels:
        wrapper = out_dir / f"simt_{Path(cu).stem}.cpp"
        text = f'#include "mixedprec/simt.h"\n#include "{ROOT / cu}"\n'
        if not wrapper.exists() or wrapper.read_text() != text:
            wrapper.write_text(text)
        wrappers.append(str(wrapper.relative_to(ROOT)))
    return wrappers


def cuda_wanted() -> bool:
    return (os.environ.get("MIXEDPREC_NO_CUDA", "0") != "1" and torch.version.cuda is not None
            and cpp_extension.CUDA_HOME is not None)


def nvidia_wheel_includes() -> list[str]:
    """Headers (cuSPARSE, cuBLAS, ...) that torch's CUDA headers include live in the nvidia wheels."""
    import importlib.util

    spec = importlib.util.find_spec("nvidia")
    if spec is None or not spec.submodule_search_locations:
        return []
    return [str(p) for base in spec.submodule_search_locations for p in Path(base).glob("cu*/include")]


def extension():
    sources = read_sources()
    files = sources["torch"] + simt_wrappers(sources["kernel"])
    # -fopenmp: at::parallel_for is inline and runs single-threaded in code built without it.
    cxx = ["-O3", "-std=c++20", "-fopenmp", "-ffp-contract=off", "-fvisibility=hidden", "-Wno-unknown-pragmas", "-Wno-maybe-uninitialized"]
    if platform.machine() in ("x86_64", "AMD64"):
        # Built from source for the machine it runs on (AVX-512 where present); set
        # MIXEDPREC_CPU_ARCH=x86-64-v3 for a portable AVX2 build. csrc/cpu/vec_ops.h picks
        # ATen's vector width from what the target enables.
        cxx += [f"-march={os.environ.get('MIXEDPREC_CPU_ARCH', 'native')}"]
    include_dirs = [str(CSRC / "include"), str(CSRC)]
    if not cuda_wanted():
        return cpp_extension.CppExtension("mixedprec._C", files, include_dirs=include_dirs,
                                          extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"])
    nvcc = ["-O3", "-std=c++20", "-Xptxas", "-v", "-lineinfo",
            "-gencode", "arch=compute_80,code=sm_80", "-gencode", "arch=compute_90,code=sm_90"]
    return cpp_extension.CUDAExtension("mixedprec._C", files + sources["kernel"] + sources["cuda"],
                                       include_dirs=include_dirs + nvidia_wheel_includes(),
                                       extra_compile_args={"cxx": cxx, "nvcc": nvcc}, extra_link_args=["-fopenmp"])


setup(
    ext_modules=[extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension},
)
