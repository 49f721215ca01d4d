"""fusedlora.add_multi_lora_: the delta-only multi-adapter LoRA, added in place into a base
output computed elsewhere, against the float64 reference."""
import pytest
import torch

import fusedlora
from conftest import DEVICE, TOL, dispatched, rel_err
from fusedlora import multi, reference
from fusedlora.routing import pack_loras

K, N = 40, 36
RANKS = (3, 0, 17, 8)   # a rank-0 slot (a C3A/sparse adapter's slot does no LoRA work), a rank past 16


def _adapters(dtype):
    As = [torch.randn(r, K, device=DEVICE, dtype=dtype) / K ** 0.5 if r else None for r in RANKS]
    Bs = [torch.randn(N, r, device=DEVICE, dtype=dtype) * 0.5 if r else None for r in RANKS]
    return As, Bs, [0.5, 1.0, 2.0, -1.5]


def _expected(y0, x, slots, As, Bs, scales):
    """float64: y0 + each row's adapter term (slot -1 and rank 0: nothing)."""
    live = [i for i, r in enumerate(RANKS) if r]
    W = torch.zeros(N, K, dtype=torch.float64, device=x.device)
    row = torch.tensor([live.index(s) if s in live else -1 for s in slots.tolist()], device=x.device)
    delta = reference.multi_lora_linear(x.double(), W, None, row, [As[i].double() for i in live],
                                        [Bs[i].double() for i in live], [scales[i] for i in live])
    return y0.double() + delta


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("M", [1, 5, 40])   # 40 > multi.sort_min_rows() under the interpreter: SGMV
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_adds_each_rows_adapter_in_place(monkeypatch, backend, M, dtype):
    monkeypatch.setenv("FUSEDLORA_BACKEND", backend)
    fusedlora.reset_dispatch()
    torch.manual_seed(M)
    As, Bs, scales = _adapters(dtype)
    pool_A, pool_BT, off, rank, scale, r_max = pack_loras(As, Bs, scales)
    slots = torch.randint(-1, len(RANKS), (M,), device=DEVICE, dtype=torch.int32)
    x = torch.randn(M, K + 3, device=DEVICE, dtype=dtype)[:, 2:K + 2]   # strided rows
    y = torch.randn(M, N, device=DEVICE, dtype=dtype)
    y0, ptr = y.clone(), y.data_ptr()
    out = fusedlora.add_multi_lora_(y, x, slots, pool_A, pool_BT, off, rank, scale, r_max)
    assert out is y and y.data_ptr() == ptr
    assert rel_err(y, _expected(y0, x, slots, As, Bs, scales)) < TOL[dtype]
    base = slots == -1
    assert torch.equal(y[base], y0[base])   # -1 rows untouched, bit for bit
    variant = {"torch": "torch:grouped", "triton": f"triton:{'sgmv' if M > multi.sort_min_rows() else 'bgmv'}"}
    assert dispatched("multi.delta:") == {f"multi.delta:{variant[backend]}": 1}


@pytest.mark.gpu
@pytest.mark.parametrize("M", [1, 16, 300])
def test_gpu_bf16_decode_and_prefill_rows(triton_backend, M):
    """bf16 on the GPU's tile sizes (BGMV up to 64 rows, SGMV above), K and N off the tiles."""
    torch.manual_seed(M)
    K2, N2 = 1000, 777
    ranks = (8, 64, 0, 16)
    As = [torch.randn(r, K2, device=DEVICE, dtype=torch.bfloat16) / K2 ** 0.5 if r else None for r in ranks]
    Bs = [torch.randn(N2, r, device=DEVICE, dtype=torch.bfloat16) * 0.3 if r else None for r in ranks]
    pool = pack_loras(As, Bs, [2.0, 0.5, 1.0, 1.5])
    x = torch.randn(M, K2, device=DEVICE, dtype=torch.bfloat16)
    y0 = torch.randn(M, N2, device=DEVICE, dtype=torch.bfloat16)
    slots = torch.randint(-1, len(ranks), (M,), device=DEVICE, dtype=torch.int32)
    y = fusedlora.add_multi_lora_(y0.clone(), x, slots, *pool, validate=False)
    live = [i for i, r in enumerate(ranks) if r]
    row = torch.tensor([live.index(s) if s in live else -1 for s in slots.tolist()], device=DEVICE)
    delta = reference.multi_lora_linear(x.double(), torch.zeros(N2, K2, dtype=torch.float64, device=DEVICE), None,
                                        row, [As[i].double() for i in live], [Bs[i].double() for i in live],
                                        [[2.0, 0.5, 1.0, 1.5][i] for i in live])
    assert rel_err(y.double() - y0.double(), delta) < 3e-2   # the delta alone, beside y's bf16 rounding
    assert rel_err(y, y0.double() + delta) < TOL[torch.bfloat16]


def test_equals_the_fused_layer_minus_its_base(triton_backend):
    """The delta-only form plus F.linear is multi_lora_linear (same pool, same rows)."""
    torch.manual_seed(0)
    As, Bs, scales = _adapters(torch.float32)
    pool = pack_loras(As, Bs, scales)
    x, W, b = torch.randn(24, K, device=DEVICE), torch.randn(N, K, device=DEVICE) / K ** 0.5, torch.randn(N, device=DEVICE)
    slots = torch.randint(-1, len(RANKS), (24,), device=DEVICE, dtype=torch.int32)
    fused = multi.multi_lora_linear(x, W, b, slots, *pool)
    y = fusedlora.add_multi_lora_(torch.nn.functional.linear(x, W, b), x, slots, *pool)
    assert rel_err(y, fused) < TOL[torch.float32]


def test_3d_rows_strided_output_and_no_rows(triton_backend):
    torch.manual_seed(1)
    As, Bs, scales = _adapters(torch.float32)
    pool = pack_loras(As, Bs, scales)
    x = torch.randn(2, 3, K, device=DEVICE)
    big = torch.randn(2, 3, N + 5, device=DEVICE)
    y = big[..., 5:]                          # rows of y strided inside a wider buffer
    y0, rest = y.clone(), big[..., :5].clone()
    slots = torch.tensor([0, 2, -1, 3, 2, 0], dtype=torch.int32, device=DEVICE)
    fusedlora.add_multi_lora_(y, x, slots, *pool)
    assert rel_err(y.reshape(6, N), _expected(y0.reshape(6, N), x.reshape(6, K), slots, As, Bs, scales)) < 1e-5
    assert torch.equal(big[..., :5], rest)    # nothing written outside y
    empty = torch.zeros(0, N, device=DEVICE)
    fusedlora.add_multi_lora_(empty, torch.zeros(0, K, device=DEVICE), slots[:0], *pool)


def test_validate_false_needs_max_rank_and_syncs_nothing(triton_backend, monkeypatch):
    torch.manual_seed(2)
    As, Bs, scales = _adapters(torch.float32)
    pool_A, pool_BT, off, rank, scale, r_max = pack_loras(As, Bs, scales)
    x, y = torch.randn(4, K, device=DEVICE), torch.zeros(4, N, device=DEVICE)
    slots = torch.tensor([3, -1, 0, 2], dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match="max_rank: validate=False needs"):
        fusedlora.add_multi_lora_(y, x, slots, pool_A, pool_BT, off, rank, scale, validate=False)
    def no_sync(*a, **k):
        raise AssertionError("a host sync on the validate=False path")
    monkeypatch.setattr(multi, "_check_table_values", no_sync)
    monkeypatch.setattr("fusedlora.multi_delta._check_table_values", no_sync)
    fusedlora.add_multi_lora_(y, x, slots, pool_A, pool_BT, off, rank, scale, r_max, validate=False)
    assert rel_err(y, _expected(torch.zeros_like(y), x, slots, As, Bs, scales)) < 1e-5


def _bad_cases():
    As, Bs, scales = _adapters(torch.float32)
    pool_A, pool_BT, off, rank, scale, r_max = pack_loras(As, Bs, scales)
    x, y = torch.randn(4, K, device=DEVICE), torch.zeros(4, N, device=DEVICE)
    slots = torch.tensor([3, -1, 0, 2], dtype=torch.int32, device=DEVICE)
    good = dict(y=y, x=x, row_slot=slots, pool_A=pool_A, pool_BT=pool_BT, slot_off=off, slot_rank=rank,
                slot_scale=scale)
    return good, [
        (dict(y=torch.zeros(3, N, device=DEVICE)), ValueError, "y: expected the leading shape of x"),
        (dict(y=torch.zeros(4, N, device=DEVICE, dtype=torch.float16)), TypeError, "y: dtype torch.float16"),
        (dict(y=torch.zeros(2, 2, N, device=DEVICE).transpose(0, 1), x=x.view(2, 2, K)), ValueError,
         "y: its rows must be addressable"),
        (dict(pool_BT=pool_BT[:, :-1]), ValueError, "pool_BT: expected shape (R_total, 36)"),
        (dict(row_slot=slots.long()), TypeError, "row_slot: expected a 1-D torch.int32"),
        (dict(row_slot=torch.tensor([4, 0, 0, 0], dtype=torch.int32, device=DEVICE)), ValueError,
         "row_slot: expected slots in -1 .. 3"),
        (dict(x=x.clone().requires_grad_()), ValueError, "inference only"),
        (dict(y=[0.0]), TypeError, "y: expected a torch.Tensor"),
        # one memory location for several elements: the kernel's tiles would race on it
        (dict(y=torch.zeros(1, N, device=DEVICE).expand(4, N)), ValueError, "y: elements of y share memory"),
        (dict(y=torch.zeros(N + 3, device=DEVICE).as_strided((4, N), (1, 1))), ValueError,
         "y: elements of y share memory"),
    ]


@pytest.mark.parametrize("case", range(len(_bad_cases()[1])))
def test_bad_arguments_raise_before_any_launch(triton_backend, case):
    good, bad = _bad_cases()
    change, exc, msg = bad[case]
    y_before = good["y"].clone()
    fusedlora.reset_dispatch()
    with pytest.raises(exc, match=msg.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        fusedlora.add_multi_lora_(**{**good, **change})
    assert dispatched() == {} and torch.equal(good["y"], y_before)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_no_output_or_input_features_is_a_no_op(monkeypatch, backend):
    """N = 0 (an empty shard) or K = 0: nothing to add, no error (view(-1, 0) is ambiguous)."""
    monkeypatch.setenv("FUSEDLORA_BACKEND", backend)
    for k, n in ((K, 0), (0, N)):
        pool = pack_loras([torch.randn(2, k, device=DEVICE), torch.randn(3, k, device=DEVICE)],
                          [torch.randn(n, 2, device=DEVICE), torch.randn(n, 3, device=DEVICE)], [1.0, 2.0])
        y = torch.randn(3, n, device=DEVICE)
        y0 = y.clone()
        slots = torch.tensor([0, -1, 1], dtype=torch.int32, device=DEVICE)
        assert fusedlora.add_multi_lora_(y, torch.randn(3, k, device=DEVICE), slots, *pool) is y
        assert torch.equal(y, y0)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_y_overlapping_x_adds_the_terms_of_x_as_given(monkeypatch, backend):
    """y and x views of one buffer, rows shifted: every row's term is of x before any write
    (the torch path wrote a group's rows of y, then read them as x for the next group)."""
    monkeypatch.setenv("FUSEDLORA_BACKEND", backend)
    torch.manual_seed(4)
    As = [torch.randn(r, N, device=DEVICE) / N ** 0.5 for r in (3, 5)]
    Bs = [torch.randn(N, r, device=DEVICE) * 0.5 for r in (3, 5)]
    pool = pack_loras(As, Bs, [0.5, 2.0])
    buf = torch.randn(6, N, device=DEVICE)
    x, y = buf[:-1], buf[1:]
    x0, y0 = x.clone(), y.clone()
    slots = torch.tensor([1, 0, 1, 0, 1], dtype=torch.int32, device=DEVICE)
    fusedlora.add_multi_lora_(y, x, slots, *pool)
    expected = y0.double() + torch.stack([[0.5, 2.0][s] * (x0[m].double() @ As[s].double().t()) @ Bs[s].double().t()
                                          for m, s in enumerate(slots.tolist())])
    assert rel_err(y, expected) < TOL[torch.float32]


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_in_place_write_is_seen_by_autograd(monkeypatch, backend):
    """The Triton kernels write y through its pointer: y's version must move as an in-place
    op's does, so a graph that saved y refuses its backward (it computed silently wrong
    gradients with the new values) and caches keyed on the version see the change."""
    monkeypatch.setenv("FUSEDLORA_BACKEND", backend)
    As, Bs, scales = _adapters(torch.float32)
    pool = pack_loras(As, Bs, scales)
    x = torch.randn(4, K, device=DEVICE)
    slots = torch.tensor([0, 2, 3, -1], dtype=torch.int32, device=DEVICE)
    w = torch.ones(N, device=DEVICE, requires_grad=True)
    y = torch.randn(4, N, device=DEVICE)
    loss = (w * y).sum()             # saves y for the gradient of w
    version = y._version
    fusedlora.add_multi_lora_(y, x, slots, *pool)
    assert y._version > version
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_inference_tensor_outside_inference_mode_is_refused(monkeypatch, backend):
    """As every in-place op: an inference tensor is updated in inference mode only."""
    monkeypatch.setenv("FUSEDLORA_BACKEND", backend)
    As, Bs, scales = _adapters(torch.float32)
    pool = pack_loras(As, Bs, scales)
    x = torch.randn(4, K, device=DEVICE)
    slots = torch.tensor([0, 2, 3, -1], dtype=torch.int32, device=DEVICE)
    with torch.inference_mode():
        y = torch.randn(4, N, device=DEVICE)
        y0 = y.clone()
        fusedlora.add_multi_lora_(y, x, slots, *pool)   # inside: fine
    assert rel_err(y, _expected(y0, x, slots, As, Bs, scales)) < TOL[torch.float32]
    before = y.clone()
    with pytest.raises(RuntimeError, match="inference tensor"):
        fusedlora.add_multi_lora_(y, x, slots, *pool)
    assert torch.equal(y, before)


_WIDE_STRIDES = r"""
import sys, torch, fusedlora
from fusedlora.routing import pack_loras
dev, which = sys.argv[1], sys.argv[2]
S, M, K, N = 2**30, 4, 3, 3          # column j at j * S: the last column at 2**31 elements
torch.manual_seed(0)
As = [torch.randn(2, K, device=dev, dtype=torch.float16), torch.randn(3, K, device=dev, dtype=torch.float16)]
Bs = [torch.randn(N, 2, device=dev, dtype=torch.float16), torch.randn(N, 3, device=dev, dtype=torch.float16)]
pool_A, pool_BT, off, rank, scale, r_max = pack_loras(As, Bs, [0.5, 2.0])
def wide(t):  # t's values in a tensor of the same shape whose columns are S elements apart (lazily allocated)
    w = torch.empty(S * (t.shape[1] - 1) + t.shape[0] + 64, device=dev, dtype=t.dtype)[64:]
    w = w.as_strided(t.shape, (1, S))
    w.copy_(t)
    return w
x = torch.randn(M, K, device=dev, dtype=torch.float16)
y = torch.randn(M, N, device=dev, dtype=torch.float16)
slots = torch.tensor([0, 1, -1, 1], dtype=torch.int32, device=dev)
expected = y.double().clone()
for m, s in enumerate(slots.tolist()):
    if s >= 0:
        expected[m] += [0.5, 2.0][s] * (x[m].double() @ As[s].double().t()) @ Bs[s].double().t()
args = dict(y=y, x=x, pool_A=pool_A, pool_BT=pool_BT)
args[which] = wide(args[which])
out = fusedlora.add_multi_lora_(args["y"], args["x"], slots, args["pool_A"], args["pool_BT"], off, rank, scale, r_max)
err = ((out.double() - expected).norm() / expected.norm()).item()
assert err < 1e-2, err
print("ok", err)
"""


@pytest.mark.parametrize("which", ["y", "x", "pool_A", "pool_BT"])
def test_columns_2_31_elements_apart_are_addressed_in_int64(triton_backend, which, tmp_path):
    """Column offsets in int64 in the kernels (the shrink's x and pool reads, the expand's pool
    reads and store_rows' writes): an operand whose columns span 2**31 elements (a transposed
    output, M * N >= 2**31) was written or read out of bounds in int32 (a segfault on y). 4 GiB of address space, a few pages touched; in a subprocess, as a
    failure here is a crash."""
    import os
    import subprocess
    import sys

    script = tmp_path / "wide.py"
    script.write_text(_WIDE_STRIDES)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, FUSEDLORA_BACKEND="triton",
               PYTHONPATH=os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p))
    run = subprocess.run([sys.executable, str(script), DEVICE, which], env=env, capture_output=True, text=True,
                         timeout=300, cwd=root)
    assert run.returncode == 0 and "ok" in run.stdout, (run.returncode, run.stdout[-500:], run.stderr[-2000:])


def test_validate_false_with_too_small_max_rank_stays_inside_u(triton_backend):
    """validate=False trusts the caller's max_rank; one below a slot's rank must not write past
    u (max_rank wide): the ranks are clamped to it, so that slot's term is cut, never memory."""
    torch.manual_seed(4)
    As, Bs, scales = _adapters(torch.float32)
    pool_A, pool_BT, off, rank, scale, r_max = pack_loras(As, Bs, scales)
    x, y = torch.randn(6, K, device=DEVICE), torch.zeros(6, N, device=DEVICE)
    slots = torch.tensor([2, 2, 0, 3, -1, 2], dtype=torch.int32, device=DEVICE)   # slot 2: rank 17
    fusedlora.add_multi_lora_(y, x, slots, pool_A, pool_BT, off, rank, scale, 2, validate=False)
    cut = [A[:2] if A is not None else None for A in As], [B[:, :2] if B is not None else None for B in Bs]
    assert rel_err(y, _expected(torch.zeros_like(y), x, slots, *cut, scales)) < 1e-5


@pytest.mark.parametrize("validate", [False, True])
def test_torch_compile_fullgraph_sees_the_mutation(torch_backend, validate):
    """The mutating custom op in a fullgraph compile; with validate=True the table checks
    become device-side asserts instead of a data-dependent guard error, and so do
    multi_lora_linear's (max_rank given)."""
    torch.manual_seed(3)
    As, Bs, scales = _adapters(torch.float32)
    pool = pack_loras(As, Bs, scales)
    x = torch.randn(5, K, device=DEVICE)
    W = torch.randn(N, K, device=DEVICE) / K ** 0.5
    slots = torch.tensor([0, -1, 2, 3, 0], dtype=torch.int32, device=DEVICE)

    def both(x, slots):
        y = torch.nn.functional.linear(x, W)
        fusedlora.add_multi_lora_(y, x, slots, *pool, validate=validate)
        return torch.tanh(y), multi.multi_lora_linear(x, W, None, slots, *pool)

    torch._dynamo.reset()
    eager = both(x, slots)
    compiled = torch.compile(both, backend="aot_eager", fullgraph=True)(x, slots)
    for a, b in zip(compiled, eager):
        assert rel_err(a, b) < 1e-6
    if validate:
        with pytest.raises(Exception, match="max_rank: under torch.compile"):
            torch.compile(lambda x, s: multi.multi_lora_linear(x, W, None, s, *pool[:5]), backend="aot_eager",
                          fullgraph=True)(x, slots)
    else:
        result = torch.library.opcheck(fusedlora.multi_delta._add_multi_lora,
                                       (torch.zeros(5, N, device=DEVICE), x, pool[0], pool[1], slots, *pool[2:5],
                                        pool[5]))
        assert set(result.values()) == {"SUCCESS"}, result
