"""The int8 path of PackedConv2d and PackedLinear (mixedprec/nn/int8.py) and the codes it is fed
(bit_sharing_codes): against the float path's quantizer bit for bit, and against a float64
convolution (GEMM) of the fake-quantized input with the decoded weight."""
from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mixedprec
from mixedprec import ops
from mixedprec.formats import pack_weight
from mixedprec.nn import PackedConv2d, PackedLinear, set_int8
from mixedprec.nn import int8
from mixedprec.nn.int8 import GRID_TOLERANCE, Int8Weight, int8_available, int8_conv2d, int8_linear
from mixedprec.ops.library import memory_format
from mixedprec.sbs.quantizer import BitSharingQuantizer

pytestmark = pytest.mark.skipif(not int8_available(), reason="no oneDNN int8 convolution or no VNNI")


@pytest.fixture(autouse=True)
def small_layers_too(monkeypatch):
    """The tests' small layers take the int8 path (below MIN_MACS, WINOGRAD_MIN_MACS,
    MIN_GEMM_MACS, MIN_CHANNELS or MIN_ROW_CHANNELS a call takes the float path)."""
    monkeypatch.setattr(int8, "MIN_ROW_CHANNELS", 1)
    monkeypatch.setattr(int8, "MIN_MACS", 0)
    monkeypatch.setattr(int8, "WINOGRAD_MIN_MACS", 0)
    monkeypatch.setattr(int8, "MIN_GEMM_MACS", 0)
    monkeypatch.setattr(int8, "MIN_CHANNELS", 1)

GRIDS = ("unsigned", "signed", "asymmetric")


def quantizer(bits: int, grid: str, x: torch.Tensor) -> BitSharingQuantizer:
    """A fixed-bit quantizer on ``grid``, its clip (and offset) taken from x as SBS's first batch does."""
    q = BitSharingQuantizer((bits,), signed={"unsigned": False, "signed": True, "asymmetric": None}[grid],
                            clip_init=None, negative_grid="asymmetric")
    with torch.no_grad():
        q(x)
    assert q.asymmetric == (grid == "asymmetric")
    return q


def sample(shape, grid: str, seed: int, channels_last: bool = False) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * 2
    if grid == "unsigned":
        x = x.relu()
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def sbs_layer(weight_shape, bits: int, quant, stride=1, padding=0, dilation=1, bias=True, seed=0):
    """A layer as SBS packs one: codes into a uniform grid mean + std v (2 k / n - 1), unit scales
    (a PackedLinear for a 2-D weight shape)."""
    g = torch.Generator().manual_seed(seed)
    n = (1 << bits) - 1
    codes = torch.randint(0, n + 1, weight_shape, generator=g)
    k = torch.arange(n + 1, dtype=torch.float32)
    grid = (0.7 * (2.0 * (k * (1.0 / n)) - 1.0)) * 0.05 + 0.003
    packed = pack_weight(codes, grid, torch.ones(weight_shape[0], dtype=torch.float16), bits,
                         codebook_dtype=torch.float32)
    b = torch.randn(weight_shape[0], generator=g) if bias else None
    if len(weight_shape) == 2:
        return PackedLinear(packed, b, quant).eval()
    return PackedConv2d(packed, b, quant, stride, padding, dilation).eval()


def check_layer(layer: PackedConv2d, x: torch.Tensor) -> torch.Tensor:
    """The int8 path's y (checked to be taken) around the float64 convolution of the quantizer's
    output x_hat with the decoded weight W. Its integer sums are exact; the error is float32
    rounding of a few products of each of its two terms (main s_x d sum (k - j)(c - m), at most
    sum |x_hat| (|W| + |c0|), and the offset c0 s_x sum (k - j)), with x_hat rebuilt as s_x (k - j)
    where the float path rounds three times: 10 u of |main| + |offset|, plus what the grid's
    affine fit may move each weight (GRID_TOLERANCE eps of the largest level) and u of the bias."""
    linear = isinstance(layer, PackedLinear)
    with torch.no_grad():
        y = (int8_linear if linear else int8_conv2d)(layer, x)
        assert y is not None, "the int8 path did not apply"
        x_hat = layer.input_quant(x).double()
    w = layer.packed_weight().decode().double()
    bias = None if layer.bias is None else layer.bias.double()
    if linear:  # a GEMM is the convolution of 1x1 pixels
        x_hat, w = x_hat.reshape(-1, w.shape[1], 1, 1), w.view(*w.shape, 1, 1)
    args = (1, 0, 1) if linear else (layer.stride, layer.padding, layer.dilation)
    expected = F.conv2d(x_hat, w, bias, *args)
    grid = layer.codebook.double()
    offset = (grid[0] + (grid[-1] - grid[0]) / (grid.numel() - 1) * (grid.numel() // 2)).abs()
    eps = torch.finfo(torch.float32).eps
    window = F.conv2d(x_hat.abs(), torch.ones_like(w), None, *args)
    u = eps / 2
    bound = (10 * u * (F.conv2d(x_hat.abs(), w.abs(), None, *args) + 2 * offset * window)
             + GRID_TOLERANCE * eps * grid.abs().max() * window
             + (0 if bias is None else u * bias.abs().view(1, -1, 1, 1)))
    finite = expected.isfinite()
    out = y.reshape(expected.shape) if linear else y
    assert torch.equal(out.isnan(), expected.isnan())
    assert ((out.double() - expected).abs()[finite] <= bound[finite]).all(), ((out.double() - expected).abs() / bound).max()
    assert y.dtype == torch.float32 and y.shape == (*x.shape[:-1], w.shape[0]) if linear else expected.shape
    if not linear:  # x's layout, as F.conv2d's (oneDNN's is channels-last)
        assert y.is_contiguous(memory_format=memory_format(x))
    return y


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("channels_last", [False, True])
def test_codes_give_the_quantizers_output_bit_for_bit(bits, grid, channels_last):
    x = sample((2, 21, 5, 7), grid, bits, channels_last)
    q = quantizer(bits, grid, x)
    x[0, 3, 1, 2], x[1, 0, 0, 0], x[1, 20, 4, 6] = float("inf"), float("-inf"), 1e-30
    fixed = q.fixed_grid()
    codes, sums = torch.ops.mixedprec.bit_sharing_codes(x, fixed.clip, bits, fixed.signed, fixed.zero_point)
    with torch.no_grad():
        y = q(x)
    n = (1 << bits) - 1
    k = codes.float()
    if fixed.signed:
        rebuilt, zero = fixed.clip * (2.0 * (k * (1.0 / n)) - 1.0), (n - 1) // 2
    else:
        z0 = 0.0 if fixed.zero_point is None else fixed.zero_point
        rebuilt, zero = fixed.clip * (k * (1.0 / n) - z0), round(float(z0) * n)
    assert codes.dtype == torch.uint8 and codes.stride() == x.stride()
    assert int(codes.max()) <= n
    assert torch.equal(rebuilt, y)
    with torch.no_grad(), ops.use_backend("reference"):
        assert torch.equal(rebuilt, q(x))  # and so the reference's rounding
    assert torch.equal(sums, (codes.double() - zero).sum(1, keepdim=True).float())
    centered, centered_sums = torch.ops.mixedprec.bit_sharing_codes(x, fixed.clip, bits, fixed.signed,
                                                                    fixed.zero_point, True)
    assert centered.dtype == torch.int8 and centered.stride() == x.stride()
    assert torch.equal(centered.int(), codes.int() - 128) and torch.equal(centered_sums, sums)
    for centered in (False, True):  # channels-last codes, whatever x's layout (oneDNN's convolution's input)
        laid_out, laid_out_sums = torch.ops.mixedprec.bit_sharing_codes(x, fixed.clip, bits, fixed.signed,
                                                                        fixed.zero_point, centered, True)
        assert laid_out.is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(laid_out.int(), codes.int() - (128 if centered else 0))
        assert torch.equal(laid_out_sums, sums)


@pytest.mark.parametrize("shape", [(1, 37, 9, 15), (3, 16, 8, 8), (2, 5, 1, 1), (1, 1, 3, 70), (2, 130, 2, 3)])
def test_channels_last_codes_of_nchw_x_on_every_tile_edge(shape):
    """NCHW x coded into channels-last codes, 16 channels x 16 pixels at a time over spans of
    64 pixels: the codes and sums of x's own layout, at every cut of channels and pixels."""
    x = sample(shape, "asymmetric", 3)
    x[0, 0, 0, -1] = float("nan")
    q = quantizer(5, "asymmetric", x.nan_to_num())
    fixed = q.fixed_grid()
    args = (fixed.clip, 5, fixed.signed, fixed.zero_point)
    codes, sums = torch.ops.mixedprec.bit_sharing_codes(x, *args)
    laid_out, laid_out_sums = torch.ops.mixedprec.bit_sharing_codes(x, *args, False, True)
    assert laid_out.is_contiguous(memory_format=torch.channels_last) and laid_out.shape == x.shape
    assert torch.equal(laid_out_sums.isnan(), x.isnan().any(1, keepdim=True))
    assert torch.equal(laid_out_sums.nan_to_num(), sums.nan_to_num())
    finite = ~x.isnan()
    assert torch.equal(laid_out[finite], codes[finite])


def test_codes_of_nan_give_a_nan_sum_at_its_pixel():
    x = sample((1, 19, 3, 4), "unsigned", 0, channels_last=True)
    x[0, 7, 1, 2] = float("nan")
    q = quantizer(4, "unsigned", x.nan_to_num())
    codes, sums = torch.ops.mixedprec.bit_sharing_codes(x, q.clip.detach(), 4, False, None)
    assert torch.equal(sums.isnan(), x.isnan().any(1, keepdim=True))


def test_codes_of_empty_tensors():
    for shape in ((0, 3, 4, 4), (2, 0, 3, 3), (1, 5, 0, 2)):
        for channels_last in (False, True):
            x = torch.rand(shape)
            x = x.contiguous(memory_format=torch.channels_last) if channels_last else x
            for laid_out in (False, True):
                codes, sums = torch.ops.mixedprec.bit_sharing_codes(x, torch.tensor(1.0), 4, False, None, False,
                                                                    laid_out)
                assert codes.shape == shape and sums.shape == (shape[0], 1, *shape[2:])
                assert torch.equal(sums, torch.zeros_like(sums))


def test_codes_reject_bad_arguments():
    x, clip = torch.rand(1, 4, 3, 3), torch.tensor(1.0)
    codes = torch.ops.mixedprec.bit_sharing_codes
    with pytest.raises(RuntimeError, match="x must be a 4-D float32"):
        codes(x.double(), clip, 4, False)
    with pytest.raises(RuntimeError, match="x must be a 4-D float32"):
        codes(x[0], clip, 4, False)
    with pytest.raises(RuntimeError, match="bits must be in 1..8"):
        codes(x, clip, 9, False)
    with pytest.raises(RuntimeError, match="clip must be finite and > 0"):
        codes(x, torch.tensor(float("nan")), 4, False)
    with pytest.raises(RuntimeError, match="contiguous"):
        codes(x.transpose(2, 3), clip, 4, False)
    with pytest.raises(RuntimeError, match="zero_point is only for the unsigned grid"):
        codes(x, clip, 4, True, torch.tensor(0.2))


GEOMETRIES = [  # (x shape, weight shape, stride, padding, dilation)
    ((1, 19, 9, 11), (13, 19, 1, 1), 1, 0, 1),
    ((2, 16, 9, 8), (24, 16, 1, 1), (2, 3), 0, 1),
    ((1, 8, 10, 7), (17, 8, 3, 3), 1, 1, 1),
    ((3, 12, 11, 9), (8, 12, 3, 3), 2, 1, 1),
    ((1, 3, 17, 15), (16, 3, 7, 7), 2, 3, 1),
    ((1, 6, 12, 12), (10, 6, 3, 3), 1, 2, 2),
    ((2, 5, 7, 9), (9, 5, 3, 1), 1, (1, 0), 1),
    ((1, 40, 6, 6), (32, 40, 3, 3), 1, 0, 1),
]


@pytest.fixture(params=["small gemm", "onednn"])
def gemm_route(request, monkeypatch):
    """1x1 convolutions and GEMMs through torch._int_mm (the tests' layers are small), or with
    GEMM_MACS = 0 through oneDNN's prepacked weights."""
    if request.param == "onednn":
        monkeypatch.setattr(int8, "GEMM_MACS", 0)
    return request.param


@pytest.mark.parametrize("case", range(len(GEOMETRIES)))
@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("channels_last", [False, True])
def test_int8_path_matches_the_float_convolution(case, grid, channels_last, gemm_route):
    x_shape, w_shape, stride, padding, dilation = GEOMETRIES[case]
    for bits, a_bits in ((2, 8), (4, 4), (8, 2)):
        x = sample(x_shape, grid, case * 10 + bits, channels_last)
        layer = sbs_layer(w_shape, bits, quantizer(a_bits, grid, x), stride, padding, dilation, bias=case % 2 == 0)
        y = check_layer(layer, x)
        with torch.no_grad():
            set_int8(False)
            try:
                float_path = layer(x)
            finally:
                set_int8(True)
            assert torch.equal(layer(x), y)  # forward takes the int8 path
        torch.testing.assert_close(y, float_path, rtol=1e-5, atol=1e-4 * float_path.abs().max())


def test_nan_reaches_the_outputs_the_float_path_reaches():
    x = sample((1, 8, 9, 9), "unsigned", 3, channels_last=True)
    layer = sbs_layer((12, 8, 3, 3), 4, quantizer(8, "unsigned", x), padding=1)
    x[0, 2, 4, 5] = float("nan")
    y = check_layer(layer, x)
    assert y.isnan().sum() == 12 * 9


def test_int8_path_follows_the_bias_and_the_clip():
    x = sample((1, 8, 6, 6), "signed", 4)
    layer = sbs_layer((8, 8, 3, 3), 4, quantizer(8, "signed", x), padding=1)
    check_layer(layer, x)
    with torch.no_grad():
        layer.bias.add_(1.0)
        layer.input_quant.clip.mul_(0.5)
    check_layer(layer, x)


def test_other_calls_take_the_float_path():
    x = sample((1, 8, 6, 6), "unsigned", 5)
    quant = quantizer(4, "unsigned", x)
    layer = sbs_layer((8, 8, 3, 3), 4, quant, padding=1)
    assert int8_conv2d(layer, x) is None  # gradients enabled: the float path's autograd
    with torch.no_grad():
        assert int8_conv2d(layer, x.double()) is None
        assert int8_conv2d(layer, x.half()) is None
        grouped = PackedConv2d(layer.packed_weight(), None, quant, groups=1)
        assert int8_conv2d(grouped, x) is not None
        g = torch.Generator().manual_seed(0)
        two_groups = PackedConv2d(pack_weight(torch.randint(0, 16, (8, 4, 3, 3), generator=g), layer.codebook,
                                              torch.ones(8), 4, codebook_dtype=torch.float32), None, quant, 1, 1,
                                  groups=2)  # a uniform grid (a float16 codebook is not one within GRID_TOLERANCE)
        assert Int8Weight(PackedConv2d(two_groups.packed_weight(), None, quant, 1, 1)).applies
        assert int8_conv2d(two_groups, x) is None
        sparse = PackedConv2d(pack_weight(torch.randint(0, 16, (8, 8, 3, 3), generator=g), layer.codebook,
                                          torch.ones(8), 4, torch.rand(8, 8, 3, 3, generator=g) > 0.5), None, quant)
        assert int8_conv2d(sparse, x) is None
        lloyd = PackedConv2d(pack_weight(torch.randint(0, 16, (8, 8, 3, 3), generator=g),
                                         torch.randn(16, generator=g).sort().values, torch.ones(8), 4), None, quant)
        assert int8_conv2d(lloyd, x) is None
        searching = sbs_layer((8, 8, 3, 3), 4, BitSharingQuantizer((2, 4, 8), signed=False, clip_init=2.0), padding=1)
        assert int8_conv2d(searching.train(), x) is None  # a search in training mode learns its gates
        assert int8_conv2d(searching.eval(), x) is not None  # in eval mode it rounds at its choice
        assert int8_conv2d(sbs_layer((8, 8, 3, 3), 4, None, padding=1), x) is None
        previous = set_int8(False)
        assert previous and int8_conv2d(layer, x) is None
        set_int8(True)
        with ops.use_backend("reference"):  # a chosen backend runs its own kernels
            assert int8_conv2d(layer, x) is None
        layer.backend = "cpu"
        assert int8_conv2d(layer, x) is None


def test_copies_and_saved_layers_after_an_int8_call():
    x = sample((2, 8, 6, 6), "unsigned", 6, channels_last=True)
    layer = sbs_layer((8, 8, 3, 3), 4, quantizer(8, "unsigned", x), padding=1)
    with torch.no_grad():
        y = layer(x)
        twin = copy.deepcopy(layer)
        buffer = io.BytesIO()
        torch.save(layer, buffer)
        buffer.seek(0)
        loaded = torch.load(buffer, weights_only=False)
        assert torch.equal(twin(x), y) and torch.equal(loaded(x), y)
        assert torch.equal(layer(x[:1]), y[:1])  # another input shape: its own prepacked weight


@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("x_shape", [(1, 37), (5, 64), (3, 4, 29), (16, 128)])
def test_int8_linear_matches_the_float_gemm(grid, x_shape, gemm_route):
    for bits, a_bits in ((2, 8), (4, 4), (8, 2)):
        x = sample(x_shape, grid, bits)
        layer = sbs_layer((23, x_shape[-1]), bits, quantizer(a_bits, grid, x), bias=bits != 4)
        y = check_layer(layer, x)
        with torch.no_grad():
            assert torch.equal(layer(x), y)  # forward takes the int8 path
            set_int8(False)
            try:
                float_path = layer(x)
            finally:
                set_int8(True)
            if x.dim() == 2:  # a strided input: its rows copied once
                check_layer(layer, x.t().contiguous().t())
        torch.testing.assert_close(y, float_path, rtol=1e-5, atol=1e-4 * float_path.abs().max())


def test_int8_linear_nan_and_fallbacks():
    x = sample((4, 32), "unsigned", 7)
    layer = sbs_layer((9, 32), 4, quantizer(8, "unsigned", x))
    assert int8_linear(layer, x) is None  # gradients enabled
    x[2, 5] = float("nan")
    y = check_layer(layer, x)
    assert torch.equal(y.isnan().any(1), torch.tensor([False, False, True, False]))
    with torch.no_grad():
        g = torch.Generator().manual_seed(1)
        sparse = PackedLinear(pack_weight(torch.randint(0, 16, (9, 32), generator=g), layer.codebook, torch.ones(9), 4,
                                          torch.rand(9, 32, generator=g) > 0.3), None, layer.input_quant)
        assert int8_linear(sparse, x) is None


def routes(fn) -> set[str]:
    """The int8 kernels a call of fn ran."""
    with torch.profiler.profile() as prof:
        fn()
    names = {"aten::_int_mm": "small gemm", "onednn::qconv2d_pointwise": "qconv",
             "onednn::qlinear_pointwise": "qlinear"}
    return {names[e.name] for e in prof.events() if e.name in names}


def test_small_gemms_and_the_rest(monkeypatch):
    """1x1 convolutions (any stride) and GEMMs of at most GEMM_MACS multiply-adds and GEMM_OUTPUTS
    outputs run through torch._int_mm; larger ones, and other convolutions, through oneDNN. NCHW
    1x1 convolutions of any size run through torch._int_mm (per image, y in NCHW)."""
    monkeypatch.setattr(int8, "GEMM_MACS", 1 << 16)
    monkeypatch.setattr(int8, "GEMM_OUTPUTS", 2048)
    x = sample((1, 16, 8, 8), "unsigned", 10, channels_last=True)
    two = x.expand(2, -1, -1, -1).contiguous(memory_format=torch.channels_last)
    quant = quantizer(8, "unsigned", x)
    with torch.no_grad():
        pointwise = sbs_layer((32, 16, 1, 1), 4, quant)  # 64 pixels, 32k multiply-adds
        assert routes(lambda: check_layer(pointwise, x)) == {"small gemm"}
        assert routes(lambda: check_layer(pointwise, two)) == {"qconv"}  # 4096 outputs
        assert routes(lambda: check_layer(pointwise, two.contiguous())) == {"small gemm"}  # NCHW
        strided = sbs_layer((32, 16, 1, 1), 4, quant, stride=2)  # 16 pixels of 2 images
        assert routes(lambda: check_layer(strided, two)) == {"small gemm"}
        assert routes(lambda: check_layer(strided, two.contiguous())) == {"small gemm"}
        wide = sbs_layer((300, 16, 1, 1), 4, quant)  # 307k
        assert routes(lambda: check_layer(wide, x)) == {"qconv"}
        assert routes(lambda: check_layer(wide, x.contiguous())) == {"small gemm"}
        assert routes(lambda: check_layer(sbs_layer((32, 16, 3, 3), 4, quant, padding=1), x)) == {"qconv"}
        assert routes(lambda: check_layer(sbs_layer((32, 16, 1, 1), 4, quant, padding=1), x)) == {"qconv"}
        rows = sample((8, 64), "unsigned", 11)
        linear = sbs_layer((40, 64), 4, quantizer(8, "unsigned", rows))
        assert routes(lambda: check_layer(linear, rows)) == {"small gemm"}
        assert routes(lambda: check_layer(linear, rows.repeat(10, 1))) == {"qlinear"}  # 3200 outputs


def test_sums_beyond_int32_take_the_float_path():
    """Sums of k - 128 times c - m over more than MAX_DEPTH terms could leave int32."""
    x = sample((2, int8.MAX_DEPTH + 1), "unsigned", 12)
    with torch.no_grad():
        layer = sbs_layer((3, x.shape[1]), 2, quantizer(8, "unsigned", x))
        assert int8_linear(layer, x) is None
        assert int8_linear(sbs_layer((3, int8.MAX_DEPTH), 2, layer.input_quant), x[:, 1:]) is not None


@pytest.mark.parametrize("channels_last", [False, True])
def test_int8_epilogue(channels_last):
    """y = float(acc + offset) factor + bias + window_factor window_sums, written over acc as
    float32 in acc's layout; its arguments are checked by name."""
    g = torch.Generator().manual_seed(13)
    acc = torch.randint(-2**20, 2**20, (2, 37, 5, 3), generator=g, dtype=torch.int32)
    if channels_last:
        acc = acc.contiguous(memory_format=torch.channels_last)
    offset = torch.randint(-2**20, 2**20, (37,), generator=g, dtype=torch.int32)
    factor, bias, window_factor = (torch.randn(37, generator=g) for _ in range(3))
    sums = torch.randn(2, 1, 5, 3, generator=g)
    epilogue = torch.ops.mixedprec.int8_epilogue_
    channel = (1, -1, 1, 1)
    for b in (bias, None):
        written = acc.clone()
        assert epilogue(written, offset, factor, b, sums, window_factor) is None
        y = written.view(torch.float32)
        want = ((acc + offset.view(channel)).double() * factor.view(channel).double()
                + (0 if b is None else b.view(channel).double()) + window_factor.view(channel).double() * sums.double())
        # three float32 roundings of the sum's terms (each at most its magnitude) and the conversion
        terms = ((acc + offset.view(channel)).double().abs() * factor.view(channel).double().abs()
                 + (0 if b is None else b.view(channel).double().abs())
                 + (window_factor.view(channel).double() * sums.double()).abs())
        assert ((y.double() - want).abs() <= 4 * torch.finfo(torch.float32).eps / 2 * terms).all()
        assert written.stride() == acc.stride()
    bad = [
        ((acc.float(), offset, factor, bias, sums, window_factor), "acc must be"),
        ((acc.transpose(2, 3), offset, factor, bias, sums, window_factor), "acc must be"),
        ((acc, offset.long(), factor, bias, sums, window_factor), "offset must be"),
        ((acc, offset, factor[:3], bias, sums, window_factor), "factor must be"),
        ((acc, offset, factor, bias.double(), sums, window_factor), "bias must be"),
        ((acc, offset, factor, bias, sums, window_factor[:-1]), "window_factor must be"),
        ((acc, offset, factor, bias, sums[:1], window_factor), "window_sums must be"),
    ]
    for args, message in bad:
        with pytest.raises(RuntimeError, match=message):
            epilogue(*args)


@pytest.mark.parametrize("shape", [(2, 37, 5, 3), (3, 16, 9, 16), (1, 5, 1, 1), (2, 1, 7, 5), (1, 64, 11, 13)])
def test_int8_nchw_epilogue(shape):
    """oneDNN's channels-last y laid out as NCHW with the offset term (and a padded signed grid's
    shift) added, each product and sum rounded in turn, bit for bit, on tiles cut at every edge;
    its arguments are checked by name."""
    g = torch.Generator().manual_seed(14)
    n, c, h, w = shape
    y = torch.randn(shape, generator=g).contiguous(memory_format=torch.channels_last)
    sums, window_factor = torch.randn(n, 1, h, w, generator=g), torch.randn(c, generator=g)
    shift = torch.randn(1, c, h, w, generator=g)
    epilogue = torch.ops.mixedprec.int8_nchw_epilogue
    for s in (shift, None):
        out = epilogue(y, sums, window_factor, s)
        want = y + sums * window_factor.view(1, -1, 1, 1)
        want = (want if s is None else want + s).contiguous()
        assert out.is_contiguous() and out.shape == y.shape
        assert torch.equal(out, want)
    bad = [
        ((y.contiguous() if c > 1 and h * w > 1 else y.double(), sums, window_factor, shift), "y must be"),
        ((y, sums, window_factor.double(), shift), "window_factor must be"),
        ((y, sums, window_factor[:-1], shift), "window_factor must be"),
        ((y, sums[:, :, :-1], window_factor, shift), "window_sums must be"),
        ((y, sums, window_factor, shift.expand(2, -1, -1, -1)), "shift must be"),
    ]
    for args, message in bad:
        with pytest.raises(RuntimeError, match=message):
            epilogue(*args)


def test_calls_below_min_macs_take_the_float_path(monkeypatch):
    """Calls through oneDNN below MIN_MACS (3x3 stride-1 ones below WINOGRAD_MIN_MACS), small
    GEMMs below MIN_GEMM_MACS."""
    monkeypatch.setattr(int8, "MIN_MACS", 1 << 21)
    monkeypatch.setattr(int8, "WINOGRAD_MIN_MACS", 1 << 22)
    monkeypatch.setattr(int8, "MIN_GEMM_MACS", 1 << 16)
    x = sample((1, 64, 4, 4), "unsigned", 8)
    quant = quantizer(8, "unsigned", x)
    strided = sbs_layer((128, 64, 3, 3), 4, quant, stride=2, padding=1)  # 4 output pixels: 0.29M a map
    dilated = sbs_layer((128, 64, 3, 3), 4, quant, padding=2, dilation=2)  # 1.2M a map: not Winograd's
    layer = sbs_layer((128, 64, 3, 3), 4, quant, padding=1)  # 1.2M multiply-adds a map
    pointwise = sbs_layer((128, 64, 1, 1), 4, quant)  # 131k a map
    linear = sbs_layer((256, 4096), 4, quant)  # 1M a row
    with torch.no_grad():
        assert int8_conv2d(strided, x.expand(7, -1, -1, -1).contiguous()) is None  # 2.06M
        assert int8_conv2d(strided, x.expand(8, -1, -1, -1).contiguous()) is not None  # 2.36M
        assert int8_conv2d(dilated, x.expand(2, -1, -1, -1).contiguous()) is not None  # 2.4M
        assert int8_conv2d(layer, x.expand(2, -1, -1, -1).contiguous()) is None  # 2.4M
        assert int8_conv2d(layer, x.expand(4, -1, -1, -1).contiguous()) is not None  # 4.7M
        assert int8_conv2d(pointwise, x) is not None
        assert int8_conv2d(pointwise, x[:, :, :2, :2]) is None  # 32k
        assert int8_linear(linear, torch.rand(1, 4096)) is not None
        assert int8_linear(sbs_layer((256, 128), 4, quant), torch.rand(1, 128)) is None  # 32k
        monkeypatch.setattr(int8, "GEMM_MACS", 0)  # through oneDNN, except NCHW 1x1 convolutions
        assert int8_conv2d(pointwise, x.contiguous(memory_format=torch.channels_last)) is None
        assert int8_conv2d(pointwise, x) is not None
        assert int8_linear(linear, torch.rand(1, 4096)) is None
        assert int8_linear(sbs_layer((512, 4096), 4, quant), torch.rand(1, 4096)) is not None  # 2.1M


def test_narrow_row_gemms_take_the_float_path(monkeypatch):
    """GEMMs over pixel rows (channels-last 1x1 convolutions, linear layers) with fewer than
    MIN_ROW_CHANNELS input or output channels; NCHW 1x1 convolutions keep the int8 path."""
    monkeypatch.setattr(int8, "MIN_ROW_CHANNELS", 16)
    x = sample((2, 16, 6, 6), "unsigned", 16, channels_last=True)
    quant = quantizer(8, "unsigned", x)
    rows = x.permute(0, 2, 3, 1).reshape(-1, 16)
    narrow = x[:, 1:].contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        for route in ("small gemm", "onednn"):
            monkeypatch.setattr(int8, "GEMM_MACS", 1 << 26 if route == "small gemm" else 0)
            assert int8_conv2d(sbs_layer((16, 16, 1, 1), 4, quant), x) is not None
            assert int8_conv2d(sbs_layer((15, 16, 1, 1), 4, quant), x) is None
            assert int8_conv2d(sbs_layer((15, 16, 1, 1), 4, quant), x.contiguous()) is not None  # NCHW
            assert int8_conv2d(sbs_layer((16, 15, 1, 1), 4, quant), narrow) is None
            assert int8_linear(sbs_layer((16, 16), 4, quant), rows) is not None
            assert int8_linear(sbs_layer((12, 16), 4, quant), rows) is None
            assert int8_linear(sbs_layer((16, 12), 4, quant), rows[:, 4:]) is None
        assert int8_conv2d(sbs_layer((8, 16, 3, 3), 4, quant, padding=1), x) is not None  # not a GEMM


def test_rgb_stems_take_the_float_path(monkeypatch):
    """oneDNN convolutions over fewer than MIN_CHANNELS input channels, in either layout; small
    GEMMs keep the int8 path."""
    monkeypatch.setattr(int8, "MIN_CHANNELS", 4)
    x = sample((1, 3, 9, 9), "signed", 14, channels_last=True)
    quant = quantizer(8, "signed", x)
    stem = sbs_layer((8, 3, 3, 3), 4, quant, stride=2, padding=1)
    with torch.no_grad():
        assert int8_conv2d(stem, x) is None and int8_conv2d(stem, x.contiguous()) is None
        assert int8_conv2d(sbs_layer((8, 3, 1, 1), 4, quant), x) is not None
        wider = sample((1, 4, 9, 9), "signed", 15, channels_last=True)
        assert int8_conv2d(sbs_layer((8, 4, 3, 3), 4, quantizer(8, "signed", wider), padding=1), wider) is not None


def test_an_nchw_model_stays_nchw_and_can_view_a_conv_output():
    """A user's model that flattens a conv's output with .view runs packed as it ran in float
    (oneDNN's channels-last output, returned as it was, made .view raise)."""
    from mixedprec import sbs
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(64, 64, 3, stride=2, padding=1), nn.ReLU(), View(), nn.Linear(64 * 16 * 16, 10))
    x = torch.rand(2, 64, 32, 32)
    net = sbs.convert(model.eval(), sbs.SBSPolicy())
    with torch.no_grad():
        net(x)
    for layer in sbs.sbs_layers(net).values():
        layer.fix(8, 8 if layer.a_quant.enabled else None)
    packed = mixedprec.pack(sbs.export(net.eval()).model).eval()
    with torch.no_grad():
        assert int8_conv2d(packed[0], x) is not None  # the int8 path takes the conv
        torch.testing.assert_close(packed(x), _float_path(packed, x), rtol=1e-4, atol=1e-4)


class View(nn.Module):
    def forward(self, x):
        return x.view(x.size(0), -1)


def _float_path(model, x):
    previous = set_int8(False)
    try:
        return model(x)
    finally:
        set_int8(previous)


def test_empty_inputs_take_the_float_path():
    x = sample((2, 8, 5, 5), "signed", 16)
    quant = quantizer(8, "signed", x)
    with torch.no_grad():
        for layer in (sbs_layer((6, 8, 1, 1), 4, quant), sbs_layer((6, 8, 3, 3), 4, quant, padding=1)):
            assert int8_conv2d(layer, x[:0]) is None
            assert layer(x[:0]).shape == (0, 6, 5, 5)
        assert int8_linear(sbs_layer((6, 8), 4, quant), torch.zeros(0, 8)) is None


def test_strided_inputs_and_wrong_shapes():
    x = sample((2, 8, 7, 9), "unsigned", 9)
    layer = sbs_layer((6, 8, 3, 3), 4, quantizer(8, "unsigned", x), padding=1)
    with torch.no_grad():
        y = check_layer(layer, x)
        assert torch.equal(check_layer(layer, x.transpose(2, 3).contiguous().transpose(2, 3)), y)
        check_layer(layer, x[:, :, 1:, ::2])
        with pytest.raises(ValueError, match="channels"):  # the float path's error, naming the mismatch
            layer(x[:, :7])
        linear = sbs_layer((5, 16), 4, layer.input_quant)
        with pytest.raises(ValueError, match="in_features|16"):
            linear(torch.rand(3, 15))


@pytest.mark.parametrize("padding_mode", ["reflect", "replicate", "circular"])
@pytest.mark.parametrize("grid", GRIDS)
def test_padding_modes_pad_x_first_on_every_path(padding_mode, grid):
    """A PackedConv2d with nn.Conv2d's other padding modes pads x as nn.Conv2d does, then convolves
    without padding: the int8 path, the float path and every kernel backend give nn.Conv2d's y on
    the quantizer's output and the decoded weight."""
    from mixedprec.ops.backend import available_backends
    x = sample((2, 16, 7, 9), grid, 17)
    quant = quantizer(8, grid, x)
    layer = sbs_layer((24, 16, 3, 5), 4, quant, stride=(2, 1), padding=(1, 3), dilation=(1, 2))
    layer.padding_mode = padding_mode
    plain = nn.Conv2d(16, 24, (3, 5), (2, 1), (1, 3), (1, 2), padding_mode=padding_mode).double()
    with torch.no_grad():
        plain.weight.copy_(layer.packed_weight().decode().double())
        plain.bias.copy_(layer.bias.double())
        want = plain(quant(x).double())
        y = layer(x)  # the int8 path
        assert int8_conv2d(layer, F.pad(x, (6, 6, 1, 1), mode=padding_mode)) is not None
        assert y.shape == want.shape and (y.double() - want).abs().max() <= 1e-5 * want.abs().max()
        for backend in ("reference", *available_backends("cpu")):
            layer.backend = backend  # a backend chosen: the float path on it
            assert (layer(x).double() - want).abs().max() <= 1e-5 * want.abs().max(), backend
    with pytest.raises(ValueError, match="padding_mode must be one of"):
        sbs_layer((24, 16, 3, 5), 4, quant).__class__(layer.packed_weight(), padding_mode="constant")
