"""Packed layers at inference run a kept plan (PackedModule.inference_call): the general path's
outputs bit for bit, the checks made once per input key, and a new plan after every change of the
layer, its quantizer, the backend and the int8 switch."""
import copy
import sys

import pytest
import torch
from torch import nn

import mixedprec
from mixedprec import ops
from mixedprec.formats import pack_weight
from mixedprec.nn import PackedConv2d, PackedLinear, int8, set_int8
from mixedprec.sbs import BitSharingQuantizer


def _quantizer(kind: str, x: torch.Tensor) -> BitSharingQuantizer | None:
    if kind == "none":
        return None
    q = BitSharingQuantizer((2, 4, 8), signed=None, clip_init=None, negative_grid=kind)
    q(x)  # the first batch: sign, offset, clip
    q.fix(4)
    return q.eval()


def _layer(kind: str, conv: bool, seed: int = 0, sparse: bool = True):
    g = torch.Generator().manual_seed(seed)
    shape = (6, 5, 3, 3) if conv else (6, 13)
    keep = torch.rand(shape, generator=torch.Generator().manual_seed(0)) > 0.3  # every seed's: as many codes
    packed = pack_weight(torch.randint(0, 16, shape, generator=g), torch.linspace(-1, 1, 16),
                         torch.rand(6, generator=g) + 0.5, 4, keep if sparse else None, codebook_dtype=torch.float32)
    bias = torch.randn(6, generator=g)
    x = torch.randn((2, 5, 7, 9) if conv else (3, 2, 13), generator=g)
    q = _quantizer(kind, x)
    layer = PackedConv2d(packed, bias, q, stride=1, padding=1) if conv else PackedLinear(packed, bias, q)
    return layer.eval(), x


def _general(layer, x):
    """forward's general path: with grad enabled no plan is made (and the int8 path declines)."""
    with torch.enable_grad():
        return layer(x).detach()


class _Counter:
    """Counts the backend resolutions of the ops' prepared calls (one per plan made)."""

    def __init__(self, monkeypatch):
        self.count = 0
        for name in ("lut_conv2d", "lowbit_linear", "bit_sharing_quant"):
            module = sys.modules[f"mixedprec.ops.{name}"]  # mixedprec.ops.<op> is the function
            monkeypatch.setattr(module, "resolve", self._counted(module.resolve))

    def _counted(self, original):
        def resolve(*args, **kwargs):
            self.count += 1
            return original(*args, **kwargs)
        return resolve

    def take(self) -> int:
        count, self.count = self.count, 0
        return count


@pytest.mark.parametrize("conv", [True, False], ids=["conv", "linear"])
@pytest.mark.parametrize("kind", ["none", "signed", "asymmetric"])
def test_the_plan_gives_the_general_path_and_follows_every_change(monkeypatch, tmp_path, kind, conv):
    layer, x = _layer(kind, conv)
    counter = _Counter(monkeypatch)
    calls = 1 if kind == "none" else 2  # resolutions per plan: the op's, the quantizer's

    def check(made: int, model=layer, inputs=x):
        want = _general(model, inputs)
        counter.take()
        with torch.inference_mode():
            y = model(inputs)
        assert torch.equal(y, want)
        assert counter.take() == made
        return y

    check(calls)
    y = check(0)  # kept: no checks, no resolution
    tracked = x.clone().requires_grad_()
    layer(tracked).sum().backward()  # with autograd: the general path
    assert tracked.grad is not None and tracked.grad.abs().sum() > 0
    other = x[..., :-1] if conv else x[:1]
    check(calls, inputs=other)  # a new key
    check(calls)  # one plan is kept, for the last key
    with torch.no_grad():
        layer.bias.add_(1.0)  # read at each call: no new plan needed
    assert not torch.equal(check(0), y)
    layer.bias = nn.Parameter(torch.randn(6))
    check(1)  # the layer's attribute: the op's call again, the quantizer's kept
    if conv:
        layer.stride = 2
        assert check(1).shape[-1] == 5
        layer.stride = 1
        check(1)
    source, _ = _layer(kind, conv, seed=1)
    layer.load_state_dict(source.state_dict())  # new packed tensors (and quantizer state)
    check(calls)
    if kind != "none":
        with torch.no_grad():
            layer.input_quant.clip.mul_(0.5)  # a new grid: the quantizer's call again
        check(2)
        layer.input_quant.fix(8)
        check(2)
        layer.input_quant.enabled = False  # its call is the identity: the op's again
        check(1)
        layer.input_quant.enabled = True
        check(1)  # the quantizer kept its call for this grid
        seen = []
        handle = layer.input_quant.register_forward_hook(lambda module, args, out: seen.append(out.shape))
        check(1)  # no plan: the quantizer runs as a module (its kept call), its hook with it
        assert len(seen) == 2
        handle.remove()
        handle = nn.modules.module.register_module_forward_hook(
            lambda module, args, out: seen.append(type(module)) if module is layer.input_quant else None)
        check(1)  # a hook on every module: the same
        assert len(seen) == 4
        handle.remove()
        check(0)  # the plan made before the hooks
    with ops.use_backend("reference"):
        check(calls)
    check(calls)
    twin = copy.deepcopy(layer)
    assert twin.__dict__.get("_plan") is None
    with torch.no_grad():
        twin.bias.add_(1.0)
    assert not torch.equal(check(calls, model=twin), check(0))  # the copy runs on its own tensors
    mixedprec.save(layer, tmp_path / "layer.safetensors")  # the plan is not saved
    check(calls, model=mixedprec.load(tmp_path / "layer.safetensors").eval())
    if conv:
        layout = x.contiguous(memory_format=torch.channels_last)
        assert check(calls, inputs=layout).is_contiguous(memory_format=torch.channels_last)


@pytest.mark.skipif(not int8.int8_available(), reason="the int8 path needs oneDNN and VNNI")
@pytest.mark.parametrize("conv", [True, False], ids=["conv", "linear"])
def test_the_plan_leaves_int8_calls_to_the_int8_path_and_follows_its_switch(monkeypatch, conv):
    layer, x = _layer("signed", conv, sparse=False)  # a uniform grid, no bitmap
    for name in ("MIN_MACS", "WINOGRAD_MIN_MACS", "MIN_GEMM_MACS", "MIN_ROW_CHANNELS"):  # no threshold: int8 takes x
        monkeypatch.setattr(int8, name, 0)
    general = _general(layer, x)
    with torch.inference_mode():
        want = (int8.int8_conv2d if conv else int8.int8_linear)(layer, x)
        assert want is not None and not torch.equal(want, general)  # float32 rounding apart
        for enabled in (False, True, False):
            previous = set_int8(enabled)
            try:
                for _ in range(2):
                    assert torch.equal(layer(x), want if enabled else general)
            finally:
                set_int8(previous)


def test_a_model_loaded_under_inference_mode_runs_and_follows_writes_there(tmp_path):
    """Tensors made under inference_mode keep no version counter and can be written in place
    there: the quantizer's grid then keys on clip's value."""
    layer, x = _layer("asymmetric", conv=True)
    mixedprec.save(layer, tmp_path / "layer.safetensors")
    with torch.inference_mode():
        want = layer(x)
        loaded = mixedprec.load(tmp_path / "layer.safetensors").eval()
        assert loaded.input_quant.clip.is_inference()
        assert torch.equal(loaded(x), want)
        for model in (layer, loaded):
            model.input_quant.clip.mul_(0.5)
        want = layer(x)
        assert torch.equal(loaded(x), want)
