"""Fused LoRA kernels (Triton; interpreter on CPU) against the float64 reference."""
import pytest
import torch

import fusedlora
from conftest import DEVICE, TOL, dispatched, rel_err
from fusedlora import launch, ops, reference

# (M, K, N, r): tiles are 16 under the interpreter, so these cover tails in
# every dimension, the autotuned GEMM (many tiles), the split-K path (few
# rows) and rank 1.
SHAPES = [(37, 45, 29, 5), (3, 50, 40, 8), (1, 33, 17, 1), (48, 32, 64, 16), (20, 70, 9, 3)]
DTYPES = [torch.float32, torch.float16]
NAMES = ("x", "weight", "bias", "lora_A", "lora_B")


def make_inputs(M, K, N, r, dtype, bias=True, lead=None, seed=None):
    g = torch.Generator().manual_seed(seed if seed is not None else torch.randint(0, 2**30, ()).item())
    shape = (*(lead or (M,)), K)
    t = {
        "x": torch.randn(shape, generator=g),
        "weight": torch.randn(N, K, generator=g) / K**0.5,
        "bias": torch.randn(N, generator=g) if bias else None,
        "lora_A": torch.randn(r, K, generator=g) / K**0.5,
        "lora_B": torch.randn(N, r, generator=g) / r**0.5,
    }
    return {k: (v.to(DEVICE, dtype).requires_grad_() if v is not None else None) for k, v in t.items()}


def reference_grads(inp, scaling, grad_y, mask=None, p=0.0):
    ref = {k: (v.detach().double().requires_grad_(v.requires_grad) if v is not None else None)
           for k, v in inp.items()}
    y = reference.lora_linear(*(ref[n] for n in NAMES), scaling, mask, p)
    y.backward(grad_y.double())
    return y, ref


def check_against_reference(inp, scaling=0.7, p=0.0, seed=None):
    dtype = inp["x"].dtype
    if seed is not None:
        torch.manual_seed(seed)
    y = ops.lora_linear(*(inp[n] for n in NAMES), scaling, p)
    grad_y = torch.randn_like(y)
    y.backward(grad_y)
    mask = None
    if p:
        torch.manual_seed(seed)  # the op drew its dropout seed right here
        drawn = int(torch.randint(0, 2**31 - 1, (), dtype=torch.int64))
        mask = ops.dropout_keep_mask(inp["x"].shape, p, drawn, inp["x"].device)
        mask = mask.reshape(inp["x"].shape).double()
    y_ref, ref = reference_grads(inp, scaling, grad_y, mask, p)
    assert rel_err(y, y_ref) < TOL[dtype]
    for n in NAMES:
        if inp[n] is not None and inp[n].requires_grad:
            assert rel_err(inp[n].grad, ref[n].grad) < TOL[dtype], n
    return y


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_forward_backward_matches_reference(triton_backend, shape, dtype):
    check_against_reference(make_inputs(*shape, dtype))
    ran = dispatched()
    assert any(k.startswith("lora.forward:triton") for k in ran), ran
    assert not any(":torch:" in k for k in ran), ran


def test_gemm_splitk_and_decode_paths_are_covered(triton_backend):
    check_against_reference(make_inputs(40, 36, 50, 4, torch.float32))  # many output tiles
    check_against_reference(make_inputs(20, 64, 9, 4, torch.float32))   # few tiles, long K
    check_against_reference(make_inputs(2, 64, 20, 4, torch.float32))   # decode: the two-launch pair
    check_against_reference(make_inputs(2, 64, 20, 4, torch.float32), p=0.2, seed=7)  # decode rows, dropout
    ran = dispatched("lora.forward")
    assert {"lora.forward:triton:gemm", "lora.forward:triton:splitk", "lora.forward:triton:decode"} <= set(ran), ran
    assert ran["lora.forward:triton:decode"] == 1  # dropout keeps the split-K pair (seeded mask in the shrink)
    with launch.use_decode_pair(False):  # the bench's A/B: decode rows on the split-K plan
        assert fusedlora.backend_info()["decode_pairs"] is False
        check_against_reference(make_inputs(3, 40, 20, 4, torch.float16))
    assert fusedlora.backend_info()["decode_pairs"] is True
    assert dispatched("lora.forward")["lora.forward:triton:splitk"] == 3 and launch.DECODE_PAIR
    assert "lora.shrink:triton:splitk" in dispatched("lora.shrink")


@pytest.mark.parametrize("M,r,p", [(37, 100, 0.0), (37, 70, 0.3), (5, 100, 0.0)])
def test_large_ranks_loop_in_the_epilogue(triton_backend, M, r, p):
    """Ranks above the epilogue's dot width (16 under the interpreter, 64 on a GPU) loop over
    rank chunks in the GEMM epilogue and in the decode pair's finish (a single dot of a
    large or stacked rank did not fit an A100's shared memory); with dropout on the sum."""
    check_against_reference(make_inputs(M, 40, 24, r, torch.float32), p=p, seed=3)
    assert launch.lowrank_block_r(r) < r


@pytest.mark.parametrize("dtype", DTYPES + [pytest.param(torch.bfloat16, marks=pytest.mark.gpu)])
@pytest.mark.parametrize("M,K,N,r", [(1, 33, 17, 1), (16, 50, 70, 20), (5, 200, 9, 3)])
def test_decode_pair_y_u_and_repeatability(triton_backend, M, K, N, r, dtype):
    """The decode pair on a strided x: u (the shrink's column tiles, summed over the K
    splits by the finishing kernel) and y against float64; rank 20 spans two column
    tiles; no bias at M = 5; the splits are added in a fixed order, so two calls agree
    bit for bit."""
    from fusedlora.launch import lora_decode

    t = {k: v.detach() for k, v in make_inputs(M, K, N, r, dtype).items()}
    x = torch.randn(M, 2 * K, dtype=dtype, device=DEVICE)[:, ::2]
    if M == 5:
        t["bias"] = None
    y, u = lora_decode(x, t["weight"], t["bias"], t["lora_A"], t["lora_B"], 0.7)
    assert u.dtype == torch.float32 and u.shape == (M, r)
    assert rel_err(u, 0.7 * x.double() @ t["lora_A"].double().t()) < 1e-5
    ref = reference.lora_linear(x.double(), *(t[n].double() if t[n] is not None else None for n in NAMES[1:]), 0.7)
    assert rel_err(y, ref) < TOL[dtype]
    y2, u2 = lora_decode(x, t["weight"], t["bias"], t["lora_A"], t["lora_B"], 0.7)
    assert torch.equal(y, y2) and torch.equal(u, u2)
    assert dispatched("lora.forward") == {"lora.forward:triton:decode": 2}


@pytest.mark.parametrize("dtype", DTYPES)
def test_dropout_matches_reference_with_kernel_mask(triton_backend, dtype):
    check_against_reference(make_inputs(21, 40, 18, 4, dtype), p=0.3, seed=1234)


def test_dropout_mask_is_seeded_and_unbiased(triton_backend):
    m1 = ops.dropout_keep_mask((64, 96), 0.25, 7, DEVICE)
    m2 = ops.dropout_keep_mask((64, 96), 0.25, 7, DEVICE)
    m3 = ops.dropout_keep_mask((64, 96), 0.25, 8, DEVICE)
    assert torch.equal(m1, m2) and not torch.equal(m1, m3)
    assert abs(m1.mean().item() - 0.75) < 0.03
    # rows and columns are independent streams: no two rows repeat
    assert len({tuple(r.tolist()) for r in m1.cpu()}) == 64


def test_dropout_same_seed_same_output(triton_backend):
    inp = make_inputs(9, 30, 12, 4, torch.float32)
    args = [inp[n].detach() for n in NAMES]
    torch.manual_seed(3)
    y1 = ops.lora_linear(*args, 1.5, 0.5)
    torch.manual_seed(3)
    y2 = ops.lora_linear(*args, 1.5, 0.5)
    y3 = ops.lora_linear(*args, 1.5, 0.5)
    assert torch.equal(y1, y2) and not torch.equal(y1, y3)


@pytest.mark.parametrize("dtype", DTYPES)
def test_3d_input(triton_backend, dtype):
    y = check_against_reference(make_inputs(0, 24, 19, 4, dtype, lead=(3, 7)))
    assert y.shape == (3, 7, 19)


def test_non_contiguous_input(triton_backend):
    inp = make_inputs(13, 50, 21, 6, torch.float32)
    wide = torch.randn(13, 100, device=DEVICE)
    inp["x"] = wide[:, ::2].detach().requires_grad_()      # stride 2 along K
    assert not inp["x"].is_contiguous()
    check_against_reference(inp)
    inp = make_inputs(13, 50, 21, 6, torch.float32)
    inp["x"] = torch.randn(50, 13, device=DEVICE).t().requires_grad_()  # column-major
    inp["weight"] = torch.randn(50, 21, device=DEVICE).t().mul(0.1).requires_grad_()
    check_against_reference(inp)


@pytest.mark.parametrize("dtype", DTYPES)
def test_every_operand_non_contiguous(triton_backend, dtype):
    """Strided views of every tensor the kernels read (x 3-D, W transposed, bias and
    lora_A with a column stride, lora_B column-major) and a stride-0 output gradient."""
    inp = make_inputs(0, 36, 22, 5, dtype, lead=(3, 5))
    g = torch.Generator().manual_seed(torch.randint(0, 2**30, ()).item())
    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(DEVICE, dtype)

    views = {
        "x": randn(36, 5, 3).permute(2, 1, 0),
        "weight": randn(36, 22, scale=1 / 6).t(),
        "bias": randn(22, 2)[:, 1],
        "lora_A": randn(5, 72, scale=1 / 6)[:, ::2],
        "lora_B": randn(5, 22, scale=1 / 2).t(),
    }
    for n, v in views.items():
        assert not v.is_contiguous(), n
        inp[n] = v.requires_grad_()
    y = ops.lora_linear(*(inp[n] for n in NAMES), 1.3)
    grad_y = torch.randn(22, device=DEVICE, dtype=dtype).expand(3, 5, 22)
    y.backward(grad_y)
    y_ref, ref = reference_grads(inp, 1.3, grad_y)
    assert rel_err(y, y_ref) < TOL[dtype]
    for n in NAMES:
        assert rel_err(inp[n].grad, ref[n].grad) < TOL[dtype], n
    ran = dispatched()
    for op in ("lora.forward", "lora.grad_x", "lora.grad_A", "lora.grad_B", "lora.grad_weight"):
        assert any(k.startswith(op + ":triton:") for k in ran), (op, ran)
    assert not any(":torch:" in k for k in ran), ran


def test_zero_rows_fp16_3d(triton_backend):
    inp = make_inputs(0, 20, 30, 2, torch.float16, lead=(4, 0))
    y = ops.lora_linear(*(inp[n] for n in NAMES), 2.0)
    assert y.shape == (4, 0, 30) and y.dtype == torch.float16
    y.sum().backward()
    assert inp["x"].grad.shape == (4, 0, 20)
    for n in ("weight", "bias", "lora_A", "lora_B"):
        assert inp[n].grad.dtype == torch.float16 and torch.count_nonzero(inp[n].grad) == 0, n


def test_no_bias_and_zero_rows(triton_backend):
    check_against_reference(make_inputs(11, 20, 30, 2, torch.float32, bias=False))
    inp = make_inputs(0, 20, 30, 2, torch.float32)
    y = ops.lora_linear(*(inp[n] for n in NAMES), 2.0)
    assert y.shape == (0, 30)
    y.sum().backward()
    assert inp["lora_A"].grad.abs().sum() == 0 and inp["x"].grad.shape == (0, 20)


def test_frozen_A_and_frozen_weight_skip_their_gradients(triton_backend):
    inp = make_inputs(17, 40, 24, 4, torch.float32)
    inp["lora_A"].requires_grad_(False)
    inp["weight"].requires_grad_(False)
    inp["bias"].requires_grad_(False)
    check_against_reference(inp)
    ran = dispatched()
    assert "lora.grad_x:triton:gemm" in ran or any(k.startswith("lora.grad_x") for k in ran)
    assert not any(k.startswith(("lora.grad_A", "lora.grad_weight")) for k in ran), ran
    assert inp["lora_A"].grad is None and inp["weight"].grad is None


def test_only_adapter_grads(triton_backend):
    inp = make_inputs(17, 40, 24, 4, torch.float16)
    for n in ("x", "weight", "bias"):
        inp[n].requires_grad_(False)
    check_against_reference(inp)
    assert not any(k.startswith(("lora.grad_x", "lora.grad_weight")) for k in dispatched())


@pytest.mark.parametrize("p", [0.0, 0.4])
def test_torch_backend_closed_form_grads(torch_backend, p):
    inp = make_inputs(15, 22, 18, 3, torch.float64)
    check_against_reference(inp, p=p, seed=99)
    assert all(":torch:" in k for k in dispatched()), dispatched()


@pytest.mark.parametrize("draw", range(4))
def test_random_shapes_each_run(triton_backend, draw):
    """Shapes drawn afresh every run (seeded by the clock, printed on failure): tails in
    every dimension, ranks 1..20, decode and GEMM plans, fp32 and fp16, 2-D and 3-D."""
    import random
    import time

    seed = time.time_ns() % 2**31 + draw
    rng = random.Random(seed)
    M, K, N, r = rng.randint(0, 40), rng.randint(1, 70), rng.randint(1, 70), rng.randint(1, 20)
    dtype = rng.choice(DTYPES)
    lead = (2, M // 2) if rng.random() < 0.3 and M >= 2 else None
    p = rng.choice([0.0, 0.0, 0.3])
    inp = make_inputs(M, K, N, r, dtype, bias=rng.random() < 0.7, lead=lead)
    try:
        check_against_reference(inp, scaling=rng.uniform(-2, 2), p=p, seed=seed)
    except AssertionError as e:
        raise AssertionError(f"seed={seed} M={M} K={K} N={N} r={r} {dtype} lead={lead} p={p}: {e}") from e


def test_autotune_can_be_narrowed_to_one_config(monkeypatch):
    """FUSEDLORA_AUTOTUNE=0: one config per kernel (a quick GPU test pass), and one that fits:
    the first config of the list needed 311 KB of shared memory for fp32 and C3A's exact
    delta on the H200 (227 KB), where the autotuner would have skipped it."""
    from fusedlora.kernels.lora import lora_matmul_kernel
    from fusedlora.launch import _GEMM_CONFIGS, autotuned

    assert len(autotuned(lora_matmul_kernel, _GEMM_CONFIGS, ["N"]).configs) == len(_GEMM_CONFIGS) > 1
    monkeypatch.setenv("FUSEDLORA_AUTOTUNE", "0")
    (kept,) = autotuned(lora_matmul_kernel, _GEMM_CONFIGS, ["N"]).configs
    kw = kept.kwargs
    stage = kw["BLOCK_K"] * (kw["BLOCK_M"] + kw["BLOCK_N"])
    assert stage * 4 * kept.num_stages <= 227 * 1024            # fp32 A and B tiles
    fp16_c3a = kw["BLOCK_K"] * (kw["BLOCK_M"] + 2 * kw["BLOCK_N"]) * 2 * kept.num_stages
    assert fp16_c3a <= 227 * 1024                                # 16-bit A, B and the exact delta's tile
