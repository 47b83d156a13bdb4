"""The one command for the day a GPU is at hand (meant to finish in under 8 minutes on one
H100/H200-class GPU):

    python benchmarks/gpu_check.py [--out out/gpu_check] [--repeats 20] [--rounds 10] [--skip-tests]

1. tests: the pytest subset of the cuda and triton backends (Triton compiling for this GPU), each
   test function in its own process, several at once, the property tests at a fifth of CI's
   examples (benchmarks/gpu_check_plugin.py), and with two or more GPUs the data-parallel tests
   on nccl (tests/test_distributed.py with MIXEDPREC_TEST_DEVICE=cuda);
2. tables, each against baselines measured in the same run (the benchmarks/bench_*.py scripts on
   the GPU): bit-sharing fake-quant vs torch's learnable fake-quant, lowbit_linear vs torch's
   _weight_int4pack_mm and fp16/bf16/fp32 matmul at batch 1 and 16, lut_conv2d vs cuDNN on
   ResNet-18 layers at batch 1 and 32, and a short SBS QAT run of ResNet-20 on synthetic data
   against the float step;
3. every kernel of benchmarks/roofline.py timed on the device (the profiler's kernel time) next to
   its H100 roofline time; for the memory-bound ones the achieved bandwidth as a share of this
   GPU's peak.

Writes OUT/gpu_check.json (everything) and OUT/gpu_check.txt (the table it prints). Exit status
0, 1 if a test or a phase failed, 3 (one line) without a CUDA device. ``run(device="cpu")``
drives the same logic with the CPU kernels (tests/test_gpu_check.py).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import traceback
import xml.etree.ElementTree as ET
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch
import triton

import bench_bit_sharing
import bench_codebook_quant
import bench_lowbit_linear
import bench_lut_conv2d
import bench_qat_step
import roofline
from mixedprec import ops
from timing import device_ms, table_backends, time_ms

ROOT = Path(__file__).resolve().parents[1]
NO_CUDA_EXIT = 3


def kernel_backends(device: torch.device) -> list[str]:
    """The backends under test on the device: cuda and triton on a GPU, cpu on the CPU."""
    return [b for b in table_backends(device) if b != "reference"]


# ---------------------------------------------------------------------------------------------
# tests

@dataclass
class PytestRun:
    name: str
    paths: list[str]  # files, folders or test functions
    keyword: str  # pytest -k
    env: dict[str, str] = field(default_factory=dict)
    skip: str | None = None  # why it cannot run here


def pytest_runs(backends: list[str], gpus: int, paths: list[str]) -> list[PytestRun]:
    """The kernel tests of ``backends`` (every test whose id names one of them) and, on GPUs,
    the data-parallel tests on nccl (without the lost-rank tests, whose hang detection is gloo's,
    and the command-line run, which trains on the CPU)."""
    runs = [PytestRun(f"tests of the {' and '.join(backends)} backends", paths, " or ".join(backends))]
    if "cuda" in backends:
        runs.append(PytestRun("data-parallel tests, 2 ranks on nccl", ["tests/test_distributed.py"],
                              "not lost_rank and not cli", {"MIXEDPREC_TEST_DEVICE": "cuda"},
                              None if gpus >= 2 else f"needs 2 GPUs, found {gpus}"))
    return runs


def _pytest(args: list[str], env: dict[str, str], **kwargs) -> subprocess.CompletedProcess:
    # the plugin cuts the property tests' examples to fit the time (benchmarks/gpu_check_plugin.py)
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-p", "benchmarks.gpu_check_plugin",
                           *args], cwd=ROOT, env={**os.environ, **env}, **kwargs)


def selected_tests(run: PytestRun) -> list[str]:
    """The ids of the tests the run selects, in collection order."""
    proc = _pytest(["--collect-only", "-q", *run.paths, "-k", run.keyword], run.env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"collecting {run.name} failed:\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}")
    return [line for line in proc.stdout.splitlines() if "::" in line]


def junit_counts(xml_path: Path) -> dict[str, int]:
    suites = list(ET.parse(xml_path).getroot().iter("testsuite"))
    return {key: sum(int(s.get(key, 0)) for s in suites) for key in ("tests", "failures", "errors", "skipped")}


def run_tests(run: PytestRun, out: Path, jobs: int) -> dict:
    """Runs each selected test function in its own pytest process, ``jobs`` at a time (on a GPU
    the tests mostly wait for Triton compiling kernels, one core each); one line per function,
    the tail of its log when it fails; counts from the processes' JUnit XML."""
    result = {"name": run.name, "paths": run.paths, "keyword": run.keyword, "env": run.env}
    if run.skip:
        return {**result, "not_run": run.skip}
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()

    def one(i_function: tuple[int, str]) -> tuple[int, dict]:
        i, function = i_function
        xml, log = out / f"{i}.xml", out / f"{i}.log"
        began = time.perf_counter()
        with log.open("w") as f:
            code = _pytest([function, "-k", run.keyword, "-q", f"--junitxml={xml}"], run.env, stdout=f,
                           stderr=subprocess.STDOUT).returncode
        print(f"  {'ok' if code == 0 else 'FAILED':6s} {function} ({time.perf_counter() - began:.0f} s)", flush=True)
        if code != 0:
            print("".join(log.read_text().splitlines(keepends=True)[-40:]), flush=True)
        return code, junit_counts(xml) if xml.exists() else {"errors": 1}

    functions = list(dict.fromkeys(test.split("[")[0] for test in selected_tests(run)))  # file::function
    print(f"{run.name}: {len(functions)} test functions, {jobs} at a time", flush=True)
    with ThreadPoolExecutor(jobs) as pool:
        done = list(pool.map(one, enumerate(functions)))
    counts = {key: sum(c.get(key, 0) for _, c in done) for key in ("tests", "failures", "errors", "skipped")}
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    return {**result, **counts, "functions": len(functions), "exit_status": max((code for code, _ in done), default=5),
            "seconds": round(time.perf_counter() - start, 1), "logs": str(out)}


def tests_failed(result: dict) -> bool:
    return "not_run" not in result and (result["exit_status"] != 0 or result.get("passed", 0) == 0)


# ---------------------------------------------------------------------------------------------
# tables: ratios against the baselines of the same run

def bit_sharing_ratios(times: dict[str, float], backends: list[str]) -> dict[str, float]:
    base = "torch learnable fake-quant (8-bit)"
    return {f"bit_sharing fwd+bwd [{b}] vs {base}": times[base] / times[f"bit_sharing_quant[{b}]"] for b in backends}


def lowbit_ratios(tables: dict[int, dict[str, float]], backends: list[str], device: torch.device) -> dict[str, float]:
    ratios = {}
    for batch, times in tables.items():
        baselines = [n for n in times if n.startswith("torch ")]
        for case in bench_lowbit_linear.CASES:
            for b in backends:
                ours = times[bench_lowbit_linear.lowbit_name(case, b, device)]
                ratios.update({f"lowbit_linear {case} batch {batch} [{b}] vs {base}": times[base] / ours
                               for base in baselines})
    return ratios


def lut_ratios(rows: list[dict]) -> dict[str, float]:
    ratios = {}
    for r in rows:
        ours = [n for n in r["ms"] if n.startswith("lut")]
        ratios.update({f"lut_conv2d {r['layer']} batch {r['batch']} {o} vs {base}": r["ms"][base] / r["ms"][o]
                       for o in ours for base in r["ms"] if base not in ours})
    return ratios


def qat_ratios(rows: list[dict]) -> dict[str, float]:
    """Step time over the float step's (minima of the rounds: the least disturbed)."""
    float_ms = min(rows[0]["ms"])
    return {f"QAT {r['kind']} step [{r['backend']}] / float step": min(r["ms"]) / float_ms for r in rows[1:]}


# ---------------------------------------------------------------------------------------------
# every kernel against its roofline

def roofline_cases(device: torch.device) -> list[tuple[str, list[roofline.Kernel], Callable[[str], Callable]]]:
    """(label, the roofline kernels one call runs, backend -> step making that call) for every
    kernel of benchmarks/roofline.py, on the benchmark inputs."""
    kernels = roofline.kernels()

    def find(prefix: str, shape: str | None = None) -> list[roofline.Kernel]:
        found = [k for k in kernels if k.name.startswith(prefix) and shape in (None, k.shape)]
        if not found:
            raise LookupError(f"benchmarks/roofline.py has no kernel {prefix!r} {shape or ''}")
        return found

    bits = bench_bit_sharing.make_inputs(device=device)
    weights = bench_codebook_quant.make_inputs(device=device)
    cases = [(f"bit_sharing_quant fwd+bwd, {bench_bit_sharing.N >> 20}M fp32", find("bit_sharing "),
              lambda b: bench_bit_sharing.bit_sharing_step(b, *bits)),
             ("codebook_quant fwd, {}x{}".format(*bench_codebook_quant.SHAPE), find("codebook_quant"),
              lambda b: bench_codebook_quant.forward_step(b, *weights))]
    n, k = bench_lowbit_linear.N, bench_lowbit_linear.K
    for batch in bench_lowbit_linear.BATCHES:
        x = torch.randn(batch, k, device=device)
        for label, (nbits, sparsity) in bench_lowbit_linear.CASES.items():
            packed = bench_lowbit_linear.packed_case(nbits, sparsity, device)
            cases.append((f"lowbit_linear fwd {label}, batch {batch}", find(f"lowbit_linear fwd {label}", f"{n}x{k} batch {batch}"),
                          lambda b, p=packed, x=x: lambda: ops.lowbit_linear(x, p, backend=b)))
    for channels, size, batch in bench_lut_conv2d.CASES:
        layer = f"{channels}x{size}x{size}"
        case = bench_lut_conv2d.make_case(channels, size, batch, device=device)
        cases.append((f"lut_conv2d fwd {layer}, batch {batch}", find(f"lut_conv2d fwd {layer}", f"batch {batch}"),
                      lambda b, c=case: bench_lut_conv2d.lut_step(*c, backend=b)))
    return cases


def roofline_rows(device: torch.device, backends: list[str], peak_bytes_per_s: float | None, repeats: int) -> list[dict]:
    """Per kernel call and backend: its time on the device (CUDA: the profiler's kernel time,
    without the host's launch gaps; CPU: wall time), the H100 roofline time, and for
    memory-bound kernels the achieved bandwidth and its share of this device's peak."""
    rows = []
    for label, kernels, make in roofline_cases(device):
        moved = sum(k.bytes for k in kernels)
        memory_bound = all(k.bound_us()[1] == "memory" for k in kernels)
        for b in backends:
            step = make(b)
            ms = device_ms(step, repeats, device) if device.type == "cuda" else time_ms(step, repeats)
            achieved = moved / (ms * 1e-3)
            rows.append({"call": label, "backend": b, "us": ms * 1e3,
                         "h100_roofline_us": sum(k.bound_us()[0] for k in kernels),
                         "bound": "memory" if memory_bound else "compute", "bytes": moved,
                         "GB_per_s": achieved / 1e9 if memory_bound else None,
                         "share_of_peak": achieved / peak_bytes_per_s if memory_bound and peak_bytes_per_s else None})
    return rows


# ---------------------------------------------------------------------------------------------
# the run

def device_info(device: torch.device) -> dict:
    info = {"device": str(device), "torch": torch.__version__, "triton": triton.__version__,
            "gpus": torch.cuda.device_count() if device.type == "cuda" else 0}
    if device.type != "cuda":
        return {**info, "name": "CPU", "threads": torch.get_num_threads(), "peak_bytes_per_s": None}
    props = torch.cuda.get_device_properties(device)
    # HBM moves data on both clock edges: bytes/s = 2 x memory clock x bus width / 8
    peak = 2 * props.memory_clock_rate * 1e3 * props.memory_bus_width / 8 if props.memory_clock_rate else None
    return {**info, "name": props.name, "capability": f"sm_{props.major}{props.minor}",
            "memory_GiB": round(props.total_memory / 2**30, 1), "peak_bytes_per_s": peak}


def run(device: torch.device | str = "cuda", out: Path = ROOT / "out" / "gpu_check", repeats: int = 20,
        rounds: int = 10, test_paths: tuple[str, ...] = ("tests",), skip_tests: bool = False,
        test_jobs: int = max(1, min(8, (os.cpu_count() or 2) // 2))) -> dict:
    """Every phase on ``device``; returns the report and writes OUT/gpu_check.{json,txt}. A phase
    that raises is recorded under "errors" and the others still run."""
    device = torch.device(device)
    out.mkdir(parents=True, exist_ok=True)
    backends = kernel_backends(device)
    report = {"gpu": device_info(device), "backends": backends, "tests": [], "tables": {}, "ratios": {},
              "roofline": [], "seconds": {}, "errors": {}}
    start = time.perf_counter()

    def phase(name: str, body: Callable[[], None]) -> None:
        began = time.perf_counter()
        try:
            body()
        except Exception:  # the report says which phase failed and why; the others still run
            report["errors"][name] = traceback.format_exc()
            print(report["errors"][name], file=sys.stderr)
        report["seconds"][name] = round(time.perf_counter() - began, 1)

    def tests():
        for i, r in enumerate(pytest_runs(backends, report["gpu"]["gpus"], list(test_paths))):
            report["tests"].append(run_tests(r, out / f"tests-{i}", test_jobs))

    def bit_sharing():
        times = report["tables"]["bit_sharing"] = bench_bit_sharing.measure(device, repeats)
        report["ratios"].update(bit_sharing_ratios(times, backends))

    def lowbit():
        tables = report["tables"]["lowbit_linear"] = bench_lowbit_linear.measure(device, repeats)
        report["ratios"].update(lowbit_ratios(tables, backends, device))

    def lut():
        rows = report["tables"]["lut_conv2d"] = bench_lut_conv2d.measure(device, repeats)
        report["ratios"].update(lut_ratios(rows))

    def qat():
        rows = report["tables"]["qat_step"] = bench_qat_step.measure(rounds, device)
        report["ratios"].update(qat_ratios(rows))

    def kernels():
        report["roofline"] = roofline_rows(device, backends, report["gpu"]["peak_bytes_per_s"], repeats)

    if not skip_tests:
        phase("tests", tests)
    for name, body in (("bit_sharing", bit_sharing), ("lowbit_linear", lowbit), ("lut_conv2d", lut),
                       ("qat_step", qat), ("roofline", kernels)):
        phase(name, body)
    report["seconds"]["total"] = round(time.perf_counter() - start, 1)
    (out / "gpu_check.json").write_text(json.dumps(report, indent=1))
    (out / "gpu_check.txt").write_text(render(report))
    return report


def render(report: dict) -> str:
    gpu = report["gpu"]
    peak = gpu["peak_bytes_per_s"]
    lines = [f"gpu_check: {gpu['name']} ({gpu.get('capability', gpu['device'])}, {gpu['gpus']} GPU(s), peak "
             f"{f'{peak / 1e9:.0f} GB/s' if peak else 'bandwidth unknown'}), torch {gpu['torch']}, "
             f"triton {gpu['triton']}, {report['seconds']['total']:.0f} s", "", "tests"]
    for t in report["tests"]:
        status = (f"not run: {t['not_run']}" if "not_run" in t else
                  f"passed {t['passed']}  failed {t['failures']}  errors {t['errors']}  skipped {t['skipped']}  "
                  f"({t['functions']} test functions, {t['seconds']:.0f} s, logs in {t['logs']})")
        lines.append(f"  {t['name']:46s} {status}")
    lines += ["", "ratios (kernel tables: baseline time / ours, > 1: ours faster; QAT: step time / float step)"]
    width = max((len(n) for n in report["ratios"]), default=0)
    lines += [f"  {name:{width}s} {value:7.2f}" for name, value in report["ratios"].items()]
    lines += ["", "kernels on the device: time, H100 roofline time, and for memory-bound ones the achieved "
              "bandwidth and its share of this GPU's peak",
              f"  {'op call':44s} {'backend':8s} {'us':>9s} {'H100 us':>8s} {'bound':>7s} {'GB/s':>8s} {'of peak':>8s}"]
    for r in report["roofline"]:
        bandwidth = f"{r['GB_per_s']:8.1f}" if r["GB_per_s"] is not None else f"{'-':>8s}"
        share = f"{r['share_of_peak']:.0%}" if r["share_of_peak"] is not None else "-"
        lines.append(f"  {r['call']:44s} {r['backend']:8s} {r['us']:9.1f} {r['h100_roofline_us']:8.1f} "
                     f"{r['bound']:>7s} {bandwidth} {share:>8s}")
    lines += ["", "phases (s): " + ", ".join(f"{k} {v:.0f}" for k, v in report["seconds"].items())]
    if report["errors"]:
        lines += ["", f"FAILED phases: {', '.join(report['errors'])} (tracebacks in gpu_check.json)"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog="Phases and outputs: see the top of benchmarks/gpu_check.py.")
    parser.add_argument("--out", type=Path, default=ROOT / "out" / "gpu_check", help="folder for the report")
    parser.add_argument("--repeats", type=int, default=20, help="timed calls per kernel measurement (median)")
    parser.add_argument("--rounds", type=int, default=10, help="rounds of the QAT steps")
    parser.add_argument("--skip-tests", action="store_true", help="only the tables (e.g. to rerun them)")
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.rounds < 1:
        parser.error("--repeats and --rounds must be at least 1")
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device (torch.cuda.is_available() is False): nothing was checked")
        return NO_CUDA_EXIT
    report = run("cuda", args.out, args.repeats, args.rounds, skip_tests=args.skip_tests)
    print(render(report), end="")
    print(f"report: {args.out / 'gpu_check.json'}")
    return 1 if report["errors"] or any(tests_failed(t) for t in report["tests"]) else 0


if __name__ == "__main__":
    sys.exit(main())
