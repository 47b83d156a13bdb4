"""Search and finetune on a tiny digits task: the BOPs penalty works, runs resume, configs re-apply."""
import json

import pytest
import torch
from torch import nn
from torch.utils.data import Subset, TensorDataset

from crashing import CrashingDataset
from mixedprec.data.digits import load_digits
from mixedprec.metrics import count_bops
from mixedprec.training import fit
from mixedprec.sbs import SBSPolicy, apply_config, convert, describe, finetune, load_config, save_config, search

POLICY = SBSPolicy(first_last_bits=None, group_size=4)  # every layer searchable


def _float_mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 10))


@pytest.fixture(scope="module")
def digits():
    """(train subset, test set, a float MLP trained on the full train set) of flattened digits."""
    split = load_digits()
    flat = lambda ds: TensorDataset(ds.tensors[0].flatten(1), ds.tensors[1])  # noqa: E731
    trained = fit(_float_mlp(), flat(split.train), epochs=10, lr=0.1, quiet=True)
    return Subset(flat(split.train), range(512)), flat(split.test), trained.state_dict()


def _mlp(digits, policy: SBSPolicy = POLICY) -> nn.Module:
    model = _float_mlp()
    model.load_state_dict(digits[2])
    return convert(model, policy)


def test_larger_lambda_ends_with_fewer_bops(digits):
    train, test, _ = digits
    results = {}
    for lam in (0.0, 0.3):
        model = _mlp(digits)
        log = search(model, train, epochs=3, bops_weight=lam, lr=0.05, eval_set=test, quiet=True)
        results[lam] = log[-1]
    assert results[0.3]["bops"] < 0.5 * results[0.0]["bops"]
    assert results[0.0]["bops"] == count_bops(_mlp(digits), (64,))  # nothing pushed it below 8/8 bits, all kept
    assert results[0.3]["eval_acc"] > 80  # and the compressed model still solves the task


def test_search_then_finetune_keeps_the_configuration(digits, tmp_path):
    train, test, _ = digits
    model = _mlp(digits)
    search(model, train, epochs=2, bops_weight=0.3, lr=0.05, quiet=True)
    chosen = describe(model)
    log = finetune(model, train, epochs=2, lr=0.05, eval_set=test, quiet=True)
    after = describe(model)
    for name, report in chosen.items():
        assert (after[name].weight_bits, after[name].act_bits) == (report.weight_bits, report.act_bits)
        assert after[name].kept_out_channels == report.kept_out_channels
    assert log[-1]["bops"] == log[0]["bops"] and log[-1]["eval_acc"] > 80

    path = tmp_path / "config.json"
    save_config(model, path, bops=log[-1]["bops"])
    written = json.loads(path.read_text())
    assert written["layers"]["2"]["weight_bits"] == chosen["2"].weight_bits and written["bops"] == log[-1]["bops"]
    fresh = _mlp(digits)
    apply_config(fresh, load_config(path))
    fresh.load_state_dict(model.state_dict())
    assert describe(fresh) == describe(model)
    model.eval(), fresh.eval()
    x = test.tensors[0][:16]
    torch.testing.assert_close(fresh(x), model(x))


def test_apply_config_rejects_a_mismatched_model(digits, tmp_path):
    model = _mlp(digits)
    model(digits[1].tensors[0][:4])
    config = save_config(model, tmp_path / "c.json")
    config["layers"]["2"]["weight_bits"] = 3
    with pytest.raises(ValueError, match="weight_bits=3"):
        apply_config(_mlp(digits), config)
    del config["layers"]["2"]
    with pytest.raises(ValueError, match="only in the model"):
        apply_config(_mlp(digits), config)


def test_search_resumes_from_its_checkpoint_exactly(digits, tmp_path):
    train, _, _ = digits
    kwargs = dict(epochs=3, bops_weight=0.3, lr=0.05, quiet=True)
    reference = _mlp(digits)
    search(reference, train, **kwargs)

    interrupted = _mlp(digits)
    ckpt = tmp_path / "search.pt"
    with pytest.raises(KeyboardInterrupt):  # dies in epoch 2, after the epoch 1 checkpoint
        search(interrupted, CrashingDataset(train, 1 + 2 * len(train) + 100), checkpoint=ckpt, **kwargs)
    assert len(torch.load(ckpt, weights_only=True)["history"]) == 2
    resumed = _mlp(digits)
    log = search(resumed, train, checkpoint=ckpt, **kwargs)
    assert [r["epoch"] for r in log] == [0, 1, 2]
    for (name, a), b in zip(reference.state_dict().items(), resumed.state_dict().values()):
        if isinstance(a, torch.Tensor):
            torch.testing.assert_close(b, a, rtol=0, atol=0, msg=name)
    with pytest.raises(ValueError, match="holds a 'search' run"):
        finetune(_mlp(digits), train, epochs=1, checkpoint=ckpt, quiet=True)


def test_pruning_only_and_quantization_only_searches(digits):
    train, _, _ = digits
    prune_only = _mlp(digits, SBSPolicy(quantize=False, first_last_bits=None, max_prune_ratio=0.75))
    log = search(prune_only, train, epochs=2, bops_weight=0.5, lr=0.05, quiet=True)
    reports = describe(prune_only)
    assert all(r.weight_bits == r.act_bits == 32 for r in reports.values())
    assert any(len(r.kept_out_channels) < r.out_channels for r in reports.values() if r.kept_out_channels)
    assert log[-1]["bops"] < count_bops(_mlp(digits, SBSPolicy(quantize=False)), (64,))

    quant_only = _mlp(digits, SBSPolicy(prune=False, first_last_bits=None))
    search(quant_only, train, epochs=2, bops_weight=0.3, lr=0.05, quiet=True)
    reports = describe(quant_only)
    assert all(r.kept_out_channels is None for r in reports.values())
    assert any(r.weight_bits < 8 or r.act_bits < 8 for r in reports.values())
