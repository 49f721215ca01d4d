"""C3A path (Triton; interpreter on CPU) against the float64 reference, and the
reference against PEFT's C3A layer."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import pytest  # noqa: E402

import fusedlora  # noqa: E402
from conftest import DEVICE, TOL, rel_err  # noqa: E402
from conftest import dispatched  # noqa: E402
from fusedlora import reference  # noqa: E402
from fusedlora.c3a import c3a_linear, init_c3a_kernel  # noqa: E402

NAMES = ("x", "weight", "bias", "c3a_kernel")


def make_inputs(M, K, N, b, dtype, *, bias=True, lead=None, kernel_dtype=torch.float32, device=DEVICE):
    g = torch.Generator().manual_seed(torch.randint(0, 2**30, ()).item())
    t = {
        "x": torch.randn((*(lead or (M,)), K), generator=g),
        "weight": torch.randn(N, K, generator=g) / K**0.5,
        "bias": torch.randn(N, generator=g) if bias else None,
        # gaussian-init kernel: dW = O(sqrt(K)/K), comparable to W, so errors in it show.
        "c3a_kernel": torch.randn(N // b, K // b, b, generator=g),
    }
    out = {k: (v.to(device, dtype) if v is not None else None) for k, v in t.items()}
    out["c3a_kernel"] = t["c3a_kernel"].to(device, kernel_dtype)
    return {k: (v.requires_grad_() if v is not None else None) for k, v in out.items()}


def check_against_reference(inp, grad_y=None):
    dtype = inp["x"].dtype
    y = c3a_linear(*(inp[n] for n in NAMES))
    grad_y = torch.randn_like(y) if grad_y is None else grad_y
    y.backward(grad_y)
    ref = {k: (v.detach().double().requires_grad_(v.requires_grad) if v is not None else None)
           for k, v in inp.items()}
    y_ref = reference.c3a_linear(*(ref[n] for n in NAMES))
    y_ref.backward(grad_y.double())
    assert rel_err(y, y_ref) < TOL[dtype], "y"
    for n in NAMES:
        if inp[n] is not None and inp[n].requires_grad:
            assert inp[n].grad.dtype == inp[n].dtype, n
            assert rel_err(inp[n].grad, ref[n].grad) < TOL[dtype], n
    return y


# (M, K, N, b): interpreter tiles are 16, so these cover tails in every
# dimension, tiles that straddle blocks (b = 6, 12, 48), b = 1 (dW is a plain
# dense matrix: the autotuned GEMM entry), one circulant (b = K = N), split-K
# (few rows) and both orientations of the kernel-gradient GEMM (N/b vs K/b).
SHAPES = [(13, 30, 18, 6), (37, 48, 32, 16), (20, 17, 40, 1), (3, 48, 48, 48), (5, 36, 24, 12)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "M{}_K{}_N{}_b{}".format(*s))
def test_forward_backward_matches_reference(triton_backend, shape, dtype):
    check_against_reference(make_inputs(*shape, dtype))
    d = dispatched("c3a.")
    for op in ("c3a.forward", "c3a.grad_x", "c3a.grad_kernel", "c3a.grad_weight"):
        assert any(k.startswith(op + ":triton:") for k in d), (op, d)
    assert not any(":torch:" in k for k in d), d


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("M,K,N,b", [(1, 64, 32, 16), (16, 96, 144, 48), (5, 128, 64, 64)],
                         ids=lambda v: str(v))
def test_decode_pair(triton_backend, M, K, N, b, dtype):
    """1..16 rows, blocks of 16 and more: the delta's fp32 products beside W's split-K
    tiles, one finishing kernel; b = 48 and 64 span several 16-wide chunks of a block's
    outputs and inputs under the interpreter. Strided x, a kernel in x's dtype, no bias
    at M = 5; bit-for-bit repeatable; use_decode_pair(False) keeps the fused split-K GEMM."""
    from fusedlora.launch import use_decode_pair

    inp = make_inputs(M, K, N, b, dtype, bias=M != 5, kernel_dtype=dtype if M == 16 else torch.float32)
    inp["x"] = torch.randn(M, 2 * K, device=DEVICE, dtype=dtype)[:, ::2].requires_grad_()
    y = check_against_reference(inp)
    assert dispatched("c3a.forward") == {"c3a.forward:triton:decode": 1}
    with torch.no_grad():
        assert torch.equal(y, c3a_linear(*(inp[n] for n in NAMES)))
        with use_decode_pair(False):
            fusedlora.reset_dispatch()
            assert rel_err(c3a_linear(*(inp[n] for n in NAMES)), y) < TOL[dtype]
            assert set(dispatched("c3a.forward")) <= {"c3a.forward:triton:splitk", "c3a.forward:triton:small"}


def test_autotuned_entries_ran(triton_backend):
    """Many row/column tiles: the autotuned GEMM of forward, dx and the kernel gradient."""
    check_against_reference(make_inputs(40, 34, 36, 2, torch.float32))
    d = dispatched("c3a.")
    for op in ("c3a.forward", "c3a.grad_x", "c3a.grad_kernel"):
        assert f"{op}:triton:gemm" in d, (op, d)


def test_3d_input_no_bias_kernel_in_x_dtype(triton_backend):
    inp = make_inputs(0, 24, 16, 8, torch.float16, bias=False, lead=(2, 5), kernel_dtype=torch.float16)
    y = check_against_reference(inp)
    assert y.shape == (2, 5, 16) and y.dtype == torch.float16


@pytest.mark.parametrize("backend,M", [("triton", 9), ("eager", 9), ("eager", 20), ("spectral", 20)])
def test_non_contiguous_operands(monkeypatch, backend, M):
    """Strided, transposed and permuted operands (a strided bias too), a stride-0 gradient;
    the eager forms too (FFT at 9 rows, the circulant and cuBLAS at 20, the spectral form at 20)."""
    if backend == "spectral":
        monkeypatch.setattr(fusedlora.c3a, "SPECTRAL_MIN_BLOCK", 1)
        backend = "eager"
    monkeypatch.setenv("FUSEDLORA_BACKEND", backend)
    K, N, b = 20, 30, 10
    inp = make_inputs(M, K, N, b, torch.float32)
    x = torch.randn(M, 2 * K, device=DEVICE)[:, ::2]                        # 2-D strided view
    w = torch.randn(K, N, device=DEVICE).t() / K**0.5                       # transposed weight
    k = torch.randn(b, K // b, N // b, device=DEVICE).permute(2, 1, 0)      # permuted kernel
    bias = torch.randn(N, 2, device=DEVICE)[:, 1]                           # stride-2 bias
    assert not (x.is_contiguous() or w.is_contiguous() or k.is_contiguous() or bias.is_contiguous())
    inp.update(x=x.requires_grad_(), weight=w.requires_grad_(), c3a_kernel=k.requires_grad_(),
               bias=bias.requires_grad_())
    # stride-0 output gradient (what y.sum(0) would send back)
    check_against_reference(inp, grad_y=torch.randn(N, device=DEVICE).expand(M, N))
    # 3-D non-contiguous input (reshape copies it)
    inp = make_inputs(M, K, N, b, torch.float32)
    inp["x"] = torch.randn(K, 3, 4, device=DEVICE).permute(1, 2, 0).requires_grad_()
    check_against_reference(inp)


def test_frozen_base_layer(triton_backend):
    """Only the adapter trains: no dW GEMM, no bias gradient."""
    inp = make_inputs(11, 24, 18, 6, torch.float32)
    inp["weight"].requires_grad_(False)
    inp["bias"].requires_grad_(False)
    check_against_reference(inp)
    d = dispatched("c3a.")
    assert "c3a.grad_weight" not in " ".join(d) and any(k.startswith("c3a.grad_kernel:triton") for k in d), d


def test_kernel_grad_row_chunks(triton_backend, monkeypatch):
    """Long reductions (rows * b past int32) run in row chunks that add up."""
    import fusedlora.c3a as c3a_mod

    monkeypatch.setattr(c3a_mod, "_MAX_Q", 40)   # b = 6: chunks of 6 rows
    check_against_reference(make_inputs(13, 24, 18, 6, torch.float32))
    check_against_reference(make_inputs(13, 12, 36, 6, torch.float32))  # swapped orientation


def test_triton_matches_peft_layer(triton_backend):
    c3a = pytest.importorskip("peft.tuners.c3a")
    K, N, b = 30, 20, 10
    layer = c3a.C3ALinear(torch.nn.Linear(K, N), "default",
                          c3a.C3AConfig(block_size=b, init_weights="gaussian", target_modules=["x"]), block_size=b)
    x = torch.randn(3, 7, K)
    with torch.no_grad():
        y_peft = layer(x)
        y = c3a_linear(x.to(DEVICE), layer.weight.to(DEVICE), layer.bias.to(DEVICE),
                       layer.c3a_kernel["default"].to(DEVICE))
    assert rel_err(y, y_peft) < 1e-5
    assert "c3a.forward:triton:" in " ".join(dispatched("c3a."))


@pytest.mark.parametrize("lead", [(0,), (2, 0)])
def test_zero_rows(triton_backend, lead):
    inp = make_inputs(0, 12, 18, 6, torch.float32, lead=lead)
    y = c3a_linear(*(inp[n] for n in NAMES))
    assert y.shape == (*lead, 18)
    y.sum().backward()
    assert inp["x"].grad.shape == inp["x"].shape
    for n in ("weight", "bias", "c3a_kernel"):
        assert torch.count_nonzero(inp[n].grad) == 0, n


def test_torch_backend_float64(monkeypatch):
    monkeypatch.setenv("FUSEDLORA_BACKEND", "torch")
    fusedlora.reset_dispatch()
    inp = make_inputs(7, 24, 36, 12, torch.float64, kernel_dtype=torch.float64)
    y = c3a_linear(*(inp[n] for n in NAMES))
    grads = torch.autograd.grad(y, [inp[n] for n in NAMES], torch.ones_like(y))
    ref = [inp[n].detach().clone().requires_grad_() for n in NAMES]
    y_ref = reference.c3a_linear(*ref)
    y_ref.backward(torch.ones_like(y_ref))
    assert rel_err(y, y_ref) < 1e-12
    for g, r, n in zip(grads, ref, NAMES):
        assert rel_err(g, r.grad) < 1e-12, n
    assert set(dispatched("c3a.")) == {"c3a.forward:torch:reference", "c3a.backward:torch:reference"}


@pytest.mark.parametrize("shape", SHAPES[:3], ids=lambda s: "M{}_K{}_N{}_b{}".format(*s))
def test_eager_backend_matches_reference(monkeypatch, shape):
    """The FFT composition auto runs on CUDA (backend.EAGER_WINS): every gradient, 3-D x."""
    monkeypatch.setenv("FUSEDLORA_BACKEND", "eager")
    fusedlora.reset_dispatch()
    check_against_reference(make_inputs(*shape, torch.float32))
    M, K, N, b = shape
    check_against_reference(make_inputs(0, K, N, b, torch.float32, lead=(2, 3)))
    check_against_reference(make_inputs(0, K, N, b, torch.float32))  # M = 0
    inp = make_inputs(M, K, N, b, torch.float64, kernel_dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda *t: c3a_linear(*t), tuple(inp[n] for n in NAMES))
    form = "dense" if M > fusedlora.c3a.FFT_ROWS else "fft"  # more rows: the circulant and cuBLAS
    # the 3-D (6 rows) and M = 0 checks take the FFT form
    ran = set(dispatched("c3a."))
    expected = {f"c3a.{d}:eager:{f}" for d in ("forward", "backward") for f in {form, "fft"}}
    if form == "dense":  # circulant and kernel gradient: Triton (the interpreter here) in fp32, torch in float64
        expected |= {"c3a.circulant:triton:gather", "c3a.circulant:torch:gather"}
        expected |= {"c3a.diagonal_sums:torch:gather"} | ({"c3a.diagonal_sums:triton:rows"} if b >= 16 else set())
    assert ran == expected


def test_custom_op_registration(monkeypatch):
    """Schema, fake impl and autograd registration (torch backend: fast)."""
    monkeypatch.setenv("FUSEDLORA_BACKEND", "torch")
    from fusedlora.c3a import _c3a_forward

    inp = make_inputs(5, 12, 18, 6, torch.float32)
    torch.library.opcheck(_c3a_forward, tuple(inp[n] for n in NAMES),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


# ------------------------------------------------------------------- PEFT
@pytest.mark.parametrize("N,K,b", [(12, 18, 6), (32, 48, 16), (5, 7, 1), (8, 8, 8)])
def test_delta_weight_matches_peft(N, K, b):
    """dW[m*b+s, n*b+t] = w[m, n, (t - s) mod b] / K is PEFT's get_delta_weight."""
    utils = pytest.importorskip("peft.tuners.c3a.utils")
    w = torch.randn(N // b, K // b, b, dtype=torch.float64)
    dense = reference.c3a_delta_weight(w, K, N)
    assert rel_err(dense, utils.get_circulant_fast(w) / K) < 1e-12
    x = torch.randn(3, 2, K, dtype=torch.float64)
    assert rel_err(reference.c3a_fft_delta(x, w), x @ dense.t()) < 1e-12
    assert rel_err(reference.c3a_fft_delta(x, w), utils.BlockCircularConvolution.apply(x, w) / K) < 1e-12


@pytest.mark.parametrize("b", [1, 6, 16])
def test_reference_matches_peft_layer(b):
    c3a = pytest.importorskip("peft.tuners.c3a")
    K, N = 48, 96
    base = torch.nn.Linear(K, N)
    layer = c3a.C3ALinear(base, "default", c3a.C3AConfig(block_size=b, init_weights="gaussian",
                                                         target_modules=["x"]), block_size=b)
    kernel = layer.c3a_kernel["default"]
    assert tuple(kernel.shape) == (N // b, K // b, b) and kernel.dtype == torch.float32
    x = torch.randn(2, 5, K, requires_grad=True)
    y_peft = layer(x)
    grad_y = torch.randn_like(y_peft)
    y_peft.backward(grad_y)

    xr = x.detach().double().requires_grad_()
    wr, br, kr = (t.detach().double().requires_grad_() for t in (base.weight, base.bias, kernel))
    y_ref = reference.c3a_linear(xr, wr, br, kr)
    y_ref.backward(grad_y.double())
    assert rel_err(y_peft, y_ref) < 1e-5
    assert rel_err(kernel.grad, kr.grad) < 1e-5        # PEFT's kernel gradient agrees
    assert rel_err(base.weight.grad, wr.grad) < 1e-5
    # x: autograd through PEFT's own FFT forward (PEFT's hand-written x gradient
    # is the adjoint of a convolution, not of its correlation forward).
    xf = x.detach().double().requires_grad_()
    (xf @ wr.detach().t() + reference.c3a_fft_delta(xf, kr.detach())).backward(grad_y.double())
    assert rel_err(xf.grad, xr.grad) < 1e-12
    # The merged layer gives the same output.
    layer.merge()
    assert rel_err(layer(x), y_ref) < 1e-5


@pytest.mark.parametrize("init", [True, False, "gaussian", "xavier_uniform", "kaiming_uniform"])
def test_init_matches_peft(init):
    c3a = pytest.importorskip("peft.tuners.c3a")
    K, N, b = 24, 36, 6
    layer = c3a.C3ALinear(torch.nn.Linear(K, N), "default",
                          c3a.C3AConfig(block_size=b, init_weights=True, target_modules=["x"]), block_size=b)
    torch.manual_seed(123)
    layer.reset_c3a_parameters("default", init)
    ours = torch.full((N // b, K // b, b), 7.0)
    torch.manual_seed(123)
    assert init_c3a_kernel(ours, init) is ours
    assert torch.equal(ours, layer.c3a_kernel["default"].detach())


def test_init_rejects_unknown():
    with pytest.raises(ValueError, match="init_weights"):
        init_c3a_kernel(torch.zeros(2, 2, 3), "orthogonal")
    with pytest.raises(ValueError, match="tensor"):
        init_c3a_kernel(torch.zeros(2, 3), True)


# -------------------------------------------------------------- bad inputs
def _bad(**kw):
    inp = make_inputs(4, 12, 18, 6, torch.float32)
    inp = {k: (v.detach() if v is not None else None) for k, v in inp.items()}
    inp.update(kw)
    return inp


@pytest.mark.parametrize("case,exc,name", [
    (dict(c3a_kernel=torch.randn(4, 3, 5)), ValueError, "c3a_kernel"),           # 5 divides neither
    (dict(c3a_kernel=torch.randn(2, 3, 4)), ValueError, "c3a_kernel"),           # 4 divides 12, not 18
    (dict(c3a_kernel=torch.randn(2, 3, 6)), ValueError, "c3a_kernel"),           # transposed blocks
    (dict(c3a_kernel=torch.randn(3, 2, 0)), ValueError, "c3a_kernel"),           # b = 0
    (dict(c3a_kernel=torch.randn(18, 12)), ValueError, "c3a_kernel"),            # 2-D
    (dict(c3a_kernel=torch.randn(3, 2, 6, dtype=torch.float64)), TypeError, "c3a_kernel"),
    (dict(c3a_kernel=torch.randn(3, 2, 6).half()), TypeError, "c3a_kernel"),    # not f32, not x's
    (dict(c3a_kernel=[[0.0]]), TypeError, "c3a_kernel"),
    (dict(c3a_kernel=torch.randn(3, 2, 6, device="meta")), ValueError, "device"),
    (dict(x=torch.randn(4, 13)), ValueError, "x"),
    (dict(weight=torch.randn(18, 12).half()), TypeError, "weight"),
    (dict(bias=torch.randn(17)), ValueError, "bias"),
    (dict(x=torch.randn(4, 0), weight=torch.randn(18, 0), c3a_kernel=torch.randn(3, 0, 6)),
     ValueError, "in_features"),
])
def test_bad_inputs_raise_before_launch(triton_backend, case, exc, name):
    inp = _bad(**case)
    with pytest.raises(exc, match=name):
        c3a_linear(*(inp[n] for n in NAMES))
    assert dispatched("c3a.") == {}


def test_triton_rejects_float64(triton_backend):
    inp = _bad(x=torch.randn(4, 12, dtype=torch.float64), weight=torch.randn(18, 12, dtype=torch.float64),
               bias=None)
    with pytest.raises(TypeError, match="x: the Triton backend"):
        c3a_linear(*(inp[n] for n in NAMES))
    assert dispatched("c3a.") == {}


def cancelling_inputs(M, K, N, b, dtype):
    """x = [v, v], W = [w, -w]: x W^T = 0 while |W| stays realistic (~1/sqrt(K)), so y is
    the adapter's term alone. With PEFT's kaiming_uniform kernel w/K is below half a
    16-bit rounding step of W: a kernel that folds it into W before rounding loses it."""
    inp = make_inputs(M, K, N, b, dtype, bias=False)
    with torch.no_grad():
        v = torch.randn(M, K // 2, device=DEVICE)
        w = torch.randn(N, K // 2, device=DEVICE) / K**0.5
        inp["x"].copy_(torch.cat([v, v], dim=1))
        inp["weight"].copy_(torch.cat([w, -w], dim=1))
        inp["c3a_kernel"].copy_(init_c3a_kernel(torch.empty_like(inp["c3a_kernel"]), "kaiming_uniform"))
    return inp


def test_fp16_keeps_the_adapter_term_below_the_weights_rounding_step(triton_backend):
    inp = cancelling_inputs(4, 2048, 64, 16, torch.float16)
    with torch.no_grad():
        y = c3a_linear(*(inp[n] for n in NAMES))
    ref = reference.c3a_linear(*(inp[n].double() if inp[n] is not None else None for n in NAMES))
    assert rel_err(y, ref) < TOL[torch.float16]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16])
@pytest.mark.parametrize("shape", [(20, 96, 64, 16), (33, 42, 30, 6), (17, 48, 144, 48), (18, 8, 12, 1),
                                   (19, 35, 21, 7)], ids=lambda s: "M{}_K{}_N{}_b{}".format(*s))
def test_spectral_form_matches_reference(monkeypatch, shape, dtype):
    """The eager spectral form (c3a.SPECTRAL_MIN_BLOCK; off by default until a GPU times it):
    the real DFT of each block as GEMMs, odd and even b, b = 1; every gradient through its
    own backward (per-frequency products for dx and the kernel gradient), 3-D x, zero and
    decode rows, and an in-place change of the kernel (nothing derived from it may be kept)."""
    monkeypatch.setenv("FUSEDLORA_BACKEND", "eager")
    fusedlora.reset_dispatch()
    M, K, N, b = shape
    kernel_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    with fusedlora.c3a.use_spectral(1):
        check_against_reference(make_inputs(*shape, dtype, kernel_dtype=kernel_dtype))
        check_against_reference(make_inputs(M, K, N, b, dtype, lead=(3, 7), kernel_dtype=kernel_dtype))
        assert dispatched("c3a.forward") == {"c3a.forward:eager:spectral": 2}
        assert dispatched("c3a.backward") == {"c3a.backward:eager:spectral": 2}
        check_against_reference(make_inputs(0, K, N, b, dtype, kernel_dtype=kernel_dtype))  # zero rows
        inp = make_inputs(2, K, N, b, dtype, kernel_dtype=kernel_dtype)  # decode rows
        check_against_reference(inp)
        # an in-place change of the kernel (as an optimizer step makes) must be seen
        with torch.no_grad():
            inp["c3a_kernel"].mul_(-3.0)
        for t in inp.values():
            if t is not None:
                t.grad = None
        check_against_reference(inp)
    assert fusedlora.c3a.SPECTRAL_MIN_BLOCK is None  # off again outside the scope


def test_spectral_form_fp16_stays_finite_where_the_plain_dft_would_overflow():
    """fp16 sums of b terms (the plain DFT) or of many rows (the kernel gradient before its
    1/K) can pass 65504 where the result does not: one large activation, large block,
    loss-scaled gradients. The unitary bases and 1/K inside the products keep it finite."""
    from fusedlora.c3a import _spectral_delta_, _spectral_grads

    torch.manual_seed(8)
    M, K, N, b = 512, 2048, 256, 256
    x = torch.randn(M, K)
    x[0, 5] = 2000.0
    x = x.half()
    W = (torch.randn(N, K) / K ** 0.5).half()
    kernel = 4 * torch.randn(N // b, K // b, b)
    gy = (4 * torch.randn(M, N)).half()
    y = _spectral_delta_(torch.nn.functional.linear(x, W), x, kernel)
    assert rel_err(y, reference.c3a_linear(x.double(), W.double(), None, kernel.double())) < TOL[torch.float16]
    grads = _spectral_grads(gy, x, W, kernel, [True, False, False, True])
    ref = reference.c3a_linear_grads(gy.double(), x.double(), W.double(), kernel.double())
    for got, want in ((grads[0], ref[0]), (grads[3], ref[3])):
        assert rel_err(got, want) < TOL[torch.float16]


@pytest.mark.parametrize("rows", [4, 40])
def test_eager_fp16_keeps_the_adapter_term(monkeypatch, rows):
    """The eager forms (FFT at few rows; above, the unscaled circulant through cuBLAS and the
    spectral form) keep the adapter term that a merge into a 16-bit W would round away."""
    monkeypatch.setenv("FUSEDLORA_BACKEND", "eager")
    if rows == 40:
        with torch.no_grad(), monkeypatch.context() as m:
            m.setattr(fusedlora.c3a, "SPECTRAL_MIN_BLOCK", 1)
            inp = cancelling_inputs(rows, 2048, 64, 16, torch.float16)
            y = c3a_linear(*(inp[n] for n in NAMES))
        ref = reference.c3a_linear(*(inp[n].double() if inp[n] is not None else None for n in NAMES))
        assert rel_err(y, ref) < TOL[torch.float16]
    inp = cancelling_inputs(rows, 2048, 64, 16, torch.float16)
    with torch.no_grad():
        y = c3a_linear(*(inp[n] for n in NAMES))
    ref = reference.c3a_linear(*(inp[n].double() if inp[n] is not None else None for n in NAMES))
    assert rel_err(y, ref) < TOL[torch.float16]


def test_torch_backend_fp16_keeps_the_adapter_term_in_y_and_dx(monkeypatch):
    """The torch backend (auto's CPU path) adds the delta's product apart in float32, as PEFT
    does: merged into a 16-bit W it was rounded away (y and dx lost about 2/3 of it)."""
    monkeypatch.setenv("FUSEDLORA_BACKEND", "torch")
    inp = cancelling_inputs(4, 2048, 64, 16, torch.float16)
    x = inp["x"].clone().requires_grad_()
    y = c3a_linear(x, inp["weight"], inp["bias"], inp["c3a_kernel"])
    ref = {n: (inp[n].double().requires_grad_() if inp[n] is not None else None) for n in NAMES}
    y_ref = reference.c3a_linear(*(ref[n] for n in NAMES))
    assert rel_err(y, y_ref) < TOL[torch.float16]
    # dx through a W whose product with dy cancels: dx is the delta's part alone
    gy = torch.randn_like(y)
    w = inp["weight"]
    W2 = torch.cat([w[: w.shape[0] // 2], -w[: w.shape[0] // 2]])
    gy = torch.cat([gy[:, : gy.shape[1] // 2]] * 2, 1)
    x2 = x.detach().clone().requires_grad_()
    c3a_linear(x2, W2, None, inp["c3a_kernel"]).backward(gy)
    xr = x2.detach().double().requires_grad_()
    reference.c3a_linear(xr, W2.double(), None, inp["c3a_kernel"].double()).backward(gy.double())
    assert rel_err(x2.grad, xr.grad) < TOL[torch.float16]


def test_float64_layer_keeps_float64_accuracy(monkeypatch):
    """A float64 layer's (float32) C3A kernel: the delta and the merge run in float64."""
    monkeypatch.setenv("FUSEDLORA_BACKEND", "torch")
    torch.manual_seed(0)
    K, N = 24, 12  # 1/K is inexact in float32
    layer = fusedlora.FusedLinear(K, N, dtype=torch.float64)
    layer.add_c3a("c", 6, init_weights="gaussian")
    k64 = layer.c3a_kernel["c"].detach().double()
    x = torch.randn(5, K, dtype=torch.float64)
    W0 = layer.weight.detach().clone()
    dW = reference.c3a_delta_weight(k64, K, N, torch.float64)
    with torch.no_grad():
        assert rel_err(layer(x), x @ (W0 + dW).t() + layer.bias) < TOL[torch.float64]
    layer.merge()
    assert (layer.weight.detach() - (W0 + dW)).abs().max() < 1e-14
    layer.unmerge()
    assert (layer.weight.detach() - W0).abs().max() < 1e-14


def test_second_active_c3a_adapter_in_fp16_keeps_its_delta(monkeypatch):
    """Two C3A adapters active in fp16: the second (the eager extra-adapter term) through
    PEFT's float32 FFT, not a dense w / K cast to fp16 (subnormal at large K)."""
    monkeypatch.setenv("FUSEDLORA_BACKEND", "eager")
    torch.manual_seed(0)
    M, K, N, b = 4, 8192, 32, 16
    layer = fusedlora.FusedLinear(K, N, bias=False, dtype=torch.float16)
    v, w = torch.randn(M, K // 2), torch.randn(N, K // 2) / K**0.5
    x = torch.cat([v, v], 1).half()
    with torch.no_grad():
        layer.weight.copy_(torch.cat([w, -w], 1))  # x W^T = 0: y is the adapters' terms alone
    layer.add_c3a("c1", b)  # zeros
    layer.add_c3a("c2", b, init_weights="kaiming_uniform")
    layer.set_adapter(["c1", "c2"])
    with torch.no_grad():
        y = layer(x)
    ref = reference.c3a_linear(x.double(), layer.weight.double(), None, layer.c3a_kernel["c2"].double())
    assert rel_err(y, ref) < 5e-3  # the fused path alone: 1.7e-3; the fp16 dense delta gave 2e-2


# -------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("shape", [(300, 768, 512, 64), (64, 1024, 4096, 1024), (517, 480, 336, 48),
                                   (8, 2048, 1024, 128), (1000, 96, 160, 1)],
                         ids=lambda s: "M{}_K{}_N{}_b{}".format(*s))
def test_gpu_large(triton_backend, shape, dtype):
    check_against_reference(make_inputs(*shape, dtype))
    if dtype.itemsize == 2:
        # The adapter's own term, not hidden in x W^T: the 16-bit rounding step of W is
        # what this guards. (In fp32 the cancelled x W^T leaves ~eps*|x||W| of rounding,
        # on the H200 ~5e-4 of the tiny y: a bound on arithmetic, not on the kernel.)
        M, K, N, b = shape
        inp = cancelling_inputs(M, K, N, b, dtype)
        with torch.no_grad():
            y = c3a_linear(*(inp[n] for n in NAMES))
        ref = reference.c3a_linear(*(inp[n].double() if inp[n] is not None else None for n in NAMES))
        assert rel_err(y, ref) < TOL[dtype]
    assert not any(":torch:" in k for k in dispatched("c3a."))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape", [(8, 1024, 512, 64), (300, 768, 512, 64), (64, 1024, 4096, 1024)],
                         ids=lambda s: "M{}_K{}_N{}_b{}".format(*s))
def test_gpu_auto_runs_the_eager_composition(monkeypatch, shape, dtype):
    """What auto picks on CUDA (backend.EAGER_WINS): FFT up to FFT_ROWS rows, the
    circulant through cuBLAS above; every gradient against the float64 reference. An eager
    forward of up to 16 rows runs Triton (backend.HOST_WINS), after the FFT form once."""
    monkeypatch.delenv("FUSEDLORA_BACKEND", raising=False)
    monkeypatch.setattr(fusedlora.backend, "_warmed", set())
    fusedlora.reset_dispatch()
    check_against_reference(make_inputs(*shape, dtype))
    form = "dense" if shape[0] > fusedlora.c3a.FFT_ROWS else "fft"
    diagonal = "c3a.diagonal_sums:" + ("triton:rows" if shape[3] >= 16 else "torch:gather")
    circulant = {"c3a.circulant:triton:gather", diagonal} if form == "dense" else set()
    ran = set(dispatched("c3a."))
    if shape[0] <= fusedlora.backend.HOST_WINS["c3a.forward"][0]:
        host = {k for k in ran if k.startswith("c3a.forward:triton:")}
        assert host, ran
        ran -= host
    assert ran == {f"c3a.forward:eager:{form}", f"c3a.backward:eager:{form}"} | circulant


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("shape", [(300, 768, 512, 64), (64, 1024, 4096, 128), (517, 480, 336, 48)],
                         ids=lambda s: "M{}_K{}_N{}_b{}".format(*s))
def test_gpu_spectral_form(monkeypatch, shape, dtype):
    """The eager forward's spectral form on cuBLAS (bmm into slices, addmm_ into y's blocks)
    against the float64 reference, every gradient, and the adapter's own term."""
    monkeypatch.setenv("FUSEDLORA_BACKEND", "eager")
    monkeypatch.setattr(fusedlora.c3a, "SPECTRAL_MIN_BLOCK", 16)
    fusedlora.reset_dispatch()
    check_against_reference(make_inputs(*shape, dtype))
    assert "c3a.forward:eager:spectral" in dispatched("c3a.forward")
    assert "c3a.backward:eager:spectral" in dispatched("c3a.backward")
    if dtype == torch.float32:
        return  # cancelling inputs measure 16-bit rounding (fp32's cancelled x W^T swamps the term)
    inp = cancelling_inputs(shape[0], 2048, 256, 64, dtype)
    with torch.no_grad():
        y = c3a_linear(*(inp[n] for n in NAMES))
    ref = reference.c3a_linear(*(inp[n].double() if inp[n] is not None else None for n in NAMES))
    assert rel_err(y, ref) < TOL[dtype]


@pytest.mark.gpu
def test_gpu_bf16_3d_kernel_bf16(triton_backend):
    inp = make_inputs(0, 256, 384, 128, torch.bfloat16, lead=(4, 33), kernel_dtype=torch.bfloat16)
    check_against_reference(inp)


@pytest.mark.parametrize("b", [16, 48])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_dense_form_kernels_match_the_reference_gathers(b, dtype):
    """The Triton kernels of the dense composition against reference.py's gathers:
    the circulant (tiles that straddle blocks, odd block counts) and the kernel
    gradient's diagonal sums (a non-power-of-two b in several offset chunks, a G with
    transposed strides)."""
    torch.manual_seed(b)
    nb_out, nb_in = 3, 2
    kernel = torch.randn(nb_out, nb_in, b, device=DEVICE)
    circ = fusedlora.c3a._circulant(kernel, dtype)
    assert circ.dtype == dtype and torch.equal(circ, reference.c3a_circulant(kernel, dtype))
    g = torch.randn(nb_in * b, nb_out * b, device=DEVICE, dtype=dtype).t()  # (N, K), column-major
    fusedlora.reset_dispatch()
    dk = fusedlora.c3a._diagonal_sums(g, kernel)
    assert dispatched("c3a.diagonal_sums") == {"c3a.diagonal_sums:triton:rows": 1}
    assert rel_err(dk, reference.c3a_diagonal_sums(g.double(), kernel.double())) < 1e-6
