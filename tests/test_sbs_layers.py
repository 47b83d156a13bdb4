"""SBS layers and quantizers: gradients, bit read-out, fixed mode, pruning masks, state dicts."""
import pytest
import torch
from torch import nn

from mixedprec import ops
from mixedprec.sbs import BitSharingQuantizer, SBSConv2d, SBSLinear, SBSPolicy, convert, sbs_layers
from mixedprec.sbs.layers import LayerRef


def _conv(**kwargs) -> SBSConv2d:
    torch.manual_seed(0)
    return SBSConv2d.from_float(nn.Conv2d(4, 8, 3, padding=1), **kwargs)


def test_gradients_reach_clips_thresholds_and_weights():
    layer = _conv()
    x = torch.rand(2, 4, 6, 6)
    layer(x).square().sum().backward()
    for name, p in [("weight", layer.weight), ("w clip", layer.w_quant.clip), ("a clip", layer.a_quant.clip),
                    ("w thresholds", layer.w_quant.thresholds), ("a thresholds", layer.a_quant.thresholds)]:
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_prune_threshold_gets_gradient_through_the_consumer():
    torch.manual_seed(0)
    producer = SBSLinear.from_float(nn.Linear(6, 8))
    consumer = SBSLinear.from_float(nn.Linear(8, 3))
    producer.enable_pruning(group_size=2, max_prune_ratio=0.5)
    consumer.input_source = LayerRef(producer)
    consumer(torch.relu(producer(torch.randn(5, 6)))).square().sum().backward()
    assert producer.prune_gate.threshold.grad is not None and producer.prune_gate.threshold.grad != 0


def test_bits_follow_the_thresholds():
    layer = _conv()
    x = torch.rand(2, 4, 6, 6)
    layer(x)
    assert layer.bits() == (8, 8)  # thresholds start at 0: every gate on
    with torch.no_grad():
        layer.w_quant.thresholds.fill_(10.0)          # first gate off: 2 bits
        layer.a_quant.thresholds.copy_(torch.tensor([0.0, 10.0]))  # second gate off: 4 bits
    layer(x)
    assert layer.bits() == (2, 4)


def test_search_eval_and_fixed_mode_quantize_directly_at_the_chosen_bits():
    layer = _conv().double()
    x = torch.rand(2, 4, 6, 6, dtype=torch.float64)
    with torch.no_grad():
        layer.w_quant.thresholds.copy_(torch.tensor([0.0, 10.0]))
    train_out = layer(x)
    assert layer.bits() == (4, 8)
    layer.eval()
    torch.testing.assert_close(layer(x), train_out)  # nested grids: gated output == direct rounding
    layer.train()
    layer.fix()
    assert layer.w_quant.fixed_bits == 4
    torch.testing.assert_close(layer(x), train_out)
    direct = ops.bit_sharing_quant(x, layer.a_quant.clip, layer.a_quant.thresholds[:0], (8,), False).output
    mean, std = layer.weight.mean(), layer.weight.std()
    w = ops.bit_sharing_quant((layer.weight - mean) / std, layer.w_quant.clip, layer.w_quant.thresholds[:0],
                              (4,), True).output * std + mean
    torch.testing.assert_close(layer(x), nn.functional.conv2d(direct, w, layer.bias, padding=1))


def test_eight_bit_layer_keeps_the_float_function():
    torch.manual_seed(0)
    linear = nn.Linear(16, 8)
    layer = SBSLinear.from_float(linear, weight_bits=(8,), act_bits=(8,))
    x = torch.rand(32, 16)
    layer(x)
    layer.eval()
    torch.testing.assert_close(layer(x), linear(x), atol=0.02, rtol=0.0)


@pytest.mark.parametrize("groups", [2, 4])
def test_grouped_and_depthwise_conv(groups):
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 4 * (groups == 2) + 4, 3, padding=1, groups=groups)
    layer = SBSConv2d.from_float(conv)
    x = torch.rand(2, 4, 5, 5)
    out = layer(x)
    assert out.shape == conv(x).shape
    out.sum().backward()
    assert layer.weight.grad.shape == conv.weight.shape and layer.a_quant.clip.grad is not None


def test_activation_sign_is_detected_or_forced():
    auto = BitSharingQuantizer((2, 4, 8), signed=None, clip_init=None)
    auto(torch.randn(100))
    assert auto.signed is True and auto.clip > 0
    relu = BitSharingQuantizer((2, 4, 8), signed=None, clip_init=None)
    relu(torch.rand(100))
    assert relu.signed is False
    forced = BitSharingQuantizer((2, 4, 8), signed=False, clip_init=None)
    y = forced(torch.randn(1000))
    assert forced.signed is False and (y >= 0).all()


def test_pruned_input_channels_contribute_nothing_with_signed_activations():
    torch.manual_seed(0)
    producer = SBSLinear.from_float(nn.Linear(6, 8))
    consumer = SBSLinear.from_float(nn.Linear(8, 3), act_signed=True, act_bits=(2,))
    producer.enable_pruning(group_size=4, max_prune_ratio=0.5)
    consumer.input_source = LayerRef(producer)
    with torch.no_grad():
        producer.prune_gate.keep[:4] = False
    producer.prune_gate.fix()
    h = producer(torch.randn(5, 6))
    scrambled = h.clone()
    scrambled[:, :4] = 100 * torch.randn(5, 4)
    consumer.eval()
    torch.testing.assert_close(consumer(h), consumer(scrambled))


def test_invalid_arguments_raise_value_errors():
    with pytest.raises(ValueError, match="bits"):
        BitSharingQuantizer((2, 3, 8))  # 2 does not divide 3: grids not nested
    with pytest.raises(ValueError, match="clip_init"):
        BitSharingQuantizer((2, 4), clip_init=0.0)
    with pytest.raises(ValueError, match="group_size"):
        SBSPolicy(group_size=0)
    with pytest.raises(ValueError, match="max_prune_ratio"):
        SBSPolicy(max_prune_ratio=1.0)
    with pytest.raises(ValueError, match="nothing to search"):
        SBSPolicy(quantize=False, prune=False)
    with pytest.raises(ValueError, match="clip"):  # the op refuses a non-positive clip value
        layer = _conv()
        with torch.no_grad():
            layer.w_quant.clip.fill_(-1.0)
        layer(torch.rand(1, 4, 3, 3))


def test_state_dicts_float_to_sbs_and_sbs_to_sbs():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    sbs = convert(model, SBSPolicy(group_size=4))
    sbs.load_state_dict(model.state_dict())  # strict: the SBS-only state may be absent entirely
    x = torch.rand(4, 8)
    sbs(x)
    sbs_layers(sbs)["2"].fix(2, 4)
    other = convert(model, SBSPolicy(group_size=4))
    other.load_state_dict(sbs.state_dict())
    assert sbs_layers(other)["2"].bits() == (2, 4) and sbs_layers(other)["2"].w_quant.fixed_bits == 2
    sbs.eval(), other.eval()
    torch.testing.assert_close(other(x), sbs(x))
    partial = {k: v for k, v in sbs.state_dict().items() if k != "2.w_quant.clip"}
    with pytest.raises(RuntimeError, match="2.w_quant.clip"):  # a partial SBS state is still an error
        other.load_state_dict(partial)


@pytest.mark.parametrize("negative_grid", ["signed", "asymmetric"])
def test_inference_checks_the_grid_once_and_follows_every_change(monkeypatch, negative_grid, tmp_path):
    """Under no_grad a fixed (or eval-mode) quantizer rounds on a grid checked once: no host read
    of clip per call, the op's output bit for bit, and a new grid after any change of bits, sign,
    clip or offset (written in place, replaced, cast)."""
    import copy
    import mixedprec
    from mixedprec.formats import pack_weight
    from mixedprec.nn import PackedLinear
    from mixedprec.ops import checks
    g = torch.Generator().manual_seed(5)
    x = torch.randn(3, 33, generator=g)
    q = BitSharingQuantizer((2, 4, 8), signed=None, clip_init=None, negative_grid=negative_grid)
    q(x)  # the first batch: sign (and offset), clip
    q.eval()
    reads = []
    monkeypatch.setattr(checks, "clip", lambda op, value: reads.append(op))

    def expected(x=x):  # the quantizer's forward with autograd
        options = {"offset": mixedprec.backends.reference.quant.zero_point(q.offset, 2, torch.promote_types(
            x.dtype, torch.float32))} if q.asymmetric else {}
        return ops.bit_sharing_quant(x, q.clip, q.thresholds[:0], (q.current_bits(),), q.signed, **options).output

    def check(read: bool):
        want = expected()
        reads.clear()
        with torch.no_grad():
            assert torch.equal(q(x), want)
        assert reads == (["fixed_grid"] if read else []), reads

    check(True)
    check(False)
    with torch.no_grad():
        q.clip.mul_(0.5)
    check(True)
    q.fix(4)
    check(True)
    q.clip = nn.Parameter(torch.tensor(0.8))
    check(True)
    if q.asymmetric:
        with torch.no_grad():
            q.offset.fill_(0.6)
        check(True)
    assert copy.deepcopy(q).__dict__.get("_fixed_grid") is None
    q.double()  # the parameters' storage swapped: float64 x takes the op (its grid in float64)
    check(True)
    want = expected(x.double())
    with torch.no_grad():
        assert torch.equal(q(x.double()), want)
    q.float()
    layer = PackedLinear(pack_weight(torch.randint(0, 4, (5, 33), generator=g), torch.linspace(-1, 1, 4),
                                     torch.ones(5), 2), None, q).eval()
    with torch.no_grad():
        y = layer(x)
        mixedprec.save(layer, tmp_path / "layer.safetensors")  # the cached grid is not saved
        assert torch.equal(mixedprec.load(tmp_path / "layer.safetensors")(x), y)
