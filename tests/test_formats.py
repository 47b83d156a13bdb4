"""The packed format: pack/decode, derived offsets, files (versioned, atomic, validated), and the
file size against mixedprec.metrics.packed_layer_bytes."""
from __future__ import annotations

import json
import os

import pytest
import torch
from torch import nn

import mixedprec
from mixedprec import formats
from mixedprec.formats import PackedWeight, pack_weight
from mixedprec.metrics import packed_layer_bytes
from mixedprec.nn import PackedLinear


def make_packed(out, inp, bits, sparsity, seed=0, codebook_dtype=torch.float16):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 1 << bits, (out, inp), generator=g)
    keep = torch.rand(out, inp, generator=g) >= sparsity if sparsity > 0 else None
    packed = pack_weight(codes, torch.randn(1 << bits, generator=g), torch.rand(out, generator=g) + 0.5, bits, keep,
                         codebook_dtype=codebook_dtype)
    return packed, codes, keep


@pytest.mark.parametrize("bits", [1, 3, 8])
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("codebook_dtype", [torch.float16, torch.float32])
def test_decode_and_offsets(bits, sparsity, codebook_dtype):
    p, codes, keep = make_packed(5, 70, bits, sparsity, codebook_dtype=codebook_dtype)
    assert p.codebook.dtype == codebook_dtype
    mask = torch.ones_like(codes, dtype=torch.bool) if keep is None else keep
    expected = torch.where(mask, p.channel_scale.float()[:, None] * p.codebook.float()[codes], 0.0)
    torch.testing.assert_close(p.decode(), expected, rtol=0, atol=0)
    if keep is None:
        assert p.code_offsets is None
    else:  # kept weights before each 64-weight block of the flat weight
        flat = mask.reshape(-1)
        assert p.code_offsets.dtype == torch.int64
        assert p.code_offsets.tolist() == [int(flat[:64 * b].sum()) for b in range(-(-flat.numel() // 64))]
    assert p.kept == int(mask.sum())


def packed_mlp(sparsity=0.75, bits=4, width=256, codebook_dtype=torch.float16):
    torch.manual_seed(0)
    layers = [PackedLinear(make_packed(width, width, bits, sparsity, seed=i, codebook_dtype=codebook_dtype)[0],
                           torch.randn(width)) for i in range(2)]
    return nn.Sequential(layers[0], nn.ReLU(), nn.BatchNorm1d(width), layers[1])


@pytest.mark.parametrize("codebook_dtype", [torch.float16, torch.float32])
def test_save_load_roundtrip(tmp_path, codebook_dtype):
    model = packed_mlp(codebook_dtype=codebook_dtype).eval()
    path = tmp_path / "model.safetensors"
    mixedprec.save(model, path)
    loaded = mixedprec.load(path).eval()
    x = torch.randn(4, 256)
    assert torch.equal(model(x), loaded(x))
    for a, b in zip(model.state_dict().values(), loaded.state_dict().values()):
        assert torch.equal(a, b)
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".tmp")]  # the temp file was renamed


@pytest.mark.parametrize("sparsity, codebook_dtype", [(0.0, torch.float16), (0.75, torch.float16), (0.75, torch.float32)])
def test_file_size_matches_packed_layer_bytes(tmp_path, sparsity, codebook_dtype):
    # the JSON header (module tree, CRCs: ~3 kB here) is what the 2% allow for
    model = packed_mlp(sparsity, width=1024, codebook_dtype=codebook_dtype)
    path = tmp_path / "model.safetensors"
    mixedprec.save(model, path)
    expected = 0
    for m in model.modules():
        if isinstance(m, PackedLinear):
            p = m.packed
            expected += packed_layer_bytes(p.numel, p.out_channels, p.kept, p.bits, p.channel_scale.dtype,
                                           p.codebook.dtype).total
    expected += sum(t.numel() * t.element_size() for name, t in model.state_dict().items()
                    if not name.endswith(formats.FIELDS))  # biases and BatchNorm, in float
    assert abs(os.path.getsize(path) - expected) <= 0.02 * expected, (os.path.getsize(path), expected)


def _save_small(tmp_path):
    path = tmp_path / "m.safetensors"
    mixedprec.save(nn.Sequential(PackedLinear(make_packed(8, 40, 3, 0.5)[0], torch.randn(8))), path)
    return path


def test_truncated_file(tmp_path):
    path = _save_small(tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 20])
    with pytest.raises(ValueError, match="truncated or corrupted"):
        mixedprec.load(path)


def test_corrupted_tensor_bytes(tmp_path):
    path = _save_small(tmp_path)
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF  # inside the last tensor's data
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="CRC32 mismatch"):
        mixedprec.load(path)


def _rewrite(path, edit):
    tensors, content = formats.load_file(path)
    edit(tensors, content)
    formats.save_file(path, tensors, content)


def test_inconsistent_layer(tmp_path):
    path = _save_small(tmp_path)
    _rewrite(path, lambda t, c: t.__setitem__("0.codes", t["0.codes"][:-1]))
    with pytest.raises(ValueError, match="layer '0' is inconsistent: .*codes must be uint8 of shape"):
        mixedprec.load(path)


def test_missing_tensor(tmp_path):
    path = _save_small(tmp_path)
    _rewrite(path, lambda t, c: t.pop("0.bias"))
    with pytest.raises(ValueError, match="tensor '0.bias' is missing"):
        mixedprec.load(path)


def test_newer_version_and_foreign_file(tmp_path):
    from safetensors.torch import save_file
    path = _save_small(tmp_path)
    tensors, content = formats.load_file(path)
    header = {"format": formats.FORMAT_NAME, "version": str(formats.FORMAT_VERSION + 1), "content": json.dumps(content),
              "crc32": json.dumps({k: formats.crc32(v) for k, v in tensors.items()})}
    save_file(tensors, str(path), metadata=header)
    newer, current = formats.FORMAT_VERSION + 1, formats.FORMAT_VERSION
    with pytest.raises(ValueError, match=f"version {newer}, this mixedprec reads versions up to {current}"):
        mixedprec.load(path)
    save_file({"w": torch.zeros(2)}, str(path))
    with pytest.raises(ValueError, match="not a mixedprec packed model"):
        mixedprec.load(path)


class Custom(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 2)

    def forward(self, x):
        return self.fc(x)


def test_a_model_of_other_classes_loads_into_a_freshly_built_one(tmp_path):
    model = nn.Sequential(Custom())
    mixedprec.save(model, tmp_path / "x.safetensors")
    with pytest.raises(ValueError, match=r"architecture comes from code: pass a freshly built one.*model="):
        mixedprec.load(tmp_path / "x.safetensors")
    loaded = mixedprec.load(tmp_path / "x.safetensors", model=nn.Sequential(Custom()))
    assert torch.equal(loaded[0].fc.weight, model[0].fc.weight)


def test_classes_outside_torch_nn_and_mixedprec_are_never_rebuilt_from_a_file(tmp_path):
    path = tmp_path / "x.safetensors"
    mixedprec.save(nn.Sequential(nn.Linear(3, 2)), path)
    _rewrite(path, lambda t, c: c["tree"].__setitem__("class", "os.system"))
    with pytest.raises(ValueError, match="class os.system is not a torch.nn or mixedprec module"):
        mixedprec.load(path)


def test_atomic_save_keeps_old_file_on_failure(tmp_path, monkeypatch):
    path = _save_small(tmp_path)
    before = path.read_bytes()
    monkeypatch.setattr(os, "replace", lambda *a: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError):
        mixedprec.save(nn.Sequential(nn.Linear(2, 2)), path)
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]


def test_packed_weight_validation():
    p, _, _ = make_packed(4, 8, 2, 0.5)
    with pytest.raises(ValueError, match="codes must be uint8 of shape"):
        PackedWeight(p.shape, 2, p.codebook, p.channel_scale, p.codes[:-1], p.keep_bitmap)
    with pytest.raises(ValueError, match="codebook must be float16 or float32"):
        PackedWeight(p.shape, 2, p.codebook.double(), p.channel_scale, p.codes, p.keep_bitmap)
    p, _, _ = make_packed(3, 7, 4, 0.5)  # 21 weights: the bitmap's last byte holds 3 unused bits
    bitmap = p.keep_bitmap.clone()
    bitmap[-1] |= 0x80
    with pytest.raises(ValueError, match=r"keep_bitmap's bits past the weight's 21 entries must be 0 \(its last byte"):
        PackedWeight(p.shape, 4, p.codebook, p.channel_scale, p.codes, bitmap)
