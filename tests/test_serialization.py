"""Packed models of any architecture on disk: save, load into a freshly built model (strictly),
rebuild from a recorded factory or module tree, files of format version 2, pruned widths, tied
tensors; attention as called projections; layers the methods cannot handle stay float, named.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import safetensors.torch
import torch
import torchvision
from torch import nn
from torch.utils.data import TensorDataset

import mixedprec
from mixedprec import formats, opq, sbs
from mixedprec.metrics import count_bops
from mixedprec.nn import LinearMultiheadAttention
from mixedprec.reporting import model_report
from any_models import ResidualConcatNet, TinyLlama

DATA = Path(__file__).parent / "data"
ANY_MODELS = Path(__file__).parent / "any_models.py"


def _images(n=4, size=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, 3, size, size, generator=g), torch.randint(0, 10, (n,), generator=g))


def _opq_packed(model, rate=6):
    net = opq.convert(model, opq.allocate(model, rate, quiet=True))
    return mixedprec.pack(net).eval()


def _fresh(cls, seed, **kwargs):
    torch.manual_seed(seed)
    return cls(**kwargs).eval()


# ------------------------------------------------------------------ format version 2

def test_version_2_files_still_load_and_compute_what_they_did():
    """Files written by format version 2 (mixedprec at commit af1df9d): a pruned W8/W2 SBS CNN and
    a sparse OPQ MLP, with the outputs that version computed (the same CPU kernels: equal up to
    float32 summation order, and a rounding an SBS activation quantizer could flip)."""
    recorded = safetensors.torch.load_file(DATA / "v2_outputs.safetensors")
    for name in ("sbs", "opq"):
        model = mixedprec.load(DATA / f"v2_{name}_{'cnn' if name == 'sbs' else 'mlp'}.safetensors")
        with torch.no_grad():
            torch.testing.assert_close(model(recorded["x"]), recorded[name], rtol=1e-5, atol=1e-5)


def test_version_2_file_loads_into_a_freshly_built_model_and_rewrites_no_bigger(tmp_path):
    path = DATA / "v2_opq_mlp.safetensors"
    skeleton = nn.Sequential(nn.Flatten(), nn.Linear(36, 64), nn.ReLU(), nn.Linear(64, 4))
    loaded = mixedprec.load(path, model=skeleton)
    assert loaded is skeleton and isinstance(skeleton[1], mixedprec.nn.PackedLinear)
    x = safetensors.torch.load_file(DATA / "v2_outputs.safetensors")["x"]
    with torch.no_grad():
        assert torch.equal(skeleton(x), mixedprec.load(path)(x))
    for name in ("v2_opq_mlp", "v2_sbs_cnn"):
        mixedprec.save(mixedprec.load(DATA / f"{name}.safetensors"), tmp_path / "v3.safetensors")
        assert (tmp_path / "v3.safetensors").stat().st_size <= (DATA / f"{name}.safetensors").stat().st_size


# ------------------------------------------------------------------ rebuilding without a model

def test_a_torchvision_factory_rebuilds_the_model(tmp_path):
    model = torchvision.models.resnet18(num_classes=3)
    packed = _opq_packed(model, rate=8)
    mixedprec.save(packed, tmp_path / "r18.safetensors", factory=torchvision.models.resnet18,
                   factory_kwargs={"num_classes": 3})
    loaded = mixedprec.load(tmp_path / "r18.safetensors")
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded.eval()(x), packed(x))


def test_a_user_factory_runs_only_when_trusted(tmp_path):
    packed = _opq_packed(_fresh(ResidualConcatNet, 0))
    path = tmp_path / "user.safetensors"
    mixedprec.save(packed, path, factory=f"{ANY_MODELS}:ResidualConcatNet", factory_kwargs={"width": 8})
    with pytest.raises(ValueError, match=r"ResidualConcatNet'.*only with trust_code=True"):
        mixedprec.load(path)
    x = _images(2)[:][0]
    with torch.no_grad():
        assert torch.equal(mixedprec.load(path, trust_code=True).eval()(x), packed(x))
    with pytest.raises(ValueError, match="cannot be found again by name"):
        mixedprec.save(packed, path, factory=lambda: ResidualConcatNet())


# ------------------------------------------------------------------ strict loading into a skeleton

@pytest.fixture(scope="module")
def user_file(tmp_path_factory):
    packed = _opq_packed(_fresh(ResidualConcatNet, 0))
    path = tmp_path_factory.mktemp("user") / "user.safetensors"
    mixedprec.save(packed, path)
    return path


def test_another_architecture_is_named(tmp_path):
    mixedprec.save(_opq_packed(torchvision.models.resnet18(num_classes=3), rate=8), tmp_path / "r18.safetensors")
    with pytest.raises(ValueError, match=r"does not fit the model.*missing from the file: layer1.2"):
        mixedprec.load(tmp_path / "r18.safetensors", model=torchvision.models.resnet34(num_classes=3))


def test_another_width_is_named(user_file):
    with pytest.raises(ValueError, match=r"'stem.0': the model's Conv2d has out_channels=16; the file's "
                                         r"PackedConv2d was made from one with out_channels=8"):
        mixedprec.load(user_file, model=ResidualConcatNet(width=16))


def test_a_missing_layer_and_a_wrongly_shaped_entry_are_named(user_file, tmp_path):
    skeleton = ResidualConcatNet()
    del skeleton.branch_b
    with pytest.raises(ValueError, match="the model has no module 'branch_b', where the file holds a PackedConv2d"):
        mixedprec.load(user_file, model=skeleton)
    tensors, content = formats.load_file(user_file)
    tensors["stem.1.running_var"] = torch.ones(9)
    formats.save_file(tmp_path / "bad.safetensors", tensors, content)
    with pytest.raises(ValueError, match=r"stem.1.running_var \(9,\) in the file, \(8,\) in the model"):
        mixedprec.load(tmp_path / "bad.safetensors", model=ResidualConcatNet())


def test_strict_false_skips_what_does_not_fit(user_file):
    skeleton = ResidualConcatNet()
    skeleton.extra = nn.Linear(2, 2)
    with pytest.raises(ValueError, match=r"2 entries missing from the file: extra.bias, extra.weight"):
        mixedprec.load(user_file, model=skeleton)
    mixedprec.load(user_file, model=skeleton, strict=False)
    assert isinstance(skeleton.mix, mixedprec.nn.PackedConv2d)


def test_a_skeleton_on_the_meta_device_takes_the_files_tensors(user_file):
    with torch.device("meta"):
        skeleton = ResidualConcatNet()
    loaded = mixedprec.load(user_file, model=skeleton, map_location="cpu")
    reference = mixedprec.load(user_file, model=ResidualConcatNet())
    x = _images(2)[:][0]
    with torch.no_grad():
        assert torch.equal(loaded.eval()(x), reference.eval()(x))


# ------------------------------------------------------------------ pruned widths, tied tensors

def test_sbs_pruned_model_loads_into_the_unpruned_skeleton(tmp_path):
    net = sbs.convert(_fresh(ResidualConcatNet, 0), sbs.SBSPolicy(group_size=2))
    with torch.no_grad():
        for layer in sbs.sbs_layers(net).values():
            if layer.prune_gate is not None:
                layer.prune_gate.threshold.fill_(1e9)
                layer.prune_gate.project_(layer.weight)  # capped: the most groups the ratio allows
        net(_images(4)[:][0])  # the gates decide
    sbs.finetune(net, _images(4), epochs=1, batch_size=4, quiet=True)
    exported = sbs.export(net).model.eval()
    assert exported.branch_a[0].out_channels < 8  # pruned
    packed = mixedprec.pack(exported).eval()
    mixedprec.save(packed, tmp_path / "pruned.safetensors")
    loaded = mixedprec.load(tmp_path / "pruned.safetensors", model=_fresh(ResidualConcatNet, 1))
    x = _images(2, seed=1)[:][0]
    with torch.no_grad():
        assert torch.equal(loaded(x), packed(x))
    assert loaded.branch_a[1].num_features == exported.branch_a[1].num_features < 8
    with pytest.raises(ValueError, match=r"out_channels=16; the file's PackedConv2d was made from one with "
                                         r"out_channels=8"):
        mixedprec.load(tmp_path / "pruned.safetensors", model=ResidualConcatNet(width=16))


def test_tied_tensors_are_stored_once(tmp_path):
    model = _fresh(TinyLlama, 0)
    mixedprec.save(model, tmp_path / "tied.safetensors")
    tensors, content = formats.load_file(tmp_path / "tied.safetensors")
    assert content["aliases"] == {"lm_head.weight": "embed.weight"} and "lm_head.weight" not in tensors
    loaded = mixedprec.load(tmp_path / "tied.safetensors", model=_fresh(TinyLlama, 1))
    assert loaded.lm_head.weight is loaded.embed.weight and torch.equal(loaded.embed.weight, model.embed.weight)
    shared = nn.Linear(4, 4)
    tree = nn.Sequential(shared, nn.ReLU(), nn.Linear(4, 4))
    tree[2].weight = shared.weight
    mixedprec.save(tree, tmp_path / "tree.safetensors")
    rebuilt = mixedprec.load(tmp_path / "tree.safetensors")
    assert rebuilt[2].weight is rebuilt[0].weight


# ------------------------------------------------------------------ attention, language models

@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("kv", [None, (5, 7)])
def test_linear_attention_computes_what_multihead_attention_does(batch_first, kv):
    torch.manual_seed(0)
    kdim, vdim = kv or (None, None)
    mha = nn.MultiheadAttention(12, 3, kdim=kdim, vdim=vdim, batch_first=batch_first).eval()
    ours = LinearMultiheadAttention.from_float(mha).eval()
    b, l, s = 2, 4, 6
    shape = (lambda n, e: (b, n, e)) if batch_first else (lambda n, e: (n, b, e))
    q, k, v = torch.randn(shape(l, 12)), torch.randn(shape(s, kdim or 12)), torch.randn(shape(s, vdim or 12))
    padding = torch.zeros(b, s, dtype=torch.bool)
    padding[0, -2:] = True
    causal = nn.Transformer.generate_square_subsequent_mask(s)[:l]
    cases = [dict(), dict(need_weights=False), dict(key_padding_mask=padding), dict(attn_mask=causal),
             dict(attn_mask=causal, key_padding_mask=padding.float() * -1e4, need_weights=False),
             dict(average_attn_weights=False), dict(attn_mask=torch.rand(b * 3, l, s) > 0.7)]
    with torch.no_grad():
        for kwargs in cases:
            for got, want in zip(ours(q, k, v, **kwargs), mha(q, k, v, **kwargs)):
                if want is None:
                    assert got is None, kwargs
                else:
                    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=lambda m: f"{kwargs}: {m}")
        unbatched = (q[0], k[0], v[0]) if batch_first else (q[:, 0], k[:, 0], v[:, 0])
        torch.testing.assert_close(ours(*unbatched)[0], mha(*unbatched)[0], rtol=1e-5, atol=1e-6)


def test_language_models_take_token_ids_and_keep_heads_and_residuals_whole():
    model = _fresh(TinyLlama, 0)
    ids = torch.randint(0, 64, (1, 8))
    with pytest.raises(ValueError, match=r"does not run on example inputs.*token ids"):
        count_bops(model, (8,))
    float_bops = count_bops(model, ids)
    assert float_bops == 8 * sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear)) * 32 * 32
    net = sbs.convert(model, sbs.SBSPolicy())
    assert not [name for name, layer in sbs.sbs_layers(net).items() if layer.prune_gate is not None]
    train = TensorDataset(torch.randint(0, 64, (4, 8)), torch.randint(0, 64, (4, 8)))
    log = sbs.search(net, train, epochs=1, bops_weight=1.0, batch_size=4, quiet=True)
    assert 0 < log[0]["bops"] < float_bops
    layers = list(sbs.sbs_layers(net).values())
    assert layers[0].bits() == (8, 8) and net.lm_head.bits() == (8, 8)  # first and last in execution order


# ------------------------------------------------------------------ layers the methods cannot handle

class _Scaled(nn.Linear):
    def forward(self, x):
        return 2 * super().forward(x)


class Awkward(nn.Module):
    """A Conv1d, a Linear subclass, attention with add_bias_kv, a conv padded "same" with one more
    on the right (not packed) and a reflect-padded conv (packed)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 4, padding="same")
        self.reflect = nn.Conv2d(8, 8, 3, padding=1, padding_mode="reflect")
        self.seq = nn.Conv1d(8, 8, 3, padding=1)
        self.attn = nn.MultiheadAttention(8, 2, add_bias_kv=True, batch_first=True)
        self.scaled = _Scaled(8, 8)
        self.head = nn.Linear(8, 10)

    def forward(self, x):
        x = self.seq(self.reflect(self.conv(x)).flatten(2)).transpose(1, 2)
        return self.head(self.scaled(self.attn(x, x, x, need_weights=False)[0]).mean(1))


@pytest.mark.parametrize("method", ["sbs", "opq"])
def test_layers_that_cannot_be_handled_stay_float_named_in_warnings(method, tmp_path):
    model, data = _fresh(Awkward, 0), _images(4, size=6)
    with pytest.warns(UserWarning) as caught:
        if method == "sbs":
            net = sbs.convert(model, sbs.SBSPolicy())
            sbs.finetune(net, data, epochs=1, batch_size=4, quiet=True)
            net = sbs.export(net).model
        else:
            net = opq.convert(model, opq.allocate(model, 1.3, quiet=True))
        packed = mixedprec.pack(net.eval())
    text = " ".join(str(w.message) for w in caught)
    for name in ("seq (Conv1d)", "scaled (_Scaled)", "['attn']", "attn.out_proj (NonDynamicallyQuantizableLinear)",
                 "conv (padding='same', dilation=(1, 1), kernel_size=(4, 4))"):  # the last: compressed, not packed
        assert name in text, text
    forms = {r.name: r.form for r in model_report(packed, (3, 6, 6)).layers}
    assert forms["seq"] == forms["scaled"] == forms["attn.out_proj"] == "float"
    assert forms["head"] == forms["reflect"] == "packed" and packed.reflect.padding_mode == "reflect"
    assert forms["conv"] == method
    mixedprec.save(packed, tmp_path / "awkward.safetensors")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = mixedprec.load(tmp_path / "awkward.safetensors", model=_fresh(Awkward, 1))
    x = data[:2][0]
    with torch.no_grad():
        assert torch.equal(loaded(x), packed(x))
