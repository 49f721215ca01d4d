"""auto's dispatch of eager decode calls (backend.HOST_WINS, backend.dispatch).

Outside CUDA-graph capture a decode call is bound by the host, so auto runs the path with
the fewest launches there; a capture runs select_backend's path, which therefore runs once
on the first eager call of each signature (compiled and loaded before any capture). The
rule is for GPU calls: here `_eager_gpu_call` is forced, and select_backend is made to
name the capture path, so on a machine without a GPU the Triton kernels run under the
interpreter on CPU tensors.
"""
import pytest
import torch

import fusedlora
from fusedlora import backend, cuda_ext, reference
from fusedlora.c3a import c3a_linear
from fusedlora.multi import multi_lora_linear
from fusedlora.ops import lora_linear
from fusedlora.routing import pack_loras

from conftest import DEVICE, TOL, dispatched, rel_err


@pytest.fixture(autouse=True)
def _on_device():
    """Tensors on the GPU where there is one (Triton needs the interpreter for CPU tensors)."""
    with torch.device(DEVICE):
        yield


@pytest.fixture
def gpu_call(monkeypatch):
    """An eager GPU call under auto whose capture-time backend is ``capture_backend[0]``."""
    capture_backend = ["triton"]
    capturing = [False]
    monkeypatch.delenv("FUSEDLORA_BACKEND", raising=False)
    monkeypatch.setattr(backend, "select_backend", lambda device, op=None, rows=0: capture_backend[0])
    monkeypatch.setattr(backend, "_eager_gpu_call", lambda device: not capturing[0])
    monkeypatch.setattr(backend, "_warmed", set())
    fusedlora.reset_dispatch()
    yield capture_backend, capturing
    fusedlora.reset_dispatch()


def _lora(M, K=40, N=24, r=4):
    x = torch.randn(M, K)
    W, b = torch.randn(N, K) / K ** 0.5, torch.randn(N)
    A, B = torch.randn(r, K) / K ** 0.5, torch.randn(N, r) / r ** 0.5
    return x, W, b, A, B


def _counts(prefix):
    d = dispatched(prefix)
    return sum(v for k, v in d.items() if ":eager:" in k), sum(v for k, v in d.items() if ":triton:" in k)


def test_lora_decode_call_warms_the_capture_path_once_then_runs_the_composition(gpu_call):
    torch.manual_seed(0)
    x, W, b, A, B = _lora(3)
    ref = reference.lora_linear(x.double(), W.double(), b.double(), A.double(), B.double(), 1.5)
    y = lora_linear(x, W, b, A, B, 1.5)
    assert rel_err(y, ref) < TOL[torch.float32]
    assert _counts("lora.forward") == (1, 1), dispatched()  # the composition, and Triton once
    assert rel_err(lora_linear(x, W, b, A, B, 1.5), ref) < TOL[torch.float32]
    assert _counts("lora.forward") == (2, 1), dispatched()  # same signature: no second warm-up
    lora_linear(torch.randn(5, 40), W, b, A, B, 1.5)
    assert _counts("lora.forward") == (3, 2), dispatched()  # a new shape warms again
    lora_linear(x[:, :40:1].t().contiguous().t(), W, b, A, B, 1.5)  # other strides: another signature
    assert _counts("lora.forward") == (4, 3), dispatched()


def test_lora_capture_rows_and_dropout_take_the_capture_path(gpu_call):
    _, capturing = gpu_call
    torch.manual_seed(1)
    x, W, b, A, B = _lora(3)
    capturing[0] = True
    lora_linear(x, W, b, A, B, 1.5)
    assert _counts("lora.forward") == (0, 1), dispatched()
    capturing[0] = False
    lora_linear(torch.randn(17, 40), W, b, A, B, 1.5)  # above HOST_WINS' 16 rows
    assert _counts("lora.forward") == (0, 2), dispatched()
    lora_linear(x, W, b, A, B, 1.5, dropout_p=0.25)  # the backward must redraw Triton's mask
    assert _counts("lora.forward") == (0, 3), dispatched()
    with fusedlora.use_backend("triton"):  # an explicit backend is obeyed
        lora_linear(x, W, b, A, B, 1.5)
    assert _counts("lora.forward") == (0, 4), dispatched()


def test_lora_composition_gradients_match_reference(gpu_call):
    torch.manual_seed(2)
    x, W, b, A, B = (t.requires_grad_() for t in _lora(4))
    lora_linear(x, W, b, A, B, 0.5).square().sum().backward()
    assert dispatched("lora.forward:eager:composition")
    grads = [t.grad for t in (x, W, b, A, B)]
    leaves = [t.detach().double().requires_grad_() for t in (x, W, b, A, B)]
    reference.lora_linear(*leaves, 0.5).square().sum().backward()
    for g, leaf in zip(grads, leaves):
        assert rel_err(g, leaf.grad) < TOL[torch.float32]


def test_eager_backend_composition_with_dropout_pairs_with_its_backward(monkeypatch):
    """FUSEDLORA_BACKEND=eager: LoRA's forward is the composition; with dropout its backward
    (the eager composition's) redraws the same mask from the seed."""
    monkeypatch.setenv("FUSEDLORA_BACKEND", "eager")
    fusedlora.reset_dispatch()
    torch.manual_seed(3)
    x, W, b, A, B = (t.requires_grad_() for t in _lora(6))
    torch.manual_seed(7)
    y = lora_linear(x, W, b, A, B, 2.0, dropout_p=0.3)
    y.sum().backward()
    assert dispatched("lora.forward") == {"lora.forward:eager:composition": 1}
    assert dispatched("lora.backward") == {"lora.backward:eager:composition": 1}
    monkeypatch.setenv("FUSEDLORA_BACKEND", "torch")
    leaves = [t.detach().clone().requires_grad_() for t in (x, W, b, A, B)]
    torch.manual_seed(7)
    y_ref = lora_linear(*leaves, 2.0, dropout_p=0.3)
    y_ref.sum().backward()
    assert rel_err(y, y_ref) < TOL[torch.float32]
    for t, leaf in zip((x, W, b, A, B), leaves):
        assert rel_err(t.grad, leaf.grad) < TOL[torch.float32]


def test_eager_inference_call_skips_the_float32_u(monkeypatch):
    """An inference call (no graph to record) of the eager composition does not make u's
    float32 copy, which only a backward reads (two launches of five at decode sizes); a call
    that records a graph does, and its gradients are right."""
    monkeypatch.setenv("FUSEDLORA_BACKEND", "eager")
    torch.manual_seed(2)
    x, W, b, A, B = (t.to(torch.bfloat16) for t in _lora(3, K=16, N=12, r=4))  # u's copy: float32
    made = []
    real = fusedlora.ops._lora_forward_on
    monkeypatch.setattr(fusedlora.ops, "_lora_forward_on", lambda *a: made.append(real(*a)[1].dtype) or real(*a))
    ref = reference.lora_linear(x.double(), W.double(), b.double(), A.double(), B.double(), 0.5)
    with torch.no_grad():
        assert rel_err(lora_linear(x, W, b, A, B, 0.5), ref) < TOL[torch.bfloat16]
    assert made == [torch.bfloat16] and not fusedlora.ops._inference.on
    made.clear()
    Bg = B.clone().requires_grad_()
    lora_linear(x, W, b, A, Bg, 0.5).sum().backward()
    assert made == [torch.float32]
    Bd = B.double().requires_grad_()
    reference.lora_linear(x.double(), W.double(), b.double(), A.double(), Bd, 0.5).sum().backward()
    assert rel_err(Bg.grad, Bd.grad) < TOL[torch.bfloat16]


def test_eager_lora_backward_keeps_float64(monkeypatch):
    """The eager backward of a float64 layer forms dB's u again in float64 (the forward's saved
    u is float32): every gradient to float64's tolerance."""
    monkeypatch.setenv("FUSEDLORA_BACKEND", "eager")
    torch.manual_seed(6)
    leaves = [t.double().requires_grad_() for t in _lora(5)]
    grads = torch.autograd.grad(lora_linear(*leaves, 0.7).square().sum(), leaves)
    ref = [t.detach().clone().requires_grad_() for t in leaves]
    want = torch.autograd.grad(reference.lora_linear(*ref, 0.7).square().sum(), ref)
    assert all(rel_err(g, w) < TOL[torch.float64] for g, w in zip(grads, want))


@pytest.mark.parametrize("frozen", [(), ("W", "b"), ("W", "b", "A"), ("x", "W", "b", "B")])
@pytest.mark.parametrize("p", [0.0, 0.25])
def test_eager_lora_backward_computes_what_is_asked(monkeypatch, frozen, p):
    """The eager composition's backward: each gradient asked for equals the float64
    reference's (the same dropout mask), and a frozen W costs no dW product."""
    monkeypatch.setenv("FUSEDLORA_BACKEND", "eager")
    torch.manual_seed(5)
    names = ("x", "W", "b", "A", "B")
    leaves = [t.requires_grad_(n not in frozen) for n, t in zip(names, _lora(7))]
    calls = []
    real = torch.Tensor.__matmul__
    monkeypatch.setattr(torch.Tensor, "__matmul__", lambda a, b: calls.append((a.shape, b.shape)) or real(a, b))
    torch.manual_seed(11)
    y = lora_linear(*leaves, 1.5, dropout_p=p)
    gy = torch.randn_like(y)
    grads = torch.autograd.grad(y, [t for t in leaves if t.requires_grad], gy)
    monkeypatch.setattr(torch.Tensor, "__matmul__", real)
    x, W = leaves[0], leaves[1]
    full = (W.shape[0], x.shape[0]), tuple(x.shape)  # gy^T @ x: dW's product
    assert (tuple(calls[-1][0]), tuple(calls[-1][1])) != full and all(
        (tuple(a), tuple(b)) != full for a, b in calls) == ("W" in frozen), calls
    torch.manual_seed(11)
    mask = fusedlora.ops.dropout_keep_mask(x.shape, p, int(fusedlora.ops.draw_seed(p) or 0), "cpu") if p else None
    ref = [t.detach().double().requires_grad_(t.requires_grad) for t in leaves]
    y_ref = reference.lora_linear(*ref, 1.5, None if mask is None else mask.double(), p)
    want = torch.autograd.grad(y_ref, [t for t in ref if t.requires_grad], gy.double())
    assert rel_err(y, y_ref) < TOL[torch.float32]
    for g, w in zip(grads, want):
        assert rel_err(g, w) < TOL[torch.float32]


@pytest.mark.parametrize("blk", [8, 16])
def test_c3a_decode_call_runs_triton_after_warming_the_fft_composition(gpu_call, blk):
    """The host path is Triton's one fused launch ("triton-fused"), not the two-launch decode
    pair that Triton runs for blocks of 16 and more elsewhere."""
    capture_backend, _ = gpu_call
    capture_backend[0] = "eager"  # auto's in-graph choice for C3A (EAGER_WINS)
    torch.manual_seed(4)
    K, N = 32, 48
    x, W, b = torch.randn(2, K), torch.randn(N, K) / K ** 0.5, torch.randn(N)
    kernel = torch.randn(N // blk, K // blk, blk)
    ref = reference.c3a_linear(x.double(), W.double(), b.double(), kernel.double())
    for calls in (1, 2):
        assert rel_err(c3a_linear(x, W, b, kernel), ref) < TOL[torch.float32]
        eager, triton = _counts("c3a.forward")
        assert (eager, triton) == (1, calls), dispatched()  # the FFT form ran once, Triton each call
    assert not any(k.endswith(":decode") for k in dispatched("c3a.forward")), dispatched()


def _multi_case():
    torch.manual_seed(5)
    K, N = 32, 24
    As = [torch.randn(r, K) / K ** 0.5 for r in (2, 8)]
    Bs = [torch.randn(N, r) for r in (2, 8)]
    pool_A, pool_BT, off, rank, scale, rmax = pack_loras(As, Bs, [0.5, 2.0], device=DEVICE)
    x, W = torch.randn(3, K), torch.randn(N, K) / K ** 0.5
    slot = torch.tensor([1, -1, 0], dtype=torch.int32)
    ref = reference.multi_lora_linear(x.double(), W.double(), None, slot.long(), [a.double() for a in As],
                                      [b.double() for b in Bs], [0.5, 2.0])
    return (x, W, None, slot, pool_A, pool_BT, off, rank, scale), rmax, ref


def test_multi_decode_call_uses_a_built_extension_after_warming_triton(gpu_call, monkeypatch):
    """The mechanism, with the extension named first in HOST_WINS (as the 2026-11-27 table had
    it; the 2026-11-28 measurements put the gather composition first: the next test)."""
    monkeypatch.setitem(backend.HOST_WINS, "multi.forward", (16, ("cuda", "eager")))
    args, rmax, ref = _multi_case()
    calls = []

    class FakeExtension:  # the binding's contract, computed by the reference path
        def multi_lora_decode(self, x, weight, bias, row_slot, pool_A, pool_BT, off, rank, scale, max_rank,
                              gemv="fma"):
            assert gemv == "fma"  # the default until a GPU run measures "mma"
            calls.append(x.shape[0])
            return fusedlora.multi._multi_forward_on(
                "torch", x, weight, bias, pool_A, pool_BT, row_slot, off, rank, scale, torch.zeros_like(scale),
                max_rank, False, torch.zeros((), dtype=torch.int64))

    monkeypatch.setattr(cuda_ext, "load", lambda build=True: FakeExtension())
    for n in (1, 2):
        y = multi_lora_linear(*args, max_rank=rmax)
        assert rel_err(y, ref) < TOL[torch.float32]
        assert calls == [3] * n
        assert dispatched("multi.forward:cuda") == {"multi.forward:cuda:bgmv": n}
    assert sum(v for k, v in dispatched("multi.forward:triton").items()) == 1  # warmed once


@pytest.mark.parametrize("built", [False, True])
def test_multi_decode_call_takes_the_gather_composition(gpu_call, monkeypatch, built):
    """HOST_WINS (2026-11-28_h200): an eager multi-adapter decode call runs the gather
    composition, with the extension built or not (102-178 us a call against 187-374 us)."""
    args, rmax, ref = _multi_case()
    monkeypatch.setattr(cuda_ext, "load", lambda build=True: object() if built else None)
    for n in (1, 2):
        assert rel_err(multi_lora_linear(*args, max_rank=rmax), ref) < TOL[torch.float32]
        d = dispatched("multi.forward")
        assert "multi.forward:triton:no-cuda-extension" not in d, d  # the gather's record says what ran
        assert d.get("multi.forward:eager:gather") == n, d
        assert not any(":cuda:" in k for k in d), d
    assert sum(v for k, v in d.items() if ":triton:bgmv" in k) == 1, d  # the capture path, warmed once


@pytest.mark.parametrize("ranks", [(2, 8), (8, 8), (1, 16)])
def test_multi_gather_composition_matches_reference(monkeypatch, ranks):
    """FUSEDLORA_BACKEND=eager's multi-adapter forward: mixed ranks padded to the largest
    and masked, -1 rows base only, per-slot scales, strided x; and its gradients (the
    grouped torch backward) through the custom op."""
    monkeypatch.setenv("FUSEDLORA_BACKEND", "eager")
    torch.manual_seed(6)
    K, N = 24, 20
    As = [torch.randn(r, K, dtype=torch.float64) for r in ranks]
    Bs = [torch.randn(N, r, dtype=torch.float64) for r in ranks]
    pool_A, pool_BT, off, rank, scale, rmax = pack_loras(As, Bs, [0.5, -2.0], device=DEVICE)
    x = torch.randn(5, 2 * K, dtype=torch.float64)[:, ::2].requires_grad_()
    W, b = torch.randn(N, K, dtype=torch.float64), torch.randn(N, dtype=torch.float64)
    slot = torch.tensor([1, -1, 0, 1, -1], dtype=torch.int32)
    fusedlora.reset_dispatch()
    y = multi_lora_linear(x, W, b, slot, pool_A, pool_BT, off, rank, scale, max_rank=rmax)
    assert dispatched("multi.forward") == {"multi.forward:eager:gather": 1}
    ref = reference.multi_lora_linear(x, W, b, slot.long(), As, Bs, [0.5, -2.0])
    assert rel_err(y, ref) < TOL[torch.float64]
    g = torch.randn_like(y)
    assert rel_err(torch.autograd.grad(y, x, g)[0], torch.autograd.grad(ref, x, g)[0]) < TOL[torch.float64]


def test_signature_sees_alignment_strides_and_scalars():
    a = torch.zeros(64)
    sig = backend._signature("op", (a[:8], 2.0, None))
    assert sig == backend._signature("op", (torch.zeros(64)[:8], 2.0, None))
    assert sig != backend._signature("op", (a[1:9], 2.0, None))  # 4 bytes off: Triton's divisibility
    assert sig != backend._signature("op", (a[:16:2], 2.0, None))
    assert sig != backend._signature("op", (a[:8], 3.0, None))


def test_gemv_choice_is_validated_scoped_and_recorded(monkeypatch):
    """FUSEDLORA_CUDA_GEMV / cuda_ext.use_gemv pick the decode kernels' GEMV; "fma" (the one
    measured on a GPU) is the default, and the record names the one that runs."""
    monkeypatch.delenv("FUSEDLORA_CUDA_GEMV", raising=False)
    assert cuda_ext.requested_gemv() == "fma"
    with cuda_ext.use_gemv("mma"):
        assert cuda_ext.requested_gemv() == "mma"
    assert cuda_ext.requested_gemv() == "fma"
    assert fusedlora.backend_info()["cuda_gemv"] == "fma"
    monkeypatch.setenv("FUSEDLORA_CUDA_GEMV", "wmma")
    with pytest.raises(ValueError, match="FUSEDLORA_CUDA_GEMV must be one of"):
        cuda_ext.requested_gemv()
    assert fusedlora.backend_info()["cuda_gemv"].startswith("invalid (FUSEDLORA_CUDA_GEMV must be")
    with pytest.raises(ValueError, match="use_gemv: name must be one of"):
        with cuda_ext.use_gemv("tensor"):
            pass
    monkeypatch.setenv("FUSEDLORA_CUDA_GEMV", "mma")
    monkeypatch.setattr(cuda_ext, "_sm_major", lambda device: 9)  # a device object needs no GPU
    fusedlora.reset_dispatch()
    x, w = torch.zeros(2, 64, dtype=torch.bfloat16), torch.zeros(8, 64, dtype=torch.bfloat16)
    assert cuda_ext.gemv_for("lora.forward", "decode", x, w) == "mma"
    assert cuda_ext.gemv_for("lora.forward", "decode", x.float(), w.float()) == "fma"  # no fp32 mma
    assert cuda_ext.gemv_for("lora.forward", "decode", x[:, 1:], w[:, 1:]) == "fma"   # rows off 16 bytes
    assert dispatched("lora.forward") == {"lora.forward:cuda:decode-mma": 1, "lora.forward:cuda:decode": 2}


def test_multi_gather_keeps_other_adapters_non_finite_rows_out(monkeypatch):
    """The gather reads max_rank pool rows from each row's offset: past a slot's rank they
    are another adapter's, and a -1 row reads slot 0's. A diverged adapter (NaN, inf) must
    not reach other tenants' rows: those rows are selected away, not multiplied by zero."""
    monkeypatch.setenv("FUSEDLORA_BACKEND", "eager")
    K, N = 16, 12
    As = [torch.randn(2, K), torch.full((8, K), float("nan"))]
    Bs = [torch.randn(N, 2), torch.full((N, 8), float("inf"))]
    pool_A, pool_BT, off, rank, scale, rmax = pack_loras(As, Bs, [1.0, 1.0], device=DEVICE)
    x, W = torch.randn(3, K), torch.randn(N, K)
    slot = torch.tensor([0, -1, 1], dtype=torch.int32)
    y = multi_lora_linear(x, W, None, slot, pool_A, pool_BT, off, rank, scale, max_rank=rmax)
    assert dispatched("multi.forward:eager") and torch.isfinite(y[:2]).all() and not torch.isfinite(y[2]).all()
    ref = reference.multi_lora_linear(x[:2].double(), W.double(), None, slot[:2].long(),
                                      [a.double() for a in As], [b.double() for b in Bs], [1.0, 1.0])
    assert rel_err(y[:2], ref) < TOL[torch.float32]
    empty = torch.zeros(0, K)
    y = multi_lora_linear(x, W, None, torch.full((3,), -1, dtype=torch.int32), empty, torch.zeros(0, N),
                          off[:0], rank[:0], scale[:0], max_rank=0)
    assert torch.equal(y, x @ W.t())


def test_host_paths_serve_only_what_they_can(gpu_call):
    """C3A's host path is Triton, which has no float64: such calls keep the capture-time
    path (the FFT composition) instead of raising; inside an op, compositions ignore
    autocast, as the kernels do (the op's dtypes in, x's dtype out: the public functions
    apply autocast to their inputs before the op, tests/test_autocast.py)."""
    capture_backend, _ = gpu_call
    capture_backend[0] = "eager"
    K, N, blk = 16, 32, 8
    x, W = torch.randn(2, K, dtype=torch.float64), torch.randn(N, K, dtype=torch.float64)
    kernel = torch.randn(N // blk, K // blk, blk, dtype=torch.float64)
    y = c3a_linear(x, W, None, kernel)
    assert rel_err(y, reference.c3a_linear(x, W, None, kernel)) < TOL[torch.float64]
    assert set(dispatched("c3a.forward")) == {"c3a.forward:eager:fft"}
    capture_backend[0] = "triton"
    xs, Ws, b, A, B = _lora(3)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        y, _ = fusedlora.ops._lora_forward(xs, Ws, b, A, B, 1.5, 0.0, None)
    assert y.dtype == torch.float32 and dispatched("lora.forward:eager:composition")
    ref = reference.lora_linear(xs.double(), Ws.double(), b.double(), A.double(), B.double(), 1.5)
    assert rel_err(y, ref) < TOL[torch.float32]


@pytest.mark.parametrize("forward_backend,backward_backend", [("torch", "triton"), ("triton", "torch")])
def test_dropout_backward_draws_the_forwards_mask_after_a_backend_switch(monkeypatch, forward_backend,
                                                                         backward_backend):
    """A forward under one backend (use_backend scope) and .backward() under another: the
    backward draws the mask family the forward drew (torch's generator or the kernels'
    Philox), for the LoRA op and the multi-adapter op; the gradients of x and A were wrong."""
    monkeypatch.setenv("FUSEDLORA_BACKEND", backward_backend)
    torch.manual_seed(1)
    M, K, N, r, p = 6, 33, 20, 4, 0.3
    x = torch.randn(M, K, device=DEVICE, requires_grad=True)
    W, b = torch.randn(N, K, device=DEVICE), torch.randn(N, device=DEVICE)
    A = torch.randn(r, K, device=DEVICE, requires_grad=True)
    B = torch.randn(N, r, device=DEVICE, requires_grad=True)
    torch.manual_seed(7)
    with fusedlora.use_backend(forward_backend):
        y = lora_linear(x, W, b, A, B, 0.7, p)
    y.backward(torch.ones_like(y))
    torch.manual_seed(7)
    seed = int(torch.randint(0, 2**31 - 1, (), dtype=torch.int64))
    with fusedlora.use_backend(forward_backend):
        mask = fusedlora.ops.dropout_keep_mask((M, K), p, seed, DEVICE).double()
    ref = [t.detach().double().requires_grad_() for t in (x, A, B)]
    yr = reference.lora_linear(ref[0], W.double(), b.double(), ref[1], ref[2], 0.7, mask, p)
    yr.backward(torch.ones_like(yr))
    assert rel_err(y, yr) < TOL[torch.float32]
    for got, want in zip((x, A, B), ref):
        assert rel_err(got.grad, want.grad) < TOL[torch.float32]
    # the multi-adapter op (one slot, the same seed, hence the same mask as lora_linear's):
    # its dx after the switch against lora_linear's run wholly inside the forward's scope
    pool_A, pool_BT, off, rank, scale, rmax = pack_loras([A.detach()], [B.detach()], [0.7], device=DEVICE)
    slot = torch.zeros(M, dtype=torch.int32, device=DEVICE)
    drop = torch.full((1,), p, device=DEVICE)
    xm, xl = x.detach().clone().requires_grad_(), x.detach().clone().requires_grad_()
    torch.manual_seed(9)
    with fusedlora.use_backend(forward_backend):
        ym = multi_lora_linear(xm, W, b, slot, pool_A, pool_BT, off, rank, scale, max_rank=rmax, slot_drop=drop)
    ym.backward(torch.ones_like(ym))
    torch.manual_seed(9)
    with fusedlora.use_backend(forward_backend):
        yl = lora_linear(xl, W, b, A.detach(), B.detach(), 0.7, p)
        yl.backward(torch.ones_like(yl))
    assert rel_err(ym, yl) < TOL[torch.float32] and rel_err(xm.grad, xl.grad) < TOL[torch.float32]


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_auto_float64_lora_and_routed_rows_take_the_compositions_at_every_row_count(gpu_call, monkeypatch, dropout):
    """auto picks Triton for LoRA's 1..16 rows and for routed rows on CUDA; Triton has no
    float64 kernels, so a float64 layer ran above 16 rows and raised below (the warm-up of
    the capture path raised first). Such calls take the compositions at every row count,
    forward and backward, dropout's mask family included, and the dispatch record says so."""
    from fusedlora import ops

    monkeypatch.setattr(ops, "select_backend", backend.select_backend)  # auto's CUDA pick: Triton
    f64 = dict(dtype=torch.float64)
    for M in (0, 3, 16, 17):
        torch.manual_seed(M)
        x = torch.randn(M, 12, **f64, requires_grad=True)
        W, A, B = torch.randn(8, 12, **f64), torch.randn(2, 12, **f64, requires_grad=True), \
            torch.randn(8, 2, **f64, requires_grad=True)
        fusedlora.reset_dispatch()
        y = lora_linear(x, W, None, A, B, 1.5, dropout)
        y.square().sum().backward()
        ran = dispatched("lora.")
        assert not [k for k in ran if ":triton:" in k], (M, ran)
        if dropout == 0.0:  # the float64 reference, gradients included
            ref = reference.lora_linear(x.detach(), W, None, A.detach(), B.detach(), 1.5)
            assert rel_err(y, ref) < 1e-12
    pool_A, pool_BT, off, rank, scale, rmax = pack_loras([torch.randn(2, 12, **f64)], [torch.randn(8, 2, **f64)],
                                                         [1.0])
    slots = torch.tensor([0, -1, 0], dtype=torch.int32)
    fusedlora.reset_dispatch()
    x = torch.randn(3, 12, **f64, requires_grad=True)
    y = multi_lora_linear(x, torch.randn(8, 12, **f64), None, slots, pool_A.requires_grad_(), pool_BT, off, rank,
                          scale)
    y.sum().backward()
    ran = dispatched("multi.")
    assert not [k for k in ran if ":triton:" in k] and ran["multi.backward:torch:grouped"] == 1, ran
