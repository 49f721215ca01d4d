"""Sparse-delta (SHiRA) path: Triton kernels (interpreter on CPU) against the
float64 reference, layout invariants, mask builders, O(nnz) merge, PEFT parity."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import pytest  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

import fusedlora  # noqa: E402
from conftest import DEVICE, TOL, rel_err  # noqa: E402
from conftest import dispatched as all_dispatched  # noqa: E402
from fusedlora import reference  # noqa: E402
from fusedlora.sparse import (  # noqa: E402
    SparseLayout, build_layout, magnitude_indices, random_indices, scatter_merge_, scatter_switch_,
    shira_num_nonzeros, sparse_linear,
)

NAMES = ("x", "weight", "bias", "values")


def dispatched(prefix="sparse."):
    return all_dispatched(prefix)


def make_inputs(M, N, K, dtype, indices, bias=True, x_shape=None, w_scale=1.0):
    x = torch.randn(*(x_shape or (M, K)), device=DEVICE, dtype=dtype)
    w = (torch.randn(N, K, device=DEVICE, dtype=dtype) * w_scale)
    b = torch.randn(N, device=DEVICE, dtype=dtype) if bias else None
    v = torch.randn(indices.shape[1], device=DEVICE, dtype=dtype)
    return {"x": x, "weight": w, "bias": b, "values": v}


def check_against_reference(inp, indices, scaling, layout=None, x_view=None, ref_indices=None):
    """Forward and every gradient of the fused op vs float64 autograd of the reference."""
    dtype = inp["x"].dtype
    leaves = {n: t.clone().requires_grad_() for n, t in inp.items() if t is not None}
    x_in = x_view(leaves["x"]) if x_view else leaves["x"]
    y = sparse_linear(x_in, leaves["weight"], leaves.get("bias"), indices, leaves["values"], scaling, layout=layout)
    ref = {n: t.detach().double().requires_grad_() for n, t in leaves.items()}
    x_ref = x_view(ref["x"]) if x_view else ref["x"]
    idx_ref = (indices if ref_indices is None else ref_indices).to(DEVICE)
    y_ref = reference.sparse_linear(x_ref, ref["weight"], ref.get("bias"), idx_ref, ref["values"], scaling)
    assert y.dtype == dtype and y.shape == y_ref.shape
    assert rel_err(y, y_ref) < TOL[dtype], "forward"
    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g.double())
    for n in leaves:
        assert leaves[n].grad is not None, n
        assert leaves[n].grad.dtype == leaves[n].dtype, n
        assert rel_err(leaves[n].grad, ref[n].grad) < TOL[dtype], n
    return y


def assert_triton_ran(grad_values=True):
    keys = dispatched()
    assert any(k.startswith("sparse.forward:triton:") for k in keys), keys
    assert any(k.startswith("sparse.grad_x:triton:") for k in keys), keys
    if grad_values:
        assert "sparse.grad_values:triton:sddmm" in keys, keys
    assert not any(":torch:" in k for k in keys), keys


# ------------------------------------------------------------ numerics
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("M,N,K,density,bias", [
    (37, 45, 53, 0.03, True),   # odd shapes, tails on every axis, autotuned entry
    (5, 33, 70, 0.05, False),   # decode rows: split-K
    (20, 16, 48, 0.01, True),   # ~1 %: several empty buckets
])
def test_matches_reference(triton_backend, dtype, M, N, K, density, bias):
    torch.manual_seed(hash((M, N, K, str(dtype))) % 2**31)
    idx = random_indices((N, K), density=density, seed=M + N + K)
    assert idx.shape[1] > 0
    inp = make_inputs(M, N, K, dtype, idx, bias=bias)
    check_against_reference(inp, idx, 0.75)
    assert_triton_ran()


def test_delta_alone_and_clustered_in_one_tile(triton_backend):
    """W = 0: y comes from the delta only. All nonzeros fill one 16 x 16 tile
    (256 of them: many chunks in one bucket), the others stay empty."""
    torch.manual_seed(1)
    N, K = 40, 36
    r, c = torch.meshgrid(torch.arange(16, 32), torch.arange(16, 32), indexing="ij")
    idx = torch.stack((r.flatten(), c.flatten()))[:, torch.randperm(256)]  # user order shuffled
    inp = make_inputs(24, N, K, torch.float32, idx, w_scale=0.0)
    y = check_against_reference(inp, idx, 1.5)
    assert y.detach().abs().sum() > 0
    assert_triton_ran()


@pytest.mark.parametrize("M", [1, 16, 17])
def test_decode_rows_path(triton_backend, M):
    """1..16 rows: base GEMM then the CSR rows (a full row of 70 nonzeros takes five
    chunks; empty rows none); 17 rows go to the tile-merging GEMM. Strided x."""
    torch.manual_seed(M)
    N, K = 40, 70
    full_row = torch.stack((torch.full((K,), 3), torch.arange(K)))
    rest = random_indices((N, K), density=0.03, seed=5)
    idx = torch.cat((full_row, rest[:, rest[0] != 3]), dim=1)
    inp = make_inputs(M, N, K, torch.float32, idx)
    fusedlora.reset_dispatch()
    check_against_reference(inp, idx, 0.6, x_view=lambda t: torch.cat((t, t), 1)[:, ::2])
    assert ("sparse.forward:triton:rows-decode" in dispatched()) == (M <= 16)


def test_row_csr_cache_never_serves_other_tensors():
    """The CSR cache (a DerivedCache) stamps its tensors' addresses and versions; a new
    layout can get a freed one's address with version 0. Views stand in for that here,
    their contents rewritten through ``.data`` (which bumps no version): same addresses
    and versions, other tensors: it must be rebuilt, not served stale."""
    from fusedlora.sparse import _row_csr

    rows = torch.tensor([2, 0, 1, 0], dtype=torch.int32)
    cols = torch.tensor([5, 6, 7, 8], dtype=torch.int32)
    perm = torch.arange(4, dtype=torch.int32)
    _, col_a, _ = _row_csr(rows, cols, perm, 3)
    version = cols._version
    cols.data.copy_(torch.tensor([1, 2, 3, 4], dtype=torch.int32))
    assert cols._version == version
    _, col_b, _ = _row_csr(rows.view(-1), cols.view(-1), perm.view(-1), 3)
    assert col_a.tolist() == [6, 8, 7, 5] and col_b.tolist() == [2, 4, 3, 1]


def test_float32_values_with_half_weight(triton_backend):
    """PEFT keeps adapter weights in float32 on a half model: values may differ in dtype from x and W."""
    torch.manual_seed(10)
    idx = random_indices((18, 30), density=0.05, seed=2)
    inp = make_inputs(9, 18, 30, torch.float16, idx)
    inp["values"] = inp["values"].float()
    check_against_reference(inp, idx, 1.0)
    assert_triton_ran()


def test_empty_delta_is_plain_linear(triton_backend):
    torch.manual_seed(2)
    idx = torch.zeros((2, 0), dtype=torch.int64)
    inp = make_inputs(19, 21, 23, torch.float32, idx)
    y = check_against_reference(inp, idx, 2.0)
    assert rel_err(y, F.linear(inp["x"], inp["weight"], inp["bias"])) < 1e-6
    assert_triton_ran(grad_values=False)


def test_3d_noncontiguous_input_and_prebuilt_small_tile_layout(triton_backend):
    """x a transposed 3-D view; a layout of 8 x 8 buckets (2 x 2 per kernel tile),
    passed prebuilt with indices=None; gradients of values in the user's order."""
    torch.manual_seed(3)
    N, K = 27, 34
    idx = random_indices((N, K), density=0.05, seed=7)
    idx = idx[:, torch.randperm(idx.shape[1])]
    layout = build_layout(idx, (N, K), tile=8, device=DEVICE)
    inp = make_inputs(0, N, K, torch.float16, idx, x_shape=(K, 3, 4))
    check_against_reference(inp, None, 0.5, layout=layout, x_view=lambda t: t.permute(1, 2, 0), ref_indices=idx)
    assert_triton_ran()
    assert torch.equal(layout.indices().cpu(), idx)


@pytest.mark.parametrize("M", [5, 20])  # the CSR rows path, the tile-merging GEMM
def test_non_contiguous_weight_bias_and_values_fp16(triton_backend, M):
    """Transposed W, stride-2 bias and values (columns of matrices) on the Triton paths, fp16:
    forward and every gradient against float64."""
    torch.manual_seed(14 + M)
    N, K = 26, 38
    dtype = torch.float16
    idx = random_indices((N, K), density=0.06, seed=9)
    leaves = {"x": torch.randn(M, K, device=DEVICE, dtype=dtype),
              "weight": torch.randn(K, N, device=DEVICE, dtype=dtype).t(),
              "bias": torch.randn(N, 2, device=DEVICE, dtype=dtype)[:, 1],
              "values": torch.randn(idx.shape[1], 3, device=DEVICE, dtype=dtype)[:, 2]}
    assert not any(leaves[n].is_contiguous() for n in ("weight", "bias", "values"))
    for t in leaves.values():
        t.requires_grad_()
    y = sparse_linear(*(leaves[n] for n in ("x", "weight", "bias")), idx, leaves["values"], 0.8)
    g = torch.randn_like(y)
    y.backward(g)
    ref = {n: t.detach().double().requires_grad_() for n, t in leaves.items()}
    y_ref = reference.sparse_linear(ref["x"], ref["weight"], ref["bias"], idx.to(DEVICE), ref["values"], 0.8)
    y_ref.backward(g.double())
    assert rel_err(y, y_ref) < TOL[dtype]
    for n in leaves:
        assert rel_err(leaves[n].grad, ref[n].grad) < TOL[dtype], n
    assert_triton_ran()
    assert ("sparse.forward:triton:rows-decode" in dispatched()) == (M <= 16)


def test_zero_rows(triton_backend):
    torch.manual_seed(4)
    idx = random_indices((12, 20), density=0.1, seed=0)
    inp = {n: (t.clone().requires_grad_() if t is not None else None)
           for n, t in make_inputs(0, 12, 20, torch.float32, idx, x_shape=(0, 20)).items()}
    y = sparse_linear(inp["x"], inp["weight"], inp["bias"], idx, inp["values"], 1.0)
    assert y.shape == (0, 12)
    y.sum().backward()
    assert inp["x"].grad.shape == (0, 20)
    for n in ("weight", "bias", "values"):
        assert torch.count_nonzero(inp[n].grad) == 0, n


# --------------------------------------------------------------- layout
def test_layout_invariants():
    N, K, T = 50, 70, 16
    idx = random_indices((N, K), density=0.04, seed=3)
    idx = idx[:, torch.randperm(idx.shape[1])].to(torch.int32)
    lay = build_layout(idx, (N, K), tile=T)
    assert isinstance(lay, SparseLayout) and lay.nnz == idx.shape[1] and lay.num_tiles == (4, 5)
    off = lay.offsets.long()
    assert off[0] == 0 and off[-1] == lay.nnz and bool((off[1:] >= off[:-1]).all())
    for b in range(off.numel() - 1):
        s, e = off[b], off[b + 1]
        assert bool((lay.rows[s:e] // T == b // 5).all()) and bool((lay.cols[s:e] // T == b % 5).all())
    p = lay.perm.long()
    assert torch.equal(lay.rows.long(), idx[0, p].long()) and torch.equal(lay.cols.long(), idx[1, p].long())
    assert torch.equal(lay.indices(), idx.long())


def test_mask_builders_and_peft_sizes():
    N, K = 30, 50
    assert shira_num_nonzeros((N, K), r=2) == 2 * (N + K)
    assert shira_num_nonzeros((N, K), density=0.1) == 150
    with pytest.raises(ValueError, match="r:"):
        shira_num_nonzeros((N, K), r=100)
    with pytest.raises(ValueError, match="density, r"):
        shira_num_nonzeros((N, K), r=2, density=0.1)
    a, b = random_indices((N, K), r=2, seed=5), random_indices((N, K), r=2, seed=5)
    assert torch.equal(a, b) and a.shape == (2, 160)
    build_layout(a, (N, K))  # in range, no duplicates
    w = torch.randn(N, K)
    top = magnitude_indices(w, density=0.05)
    thr = w.abs().flatten().kthvalue(N * K - top.shape[1]).values
    assert bool((w.abs()[top[0], top[1]] > thr).all())


# ---------------------------------------------------------------- merge
def test_scatter_merge_roundtrip_and_switch(triton_backend):
    torch.manual_seed(6)
    N, K = 33, 29
    w0 = torch.randn(N, K, device=DEVICE)
    ia, ib = random_indices((N, K), density=0.05, seed=1), random_indices((N, K), density=0.03, seed=2)
    va, vb = torch.randn(ia.shape[1], device=DEVICE), torch.randn(ib.shape[1], device=DEVICE)
    x = torch.randn(7, K, device=DEVICE)
    w = w0.clone()
    scatter_merge_(w, ia, va, 0.5)
    assert rel_err(w, w0 + reference.sparse_delta_weight(ia, va, 0.5, (N, K))) < 1e-7
    assert rel_err(F.linear(x, w), sparse_linear(x, w0, None, ia, va, 0.5)) < 1e-5
    scatter_switch_(w, (ia, va, 0.5), (ib, vb, 2.0))
    assert rel_err(w, w0 + reference.sparse_delta_weight(ib, vb, 2.0, (N, K))) < 1e-6
    scatter_merge_(w, ib, vb, 2.0, sign=-1)
    assert (w - w0).abs().max() < 1e-5
    p = nn.Parameter(w0.clone())  # in place on a leaf that requires grad
    scatter_merge_(p, ia, va, 0.5)
    assert p.requires_grad and (p.detach() - w0).abs().max() > 0


def two_sparse_adapters(N, K, dtype, densities, seed):
    """A layer with sparse adapters "a" (scaling 0.9) and "b" (2.0): (layer, W before, ia, ib)."""
    torch.manual_seed(seed)
    layer = fusedlora.FusedLinear(K, N, dtype=dtype)
    w0 = layer.weight.detach().clone()
    ia, ib = (random_indices((N, K), density=d, seed=seed + 1 + i) for i, d in enumerate(densities))
    layer.add_sparse("a", ia, torch.randn(ia.shape[1]) * 0.37, scaling=0.9)
    layer.add_sparse("b", ib, torch.randn(ib.shape[1]) * 1.3, scaling=2.0)
    return layer, w0, ia, ib


def test_module_switch_restores_the_weight_bit_for_bit(torch_backend):
    """switch_merged keeps the entries a merge overwrites: in bf16, where adding and
    subtracting a delta drifts, W is exactly the original after any number of switches."""
    N, K = 40, 56
    layer, w0, ia, ib = two_sparse_adapters(N, K, torch.bfloat16, (0.05, 0.04), seed=12)
    for _ in range(25):
        layer.switch_merged("a")
        layer.switch_merged("b")
    flat = ib[0] * K + ib[1]
    want = w0.view(-1).clone()
    want[flat] = (w0.view(-1)[flat].float() + layer.sparse_values["b"].detach().float() * 2.0).to(torch.bfloat16)
    assert torch.equal(layer.weight.detach().view(-1), want)  # one rounding from float32
    layer.unmerge()
    assert torch.equal(layer.weight.detach(), w0)
    assert dispatched("sparse.unmerge") == {"sparse.unmerge:torch:restore": 50}


def test_module_unmerge_keeps_changes_made_to_a_merged_weight(torch_backend):
    torch.manual_seed(13)
    layer = fusedlora.FusedLinear(24, 16)
    w0 = layer.weight.detach().clone()
    idx = random_indices((16, 24), density=0.1, seed=5)
    layer.add_sparse("a", idx, torch.randn(idx.shape[1]), scaling=0.5)
    layer.merge(["a"])
    with torch.no_grad():
        layer.weight.add_(1.0)  # trained or edited while merged: unmerge must not undo it
    layer.unmerge()
    assert (layer.weight.detach() - (w0 + 1.0)).abs().max() < 1e-6
    assert dispatched("sparse.unmerge") == {"sparse.unmerge:torch:subtract": 1}


@pytest.mark.parametrize("change", ["fused_step", "foreach_step"])
def test_module_unmerge_keeps_changes_made_by_optimizer_steps(torch_backend, change):
    """A fused optimizer step bumps no version counter (the process's step count moves): unmerge
    then decides per position from W's content, so the change survives everywhere."""
    idx = random_indices((16, 24), density=0.3, seed=1)
    torch.manual_seed(0)
    layer = fusedlora.FusedLinear(24, 16)
    layer.add_sparse("a", idx, torch.randn(idx.shape[1]), scaling=0.5)
    w0 = layer.weight.detach().clone()
    layer.merge(["a"])
    opt = torch.optim.SGD([layer.weight], lr=1.0, **({"fused": True} if change == "fused_step" else
                                                     {"foreach": True}))
    layer.weight.grad = -torch.ones_like(layer.weight)  # the step adds 1 everywhere
    opt.step()
    layer.unmerge()
    assert (layer.weight.detach() - (w0 + 1.0)).abs().max() < 1e-6
    assert dispatched("sparse.unmerge") == {"sparse.unmerge:torch:subtract": 1}


def test_module_sparse_adapters_merged_together_and_strided_weights_restore_exactly(torch_backend):
    """Two sparse adapters sharing positions merged at once, in fp16, and switches on a W that
    is a transposed view (or becomes one while merged): W comes back bit for bit, every time."""
    layer, w0, _, _ = two_sparse_adapters(16, 24, torch.float16, (0.3, 0.3), seed=0)
    for _ in range(10):
        layer.merge(["a", "b"])
        layer.unmerge()
    assert torch.equal(layer.weight.detach(), w0)
    layer.weight.data = w0.t().contiguous().t()  # same values, column-major
    for _ in range(10):
        layer.switch_merged("a")
        layer.switch_merged("b")
    layer.weight.data = layer.weight.data.contiguous().t().contiguous().t()  # strides change while merged
    layer.unmerge()
    assert torch.equal(layer.weight.detach(), w0) and not layer.merged_adapters
    assert set(dispatched("sparse.unmerge")) == {"sparse.unmerge:torch:restore"}


def test_unmerge_restores_nan_values_and_tolerates_older_saved_entries(torch_backend):
    """A NaN value merged is restored like any other (its entry still holds what the merge
    wrote); entries saved by an older fusedlora (other fields, from a pickle) are subtracted."""
    layer, w0, ia, _ = two_sparse_adapters(16, 24, torch.float32, (0.3, 0.3), seed=3)
    with torch.no_grad():
        layer.sparse_values["a"][0] = float("nan")
    layer.merge(["a"])
    layer.weight.data = layer.weight.data.clone()  # a new storage: the per-position path
    layer.unmerge()
    assert torch.equal(layer.weight.detach(), w0)
    layer.merge(["b"])
    old = fusedlora.sparse.SavedEntries(torch.zeros(3, dtype=torch.long), torch.zeros(3), 7, 123)  # 4 old fields
    layer._sparse_saved["b"] = old
    layer.unmerge()
    assert (layer.weight.detach() - w0).abs().max() < 1e-6 and "b" not in layer._sparse_saved


# ----------------------------------------------------------------- PEFT
@pytest.mark.filterwarnings("ignore:Sparse invariant checks")
def test_matches_peft_shira_layer(triton_backend):
    layer_mod = pytest.importorskip("peft.tuners.shira.layer")
    from peft.tuners.shira.config import ShiraConfig
    from peft.tuners.shira.mask_functions import random_mask

    torch.manual_seed(8)
    N, K, r, seed = 24, 40, 2, 11
    base = nn.Linear(K, N)
    layer = layer_mod.Linear(base, random_mask(base, r, random_seed=seed), "default",
                             ShiraConfig(r=r, random_seed=seed, init_weights=False), r=r)
    peft_idx = layer.shira_indices["default"]
    idx = random_indices((N, K), r=r, seed=seed)
    assert torch.equal(peft_idx.long(), idx)  # same mask for the same seed
    values = layer.shira_weight["default"].detach().clone()
    layer.set_scale("default", 0.7)
    x = torch.randn(3, 5, K)
    with torch.no_grad():
        y_peft = layer(x)
    y = sparse_linear(x, base.weight.detach(), base.bias.detach(), peft_idx, values, 0.7)
    assert rel_err(y, y_peft) < 1e-5
    # 15 rows: the decode pair (the base GEMM's split partials, then the nonzeros by CSR row)
    assert set(dispatched()) == {"sparse.forward:triton:rows-decode"}
    from fusedlora.launch import use_decode_pair

    with use_decode_pair(False):  # the bench's A/B: the split-K base, then the rows
        fusedlora.reset_dispatch()
        assert rel_err(sparse_linear(x, base.weight.detach(), base.bias.detach(), peft_idx, values, 0.7),
                       y_peft) < 1e-5
        assert set(dispatched()) == {"sparse.base:triton:splitk", "sparse.forward:triton:rows"}
    w = base.weight.detach().clone()
    scatter_merge_(w, peft_idx, values, 0.7)
    layer.merge()
    assert rel_err(w, base.weight) < 1e-7
    layer.unmerge()
    scatter_merge_(w, peft_idx, values, 0.7, sign=-1)
    assert rel_err(w, base.weight) < 1e-6


# ------------------------------------------------------- torch backend, op
def test_torch_backend_float64(monkeypatch):
    monkeypatch.setenv("FUSEDLORA_BACKEND", "torch")
    fusedlora.reset_dispatch()
    torch.manual_seed(9)
    idx = random_indices((9, 13), density=0.2, seed=3)
    inp = {n: t.double().requires_grad_() for n, t in make_inputs(6, 9, 13, torch.float32, idx).items()}
    y = sparse_linear(inp["x"], inp["weight"], inp["bias"], idx, inp["values"], 1.25)
    assert y.dtype == torch.float64
    assert torch.autograd.gradcheck(
        lambda x, w, b, v: sparse_linear(x, w, b, idx, v, 1.25), tuple(inp[n] for n in NAMES))
    assert set(dispatched()) == {"sparse.forward:torch:reference", "sparse.backward:torch:reference"}


@pytest.mark.parametrize("M,N,K,density", [(6, 9, 13, 0.2), (37, 40, 24, 0.05)])
def test_eager_backend_matches_reference(monkeypatch, M, N, K, density):
    """The dense composition auto runs on CUDA (backend.EAGER_WINS): every gradient,
    3-D and non-contiguous x, a transposed weight."""
    monkeypatch.setenv("FUSEDLORA_BACKEND", "eager")
    fusedlora.reset_dispatch()
    torch.manual_seed(21)
    idx = random_indices((N, K), density=density, seed=7)
    check_against_reference(make_inputs(M, N, K, torch.float32, idx), idx, 0.75)
    check_against_reference(make_inputs(M, N, K, torch.float32, idx, x_shape=(2, M, K)), idx, 1.5)
    check_against_reference(make_inputs(0, N, K, torch.float32, idx), idx, 1.5)  # M = 0
    inp = make_inputs(M, N, K, torch.float32, idx)
    inp["weight"] = inp["weight"].t().contiguous().t()  # column-major W
    check_against_reference(inp, idx, 0.5, x_view=lambda t: t.t().contiguous().t())
    inp = {n: t.double().requires_grad_() for n, t in make_inputs(M, N, K, torch.float32, idx).items()}
    assert torch.autograd.gradcheck(lambda x, w, b, v: sparse_linear(x, w, b, idx, v, 1.25),
                                    tuple(inp[n] for n in NAMES))
    # W + s S formed by the Triton tile pass (the interpreter here) in fp32, by torch in float64
    assert set(dispatched()) == {"sparse.forward:eager:dense", "sparse.backward:eager:dense",
                                 "sparse.densify:triton:tiles", "sparse.densify:torch:index_put",
                                 "sparse.sample:triton:gather", "sparse.sample:torch:index"}


def test_custom_op_registration(monkeypatch):
    monkeypatch.setenv("FUSEDLORA_BACKEND", "torch")
    from fusedlora.sparse import _sparse_forward

    idx = random_indices((10, 14), density=0.1, seed=4)
    inp = make_inputs(5, 10, 14, torch.float32, idx)
    lay = build_layout(idx, (10, 14), device=DEVICE)
    args = tuple(inp[n] for n in NAMES) + lay.tensors() + (0.5, lay.tile)
    torch.library.opcheck(_sparse_forward, args,
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


def test_torch_compile_fullgraph_with_prebuilt_layout(triton_backend):
    """No graph break; only some gradients asked for (outputs of the backward op must not alias)."""
    torch.manual_seed(12)
    N, K = 20, 24
    idx = random_indices((N, K), density=0.05, seed=1)
    lay = build_layout(idx, (N, K), device=DEVICE)
    w = torch.randn(N, K, device=DEVICE)
    x = torch.randn(6, K, device=DEVICE, requires_grad=True)
    v = torch.randn(idx.shape[1], device=DEVICE, requires_grad=True)
    f = torch.compile(lambda x, v: sparse_linear(x, w, None, None, v, 0.5, layout=lay), fullgraph=True)
    y = f(x, v)
    y.sum().backward()
    xr, vr = x.detach().double().requires_grad_(), v.detach().double().requires_grad_()
    yr = reference.sparse_linear(xr, w.double(), None, idx.to(DEVICE), vr, 0.5)
    yr.sum().backward()
    assert rel_err(y, yr) < 1e-5 and rel_err(x.grad, xr.grad) < 1e-5 and rel_err(v.grad, vr.grad) < 1e-5
    assert_triton_ran()


# ------------------------------------------------------------ bad inputs
def _bad_call(**over):
    N, K = 8, 12
    args = dict(x=torch.randn(3, K, device=DEVICE), weight=torch.randn(N, K, device=DEVICE), bias=None,
                indices=torch.tensor([[0, 1, 7], [0, 5, 11]]), values=torch.randn(3, device=DEVICE), scaling=1.0)
    args.update(over)
    return sparse_linear(**args)


@pytest.mark.parametrize("over,exc,match", [
    (dict(indices=torch.tensor([[0, 8, 1], [0, 1, 2]])), ValueError, "indices: .*out of range"),
    (dict(indices=torch.tensor([[0, 1, 2], [0, -1, 2]])), ValueError, "indices: .*out of range"),
    (dict(indices=torch.tensor([[0, 1, 2], [0, 12, 2]])), ValueError, "indices: .*out of range"),
    (dict(indices=torch.tensor([[0, 3, 3], [0, 4, 4]])), ValueError, "indices: duplicate.*row 3, col 4"),
    (dict(indices=torch.tensor([[0, 1, 2], [0, 1, 2], [0, 1, 2]])), ValueError, r"indices: expected shape \(2, nnz\)"),
    (dict(indices=torch.tensor([0, 1, 2])), ValueError, r"indices: expected shape \(2, nnz\)"),
    (dict(indices=torch.tensor([[0.0, 1, 2], [0, 1, 2]])), TypeError, "indices: expected an integer dtype"),
    (dict(indices=[[0, 1, 2], [0, 1, 2]]), TypeError, "indices: expected a torch.Tensor"),
    (dict(values=torch.randn(4)), ValueError, r"values: expected shape \(3,\)"),
    (dict(values=torch.randn(3, 1)), ValueError, r"values: expected shape \(3,\)"),
    (dict(values=torch.arange(3)), TypeError, "values: expected a floating dtype"),
    (dict(values=torch.randn(3, device="meta")), ValueError, "values: device"),
    (dict(scaling=float("nan")), ValueError, "scaling"),
    (dict(scaling="2"), TypeError, "scaling"),
    (dict(x=torch.randn(3, 11)), ValueError, "x: expected last dimension"),
    (dict(x=torch.ones(3, 12, dtype=torch.int64)), TypeError, "x: expected a floating dtype"),
    (dict(weight=torch.randn(8, 12, dtype=torch.float16)), TypeError, "weight: dtype"),
    (dict(weight=torch.randn(8, 12, device="meta")), ValueError, "weight: device"),
    (dict(weight=torch.randn(8, 12, 1)), ValueError, "weight: expected a 2-D tensor"),
    (dict(bias=torch.randn(7)), ValueError, r"bias: expected shape \(8,\)"),
    (dict(indices=None), ValueError, "indices: required"),
])
def test_bad_inputs_raise_before_launch(triton_backend, over, exc, match):
    over = {k: (v.to(DEVICE) if isinstance(v, torch.Tensor) and v.device.type != "meta" and k != "indices" else v)
            for k, v in over.items()}
    with pytest.raises(exc, match=match):
        _bad_call(**over)
    assert dispatched() == {}


def test_bad_layout_and_merge_args(triton_backend):
    idx = torch.tensor([[0, 1, 7], [0, 5, 11]])
    with pytest.raises(ValueError, match="layout: built for a weight of shape"):
        _bad_call(layout=build_layout(idx, (9, 12)))
    with pytest.raises(TypeError, match="layout: expected a SparseLayout"):
        _bad_call(layout=(1, 2))
    with pytest.raises(ValueError, match="tile"):
        build_layout(idx, (8, 12), tile=12)
    w = torch.randn(8, 12)
    with pytest.raises(ValueError, match="sign"):
        scatter_merge_(w, idx, torch.randn(3), sign=2)
    with pytest.raises(ValueError, match="indices: duplicate"):
        scatter_merge_(w, torch.tensor([[1, 1], [2, 2]]), torch.randn(2))
    assert dispatched() == {}


# ------------------------------------------------------------------ GPU
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("M,N,K,density", [(1, 4096, 4096, 0.0156), (300, 1024, 768, 0.05), (2048, 1000, 999, 0.01)])
def test_gpu_matches_reference(triton_backend, dtype, M, N, K, density):
    torch.manual_seed(0)
    idx = random_indices((N, K), density=density, seed=1)
    inp = make_inputs(M, N, K, dtype, idx)
    inp["values"] = inp["values"] * 0.1
    check_against_reference(inp, idx, 1.0, layout=build_layout(idx, (N, K), device=DEVICE))
    assert_triton_ran()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("M", [1, 300])
def test_gpu_auto_runs_the_dense_composition(monkeypatch, dtype, M):
    """What auto picks on CUDA (backend.EAGER_WINS: Triton's rows path up to 16 rows, the
    dense composition above and for every backward), against the float64 reference."""
    monkeypatch.delenv("FUSEDLORA_BACKEND", raising=False)
    fusedlora.reset_dispatch()
    torch.manual_seed(0)
    idx = random_indices((1024, 768), density=0.02, seed=1)
    inp = make_inputs(M, 1024, 768, dtype, idx)
    inp["values"] = inp["values"] * 0.1
    check_against_reference(inp, idx, 1.0)
    forward = {"sparse.forward:triton:rows-decode"} if M <= 16 else {"sparse.forward:eager:dense"}
    assert set(dispatched()) == forward | {"sparse.backward:eager:dense", "sparse.densify:triton:tiles",
                                           "sparse.sample:triton:gather"}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_dense_composition_kernels_match_torch(dtype):
    """W + s S written by the Triton tile pass (the interpreter here) equals the torch form
    bit for bit: one float32 sum per nonzero, rounded once; W itself is untouched, and a
    transposed W (strided rows) works; with layout tiles of 8 the copy's tiles (4 x 8
    columns) split K into two programs per row of tiles, the last one ragged, and a
    bucket run ends mid-row. The value gradient's gather likewise."""
    torch.manual_seed(3)
    N, K = 37, 53
    idx = random_indices((N, K), density=0.1, seed=4)
    values = torch.randn(idx.shape[1], dtype=dtype)
    for tile in (None, 8):
        layout = build_layout(idx, (N, K)) if tile is None else build_layout(idx, (N, K), tile=tile)
        for W in (torch.randn(N, K, dtype=dtype), torch.randn(K, N, dtype=dtype).t()):
            before = W.clone()
            fusedlora.reset_dispatch()
            fast = fusedlora.sparse._dense_weight(W, layout.tensors(), values, 0.75, layout.tile)
            assert dispatched("sparse.densify") == {"sparse.densify:triton:tiles": 1}
            ref = W.clone()
            ref[idx[0], idx[1]] = (W[idx[0], idx[1]].float() + 0.75 * values.float()).to(dtype)
            assert torch.equal(fast, ref) and torch.equal(W, before)
    _, rows, cols, perm = layout.tensors()
    # the value gradient read off a dense G (transposed strides), in the values' order
    g = torch.randn(K, N).t()
    fusedlora.reset_dispatch()
    dv = fusedlora.sparse._sampled(g, rows, cols, perm, 0.75, values)
    assert dispatched("sparse.sample") == {"sparse.sample:triton:gather": 1}
    assert dv.dtype == dtype and torch.equal(dv, (0.75 * g[idx[0], idx[1]]).to(dtype))


def test_dense_composition_reads_strided_values(monkeypatch):
    """values that are a strided view (a column of a matrix) give the same W + s S,
    forward and dx, as contiguous ones."""
    monkeypatch.setenv("FUSEDLORA_BACKEND", "eager")
    torch.manual_seed(5)
    N, K, M = 24, 40, 20
    idx = random_indices((N, K), density=0.1, seed=6)
    values = torch.randn(idx.shape[1], 2)[:, 0]
    x = torch.randn(M, K, requires_grad=True)
    W, b = torch.randn(N, K), torch.randn(N)
    y = sparse_linear(x, W, b, idx, values, 0.5)
    ref = reference.sparse_linear(x.double(), W.double(), b.double(), idx, values.double(), 0.5)
    assert rel_err(y, ref) < TOL[torch.float32]
    gy = torch.randn(M, N)
    (dx,) = torch.autograd.grad(y, [x], gy)
    assert rel_err(dx, gy.double() @ (W.double() + reference.sparse_delta_weight(idx, values.double(), 0.5, (N, K)))) \
        < TOL[torch.float32]


def test_auto_float64_sparse_rows_take_the_composition(monkeypatch):
    """auto sends 1..16 sparse rows on CUDA to Triton's rows path, which has no float64
    kernel: such calls take the eager composition, as they do above 16 rows, and say so."""
    import fusedlora.sparse as sp

    monkeypatch.delenv("FUSEDLORA_BACKEND", raising=False)
    monkeypatch.setattr(sp, "select_backend", lambda device, op, rows=0: "triton")  # what auto picks on CUDA
    idx = random_indices((12, 10), density=0.2, seed=2)
    x, W, values = torch.randn(3, 10, dtype=torch.float64), torch.randn(12, 10, dtype=torch.float64), \
        torch.randn(idx.shape[1], dtype=torch.float64)
    fusedlora.reset_dispatch()
    with torch.no_grad():
        y = sparse_linear(x, W, None, idx, values, 1.0)
    assert dispatched("sparse.forward") == {"sparse.forward:eager:dense": 1}
    assert rel_err(y, reference.sparse_linear(x, W, None, idx, values, 1.0)) < 1e-12


def test_safe_merge_of_a_sparse_adapter(torch_backend):
    """safe_merge=True refuses a sparse adapter whose merged entries would not be finite (an
    inf value, or one past the 16-bit range after scaling), leaving W as it was."""
    layer, w0, _, _ = two_sparse_adapters(16, 24, torch.float16, (0.3, 0.3), seed=5)
    with torch.no_grad():
        layer.sparse_values["a"][3] = 1e5  # 0.9 * 1e5 passes float16's 65504
    with pytest.raises(ValueError, match="'a' seems to be broken"):
        layer.merge(["a"], safe_merge=True)
    assert torch.equal(layer.weight.detach(), w0) and not layer.merged_adapters
    layer.merge(["b"], safe_merge=True)
    assert layer.merged_adapters == ["b"]
