"""pack(): SBS and OPQ linear models -> PackedLinear models with the same outputs; PackedLinear's
frozen buffers; the issue-9 test (train a fresh head on a packed digits MLP); conv refusal."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import mixedprec
from mixedprec.data import load_digits
from mixedprec.nn import PackedLinear
from mixedprec.opq.layers import OPQLinear
from mixedprec.sbs.layers import SBSLinear


def test_pack_opq_mlp_same_outputs():
    torch.manual_seed(0)
    layers = []
    for inp, out, bits in ((20, 33, 3), (33, 7, 5)):
        layer = OPQLinear(inp, out, bits=bits)
        mask = torch.rand(out, inp) > 0.6
        layer.keep_mask.copy_(mask)
        layer.codebook.copy_(torch.sort(torch.randn(1 << bits)).values)
        layer.channel_scale.copy_((torch.rand(out) * 0.1 + 0.05).half().float())
        with torch.no_grad():
            layer.weight.mul_(mask)
        layers.append(layer)
    model = nn.Sequential(layers[0], nn.ReLU(), layers[1]).eval()
    packed = mixedprec.pack(model)
    assert isinstance(packed[0], PackedLinear) and isinstance(packed[2], PackedLinear)
    assert packed[0].keep_bitmap is not None
    x = torch.randn(8, 20)
    with torch.no_grad():  # fp16 codebook: levels rounded to 11 bits
        torch.testing.assert_close(packed(x), model(x), rtol=2e-3, atol=2e-3)


def test_pack_sbs_mlp_same_outputs():
    torch.manual_seed(0)
    model = nn.Sequential(SBSLinear(20, 30, weight_bits=(4,), act_bits=(8,), act_signed=True), nn.ReLU(),
                          SBSLinear(30, 5, weight_bits=(2,), act_bits=(8,)))
    model(torch.randn(64, 20))  # first pass sets the activation clips from data
    model.eval()
    packed = mixedprec.pack(model)
    assert isinstance(packed[0], PackedLinear) and packed[0].bits == 4 and packed[2].bits == 2
    assert packed[0].input_quant is not None
    x = torch.randn(8, 20)
    with torch.no_grad():
        torch.testing.assert_close(packed(x), model(x), rtol=2e-3, atol=2e-3)


def test_pack_sbs_decodes_to_the_finetuned_weight_bit_for_bit():
    """SBS levels are stored in float32 with unit scales: a packed layer's weight is exactly the
    exported layer's quantized weight (float16 levels moved W4A4 outputs by ~0.3 logits)."""
    from mixedprec import sbs
    from mixedprec.models import digits_cnn
    from mixedprec.sbs.layers import SBSLayer

    torch.manual_seed(0)
    model = sbs.convert(digits_cnn(width=8), sbs.SBSPolicy(weight_bits=(4,), act_bits=(4,), prune=False))
    model(torch.rand(6, 1, 8, 8))  # activation clips from a first batch
    model = sbs.export(model.eval()).model.eval()
    packed_layers = dict(mixedprec.pack(model).named_modules())
    checked = 0
    for name, layer in model.named_modules():
        if isinstance(layer, SBSLayer):
            packed = packed_layers[name].packed_weight()
            assert packed.codebook.dtype == torch.float32 and bool((packed.channel_scale == 1).all())
            with torch.no_grad():
                assert torch.equal(packed.decode(), layer.quantized_weight()), name
            checked += 1
    assert checked >= 4


def test_pack_refuses_unexported_sbs():
    model = nn.Sequential(SBSLinear(4, 3, weight_bits=(2, 4)))
    with pytest.raises(ValueError, match="not exported"):
        mixedprec.pack(model)


def test_pack_conv_models_match_and_survive_save_load(tmp_path):
    """OPQ (masked codes) and exported SBS (channels removed) CNNs pack into PackedConv2d layers
    with the outputs of the model they came from, and a saved file loads back to the same."""
    from mixedprec import opq, sbs
    from mixedprec.models import digits_cnn
    from mixedprec.nn import PackedConv2d

    torch.manual_seed(0)
    x = torch.rand(6, 1, 8, 8)
    float_model = digits_cnn(width=8)
    opq_model = opq.convert(float_model, opq.allocate(float_model, 6.0, quiet=True)).eval()
    sbs_model = sbs.convert(digits_cnn(width=8), sbs.SBSPolicy(group_size=2))
    sbs_model(x)  # activation clips from a first batch
    sbs_model = sbs.export(sbs_model.eval()).model.eval()
    for name, model in (("opq", opq_model), ("sbs", sbs_model)):
        packed = mixedprec.pack(model)
        assert sum(isinstance(m, PackedConv2d) for m in packed.modules()) >= 3, name
        with torch.no_grad():
            torch.testing.assert_close(packed(x), model(x), rtol=2e-3, atol=2e-3)
            path = tmp_path / f"{name}.safetensors"
            mixedprec.save(packed, path)
            torch.testing.assert_close(mixedprec.load(path)(x), packed(x), rtol=0, atol=0)


def test_packed_cnn_runs_channels_last():
    """A packed CNN moved to channels_last (model and input, as torch's CPU guidance has it) keeps
    that layout through every packed conv (Winograd 3x3, depthwise, strided, 1x1) and SBS input
    quantizer, and gives the NCHW run's outputs."""
    from mixedprec import opq, sbs
    from mixedprec.nn import PackedConv2d

    torch.manual_seed(0)
    float_model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
        nn.Conv2d(16, 16, 3, stride=2, padding=1, groups=16), nn.ReLU(),
        nn.Conv2d(16, 24, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(24, 5)).eval()
    x = torch.randn(3, 3, 11, 10)
    sbs_model = sbs.convert(copy.deepcopy(float_model), sbs.SBSPolicy(group_size=4))
    sbs_model(x)  # activation clips from a first batch
    models = {"opq": opq.convert(float_model, opq.allocate(float_model, 6.0, quiet=True)).eval(),
              "sbs": sbs.export(sbs_model.eval()).model.eval()}
    for name, model in models.items():
        packed = mixedprec.pack(model)
        channels_last = copy.deepcopy(packed).to(memory_format=torch.channels_last)
        layouts = []
        for m in channels_last.modules():
            if isinstance(m, PackedConv2d):
                m.register_forward_hook(lambda m, i, y: layouts.append(
                    (i[0].is_contiguous(memory_format=torch.channels_last), y.is_contiguous(), y.is_contiguous(
                        memory_format=torch.channels_last))))
        with torch.no_grad():
            got = channels_last(x.contiguous(memory_format=torch.channels_last))
            torch.testing.assert_close(got, packed(x), rtol=1e-4, atol=1e-4, msg=lambda m: f"{name}: {m}")
        assert layouts == [(True, False, True)] * 4, (name, layouts)


def test_packed_buffers_are_frozen():
    layer = mixedprec.pack(nn.Sequential(_opq(8, 4)))[0]
    assert [n for n, _ in layer.named_parameters()] == ["bias"]
    with pytest.raises(ValueError, match="frozen packed buffer"):
        layer.codebook = nn.Parameter(layer.codebook.float())
    layer.channel_scale.requires_grad_(True)
    with pytest.raises(ValueError, match="must not require grad"):
        layer(torch.randn(2, 8))


def _opq(inp, out, bits=4):
    layer = OPQLinear(inp, out, bits=bits)
    layer.codebook.copy_(torch.linspace(-1, 1, 1 << bits))
    layer.channel_scale.copy_(layer.weight.detach().abs().amax(1))
    return layer


def _train(model, params, x, y, epochs, lr=0.05):
    opt = torch.optim.Adam(params, lr=lr)
    for _ in range(epochs):
        for i in range(0, len(x), 128):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[i:i + 128]), y[i:i + 128]).backward()
            opt.step()


def _accuracy(model, x, y):
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item() * 100


def test_issue9_train_head_on_packed_digits_mlp():
    """A trained MLP as OPQ layers packed; a fresh last layer trained on the packed and the
    unpacked model reaches the same accuracy, and the packed buffers do not change."""
    torch.manual_seed(0)
    data = load_digits()
    (x_train, y_train), (x_test, y_test) = data.train.tensors, data.test.tensors
    x_train, x_test = x_train.flatten(1), x_test.flatten(1)
    float_model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    _train(float_model, float_model.parameters(), x_train, y_train, epochs=15, lr=0.01)
    quantized = copy.deepcopy(float_model)
    for i in (0, 2):
        layer = _opq(64, 64)
        with torch.no_grad():
            layer.weight.copy_(float_model[i].weight)
            layer.bias.copy_(float_model[i].bias)
            layer.channel_scale.copy_(layer.weight.abs().amax(1))
        quantized[i] = layer
    packed = mixedprec.pack(quantized)
    before = {k: v.clone() for k, v in packed.state_dict().items() if not k.endswith("bias")}
    accuracies = []
    for model in (quantized, packed):
        torch.manual_seed(1)
        model[4] = nn.Linear(64, 10)
        for p in model.parameters():
            p.requires_grad_(False)
        model[4].requires_grad_(True)
        _train(model, model[4].parameters(), x_train, y_train, epochs=5)
        accuracies.append(_accuracy(model, x_test, y_test))
    assert accuracies[1] > 80 and abs(accuracies[0] - accuracies[1]) <= 1.0, accuracies
    after = packed.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in before.items() if not k.startswith("4."))


def test_save_load_unpacked_sbs_model_and_file_mode(tmp_path):
    """An exported, unpacked SBS model (its layers' prune-gate slots are None) round-trips, and the
    file is created with the usual permissions (not mkstemp's owner-only mode)."""
    import os
    import stat

    from mixedprec import sbs
    from mixedprec.models import digits_cnn

    torch.manual_seed(0)
    x = torch.rand(4, 1, 8, 8)
    model = sbs.convert(digits_cnn(width=8), sbs.SBSPolicy(group_size=2))
    model(x)
    model = sbs.export(model.eval()).model.eval()  # fixed bits, pruned channels removed, gate slots None
    path = tmp_path / "sbs.safetensors"
    mixedprec.save(model, path)
    with torch.no_grad():
        torch.testing.assert_close(mixedprec.load(path)(x), model(x), rtol=0, atol=0)
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o666 & ~umask


def test_pack_sbs_asymmetric_activations_equal_the_finetuned_model(tmp_path):
    """A layer whose inputs hold negative values quantizes them on the asymmetric grid (learnable
    offset). The packed layer's input quantizer carries the finetuned offset: its quantized
    inputs equal the finetuned model's bit for bit, the weights decode bit for bit, and a saved
    file loads back to the same offset and the same outputs bit for bit."""
    from mixedprec import sbs
    from mixedprec.sbs.layers import SBSLayer

    torch.manual_seed(0)
    policy = sbs.SBSPolicy(weight_bits=(4,), act_bits=(4,), prune=False, act_grid="asymmetric", first_last_bits=None)
    model = sbs.convert(nn.Sequential(nn.Linear(20, 30), nn.Linear(30, 16), nn.ReLU(), nn.Linear(16, 5)), policy)
    x = torch.randn(64, 20)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    for _ in range(5):  # finetune: the offset moves away from its start
        start = None if model[1].a_quant.offset is None else model[1].a_quant.offset.detach().clone()
        optimizer.zero_grad()
        model(x).square().mean().backward()
        optimizer.step()
        for m in model.modules():
            if isinstance(m, SBSLayer):
                m.a_quant.project_()
    quant = model[1].a_quant
    assert quant.asymmetric and not quant.signed and start is not None and quant.offset.item() != start.item()
    model = sbs.export(model.eval()).model.eval()
    packed = mixedprec.pack(model)
    assert isinstance(packed[1], PackedLinear) and packed[1].input_quant.asymmetric
    assert torch.equal(packed[1].input_quant.offset, model[1].a_quant.offset)
    with torch.no_grad():
        hidden = model[0](x)
        assert hidden.min() < 0
        assert torch.equal(packed[1].input_quant(hidden), model[1].a_quant(hidden))
        assert torch.equal(packed[1].packed_weight().decode(), model[1].quantized_weight())
        torch.testing.assert_close(packed(x), model(x), rtol=2e-3, atol=2e-3)
        path = tmp_path / "asymmetric.safetensors"
        mixedprec.save(packed, path)
        loaded = mixedprec.load(path)
        assert loaded[1].input_quant.asymmetric
        assert torch.equal(loaded[1].input_quant.offset, packed[1].input_quant.offset)
        assert torch.equal(loaded(x), packed(x))
