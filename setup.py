"""Builds two extensions from csrc/ (see csrc/README.md): mixedprec._C, the CPU kernels always and
the CUDA kernels (sm_80, sm_90) when torch is a CUDA build and nvcc is found (MIXEDPREC_NO_CUDA=1
skips them), and the test-only mixedprec._simt, the CUDA kernel sources run under SIMT emulation."""
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


def sources() -> dict[str, list[str]]:
    """csrc/ by role (csrc/README.md), found by globbing: adding an op adds a folder csrc/ops/<op>/
    and edits no list. Paths relative to the repository root."""
    def rel(paths):
        return sorted(str(p.relative_to(ROOT)) for p in paths)
    ops = sorted(p for p in (CSRC / "ops").iterdir() if p.is_dir())
    return {
        "glue": rel(op / f"{op.name}_glue.cpp" for op in ops),  # schemas, checks, registration
        "cpu": rel(p for op in ops for p in op.glob("*_cpu.cpp")) + rel([CSRC / "cpu" / "switches.cpp"]),
        "kernel": rel(p for op in ops for p in op.glob("*.cu")),  # raw-pointer kernels (no torch)
        "module": rel([CSRC / "register" / "module.cpp"]),
    }


def generated(name: str, text: str) -> str:
    """A generated source under build/simt_src/ (rewritten only when it changes)."""
    out_dir = ROOT / "build" / "simt_src"
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / name
    if not path.exists() or path.read_text() != text:
        path.write_text(text)
    return str(path.relative_to(ROOT))


def simt_sources(src: dict[str, list[str]]) -> list[str]:
    """The sources of mixedprec._simt, one generated file each (so that their objects do not
    collide with _C's): every .cu behind the SIMT header, the glue and the module init."""
    files = [generated(f"simt_{Path(cu).stem}.cpp", f'#include "simt/simt.h"\n#include "{ROOT / cu}"\n')
             for cu in src["kernel"]]
    files += [generated(f"{Path(p).stem}.cpp", f'#include "{ROOT / p}"\n') for p in src["glue"] + src["module"]]
    return files


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


def extensions():
    src = sources()
    # -fopenmp: at::parallel_for is inline and runs single-threaded in code built without it.
    cxx = ["-O3", "-std=c++20", "-fopenmp", "-ffp-contract=off", "-fvisibility=hidden", "-Wno-unknown-pragmas", "-Wno-maybe-uninitialized"]
    if platform.machine() in ("x86_64", "AMD64"):
        # Built from source for the machine it runs on (AVX-512 where present); set
        # MIXEDPREC_CPU_ARCH=x86-64-v3 for a portable AVX2 build. csrc/cpu/vec_ops.h picks
        # ATen's vector width from what the target enables.
        cxx += [f"-march={os.environ.get('MIXEDPREC_CPU_ARCH', 'native')}"]
    include_dirs = [str(CSRC / "include"), str(CSRC)]
    common = dict(include_dirs=include_dirs, extra_link_args=["-fopenmp"])
    # test-only: the .cu sources under SIMT emulation, registered in namespace mixedprec_simt
    simt = cpp_extension.CppExtension("mixedprec._simt", simt_sources(src),
                                      extra_compile_args={"cxx": cxx + ["-DMP_SIMT_LIBRARY"]}, **common)
    c_sources = src["glue"] + src["cpu"] + src["module"]
    if not cuda_wanted():
        return [cpp_extension.CppExtension("mixedprec._C", c_sources, extra_compile_args={"cxx": cxx}, **common), simt]
    nvcc = ["-O3", "-std=c++20", "-Xptxas", "-v", "-lineinfo",
            "-gencode", "arch=compute_80,code=sm_80", "-gencode", "arch=compute_90,code=sm_90"]
    common["include_dirs"] = include_dirs + nvidia_wheel_includes()
    return [cpp_extension.CUDAExtension("mixedprec._C", c_sources + src["kernel"],
                                        extra_compile_args={"cxx": cxx + ["-DMP_WITH_CUDA"], "nvcc": nvcc}, **common),
            simt]


setup(
    ext_modules=extensions(),
    cmdclass={"build_ext": cpp_extension.BuildExtension},
)
