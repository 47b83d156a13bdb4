"""Determinism and state: the same seed gives the same SBS search, OPQ plan and packed bytes; a
search or finetune resumed from a checkpoint taken mid-run ends where an uninterrupted run ends;
device moves, dtype casts and state_dict round trips keep every buffer (bit gates' choices,
pruning masks, codebooks, channel scales, packed codes)."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import Tensor, nn
from torch.utils.data import Subset

import mixedprec
from crashing import CrashingDataset
from mixedprec import opq, sbs
from mixedprec.data.digits import load_digits
from mixedprec.formats import load_file, pack_weight
from mixedprec.models.digits import digits_cnn
from mixedprec.nn import PackedConv2d, PackedLinear
from mixedprec.nn.packed_module import PACKED_BUFFERS

POLICY = sbs.SBSPolicy(group_size=2, first_last_bits=None)  # every layer searched, pruning in pairs
SEARCH = dict(epochs=2, bops_weight=3.0, lr=0.2, quiet=True)  # strong enough to lower bits and prune


@pytest.fixture(scope="module")
def digits():
    """(192 training images: three batches of 64, a batch of test images)."""
    split = load_digits()
    return Subset(split.train, range(192)), split.test.tensors[0][:32]


def float_cnn() -> nn.Module:
    torch.manual_seed(0)
    return digits_cnn(width=4)


def searched(train, seed: int = 0, checkpoint=None) -> nn.Module:
    model = sbs.convert(float_cnn(), POLICY)
    sbs.search(model, train, seed=seed, checkpoint=checkpoint, **SEARCH)
    return model


@pytest.fixture(scope="module")
def searched_model(digits):
    return searched(digits[0])


def assert_same_state(a: nn.Module, b: nn.Module) -> None:
    """The same state dict and buffers (persistent or not), bit for bit, with the same dtypes."""
    for state_a, state_b in ((a.state_dict(), b.state_dict()), (dict(a.named_buffers()), dict(b.named_buffers()))):
        assert list(state_a) == list(state_b)
        for name, value in state_a.items():
            other = state_b[name]
            if isinstance(value, Tensor):
                assert value.dtype == other.dtype and torch.equal(value.cpu(), other.cpu()), name
            else:  # extra state: the quantizers' and gates' Python-side settings
                assert value == other, name


def packed_bytes(model: nn.Module, path) -> bytes:
    mixedprec.save(mixedprec.pack(model), path)
    return path.read_bytes()


# ---------------------------------------------------------------------------------------------
# the same seed, the same result

def test_same_seed_gives_the_same_sbs_search_and_packed_bytes(digits, searched_model, tmp_path):
    train, _ = digits
    reports = sbs.describe(searched_model).values()
    assert any(r.weight_bits < 8 or r.act_bits < 8 for r in reports)  # the search decided something:
    assert any(len(r.kept_out_channels) < r.out_channels for r in reports if r.kept_out_channels)  # bits, masks
    again = searched(train)
    assert_same_state(again, searched_model)
    assert packed_bytes(sbs.export(again).model, tmp_path / "a.safetensors") == \
        packed_bytes(sbs.export(searched_model).model, tmp_path / "b.safetensors")
    other_seed = searched(train, seed=1)  # data order changes: so would the state
    with pytest.raises(AssertionError):
        assert_same_state(other_seed, searched_model)


def test_same_seed_gives_the_same_opq_plan_and_packed_bytes(digits, tmp_path):
    train, _ = digits
    runs = []
    for _ in range(2):
        float_model = float_cnn()
        plan = opq.allocate(float_model, 6.0, quiet=True)
        model = opq.convert(float_model, plan)
        opq.finetune(model, train, epochs=1, lr=0.05, seed=3, quiet=True)
        runs.append((plan.to_dict(), model, packed_bytes(model, tmp_path / f"{len(runs)}.safetensors")))
    (plan_a, model_a, bytes_a), (plan_b, model_b, bytes_b) = runs
    assert plan_a == plan_b and any(not layer["dense"] for layer in plan_a["layers"])  # something pruned
    assert_same_state(model_a, model_b)
    assert bytes_a == bytes_b


# ---------------------------------------------------------------------------------------------
# resuming from a checkpoint

def test_search_and_finetune_resume_from_a_mid_run_checkpoint(digits, searched_model, tmp_path):
    """Each phase is killed in its second epoch, after the first epoch's checkpoint, and run again
    with the same arguments: it resumes and ends bit for bit where the uninterrupted run ends."""
    train, _ = digits
    crash_in_epoch_2 = 1 + len(train) + len(train) // 2  # one read for the input shape, then epochs
    search_ckpt, finetune_ckpt = tmp_path / "search.pt", tmp_path / "finetune.pt"
    interrupted = sbs.convert(float_cnn(), POLICY)
    with pytest.raises(KeyboardInterrupt):
        sbs.search(interrupted, CrashingDataset(train, crash_in_epoch_2), checkpoint=search_ckpt, **SEARCH)
    assert len(torch.load(search_ckpt, weights_only=True)["history"]) == 1
    resumed = searched(train, checkpoint=search_ckpt)
    assert_same_state(resumed, searched_model)

    finetune = dict(epochs=2, lr=0.05, quiet=True)
    uninterrupted = copy.deepcopy(searched_model)
    log = sbs.finetune(uninterrupted, train, **finetune)
    with pytest.raises(KeyboardInterrupt):
        sbs.finetune(resumed, CrashingDataset(train, crash_in_epoch_2), checkpoint=finetune_ckpt, **finetune)
    fresh = sbs.convert(float_cnn(), POLICY)  # as a new process would: the checkpoint holds the rest
    assert sbs.finetune(fresh, train, checkpoint=finetune_ckpt, **finetune) == log
    assert_same_state(fresh, uninterrupted)


# ---------------------------------------------------------------------------------------------
# moves, casts and state dicts keep the buffers

def _opq_model(train) -> nn.Module:
    float_model = float_cnn()
    return opq.convert(float_model, opq.allocate(float_model, 6.0, quiet=True))


MODELS = {
    "sbs": lambda train, searched_model: copy.deepcopy(searched_model),
    "opq": lambda train, searched_model: _opq_model(train),
    "packed sbs": lambda train, searched_model: mixedprec.pack(sbs.export(searched_model).model),
    "packed opq": lambda train, searched_model: mixedprec.pack(_opq_model(train)),
}


@pytest.mark.parametrize("kind", list(MODELS))
def test_moves_casts_and_state_dicts_keep_the_buffers(digits, searched_model, kind):
    train, images = digits
    model = MODELS[kind](train, searched_model).eval()
    before = copy.deepcopy(model)
    expected = model(images)

    assert_same_state(model.to("cpu"), before)
    model.to(torch.float64).to(torch.float32)  # float32 -> float64 -> float32 is exact
    assert_same_state(model, before)
    assert torch.equal(model(images), expected)

    fresh = copy.deepcopy(before)
    for value in fresh.state_dict().values():  # every tensor scrambled, then restored by loading
        if isinstance(value, Tensor):
            value.copy_(~value if value.dtype == torch.bool else value + 1)
    fresh.load_state_dict(before.state_dict())
    assert_same_state(fresh, before)
    assert torch.equal(fresh(images), expected)


@pytest.mark.parametrize("kind", ["packed sbs", "packed opq"])
def test_casting_a_packed_model_leaves_the_format_alone(digits, searched_model, kind):
    """.half() / .double() cast the float parts (biases, BatchNorm, activation clips); the packed
    tensors keep the dtypes the format fixes (float16 codebook, uint8 codes, float32 scales keep
    their bits), so the model still packs, saves and runs."""
    train, images = digits
    model = MODELS[kind](train, searched_model).eval()
    format_tensors = {name: t.clone() for name, t in model.named_buffers() if name.endswith(PACKED_BUFFERS)}
    assert format_tensors
    for cast in (torch.float16, torch.float64):
        model.to(cast)
        for name, t in model.named_buffers():
            if name in format_tensors:
                assert t.dtype == format_tensors[name].dtype and torch.equal(t, format_tensors[name]), name
        assert model(images.to(cast)).dtype == cast
    for module in model.modules():
        if isinstance(module, (PackedLinear, PackedConv2d)):
            module.packed_weight()  # still a valid packed weight


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the CUDA round trip needs a GPU")
@pytest.mark.parametrize("kind", list(MODELS))
def test_cuda_round_trip_keeps_the_buffers(digits, searched_model, kind):
    train, images = digits
    model = MODELS[kind](train, searched_model).eval()
    before = copy.deepcopy(model)
    on_gpu = model.cuda()
    for name, t in on_gpu.named_buffers():
        assert t.is_cuda, name
    torch.testing.assert_close(on_gpu(images.cuda()).cpu(), before(images), rtol=1e-4, atol=1e-4)
    assert_same_state(on_gpu.cpu(), before)


def _packed_linear(seed: int, scale_dtype: torch.dtype = torch.float32) -> PackedLinear:
    """A sparse 4-bit (6, 40) layer keeping exactly 120 weights, at positions that depend on seed."""
    g = torch.Generator().manual_seed(seed)
    keep = torch.zeros(240, dtype=torch.bool)
    keep[torch.randperm(240, generator=g)[:120]] = True
    codes = torch.randint(0, 16, (6, 40), generator=g)
    scale = (torch.rand(6, generator=g) + 0.5).to(scale_dtype)
    return PackedLinear(pack_weight(codes, torch.randn(16, generator=g), scale, 4, keep.reshape(6, 40)))


@pytest.mark.parametrize("change", ["load_state_dict", "assignment", "device move"])
def test_packed_linear_remakes_its_kernel_tables_when_its_buffers_change(change):
    """The float32 tables the kernels read are made once per PackedWeight (copies here: the codebook
    and the scales are float16); loading, assigning or moving the buffers must remake them."""
    source, target = _packed_linear(1, torch.float16), _packed_linear(2, torch.float16)
    x = torch.randn(3, 40)
    with torch.inference_mode():
        before = target(x)  # target's tables made
    if change == "load_state_dict":
        target.load_state_dict(source.state_dict())
    elif change == "assignment":
        for name in PACKED_BUFFERS:
            setattr(target, name, getattr(source, name).clone())
    else:  # there and back: the tables must follow both moves
        if not torch.cuda.is_available():
            pytest.skip("no GPU on this machine: no other device to move the layer to")
        target.cuda()
        assert target.packed_weight().codebook_float32.is_cuda and target.packed_weight().channel_scale_float32.is_cuda
        torch.testing.assert_close(target(x.cuda()).cpu(), before, rtol=1e-5, atol=1e-5)
        target.cpu()
        source = _packed_linear(2, torch.float16)  # target's own values: a move changes none
    packed = target.packed_weight()
    assert torch.equal(packed.codebook_float32, target.codebook.float())
    assert torch.equal(packed.channel_scale_float32, target.channel_scale.float())
    with torch.inference_mode():
        assert torch.equal(target(x), source(x))
    assert change == "device move" or not torch.equal(target(x), before)


def test_packed_linear_first_run_under_inference_mode_trains_afterwards():
    """A layer remakes its PackedWeight at the first forward after its buffers change; made under
    torch.inference_mode, its derived tensors must still be ones autograd can save (they were
    inference tensors: "Inference tensors cannot be saved for backward")."""
    layer = _packed_linear(1, torch.float16)
    layer.channel_scale = layer.channel_scale.clone()
    x = torch.randn(3, 40)
    with torch.inference_mode():
        expected = layer(x)
    x.requires_grad_(True)
    y = layer(x)
    y.sum().backward()
    assert torch.equal(y.detach(), expected) and x.grad is not None


def test_packed_layer_with_an_inference_mode_bitmap_holds_one_normal_copy():
    """Buffers assigned (or loaded) under torch.inference_mode are inference tensors. The
    PackedWeight made over them copies the bitmap out (the C++ glue checks a sparse index once per
    version of its tensors, and inference tensors have none; autograd cannot save them), and the
    layer keeps that copy as its buffer rather than holding two bitmaps."""
    layer = _packed_linear(1)
    x = torch.randn(3, 40)
    expected = layer(x).detach()
    with torch.inference_mode():
        layer.keep_bitmap = layer.keep_bitmap.clone()
        assert layer.keep_bitmap.is_inference()
        torch.testing.assert_close(layer(x), expected, rtol=0, atol=0)
    assert not layer.keep_bitmap.is_inference() and layer.keep_bitmap is layer.packed_weight().keep_bitmap
    x.requires_grad_(True)
    layer(x).sum().backward()
    assert x.grad is not None


def test_packed_weight_derived_tensors_are_not_saved(tmp_path):
    layer = _packed_linear(1, torch.float16)
    layer.packed_weight()
    mixedprec.save(nn.Sequential(layer), tmp_path / "m.safetensors")
    tensors, _ = load_file(tmp_path / "m.safetensors")
    assert sorted(tensors) == sorted(f"0.{name}" for name in PACKED_BUFFERS)


def test_packed_linear_load_state_dict_rebuilds_its_code_offsets():
    """The code index is derived from the keep bitmap, not saved: loading another layer's buffers
    of the same size must rebuild it (it used to keep the old one)."""
    source, target = _packed_linear(1), _packed_linear(2)
    assert not torch.equal(source.packed_weight().code_offsets, target.packed_weight().code_offsets)
    target.load_state_dict(source.state_dict())
    assert torch.equal(target.packed_weight().code_offsets, source.packed_weight().code_offsets)
    x = torch.randn(3, 40)
    assert torch.equal(target(x), source(x))
    bad = source.state_dict()
    bad["channel_scale"] = -bad["channel_scale"]
    with pytest.raises(RuntimeError, match="PackedLinear .* channel_scale must be finite and > 0"):
        target.load_state_dict(bad)
