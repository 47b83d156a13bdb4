"""Data-parallel training under torchrun: 2 CPU ranks with gloo on loopback against one process
(MIXEDPREC_TEST_DEVICE=cuda: 2 GPUs with nccl, as benchmarks/gpu_check.py runs them).

The runs are tiny (a small CNN, 256 digits, 8 global batches per epoch) and each launch is bounded
by a timeout; the ranks themselves live in tests/distributed_worker.py.
"""
from __future__ import annotations

import copy
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import distributed_worker as worker
from crashing import CrashingDataset
from mixedprec import opq, sbs

PG_BACKEND = "nccl" if worker.DEVICE == "cuda" else "gloo"  # MIXEDPREC_TEST_DEVICE=cuda: one GPU per rank
pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available() or not torch.distributed.is_backend_available(PG_BACKEND)
    or (PG_BACKEND == "nccl" and torch.cuda.device_count() < 2),
    reason=f"needs torch.distributed with {PG_BACKEND}" + (" and 2 GPUs" if PG_BACKEND == "nccl" else ""))

ROOT = Path(__file__).resolve().parent.parent
WORKER = Path(worker.__file__)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(timeout_s: float) -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT), "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1",
            "MIXEDPREC_DIST_TIMEOUT": str(timeout_s)}


def _torchrun(args: list[str], *, timeout: float) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2",
               "--master-addr", "127.0.0.1", "--master-port", str(_free_port()), *args]
    return subprocess.run(command, cwd=ROOT, env=_env(60), capture_output=True, text=True, timeout=timeout)


def _state_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a if isinstance(a[k], torch.Tensor))


def _assert_state_close(actual: dict, expected: dict) -> None:
    """Equal up to float summation order: a gradient averaged over ranks rounds differently from one
    batch mean, and where a fake-quantized weight or activation sits at a rounding boundary that
    difference becomes a whole quantization step in one step's gradient, which the later steps
    carry on (AVX2 builds: 1.5e-6 on a weight that training moved by 4.7e-3; a Xeon with AVX-512:
    3 of a conv's 1152 weights by up to 1.7% of their own movement, the first conv's bias by 1.03%
    of its movement as a norm). So a tensor that training moved may differ, as a norm, by 2% of its
    movement from where it started (a rank on the wrong shard, or one step lost of the 16, moves
    every element: one step is ~6% of the movement), and one it did not move only by float32
    rounding."""
    assert actual.keys() == expected.keys()
    initial = {**sbs.convert(worker.float_model(), worker.POLICY).state_dict(), **worker.float_model().state_dict()}
    for k, v in expected.items():
        if not isinstance(v, torch.Tensor):
            continue
        got, v = actual[k].cpu(), v.cpu()
        start = initial.get(k)
        if v.is_floating_point() and start is not None and not torch.equal(v, start):
            moved, off = (v - start).double().norm().item(), (got - v).double().norm().item()
            assert off <= 2e-2 * moved, f"{k}: off by {off:.3g} (norm), training moved it by {moved:.3g}"
        else:
            torch.testing.assert_close(got, v, rtol=1e-5, atol=1e-6, msg=lambda m, k=k: f"{k}: {m}")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The worker's 2-rank results (rank 0, rank 1), one process's results on the same global
    batches, and the folder the 2-rank run wrote its checkpoints to."""
    out = tmp_path_factory.mktemp("ddp")
    data = worker.train_set()
    stopped = sbs.convert(worker.float_model(), worker.POLICY)  # a checkpoint for the 2 ranks to resume
    with pytest.raises(KeyboardInterrupt):
        sbs.search(stopped, CrashingDataset(data, worker.reads_into_epoch_1(1)), checkpoint=out / "single.ckpt",
                   **worker.SEARCH)
    proc = _torchrun([str(WORKER), "train", str(out)], timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = [torch.load(out / f"rank{r}.pt", weights_only=False, map_location="cpu") for r in (0, 1)]

    searched = sbs.convert(worker.float_model(), worker.POLICY)
    history = sbs.search(searched, data, **worker.SEARCH)
    single = {"search": copy.deepcopy(searched.state_dict()), "decisions": worker.decisions(searched),
              "history": history}
    sbs.finetune(searched, data, **worker.FINETUNE)
    single["finetune"] = searched.state_dict()
    plain = worker.float_model()
    opq_model = opq.convert(plain, opq.allocate(plain, 8.0, quiet=True))
    opq.finetune(opq_model, data, **worker.FINETUNE)
    single["opq"] = opq_model.state_dict()
    return ranks, single, out


def test_search_decides_the_same_on_every_rank_and_as_one_process(runs):
    (rank0, rank1), single, _ = runs
    assert rank0["decisions"] == rank1["decisions"]  # bits, activation signs, kept channels
    assert _state_equal(rank0["search"], rank1["search"])  # weights, clips, thresholds, bit choices, masks
    assert rank0["history"] == rank1["history"]  # per epoch: mean CE over the ranks, BOPs
    assert rank0["decisions"] == single["decisions"]
    _assert_state_close(rank0["search"], single["search"])
    for two, one in zip(rank0["history"], single["history"]):
        # the epoch's mean CE over weights that differ as above (7e-6 apart on the Xeon)
        assert two["bops"] == one["bops"] and two["ce"] == pytest.approx(one["ce"], rel=1e-4)
    chosen = [d["bits"] for d in single["decisions"].values()]
    assert any(b != (8, 8) for b in chosen), f"the search moved no layer off 8 bits ({chosen}): nothing was tested"
    assert any(d["keep"] is not None for d in single["decisions"].values())


def test_one_small_all_reduce_per_activation_quantizer_step(runs):
    """The resumed epoch: 8 steps x 3 searched activation quantizers, each one all_reduce of
    [sum|r_2|, sum|r_3|, count], then the epoch's mean CE. (DDP's gradient buckets go through
    its C++ reducer, not torch.distributed.all_reduce.)"""
    (rank0, rank1), _, _ = runs
    assert rank0["reduced"] == rank1["reduced"] == [3] * (8 * 3) + [1]


def test_finetune_and_opq_give_the_same_weights_on_every_rank(runs):
    (rank0, rank1), single, _ = runs
    for phase in ("finetune", "opq"):
        assert _state_equal(rank0[phase], rank1[phase]), phase
        _assert_state_close(rank0[phase], single[phase])


def test_checkpoints_resume_at_another_world_size(runs):
    (rank0, rank1), single, out = runs
    # written by one process at world size 1, resumed by 2 ranks
    assert _state_equal(rank0["from_single"], rank1["from_single"])
    _assert_state_close(rank0["from_single"], single["search"])
    # written by rank 0 of 2 after the first epoch, resumed by one process
    resumed = sbs.convert(worker.float_model(), worker.POLICY)
    log = sbs.search(resumed, worker.train_set(), checkpoint=out / "two_epoch0.ckpt", **worker.SEARCH)
    assert [r["epoch"] for r in log] == [0, 1]
    _assert_state_close(resumed.state_dict(), single["search"])
    assert not list(out.glob("*.tmp"))  # saved through a temporary file and a rename


@pytest.mark.parametrize("how, timeout_s", [("die", 30), ("hang", 8)])
def test_a_lost_rank_stops_the_others_with_a_clear_error(tmp_path, how, timeout_s):
    """Two ranks started with torchrun's environment; rank 1 exits (or stops responding) at
    its 3rd step. Rank 0 must exit non-zero, naming the problem, within the timeout."""
    port, procs = _free_port(), []
    for rank in (0, 1):
        env = {**_env(timeout_s), "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
               "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        procs.append(subprocess.Popen([sys.executable, str(WORKER), how, str(tmp_path)], cwd=ROOT, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    start = time.monotonic()
    try:
        _, err = procs[0].communicate(timeout=90)
        elapsed = time.monotonic() - start
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGKILL)
            p.communicate()
    assert procs[0].returncode not in (0, None)
    assert "RankLostError: rank 0 of 2 stopped in SBS search: a collective with the other ranks failed" in err, err[-3000:]
    assert elapsed < 60
    if how == "die":
        assert procs[1].returncode == 3


def test_cli_compress_runs_under_torchrun(tmp_path):
    proc = _torchrun(["-m", "mixedprec", "compress", "sbs", "--model-arg", "width=8", "--float-epochs", "1",
                      "--search-epochs", "1", "--finetune-epochs", "1", "--out", str(tmp_path), "-q"], timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("SBS: top-1") == 1  # rank 0 alone reports and writes
    assert (tmp_path / "packed.safetensors").is_file() and (tmp_path / "packed.json").is_file()
