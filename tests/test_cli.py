"""The `mixedprec` command line, driven as a user drives it: in a subprocess, from a scratch folder.

Every subcommand runs on tiny settings (a 4-channel digits_cnn, one epoch per phase); every
user mistake must end in one line on stderr naming the problem, no traceback, exit status 2.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from mixedprec.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
TINY_MODEL = ["--model", "digits_cnn", "--model-arg", "width=4"]
TINY_TRAINING = ["--float-epochs", "1", "--finetune-epochs", "1"]


def mixedprec(*args: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p))
    return subprocess.run([sys.executable, "-m", "mixedprec", *map(str, args)], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def assert_ok(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"


def assert_one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, f"exit {result.returncode}, stderr:\n{result.stderr}"
    assert len(lines) == 1 and lines[0].startswith("mixedprec") and ": error: " in lines[0], result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    for fragment in fragments:
        assert fragment in lines[0], f"{fragment!r} not in {lines[0]!r}"


# ---------------------------------------------------------------- help

def _parsers(parser: argparse.ArgumentParser, prog: str = "mixedprec"):
    yield prog, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _parsers(sub, f"{prog} {name}")


def test_every_option_of_every_command_has_help():
    seen = []
    for prog, parser in _parsers(build_parser()):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                assert all(c.help for c in action._choices_actions), f"{prog}: a subcommand without help"
                continue
            assert action.help and action.help != argparse.SUPPRESS, f"{prog} {action.option_strings or action.dest}: no help"
            seen.append((prog, action.dest))
    assert {p for p, _ in seen} >= {"mixedprec demo", "mixedprec compress sbs", "mixedprec compress opq",
                                    "mixedprec report", "mixedprec bench"}


@pytest.mark.parametrize("command", [[], ["demo"], ["compress", "sbs"], ["compress", "opq"], ["report"], ["bench"]])
def test_help_exits_zero_and_shows_defaults(tmp_path, command):
    result = mixedprec(*command, "--help", cwd=tmp_path)
    assert_ok(result)
    assert result.stdout.startswith("usage: mixedprec")
    if command and command != ["report"] and command != ["bench"]:
        assert "(default: " in result.stdout


# ---------------------------------------------------------------- bad input: one line, exit 2

USER_CODE = '''
import torch
from torch import nn

def not_a_module():
    return 3

def three_classes():
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 3))

def boom():
    raise RuntimeError("boom in the factory")

def wrong_input():
    return nn.Linear(5, 10)

def mlp(hidden=16):
    return nn.Sequential(nn.Flatten(), nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, 10))

class Residual(nn.Module):
    def __init__(self, width=4):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(1, width, 3, padding=1), nn.Conv2d(width, width, 3, padding=1)
        self.fc = nn.Linear(width, 10)

    def forward(self, x):
        x = torch.relu(self.conv1(x))
        x = torch.relu(x + self.conv2(x))
        return self.fc(x.mean((2, 3)))

def residual(width=4):
    return Residual(width)
'''


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    """A folder with a user's model module, weights files and a few broken files."""
    folder = tmp_path_factory.mktemp("user")
    (folder / "usermodels.py").write_text(textwrap.dedent(USER_CODE))
    sys.path.insert(0, str(folder))
    try:
        import usermodels
    finally:
        sys.path.remove(str(folder))
    torch.save(usermodels.mlp(hidden=16).state_dict(), folder / "mlp16.pt")
    torch.save(usermodels.mlp(hidden=8).state_dict(), folder / "mlp8.pt")
    (folder / "garbage.pt").write_bytes(b"not a torch file")
    (folder / "notes.txt").write_text("hello")
    (folder / "cifar").mkdir()
    (folder / "images" / "train" / "cat").mkdir(parents=True)
    return folder


BAD_INPUTS = {
    "no command": ([], ["required", "COMMAND"]),
    "unknown command": (["frobnicate"], ["invalid choice", "frobnicate"]),
    "compress without method": (["compress"], ["required"]),
    "unknown zoo model": (["compress", "sbs", "--model", "resnet9000"], ["resnet9000", "digits_cnn"]),
    "module not importable": (["compress", "opq", "--model", "nosuchmodule:make"], ["nosuchmodule", "No module named"]),
    "function missing": (["compress", "opq", "--model", "usermodels:nothing"], ["has no attribute", "nothing"]),
    "file missing": (["compress", "opq", "--model", "missing.py:make"], ["missing.py", "not found"]),
    "factory returns no module": (["compress", "opq", "--model", "usermodels:not_a_module"], ["int", "not a torch.nn.Module"]),
    "factory raises": (["compress", "opq", "--model", "usermodels:boom"], ["boom in the factory"]),
    "model does not take the data": (["compress", "opq", "--model", "usermodels:wrong_input"], ["does not accept"]),
    "model has the wrong classes": (["compress", "opq", "--model", "usermodels:three_classes"], ["(1, 10)"]),
    "bad model arg": (["compress", "opq", "--model-arg", "width"], ["KEY=VALUE"]),
    "weights missing": (["compress", "opq", "--weights", "nope.pt"], ["nope.pt", "not found"]),
    "weights not a state_dict": (["compress", "opq", "--model", "usermodels:mlp", "--weights", "garbage.pt"], ["garbage.pt"]),
    "weights of another model": (["compress", "opq", "--model", "usermodels:mlp", "--weights", "mlp8.pt"],
                                 ["do not fit", "wrong shape"]),
    "nothing to compress": (["compress", "opq", "--float-epochs", "0"], ["--weights", "--float-epochs"]),
    "cifar without data dir": (["compress", "sbs", "--data", "cifar10"], ["--data-dir"]),
    "data dir absent": (["compress", "sbs", "--data", "cifar100", "--data-dir", "nowhere"], ["nowhere", "not found"]),
    "cifar not downloaded": (["compress", "opq", "--data", "cifar10", "--data-dir", "cifar"], ["cifar-10-batches-py", "never downloads"]),
    "image folder without val": (["compress", "opq", "--data", "imagefolder", "--data-dir", "images"], ["val/"]),
    "data dir for digits": (["compress", "opq", "--data-dir", "images"], ["--data-dir"]),
    "bad candidate bits": (["compress", "sbs", "--weight-bits", "3", "4"], ["--weight-bits"]),
    "negative rate": (["compress", "opq", "--rate", "-2"], ["--rate"]),
    "rate out of reach": (["compress", "opq", "--model", "usermodels:mlp", "--rate", "500"], ["--rate 500", "out of reach"]),
    "demo rate out of reach": (["demo", "--width", "4", "--opq-rate", "500"], ["--opq-rate 500", "out of reach"]),
    "zero epochs for float": (["demo", "--float-epochs", "0"], ["--float-epochs"]),
    "out is a file": (["demo", "--out", "notes.txt", "--float-epochs", "1"], ["notes.txt", "not a folder"]),
    "report of a missing file": (["report", "nothing.safetensors"], ["nothing.safetensors", "not found"]),
    "report of a text file": (["report", "notes.txt"], ["notes.txt"]),
    "report with a bad input shape": (["report", "notes.txt", "--input-shape", "3,x"], ["--input-shape"]),
    "unknown benchmark": (["bench", "no_such_kernel"], ["no_such_kernel", "bit_sharing"]),
    "benchmark folder absent": (["bench", "--dir", "nowhere"], ["nowhere"]),
}
if not torch.cuda.is_available():
    BAD_INPUTS["cuda without a GPU"] = (["compress", "opq", "--device", "cuda"], ["--device cuda"])


@pytest.fixture(scope="module")
def bad_input_results(scratch) -> dict[str, subprocess.CompletedProcess]:
    """Every bad-input command, run a few at a time (each is one short-lived process)."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=max(2, min(4, os.cpu_count() or 2))) as pool:
        futures = {case: pool.submit(mixedprec, *args, cwd=scratch) for case, (args, _) in BAD_INPUTS.items()}
        return {case: future.result() for case, future in futures.items()}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_gives_one_line_and_exit_2(bad_input_results, case):
    assert_one_line_error(bad_input_results[case], *BAD_INPUTS[case][1])


# ---------------------------------------------------------------- compress and report

@pytest.fixture(scope="module")
def opq_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("opq")
    result = mixedprec("compress", "opq", *TINY_MODEL, *TINY_TRAINING, "--rate", "8", "--bits", "2", "4", "8", "--out",
                       out, "-q", cwd=out)
    assert_ok(result)
    assert "packed model:" in result.stdout and "total" in result.stdout
    assert result.stderr == ""  # --quiet: no progress bars
    return out


def test_compress_opq_writes_a_packed_model_and_its_record(opq_run):
    record = json.loads((opq_run / "packed.json").read_text())
    assert record["method"] == "OPQ" and record["input_shape"] == [1, 8, 8] and record["model"] == "digits_cnn"
    assert (opq_run / "packed.safetensors").stat().st_size == record["file_bytes"]
    report = record["report"]
    assert [layer["form"] for layer in report["layers"]] == ["packed"] * 5
    assert 0 <= record["top1"] <= 100 and record["top1"] == pytest.approx(record["top1_before_packing"], abs=1.0)
    # the real-bytes rate the allocation aimed at, measured on the packed layers
    assert report["real_rate"] == pytest.approx(8.0, rel=0.15)
    assert report["bops"] < report["baseline_bops"]
    assert {layer["bits"] for layer in record["details"]["plan"]["layers"]} <= {2, 4, 8}  # --bits 2 4 8
    assert record["latency_ms_batch1"] > 0


def test_report_prints_layers_and_totals(opq_run):
    result = mixedprec("report", "packed.safetensors", cwd=opq_run)
    assert_ok(result)
    lines = result.stdout.splitlines()
    assert any(line.startswith("total") for line in lines)
    for column in ("w bits", "a bits", "sparsity", "BOPs", "packed B", "real x", "paper x"):
        assert column in result.stdout
    assert sum(line.split()[1:2] == ["packed"] for line in lines) == 5
    timed = next(line for line in lines if line.startswith("latency at batch 1 on cpu: "))
    assert "float model" in timed and "not timed" not in timed  # measured, never compared here


def test_report_json_matches_the_record(opq_run):
    result = mixedprec("report", "packed.safetensors", "--json", cwd=opq_run)
    assert_ok(result)
    report, record = json.loads(result.stdout), json.loads((opq_run / "packed.json").read_text())
    assert report["bops"] == record["report"]["bops"] and report["packed_bytes"] == record["report"]["packed_bytes"]
    assert report["file_bytes"] == (opq_run / "packed.safetensors").stat().st_size
    timed = report["latency"]
    assert timed["batch"] == 1 and timed["model_ms"] > 0 and timed["float_ms"] > 0 and timed["speedup"] > 0


def test_report_no_latency_times_nothing(opq_run):
    table, as_json = (mixedprec("report", "packed.safetensors", "--no-latency", *more, cwd=opq_run)
                      for more in ([], ["--json"]))
    assert_ok(table)
    assert_ok(as_json)
    assert "latency" not in table.stdout and "latency" not in json.loads(as_json.stdout)


def test_report_needs_an_input_shape_without_a_record(opq_run, tmp_path):
    (tmp_path / "alone.safetensors").write_bytes((opq_run / "packed.safetensors").read_bytes())
    assert_one_line_error(mixedprec("report", "alone.safetensors", cwd=tmp_path), "--input-shape")
    result = mixedprec("report", "alone.safetensors", "--input-shape", "1,8,8", "--json", cwd=tmp_path)
    assert_ok(result)
    assert json.loads(result.stdout)["bops"] == json.loads((opq_run / "packed.json").read_text())["report"]["bops"]


def test_compress_sbs_user_model_with_weights(scratch, tmp_path):
    """A user's module:function and a state_dict, SBS with bits only; no float training."""
    result = mixedprec("compress", "sbs", "--model", f"{scratch / 'usermodels.py'}:mlp", "--weights", scratch / "mlp16.pt",
                       "--search-epochs", "1", "--finetune-epochs", "1", "--no-prune", "--out", tmp_path / "run",
                       cwd=tmp_path)
    assert_ok(result)
    assert "training" not in result.stdout  # the weights were given
    record = json.loads((tmp_path / "run" / "packed.json").read_text())
    assert record["method"] == "SBS" and record["weights"].endswith("mlp16.pt")
    bits = [(layer["weight_bits"], layer["act_bits"]) for layer in record["report"]["layers"]]
    assert bits[0] == (8, 8) and bits[-1] == (8, 8)  # first and last layer stay at 8 bits
    assert "search" in result.stderr  # progress bars without --quiet


def test_compress_of_a_user_class_ends_in_a_file_that_report_and_load_read(scratch, tmp_path):
    model = f"{scratch / 'usermodels.py'}:residual"
    result = mixedprec("compress", "opq", "--model", model, "--model-arg", "width=6", *TINY_TRAINING, "--rate", "4",
                       "--out", "run", "-q", cwd=tmp_path)
    assert_ok(result)
    assert "trust_code=True" in result.stdout  # how to load it
    assert_one_line_error(mixedprec("report", "run/packed.safetensors", cwd=tmp_path), "--trust-code", "--model")
    trusted = mixedprec("report", "run/packed.safetensors", "--trust-code", "--json", cwd=tmp_path)
    built = mixedprec("report", "run/packed.safetensors", "--model", model, "--model-arg", "width=6", "--json",
                      cwd=tmp_path)
    assert_ok(trusted)
    assert_ok(built)
    assert json.loads(trusted.stdout)["bops"] == json.loads(built.stdout)["bops"] > 0
    sys.path.insert(0, str(scratch))
    try:
        import usermodels
    finally:
        sys.path.remove(str(scratch))
    import mixedprec as library
    loaded = library.load(tmp_path / "run" / "packed.safetensors", model=usermodels.residual(width=6))
    assert isinstance(loaded.conv2, library.nn.PackedConv2d)


def _mtimes(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in folder.glob("*.pt")}


def test_a_failed_save_names_the_kept_model_and_resume_does_not_train_again(tmp_path):
    args = ("compress", "sbs", *TINY_MODEL, *TINY_TRAINING, "--search-epochs", "1", "--out", "run")
    (tmp_path / "run" / "packed.safetensors").mkdir(parents=True)  # saving there fails
    failed = mixedprec(*args, cwd=tmp_path)
    assert failed.returncode == 1, failed.stderr
    message = failed.stderr.strip().splitlines()[-1]
    assert "failed" in message and "checkpoints/compressed.pt" in message and "--resume" in message
    kept = _mtimes(tmp_path / "run" / "checkpoints")
    assert set(kept) == {"float.pt", "search.pt", "finetune.pt", "compressed.pt"}
    assert_one_line_error(mixedprec(*args, cwd=tmp_path), "unfinished run", "--resume")
    assert_one_line_error(mixedprec(*args, "--resume", "--lr", "0.5", cwd=tmp_path), "--resume", "--lr")
    (tmp_path / "run" / "packed.safetensors").rmdir()
    resumed = mixedprec(*args, "--resume", cwd=tmp_path)
    assert_ok(resumed)
    assert "no training" in resumed.stdout and _mtimes(tmp_path / "run" / "checkpoints") == kept
    assert json.loads((tmp_path / "run" / "packed.json").read_text())["method"] == "SBS"


def test_a_run_killed_after_training_resumes_without_training(tmp_path):
    args = ["compress", "opq", *TINY_MODEL, *TINY_TRAINING, "--rate", "8", "--out", "run"]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p))
    with subprocess.Popen([sys.executable, "-m", "mixedprec", *args], cwd=tmp_path, env=env, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.DEVNULL) as proc:
        for line in proc.stdout:
            if line.startswith("finetuned model kept in"):
                proc.kill()
                break
    assert proc.returncode != 0 and not (tmp_path / "run" / "packed.json").exists()
    kept = _mtimes(tmp_path / "run" / "checkpoints")
    resumed = mixedprec(*args, "--resume", cwd=tmp_path)
    assert_ok(resumed)
    assert "no training" in resumed.stdout and _mtimes(tmp_path / "run" / "checkpoints") == kept


def test_compress_on_an_image_folder(tmp_path):
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    for split in ("train", "val"):
        for c, name in enumerate(("dark", "light")):
            (tmp_path / "data" / split / name).mkdir(parents=True)
            for i in range(6):
                pixels = (torch.rand(10, 10, 3, generator=g) * 100 + 150 * c).to(torch.uint8).numpy()
                Image.fromarray(pixels).save(tmp_path / "data" / split / name / f"{i}.png")
    result = mixedprec("compress", "opq", *TINY_MODEL, "--model-arg", "num_classes=2", *TINY_TRAINING, "--data",
                       "imagefolder", "--data-dir", "data", "--image-size", "8", "--rate", "6", "--out", "run", "-q",
                       cwd=tmp_path)
    assert_ok(result)
    record = json.loads((tmp_path / "run" / "packed.json").read_text())
    assert record["input_shape"] == [3, 8, 8] and record["num_classes"] == 2


# ---------------------------------------------------------------- demo

def test_demo_end_to_end_on_tiny_settings(tmp_path):
    result = mixedprec("demo", "--width", "4", "--float-epochs", "2", "--search-epochs", "1", "--finetune-epochs", "1",
                       "--opq-rate", "8", "--out", "demo", "-q", cwd=tmp_path)
    assert_ok(result)
    assert result.stderr == ""
    out = tmp_path / "demo"
    for line in ("table: ", "json: ", "plot: ", "b1 ms"):
        assert line in result.stdout
    record = json.loads((out / "results.json").read_text())
    methods = {m["method"]: m for m in record["methods"]}
    assert list(methods) == ["float", "uniform 4-bit", "SBS", "OPQ"]
    for name, m in methods.items():
        assert (tmp_path / m["path"]).stat().st_size == m["file_bytes"], name  # paths as given, from the cwd
        assert 0 <= m["top1"] <= 100 and m["seconds"] > 0 and m["latency_ms"] > 0
        assert m["method"] in result.stdout
    assert all(m["bops"] < methods["float"]["bops"] for name, m in methods.items() if name != "float")
    assert all(m["file_bytes"] < methods["float"]["file_bytes"] for name, m in methods.items() if name != "float")
    uniform_bits = {(l["weight_bits"], l["act_bits"]) for l in methods["uniform 4-bit"]["report"]["layers"]}
    assert uniform_bits == {(8, 8), (4, 4)}
    assert "== SBS" in (out / "results.txt").read_text()
    from matplotlib import image

    png = image.imread(out / "tradeoff.png")
    assert png.shape[0] > 300 and png.shape[1] > 600


# ---------------------------------------------------------------- bench

def test_bench_lists_the_repository_benchmarks(tmp_path):
    result = mixedprec("bench", "--list", cwd=tmp_path)
    assert_ok(result)
    found = {line.split()[0] for line in result.stdout.splitlines()}
    assert {p.stem.removeprefix("bench_") for p in (ROOT / "benchmarks").glob("bench_*.py")} == found


def test_bench_runs_discovered_scripts_and_passes_arguments(tmp_path):
    (tmp_path / "bench_alpha.py").write_text("import sys\nprint('alpha table', sys.argv[1:])\n")
    (tmp_path / "bench_beta.py").write_text("import mixedprec\nprint('beta table from', mixedprec.__name__)\n")
    result = mixedprec("bench", "--dir", tmp_path, "--", "--repeats", "2", cwd=tmp_path)
    assert_ok(result)
    assert "alpha table ['--repeats', '2']" in result.stdout and "beta table from mixedprec" in result.stdout
    only = mixedprec("bench", "--dir", tmp_path, "bench_alpha.py", cwd=tmp_path)
    assert "alpha table" in only.stdout and "beta" not in only.stdout


def test_bench_failing_script_exits_1(tmp_path):
    (tmp_path / "bench_broken.py").write_text("raise SystemExit(3)\n")
    result = mixedprec("bench", "--dir", tmp_path, cwd=tmp_path)
    assert result.returncode == 1 and "broken (exit 3)" in result.stderr
