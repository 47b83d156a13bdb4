"""Any architecture end to end: SBS (convert, search, finetune, export) and OPQ (allocate, convert,
finetune) on torchvision CNNs and a ViT, a user-defined CNN, nn.TransformerEncoder and a
Llama-shaped decoder; then pack, save, load into a freshly built model of the same class
(initialized differently, so every weight must come from the file), and torch.compile.

Random init, small inputs, one optimizer step per phase: what is tested is that every step runs
on every architecture and that the loaded model computes exactly what the in-memory packed one
does. torch.compile must give the same outputs: exactly under the aot_eager backend (the same
graph on eager kernels), to float rounding under inductor, except that in front of SBS's
activation quantizers inductor's reordered arithmetic can flip a rounding (a whole 8-bit step), so
SBS models are held to a few such steps there. To fit CI's time, every model is compiled with
aot_eager in its SBS case (which holds every op: activation fake-quant, packed conv and linear),
and the small ones with inductor in both cases (inductor takes up to minutes on the CNNs).
"""
from __future__ import annotations

import warnings

import pytest
import torch
import torchvision
from torch import nn
from torch.utils.data import TensorDataset

import mixedprec
from mixedprec import opq, sbs
from mixedprec.reporting import model_report
from any_models import ResidualConcatNet, TinyLlama

CLASSES = 5


class Encoder(nn.Module):
    """nn.TransformerEncoder over a sequence of feature vectors, mean-pooled into class logits."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(12, 32)
        self.encoder = nn.TransformerEncoder(nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True), 2)
        self.head = nn.Linear(32, CLASSES)

    def forward(self, x):
        return self.head(self.encoder(self.proj(x)).mean(1))


def _vit():
    return torchvision.models.VisionTransformer(image_size=16, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32,
                                                mlp_dim=64, num_classes=CLASSES)


def _images(size):
    return lambda g, n: torch.randn(n, 3, size, size, generator=g)


# name: (builder, inputs of n examples, labels of n examples)
MODELS = {
    "resnet18": (lambda: torchvision.models.resnet18(num_classes=CLASSES), _images(32)),
    "resnet50": (lambda: torchvision.models.resnet50(num_classes=CLASSES), _images(32)),
    "mobilenet_v2": (lambda: torchvision.models.mobilenet_v2(num_classes=CLASSES), _images(32)),
    "efficientnet_b0": (lambda: torchvision.models.efficientnet_b0(num_classes=CLASSES), _images(32)),
    "convnext_tiny": (lambda: torchvision.models.convnext_tiny(num_classes=CLASSES), _images(32)),
    "vit": (_vit, _images(16)),
    "user_cnn": (lambda: ResidualConcatNet(CLASSES), _images(12)),
    "transformer_encoder": (Encoder, lambda g, n: torch.randn(n, 6, 12, generator=g)),
    "llama": (TinyLlama, lambda g, n: torch.randint(0, 64, (n, 9), generator=g)),
}
EXAMPLES = 4  # one batch: one optimizer step per epoch
INDUCTOR = ("vit", "user_cnn", "transformer_encoder", "llama")


def _data(name: str):
    g = torch.Generator().manual_seed(1)
    inputs = MODELS[name][1](g, EXAMPLES)
    if name == "llama":  # next-token prediction
        return TensorDataset(inputs[:, :-1], inputs[:, 1:]), inputs[:3, :-1]
    return TensorDataset(inputs, torch.randint(0, CLASSES, (EXAMPLES,), generator=g)), inputs[:3]


def _fresh(name: str, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return MODELS[name][0]().eval()


def _compress(name: str, method: str, model: nn.Module, train) -> nn.Module:
    steps = dict(batch_size=4, quiet=True)
    if method == "opq":
        net = opq.convert(model, opq.allocate(model, 8, quiet=True), inplace=True)
        opq.finetune(net, train, epochs=1, **steps)
        return net
    net = sbs.convert(model, sbs.SBSPolicy(), inplace=True)
    sbs.search(net, train, epochs=1, bops_weight=0.5, **steps)
    sbs.finetune(net, train, epochs=1, **steps)
    return sbs.export(net).model


def _close(actual, expected, what, atol=1e-4):
    scale = expected.abs().max().item() + 1e-6
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=atol * scale, msg=lambda m: f"{what}: {m}")


# An SBS model computed with other float32 roundings than the finetuned model's F.conv2d / F.linear
# (inductor's kernels, the int8 convolutions of nn/int8.py, and on the float path lut_conv2d's
# Winograd layers and GEMMs and lowbit_linear's sums: each layer within ~1e-6 of F.conv2d) moves
# some activations across a rounding boundary of the next quantizer, a whole step each, and the
# network carries each such step on: outputs moved by up to ~1e-2 of their scale on one CPU and
# 7e-2 on another (EfficientNet-B0 on a Xeon, its 22nd layer's input one step off). So the packed
# SBS layers are compared with the finetuned ones each on the same input (_layers_match), and
# whole models only where a step is what is allowed (torch.compile with inductor).
SBS_OTHER_ROUNDING = 3e-2


def _layers_match(net: nn.Module, packed: nn.Module, x: torch.Tensor) -> None:
    """Every packed layer, on the input its finetuned twin saw in net(x), gives that twin's output
    (float rounding), on the float path and as int8 convolutions."""
    kinds = (mixedprec.nn.PackedLinear, mixedprec.nn.PackedConv2d)
    layers = {n: m for n, m in packed.named_modules() if isinstance(m, kinds)}
    seen = {}  # cloned: in-place activations (EfficientNet's SiLU) rewrite a layer's output after it

    def keep(name):
        return lambda module, args, y: seen.__setitem__(name, ([a.clone() for a in args], y.clone()))
    hooks = [m.register_forward_hook(keep(n)) for n, m in net.named_modules() if n in layers]
    try:
        net(x)
    finally:
        for h in hooks:
            h.remove()
    assert seen.keys() == layers.keys(), sorted(set(layers) ^ set(seen))
    for int8 in (False, True):
        previous = mixedprec.nn.set_int8(int8)
        try:
            for n, (args, y) in seen.items():
                _close(layers[n](*args), y, f"packed {n} vs finetuned ({'int8' if int8 else 'float path'})")
        finally:
            mixedprec.nn.set_int8(previous)


@pytest.mark.parametrize("method", ["sbs", "opq"])
@pytest.mark.parametrize("name", list(MODELS))
def test_compress_pack_save_load_compile(name, method, tmp_path):
    train, x = _data(name)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every layer of these models is compressed: no "stays float" warning
        net = _compress(name, method, _fresh(name, 0), train).eval()
        packed = mixedprec.pack(net).eval()
    assert any(isinstance(m, (mixedprec.nn.PackedLinear, mixedprec.nn.PackedConv2d)) for m in packed.modules())
    with torch.no_grad():
        if method == "sbs":
            _layers_match(net, packed, x)
        else:
            _close(packed(x), net(x), "packed vs finetuned")
    path = tmp_path / f"{name}.safetensors"
    mixedprec.save(packed, path)
    loaded = mixedprec.load(path, model=_fresh(name, 1))
    with torch.no_grad():
        expected = packed(x)
        assert torch.equal(loaded(x), expected), "the loaded model must compute what the in-memory one does"
        if method == "sbs":
            torch._dynamo.reset()
            assert torch.equal(torch.compile(loaded, backend="aot_eager")(x), expected), "torch.compile (aot_eager)"
        if name in INDUCTOR:
            scale = expected.abs().max().item() + 1e-6
            atol = (SBS_OTHER_ROUNDING if method == "sbs" else 1e-4) * scale
            torch.testing.assert_close(torch.compile(loaded)(x), expected, rtol=1e-4, atol=atol,
                                       msg=lambda m: f"torch.compile (inductor): {m}")
    example = x[:1] if name in ("llama", "transformer_encoder") else tuple(x.shape[1:])
    rows = model_report(loaded, example).layers
    assert {r.form for r in rows} == {"packed"}, [r for r in rows if r.form != "packed"]
    if name == "llama":
        prompt = x[:2, :4]
        tokens = loaded.generate(prompt, 5)
        assert tokens.shape == (2, 9) and torch.equal(tokens, packed.generate(prompt, 5))


def test_packed_state_dict_round_trips(tmp_path):
    train, x = _data("resnet18")
    packed = mixedprec.pack(_compress("resnet18", "opq", _fresh("resnet18", 0), train)).eval()
    mixedprec.save(packed, tmp_path / "m.safetensors")
    other = mixedprec.load(tmp_path / "m.safetensors", model=_fresh("resnet18", 1))
    other.load_state_dict(packed.state_dict())
    with torch.no_grad():
        assert torch.equal(other(x), packed(x))
