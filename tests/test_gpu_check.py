"""benchmarks/gpu_check.py without a GPU: its one line and exit status 3, its test selections, and
its whole run driven on the CPU backends (tests, tables, ratios, roofline rows, JSON and text)."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))  # gpu_check and the bench_* modules it imports

import bench_lowbit_linear  # noqa: E402
import bench_lut_conv2d  # noqa: E402
import bench_qat_step  # noqa: E402
import gpu_check  # noqa: E402


def _run_script(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), *args], cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT), **env}, capture_output=True, text=True,
                          timeout=120)


def test_without_a_gpu_one_line_and_exit_status_3():
    proc = _run_script(CUDA_VISIBLE_DEVICES="")
    assert proc.returncode == gpu_check.NO_CUDA_EXIT == 3, proc.stderr[-2000:]
    assert proc.stdout.splitlines() == ["gpu_check: no CUDA device (torch.cuda.is_available() is False): "
                                        "nothing was checked"]


def test_bad_arguments_are_refused(capsys):
    with pytest.raises(SystemExit) as exit_:
        gpu_check.main(["--repeats", "0"])
    assert exit_.value.code == 2 and "--repeats and --rounds must be at least 1" in capsys.readouterr().err


def test_gpu_selections_collect_the_kernel_and_nccl_tests():
    kernels, ddp = gpu_check.pytest_runs(["cuda", "triton"], 1, ["tests"])
    assert ddp.skip == "needs 2 GPUs, found 1"
    kernels, ddp = gpu_check.pytest_runs(["cuda", "triton"], 2, ["tests"])
    assert ddp.skip is None and ddp.env == {"MIXEDPREC_TEST_DEVICE": "cuda"}
    ids = gpu_check.selected_tests(kernels)
    assert all("cuda" in i.lower() or "triton" in i.lower() for i in ids)  # -k ignores case
    for test in ("test_bit_sharing.py::test_backends_match_reference_sizes", "test_lut_conv2d.py::test_geometries",
                 "test_lowbit_linear.py::test_backends_match_reference", "test_properties.py::test_lut_conv2d"):
        for backend in ("cuda", "triton"):
            assert any(test in i and backend in i for i in ids), (test, backend)
    ddp_ids = gpu_check.selected_tests(ddp)
    assert len(ddp_ids) == 4 and not any("lost_rank" in i or "cli" in i for i in ddp_ids), ddp_ids


def test_cpu_selection_has_no_gpu_runs():
    (kernels,) = gpu_check.pytest_runs(["cpu"], 0, ["tests/test_codebook_quant.py"])
    assert (kernels.paths, kernels.keyword, kernels.skip) == (["tests/test_codebook_quant.py"], "cpu", None)


@pytest.fixture(scope="module")
def cpu_report(tmp_path_factory):
    """One run on the CPU kernels: one timed call each, two test functions, and ResNet-20's
    float and SBS steps (not those forced to the reference) on 8 images instead of 64: the
    driver is under test here, not the CPU's speed."""
    out = tmp_path_factory.mktemp("gpu_check")
    functions = ("tests/test_codebook_quant.py::test_every_backend_breaks_ties_like_the_reference",
                 "tests/test_codebook_quant.py::test_every_backend_masks_like_the_reference")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(bench_qat_step, "BATCH", 8)
        patch.setattr(bench_qat_step, "CASES", [case for case in bench_qat_step.CASES if case[1] != "reference"])
        return gpu_check.run("cpu", out, repeats=1, rounds=1, test_paths=functions, test_jobs=2), out


def test_cpu_run_tests_tables_and_report(cpu_report):
    report, out = cpu_report
    assert report["errors"] == {}, "\n".join(report["errors"].values())
    assert report["backends"] == ["cpu"] and report["gpu"]["name"] == "CPU"
    (tests,) = report["tests"]
    assert tests["exit_status"] == 0 and tests["functions"] == 2 and tests["passed"] > 0
    assert tests["failures"] == tests["errors"] == 0 and len(list(Path(tests["logs"]).glob("*.log"))) == 2
    assert not gpu_check.tests_failed(tests)

    ratios = report["ratios"]
    expected = {"bit_sharing fwd+bwd [cpu] vs torch learnable fake-quant (8-bit)"}
    expected |= {f"lowbit_linear {case} batch {batch} [cpu] vs {base}" for case in bench_lowbit_linear.CASES
                 for batch in bench_lowbit_linear.BATCHES for base in ("torch fp32 matmul", "torch int4pack_mm (bf16 x)")}
    expected |= {f"lut_conv2d {c}x{s}x{s} batch {b} lut vs torch" for c, s, b in bench_lut_conv2d.CASES}
    expected |= {f"QAT {kind} step [cpu] / float step" for kind in ("search", "finetune")}
    assert set(ratios) == expected
    assert all(math.isfinite(v) and v > 0 for v in ratios.values())

    rows = {r["call"]: r for r in report["roofline"]}
    assert all(r["backend"] == "cpu" for r in report["roofline"]) and len(rows) == len(report["roofline"])
    assert set(rows) == {"bit_sharing_quant fwd+bwd, 4M fp32", "codebook_quant fwd, 1024x4096",
                         *(f"lowbit_linear fwd {case}, batch {b}" for case in bench_lowbit_linear.CASES
                           for b in bench_lowbit_linear.BATCHES),
                         *(f"lut_conv2d fwd {c}x{s}x{s}, batch {b}" for c, s, b in bench_lut_conv2d.CASES)}
    for r in rows.values():  # no peak bandwidth known for a CPU
        assert r["us"] > 0 and r["h100_roofline_us"] > 0 and r["share_of_peak"] is None
        assert (r["GB_per_s"] > 0) if r["bound"] == "memory" else (r["GB_per_s"] is None)
    assert rows["codebook_quant fwd, 1024x4096"]["bound"] == "memory"
    assert rows["lut_conv2d fwd 64x56x56, batch 32"]["bound"] == "compute"

    assert json.loads((out / "gpu_check.json").read_text()) == json.loads(json.dumps(report))
    text = (out / "gpu_check.txt").read_text()
    assert text == gpu_check.render(report)
    assert all(name in text for name in ratios) and "passed" in text and "FAILED" not in text


def test_a_failing_phase_is_reported_and_the_others_run(tmp_path, monkeypatch):
    """The measurements replaced by fixed numbers (and one by a failure): the driver alone."""
    def broken(*args):
        raise RuntimeError("planted failure")

    monkeypatch.setattr(gpu_check.bench_bit_sharing, "measure", lambda *a: {
        "bit_sharing_quant[cpu]": 2.0, "torch learnable fake-quant (8-bit)": 5.0})
    monkeypatch.setattr(gpu_check.bench_lowbit_linear, "measure", lambda *a: {})
    monkeypatch.setattr(gpu_check.bench_lut_conv2d, "measure", broken)
    monkeypatch.setattr(gpu_check.bench_qat_step, "measure", lambda *a: [
        {"kind": "float", "backend": "-", "ms": [2.0, 4.0]}, {"kind": "search", "backend": "cpu", "ms": [3.0]}])
    monkeypatch.setattr(gpu_check, "roofline_rows", lambda *a: [])
    report = gpu_check.run("cpu", tmp_path, repeats=1, rounds=1, skip_tests=True)
    assert list(report["errors"]) == ["lut_conv2d"] and "planted failure" in report["errors"]["lut_conv2d"]
    assert report["ratios"] == {"bit_sharing fwd+bwd [cpu] vs torch learnable fake-quant (8-bit)": 2.5,
                                "QAT search step [cpu] / float step": 1.5}
    assert "FAILED phases: lut_conv2d" in (tmp_path / "gpu_check.txt").read_text()
