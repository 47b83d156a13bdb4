"""Ahead-of-time compilation of every Triton kernel launch the package makes, for sm_80 and sm_90,
with each cubin's resources (registers, shared memory, spills) read by the cuobjdump bundled
with Triton. No GPU is needed.

Triton's interpreter, which runs the kernels in CI, does not run Triton's compiler: a kernel it
accepts can still fail to compile for a GPU, spill registers, or ask for more shared memory than
the GPU has. Here the launches are taken from the launchers themselves: the ops are called
through their public API with backend="triton" on small CPU tensors (``WORKLOADS``) while
``JITFunction.run`` records each launch instead of running it, so the block sizes, num_warps,
options and constexprs compiled are the ones the launchers pass. Each launch is then specialized
by Triton's own binder for the target (argument types, 16-byte alignment, integers equal to 1
or divisible by 16, as its runtime does for a GPU launch) and compiled by ``triton.compile``.

Run it in a process without TRITON_INTERPRET, as a GPU process runs: only then are the kernels
JITFunctions, and the launchers pick their GPU constants (mixedprec/backends/triton/common.py chooses
BLOCK and LAUNCH_OPTIONS from TRITON_INTERPRET when it is imported).

    python tests/triton_aot.py [--arch 80 90] [--jobs N] [--json FILE] [--planted]

prints the resource table and exits 1 if any launch failed to compile or broke a limit
(``problems``). --planted compiles, instead, two of the package's kernels at absurd block sizes
that must be reported: the check's own test.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import multiprocessing
import os
import pkgutil
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

ARCHES = (80, 90)
# Per-block limits (CUDA C++ Programming Guide, "Technical Specifications per Compute
# Capability"): opt-in dynamic shared memory 163 KB on 8.0 and 227 KB on 9.0; 255 registers
# per thread; 64K registers per block.
SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
MAX_REGISTERS_PER_THREAD = 255
REGISTERS_PER_BLOCK = 65536

if os.environ.get("TRITON_INTERPRET", "0") == "1":
    raise RuntimeError("tests/triton_aot.py compiles for GPUs: run it without TRITON_INTERPRET=1")

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402
from triton.runtime.jit import JITFunction, create_function_from_signature  # noqa: E402

from mixedprec import _extension, ops  # noqa: E402
from mixedprec.formats import pack_weight  # noqa: E402
from mixedprec.backends.triton import common  # noqa: E402

CUOBJDUMP = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# ---------------------------------------------------------------------------------------------
# the workloads: op calls whose launches are compiled

def _packed(shape, bits: int, sparsity: float = 0.0, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 1 << bits, shape, generator=g)
    keep = torch.rand(shape, generator=g) >= sparsity if sparsity else None
    codebook = torch.sort(torch.randn(1 << bits, generator=g)).values
    return pack_weight(codes, codebook, torch.rand(shape[0], generator=g) + 0.5, bits, keep)


def _backward(y: torch.Tensor) -> None:
    y.backward(torch.ones_like(y))


def _bit_sharing(dtype, numel: int, bits: tuple[int, ...], signed: bool) -> None:
    x = torch.randn(numel, dtype=dtype, requires_grad=True)
    thresholds = torch.full((len(bits) - 1,), 1e-3)
    _backward(ops.bit_sharing_quant(x, torch.tensor(2.0), thresholds, bits, signed, backend="triton").output)


def _codebook(dtype, levels: int) -> None:
    weight = torch.randn(64, 96, dtype=dtype)
    keep = torch.rand(64, 96) < 0.5
    ops.codebook_quant(weight, torch.linspace(-2, 2, levels), torch.rand(64) + 0.5, keep, backend="triton")


def _lowbit(dtype, batch: int, out_in: tuple[int, int], bits: int, sparsity: float) -> None:
    x = torch.randn(batch, out_in[1], dtype=dtype, requires_grad=True)
    _backward(ops.lowbit_linear(x, _packed(out_in, bits, sparsity), backend="triton"))


def _conv(dtype, batch: int, c_in: int, c_out: int, size: int, kernel: int, stride: int, padding: int,
          groups: int = 1, bits: int = 4, sparsity: float = 0.0, bias: bool = True) -> None:
    x = torch.randn(batch, c_in, size, size, dtype=dtype, requires_grad=True)
    packed = _packed((c_out, c_in // groups, kernel, kernel), bits, sparsity)
    b = torch.randn(c_out) if bias else None
    _backward(ops.lut_conv2d(x, packed, b, stride, padding, 1, groups, backend="triton"))


def _workloads() -> Iterator[tuple[str, Callable[[], None]]]:
    """(name, call): forward and backward of every op, fp32/fp16/bf16 inputs, the SBS and OPQ
    settings the methods produce (default and extreme bit counts, codebook sizes, sparsity), the
    GEMV and GEMM batches, and ResNet/MobileNet convolution geometries."""
    for dtype in FLOAT_DTYPES:
        name = str(dtype).removeprefix("torch.")
        for signed in (True, False):
            yield f"bit_sharing {name} bits 2,4,8 signed={signed}", lambda d=dtype, s=signed: _bit_sharing(d, 4096, (2, 4, 8), s)
        yield f"codebook_quant {name} 16 levels", lambda d=dtype: _codebook(d, 16)
        yield f"lowbit_linear {name} batch 16 dense 4-bit", lambda d=dtype: _lowbit(d, 16, (256, 512), 4, 0.0)
        yield f"lut_conv2d {name} batch 32 3x3 dense 4-bit", lambda d=dtype: _conv(d, 32, 16, 16, 14, 3, 1, 1)
    f32 = torch.float32
    yield "bit_sharing float32 odd size", lambda: _bit_sharing(f32, 1000, (2, 4, 8), True)
    yield "bit_sharing float32 8 candidate bitwidths", lambda: _bit_sharing(f32, 4096, tuple(range(1, 9)), True)
    yield "bit_sharing float32 one bitwidth", lambda: _bit_sharing(f32, 4096, (8,), True)
    yield "codebook_quant float32 256 levels", lambda: _codebook(f32, 256)
    yield "codebook_quant float32 1 level", lambda: _codebook(f32, 1)
    yield "lowbit_linear float32 batch 1 dense 4-bit", lambda: _lowbit(f32, 1, (256, 512), 4, 0.0)
    yield "lowbit_linear float32 batch 1 75%-sparse 2-bit", lambda: _lowbit(f32, 1, (256, 512), 2, 0.75)
    yield "lowbit_linear float32 batch 5 sparse 3-bit odd sizes", lambda: _lowbit(f32, 5, (100, 70), 3, 0.5)
    yield "lut_conv2d float32 batch 1 3x3", lambda: _conv(f32, 1, 16, 16, 14, 3, 1, 1)
    yield "lut_conv2d float32 3x3 50%-sparse 3-bit", lambda: _conv(f32, 32, 16, 16, 14, 3, 1, 1, bits=3, sparsity=0.5)
    yield "lut_conv2d float32 7x7 stride 2 stem, no bias", lambda: _conv(f32, 8, 3, 16, 32, 7, 2, 3, bias=False)
    yield "lut_conv2d float32 3x3 depthwise", lambda: _conv(f32, 32, 16, 16, 14, 3, 1, 1, groups=16)


WORKLOADS = dict(_workloads())


# ---------------------------------------------------------------------------------------------
# recording launches

@dataclass
class Launch:
    kernel: JITFunction
    args: tuple
    kwargs: dict
    workload: str

    @property
    def name(self) -> str:
        return f"{self.kernel.fn.__module__.rsplit('.', 1)[-1]}.{self.kernel.__name__}"


@contextlib.contextmanager
def _recording(workload: str, launches: list[Launch]):
    """Launches are recorded instead of run; the ops accept backend="triton" for the CPU tensors
    (they hand Triton CPU tensors only under its interpreter, which is off here)."""
    run, usable = JITFunction.run, _extension.triton_usable

    def record(self, *args, grid, warmup, **kwargs):
        launches.append(Launch(self, args, kwargs, workload))

    JITFunction.run, _extension.triton_usable = record, lambda device: True
    try:
        yield
    finally:
        JITFunction.run, _extension.triton_usable = run, usable


def record_launches(workloads: dict[str, Callable[[], None]]) -> list[Launch]:
    launches: list[Launch] = []
    for name, call in workloads.items():
        with _recording(name, launches):
            call()
    return launches


# ---------------------------------------------------------------------------------------------
# specializing and compiling one launch

@dataclass
class Specialized:
    launch: Launch
    arch: int
    signature: dict
    constexprs: dict
    attrs: dict
    options: object

    def config(self) -> str:
        """The launch's configuration: its first pointer's element type (the op's input), every
        constexpr, integers Triton specialized as divisible by 16, warps, pipeline stages and
        the register cap when one is set."""
        names = self.launch.kernel.arg_names
        pointers = [t for t in self.signature.values() if t.startswith("*")]
        constexprs = " ".join(f"{names[k[0]]}={v}" for k, v in sorted(self.constexprs.items()))
        divisible = [names[k[0]] for k, v in sorted(self.attrs.items())
                     if v and not self.signature[names[k[0]]].startswith("*")]
        return " ".join(filter(None, [pointers[0].removeprefix("*") if pointers else "", constexprs,
                                      f"%16:{','.join(divisible)}" if divisible else "",
                                      f"warps={self.options.num_warps} stages={self.options.num_stages}",
                                      f"maxnreg={self.options.maxnreg}" if self.options.maxnreg else ""]))

    def key(self) -> tuple:
        return self.launch.name, self.arch, self.config()


def specialize(launch: Launch, arch: int) -> Specialized:
    """What Triton's runtime would compile for this launch on a GPU of compute capability arch
    (the steps of JITFunction.run before it compiles: its binder, then _pack_args)."""
    backend = make_backend(GPUTarget("cuda", arch, 32))
    kernel = launch.kernel
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialization, options = binder(*launch.args, **launch.kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, launch.kwargs, bound, specialization, options)
    return Specialized(launch, arch, signature, constexprs, attrs, options)


def resource_usage(cubin: bytes) -> dict[str, int]:
    """cuobjdump --dump-resource-usage of a one-function cubin: REG, STACK, SHARED, LOCAL, ..."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([str(CUOBJDUMP), "--dump-resource-usage", f.name], capture_output=True, text=True,
                             check=True).stdout
    usage = dict(re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", out))
    if len(usage) != 4:
        raise RuntimeError(f"cuobjdump reported no REG, STACK, SHARED and LOCAL usage:\n{out}")
    return {k: int(v) for k, v in usage.items()}


def compile_row(spec: Specialized) -> dict:
    """Compiles one specialized launch; the table row: resources, or the compiler's error."""
    row = {"kernel": spec.launch.name, "config": spec.config(), "arch": spec.arch, "workload": spec.launch.workload}
    start = time.perf_counter()
    try:
        compiled = triton.compile(ASTSource(spec.launch.kernel, spec.signature, spec.constexprs, spec.attrs),
                                  target=GPUTarget("cuda", spec.arch, 32), options=spec.options.__dict__)
    except Exception as exc:  # the compiler's own message is the report
        row["error"] = f"{type(exc).__name__}: {exc}"
    else:
        usage = resource_usage(compiled.asm["cubin"])
        row.update(registers=usage["REG"], stack=usage["STACK"], local=usage["LOCAL"],
                   shared=usage["SHARED"] + compiled.metadata.shared, threads=32 * compiled.metadata.num_warps)
    row["seconds"] = round(time.perf_counter() - start, 2)
    return row


def problems(row: dict) -> list[str]:
    """What keeps a compiled launch from running well on its GPU (empty: nothing)."""
    if "error" in row:
        return [f"does not compile: {row['error']}"]
    found = []
    if row["stack"] or row["local"]:
        found.append(f"spills: stack {row['stack']} B, local memory {row['local']} B per thread")
    if row["shared"] > SHARED_LIMIT[row["arch"]]:
        found.append(f"shared memory {row['shared']} B > {SHARED_LIMIT[row['arch']]} B of sm_{row['arch']}")
    if row["registers"] > MAX_REGISTERS_PER_THREAD or row["registers"] * row["threads"] > REGISTERS_PER_BLOCK:
        found.append(f"{row['registers']} registers x {row['threads']} threads do not fit a block")
    return found


_SPECIALIZED: list[Specialized] = []  # read by pool workers forked from compile_all


def _compile_index(i: int) -> dict:
    return compile_row(_SPECIALIZED[i])


def compile_all(launches: list[Launch], arches=ARCHES, jobs: int | None = None) -> list[dict]:
    """One row per distinct (kernel, target, configuration), compiled in parallel by forked
    workers (the launches hold tensors and kernels, which are not sent to them)."""
    unique: dict[tuple, Specialized] = {}
    for launch in launches:
        for arch in arches:
            spec = specialize(launch, arch)
            unique.setdefault(spec.key(), spec)
    _SPECIALIZED[:] = sorted(unique.values(), key=lambda s: "tl.dot(" not in s.launch.kernel.src)  # slowest first
    with multiprocessing.get_context("fork").Pool(jobs or os.cpu_count()) as pool:
        return pool.map(_compile_index, range(len(_SPECIALIZED)), chunksize=1)


def table(rows: list[dict]) -> str:
    """Registers per thread, shared memory (bytes per block) and spills (stack + local bytes per
    thread) of each kernel configuration, one column group per target."""
    arches = sorted({r["arch"] for r in rows})
    by_config: dict[tuple, dict[int, dict]] = {}
    for r in rows:
        by_config.setdefault((r["kernel"], r["config"]), {})[r["arch"]] = r
    width = max(len(f"{k}  {c}") for k, c in by_config)
    head = f"{'kernel  configuration':{width}s}" + "".join(f" | sm_{a}: {'regs':>4s} {'smem':>6s} {'spill':>5s}"
                                                         for a in arches)
    lines = [head, "-" * len(head)]
    for (kernel, config), per_arch in sorted(by_config.items()):
        cells = []
        for a in arches:
            r = per_arch.get(a)
            if r is None or "error" in r:
                cells.append(f" | {'(not compiled)' if r is None else 'COMPILE ERROR':>23s}")
            else:
                cells.append(f" | {'':6s}{r['registers']:>4d} {r['shared']:>6d} {r['stack'] + r['local']:>5d}")
        lines.append(f"{f'{kernel}  {config}':{width}s}" + "".join(cells))
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# planted problems: the package's own kernels at absurd block sizes

@contextlib.contextmanager
def _module_constants(module, **values):
    saved = {k: getattr(module, k) for k in values}
    for k, v in values.items():
        setattr(module, k, v)
    try:
        yield
    finally:
        for k, v in saved.items():
            setattr(module, k, v)


def planted_launches() -> list[Launch]:
    """lut_conv2d's forward twice: allowed 32 registers per thread (it needs ~200: spills), and
    with 64 x 64 x 128 tiles (~230 KB of shared memory, more than sm_80's 163 KB)."""
    from mixedprec.backends.triton import lut_conv2d

    def forward():
        ops.lut_conv2d(torch.randn(2, 64, 16, 16), _packed((64, 64, 3, 3), 4), padding=1, backend="triton")

    with _module_constants(lut_conv2d, MAX_REGISTERS=32):
        launches = record_launches({"lut_conv2d MAX_REGISTERS=32": forward})
    with _module_constants(lut_conv2d, BLOCK_K=128):
        return launches + record_launches({"lut_conv2d BLOCK_K=128": forward})


def defined_kernels() -> set[str]:
    """Every kernel in mixedprec/backends/triton: the @triton.jit functions that read their program id
    (the others are helpers inlined into them)."""
    import mixedprec.backends.triton
    found = set()
    for info in pkgutil.iter_modules(mixedprec.backends.triton.__path__):
        module = importlib.import_module(f"mixedprec.backends.triton.{info.name}")
        found |= {f"{info.name}.{name}" for name, obj in vars(module).items()
                  if isinstance(obj, JITFunction) and obj.__module__ == module.__name__ and "tl.program_id(" in obj.src}
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, nargs="+", default=list(ARCHES), choices=ARCHES)
    parser.add_argument("--jobs", type=int, default=None, help="compiler processes (default: one per core)")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    parser.add_argument("--workload", default="", metavar="TEXT", help="only the workloads whose name contains TEXT")
    parser.add_argument("--planted", action="store_true", help="compile the planted absurd configurations instead")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    workloads = {name: call for name, call in WORKLOADS.items() if args.workload in name}
    if not workloads:
        parser.error(f"--workload {args.workload!r}: no workload name contains it; names: {', '.join(WORKLOADS)}")
    launches = planted_launches() if args.planted else record_launches(workloads)
    rows = compile_all(launches, args.arch, args.jobs)
    for r in rows:
        r["problems"] = problems(r)
    # every kernel must be compiled (a new kernel needs a workload that launches it)
    unlaunched = sorted(defined_kernels() - {r["kernel"] for r in rows}) if not (args.planted or args.workload) else []
    seconds = time.perf_counter() - start
    print(f"Triton {triton.__version__}: {len(launches)} launches, {len(rows)} distinct compilations in "
          f"{seconds:.1f} s. regs: registers per thread; smem: shared memory per block (B); "
          f"spill: stack + local memory per thread (B)")
    print(table(rows))
    for r in rows:
        for p in r["problems"]:
            print(f"PROBLEM {r['kernel']} [{r['config']}] sm_{r['arch']}: {p}")
    for name in unlaunched:
        print(f"PROBLEM {name}: no workload launches it (add one to WORKLOADS)")
    if args.json:
        gpu_constants = {"BLOCK": common.BLOCK, "LAUNCH_OPTIONS": common.LAUNCH_OPTIONS}  # as a GPU process has them
        args.json.write_text(json.dumps({"rows": rows, "unlaunched": unlaunched, "seconds": seconds,
                                         "gpu_constants": gpu_constants}, indent=1))
    return 1 if unlaunched or any(r["problems"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
