"""Batched multi-adapter serving (issue 4): every row its own adapter, forward and backward.

Under the interpreter the SGMV (sorted) path runs for batches of more than
16 rows and the BGMV (gather) path for fewer; sorted tiles meeting more than
2 segments take the per-row gather epilogue (fusedlora.multi's thresholds).
"""
import contextlib

import pytest
import torch
from torch import nn

import fusedlora
from conftest import DEVICE, TOL, dispatched, rel_err
from fusedlora import FusedLinear, multi, reference, routing
from fusedlora.sparse import random_indices


def make_layer(K, N, ranks, dtype=torch.float32, names=None, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    layer = FusedLinear(K, N, bias=bias, device=DEVICE, dtype=dtype)
    names = names or [f"r{r}_{i}" for i, r in enumerate(ranks)]
    with torch.no_grad():
        layer.weight.copy_(torch.randn(N, K, generator=g) / K**0.5)
        if bias:
            layer.bias.copy_(torch.randn(N, generator=g))
        for n, r in zip(names, ranks):
            layer.add_lora(n, r=r, lora_alpha=1.5 * r)
            layer.lora_A[n].copy_(torch.randn(r, K, generator=g) / K**0.5)
            layer.lora_B[n].copy_(torch.randn(N, r, generator=g) / r**0.5)
    return layer, names


def draw_ids(layer, names, n, with_base=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    choices = torch.tensor([layer.adapter_id(a) for a in names] + ([-1] if with_base else []))
    return choices[torch.randint(0, len(choices), (n,), generator=g)].to(DEVICE)


def name_of(i):
    return None if i == -1 else routing.REGISTRY.names()[i]


def rowwise_single(layer, x, row_ids):
    """The single-adapter forward of every row with that row's adapter (base for -1)."""
    saved = layer.active_adapters
    x2 = x.reshape(-1, x.shape[-1])
    out = []
    with torch.no_grad():
        for row, i in zip(x2, row_ids.reshape(-1).tolist()):
            layer.set_adapter(name_of(i))
            out.append(layer(row[None])[0])
    layer.set_adapter(saved)
    return torch.stack(out).reshape(*x.shape[:-1], layer.out_features)


def reference_multi(layer, names, x, row_ids, grad_y=None):
    """float64 oracle (reference.multi_lora_linear), with its autograd gradients."""
    p = {k: v.detach().double().requires_grad_() for k, v in layer.named_parameters()}
    xd = x.detach().double().requires_grad_()
    slot = {layer.adapter_id(n): s for s, n in enumerate(names)}
    row = torch.tensor([slot.get(i, -1) for i in row_ids.reshape(-1).tolist()], device=x.device)
    x2 = xd.reshape(-1, x.shape[-1])
    y = reference.multi_lora_linear(x2, p["weight"], p.get("bias"), row, [p[f"lora_A.{n}"] for n in names],
                                    [p[f"lora_B.{n}"] for n in names], [layer.scaling[n] for n in names])
    y = y.reshape(*x.shape[:-1], -1)
    if grad_y is not None:
        y.backward(grad_y.double())
    return y, xd, p


@pytest.fixture(params=["cublas", "fused"])
def base(request):
    """How routed products of more than 16 rows run: the base GEMM on cuBLAS with the
    adapters' terms added into its output (the default, multi.CUBLAS_BASE_ROWS), or fused."""
    with multi.use_fused_base(request.param == "fused"):
        yield request.param


def via(base, M):
    """The dispatch variant's prefix of a routed product of M rows under ``base``."""
    return "cublas+" if base == "cublas" and M > multi.CUBLAS_BASE_ROWS else ""


# --------------------------------------------------------------- forward
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("M,base", [(5, "cublas"), (37, "cublas"), (37, "fused")], indirect=["base"])  # BGMV, SGMV
def test_mixed_ranks_rowwise_equal_single_adapter(triton_backend, dtype, M, base):
    layer, names = make_layer(45, 29, [1, 3, 8], dtype)
    layer.eval()
    x = torch.randn(M, 45, device=DEVICE, dtype=dtype)
    ids = draw_ids(layer, names, M, seed=M)
    with torch.no_grad():
        y = layer(x, adapter_ids=ids)
    assert y.dtype == dtype and y.shape == (M, 29)
    assert rel_err(y, rowwise_single(layer, x, ids)) < TOL[dtype]
    assert rel_err(y, reference_multi(layer, names, x, ids)[0]) < TOL[dtype]
    path = "sgmv" if M > multi.sort_min_rows() else "bgmv"
    ran = dispatched("multi.")
    assert any(k.startswith(f"multi.forward:triton:{via(base, M)}{path}") for k in ran), ran
    if path == "sgmv":
        assert "multi.shrink:triton:sgmv" in ran, ran
    else:  # decode rows: the shrink runs in the decode pair's first launch
        assert set(ran) == {"multi.forward:triton:bgmv-decode"}, ran


@pytest.mark.parametrize("seg_dot_max", [2, 64])  # most tiles per row / every tile by segments
def test_sorted_kernels_walk_segments_through_ends(triton_backend, monkeypatch, seg_dot_max):
    """SGMV on slots crafted for the segment walk: -1 rows first, a slot with no rows, a
    segment across tile boundaries, one-row segments; with every tile walked by segments,
    also slots outside [-1, S) (what an unchecked caller could pass: the walk gives such rows
    the base only and reads nothing past the tables; the per-row fallback, like BGMV, reads
    the tables at the slot: callers check). Against the float64 oracle, kernels directly."""
    from fusedlora.routing import pack_loras

    monkeypatch.setattr(multi, "SEG_DOT_MAX_INTERPRET", seg_dot_max)

    torch.manual_seed(8)
    K, N, M = 24, 20, 40
    As = [torch.randn(r, K, device=DEVICE) / K ** 0.5 for r in (3, 5, 2, 4)]
    Bs = [torch.randn(N, r, device=DEVICE) for r in (3, 5, 2, 4)]
    pool_A, pool_BT, off, rank, scale, rmax = pack_loras(As, Bs, [0.5, 2.0, 1.0, 1.5], device=DEVICE)
    slots = [-1] * 5 + [0] * 19 + [2] + [3] * 3 + [0, 3, -1, 2] + [3] * 4  # slot 1: no rows
    slots += [7, 4, -4, -2] if seg_dot_max == 64 else [0, 2, -1, -1]
    row_slot = torch.tensor(slots, dtype=torch.int32, device=DEVICE)[torch.randperm(M)]
    x = torch.randn(M, K, device=DEVICE)
    W, b = torch.randn(N, K, device=DEVICE) / K ** 0.5, torch.randn(N, device=DEVICE)
    sl = multi._Slots(off, rank, scale, torch.zeros(4, device=DEVICE), False, 0)
    routing = multi.route(row_slot, 4)
    assert routing.ends.tolist() == [sum(s < j for s in slots) for j in range(0, 5)]
    u = multi._shrink(x, pool_A, row_slot, sl, rmax, routing, False, "multi.shrink")
    y = multi._matmul(x, W.t(), b, u, pool_BT, row_slot, sl, routing, False, x.dtype, "multi.forward")
    served = torch.where((row_slot >= 0) & (row_slot < 4), row_slot, -1).cpu()
    want = reference.multi_lora_linear(x.double(), W.double(), b.double(), served, [a.double() for a in As],
                                       [b_.double() for b_ in Bs], [0.5, 2.0, 1.0, 1.5])
    assert rel_err(y, want) < TOL[torch.float32]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, pytest.param(torch.bfloat16, marks=pytest.mark.gpu)])
def test_bgmv_decode_pair_u_and_repeatability(triton_backend, dtype):
    """The two-launch BGMV decode on a strided x, ranks 20 and 3 (20 spans two shrink
    chunks of 16 and three expand chunks of 8), base-only rows: u is s x P_A[slot]^T up to
    each row's rank and stored as 0 past it and on -1 rows (the partials there are never
    written); y against float64; the splits are added in a fixed order: bit for bit."""
    from fusedlora.routing import pack_loras

    K, N = 70, 37
    g = torch.Generator().manual_seed(11)
    As = [(torch.randn(r, K, generator=g) / K**0.5).to(DEVICE, dtype) for r in (20, 3)]
    Bs = [torch.randn(N, r, generator=g).to(DEVICE, dtype) for r in (20, 3)]
    pool_A, pool_BT, off, rank, scale, rmax = pack_loras(As, Bs, [0.5, 2.0], device=DEVICE)
    W = (torch.randn(N, K, generator=g) / K**0.5).to(DEVICE, dtype)
    b = torch.randn(N, generator=g).to(DEVICE, dtype)
    x = torch.randn(7, 2 * K, generator=g).to(DEVICE, dtype)[:, ::2]
    slots = [0, -1, 1, 1, -1, 0, 1]
    row_slot = torch.tensor(slots, dtype=torch.int32, device=DEVICE)
    sl = multi._Slots(off, rank, scale, torch.zeros(2, device=DEVICE), False, 0)
    y, u = multi._decode_pair(x, W, b, pool_A, pool_BT, row_slot, sl, rmax)
    xd = x.double()
    u_ref = torch.zeros(7, rmax, dtype=torch.float64, device=DEVICE)
    y_ref = torch.nn.functional.linear(xd, W.double(), b.double())
    for m, s in enumerate(slots):
        if s >= 0:
            u_ref[m, :As[s].shape[0]] = (0.5, 2.0)[s] * xd[m] @ As[s].double().t()
            y_ref[m] += u_ref[m, :As[s].shape[0]] @ Bs[s].double().t()
    assert rel_err(u, u_ref) < 1e-5
    assert torch.equal(u[1], torch.zeros_like(u[1])) and torch.equal(u[2, 3:], torch.zeros_like(u[2, 3:]))
    assert rel_err(y, y_ref) < TOL[dtype]
    y2, u2 = multi._decode_pair(x, W, b, pool_A, pool_BT, row_slot, sl, rmax)
    assert torch.equal(y, y2) and torch.equal(u, u2)
    assert dispatched("multi.") == {"multi.forward:triton:bgmv-decode": 2}


@pytest.mark.parametrize("M,base", [(6, "cublas"), (40, "cublas"), (40, "fused")], indirect=["base"])
def test_forward_backward_all_grads(triton_backend, M, base):
    """fp32 and fp16, BGMV and SGMV: y, dx, dW, db and every adapter's dA, dB against float64."""
    for dtype in (torch.float32, torch.float16):
        layer, names = make_layer(33, 26, [1, 3, 8, 20], dtype, seed=M)
        x = torch.randn(M, 33, device=DEVICE, dtype=dtype, requires_grad=True)
        ids = draw_ids(layer, names, M, seed=M + 1)
        ids[:4] = torch.tensor([layer.adapter_id(n) for n in names])  # every adapter has rows
        fusedlora.reset_dispatch()
        y = layer(x, adapter_ids=ids)
        gy = torch.randn_like(y)
        y.backward(gy)
        y_ref, xd, p = reference_multi(layer, names, x, ids, gy)
        tol = TOL[dtype]
        assert rel_err(y, y_ref) < tol
        assert rel_err(x.grad, xd.grad) < tol
        for k, prm in layer.named_parameters():
            assert rel_err(prm.grad, p[k].grad) < tol, k
        ran = dispatched("multi.")
        for op in ("multi.grad_A:triton:grouped", "multi.grad_B:triton:grouped"):
            assert op in ran, ran
        assert any(k.startswith("multi.grad_x:triton:" + via(base, M)) for k in ran), ran
        assert any(k.startswith("multi.forward:triton:" + via(base, M)) for k in ran), ran


@pytest.mark.parametrize("seg_dot_max,base", [(2, "fused"), (0, "fused"), (2, "cublas"), (0, "cublas")],
                         indirect=["base"])
def test_fragmented_sorted_tiles_and_per_row_ids_3d(triton_backend, monkeypatch, seg_dot_max, base):
    """Six adapters, 2-3 rows each: sorted tiles meet more than SEG_DOT_MAX segments and take
    the in-tile gather (2), or one dot per segment however many (0, the GPU's epilogue);
    per-row ids on a 3-D input."""
    monkeypatch.setattr(multi, "SEG_DOT_MAX_INTERPRET", seg_dot_max)
    layer, names = make_layer(24, 20, [2, 5, 1, 7, 3, 16])
    layer.eval()
    ids = torch.tensor([layer.adapter_id(n) for n in names] * 3 + [-1, -1], device=DEVICE)
    ids = ids[torch.randperm(20, generator=torch.Generator().manual_seed(1))].reshape(4, 5)
    x = torch.randn(4, 5, 24, device=DEVICE)
    with torch.no_grad():
        y = layer(x, adapter_ids=ids)
    assert y.shape == (4, 5, 20)
    assert rel_err(y, reference_multi(layer, names, x, ids)[0]) < TOL[torch.float32]
    assert rel_err(y, rowwise_single(layer, x, ids)) < TOL[torch.float32]
    assert f"multi.forward:triton:{via(base, 20)}sgmv" in dispatched()


def test_per_sample_ids_3d_noncontiguous_odd_shapes_no_bias(triton_backend):
    layer, names = make_layer(33, 17, [3, 1], bias=False)
    wide = torch.randn(3, 7, 66, device=DEVICE)
    x = wide[..., ::2].requires_grad_()                      # stride 2 along K
    assert not x.is_contiguous()
    ids = torch.tensor([layer.adapter_id(names[1]), -1, layer.adapter_id(names[0])], device=DEVICE)
    y = layer(x, adapter_ids=ids)                           # one id per sample
    assert y.shape == (3, 7, 17)
    gy = torch.randn_like(y)
    y.backward(gy)
    rows = ids[:, None].expand(3, 7)
    y_ref, xd, p = reference_multi(layer, names, x, rows, gy)
    assert rel_err(y, y_ref) < TOL[torch.float32]
    assert rel_err(x.grad, xd.grad) < TOL[torch.float32]
    for n in names:
        assert rel_err(layer.lora_A[n].grad, p[f"lora_A.{n}"].grad) < TOL[torch.float32]
    assert rel_err(y[1], rowwise_single(layer, x[1:2], rows[1:2])[0]) < 1e-6   # -1: the base layer


def test_zero_rows_and_all_base(triton_backend):
    layer, names = make_layer(20, 12, [4, 2])
    x = torch.randn(0, 20, device=DEVICE, requires_grad=True)
    y = layer(x, adapter_ids=torch.zeros(0, dtype=torch.long, device=DEVICE))
    assert y.shape == (0, 12)
    y.sum().backward()
    # no row used the adapters: zero gradients, not None (docs/multi.md: DDP's default needs one)
    assert x.grad.shape == (0, 20) and layer.lora_A[names[0]].grad.abs().sum() == 0
    x = torch.randn(3, 4, 20, device=DEVICE)
    with torch.no_grad():
        y = layer(x, adapter_ids=torch.full((3,), -1, device=DEVICE))
    assert rel_err(y, nn.functional.linear(x, layer.weight, layer.bias)) < 1e-6


# ----------------------------------------------------------- ids and pool
def test_routed_forward_on_the_meta_device_traces_shapes():
    """A model built on the meta device (init_empty_weights, shape tracing): routed rows give
    meta outputs of the right shape, with or without validation (no values to check) and
    through use_adapters; the graph is recorded when a parameter needs grad."""
    layer = FusedLinear(16, 8, device="meta")
    layer.add_lora("meta_a", r=2)
    layer.add_c3a("meta_c", block_size=4)
    layer.add_sparse("meta_s", random_indices((8, 16), density=0.1, seed=0))
    ids = torch.tensor([layer.adapter_id("meta_a"), -1, layer.adapter_id("meta_c")], device="meta")
    x = torch.randn(3, 5, 16, device="meta")
    for validate in (True, False):
        for grad in (True, False):
            with torch.set_grad_enabled(grad):
                y = layer(x, adapter_ids=ids, validate=validate)
            assert y.shape == (3, 5, 8) and y.is_meta and y.requires_grad == grad
    with fusedlora.use_adapters(nn.Sequential(layer), ids):
        assert layer(x).shape == (3, 5, 8)
    layer.set_adapter("meta_s")  # the active sparse adapter (its layout from meta indices)
    assert layer(x).shape == (3, 5, 8)
    with pytest.raises(ValueError, match="meta device"):
        layer.merge()
    assert not layer.merged_adapters


def test_global_ids_stable_across_layers_and_deletes(triton_backend):
    l1 = FusedLinear(16, 8, device=DEVICE)
    l2 = FusedLinear(8, 16, device=DEVICE)
    l1.add_lora("gid_x", r=2)
    l2.add_lora("gid_y", r=3)
    l2.add_lora("gid_x", r=4)
    l1.add_lora("gid_y", r=1)
    ix, iy = l1.adapter_id("gid_x"), l1.adapter_id("gid_y")
    assert ix != iy and l2.adapter_id("gid_x") == ix and l2.adapter_id("gid_y") == iy
    assert fusedlora.adapter_id("gid_x") == ix
    l1.delete_adapter("gid_x")
    assert l1.adapter_id("gid_y") == iy and l2.adapter_id("gid_x") == ix
    with pytest.raises(ValueError, match="unknown adapter 'gid_x'"):
        l1.adapter_id("gid_x")
    l1.add_lora("gid_x", r=5)                   # re-added: the same id as before
    assert l1.adapter_id("gid_x") == ix


def test_pool_growth_delete_and_sync_are_amortised(triton_backend):
    layer, names = make_layer(16, 12, [(i % 4) + 1 for i in range(24)])
    layer.eval()
    x = torch.randn(40, 16, device=DEVICE)

    def check():
        live = layer.adapter_names
        ids = draw_ids(layer, live, 40, seed=len(live))
        with torch.no_grad():
            y = layer(x, adapter_ids=ids)
        assert rel_err(y, reference_multi(layer, live, x, ids)[0]) < TOL[torch.float32]

    check()
    pool = layer._multi_pool
    total = sum(layer.r.values())
    assert pool.copied_rows == total
    for n in names[::2]:                        # delete half: holes, then one compaction
        layer.delete_adapter(n)
    check()
    assert pool.used <= 2 * sum(layer.r.values())
    assert pool.copied_rows <= 2 * total        # only live rows moved, once
    before = pool.copied_rows
    with torch.no_grad():                       # an optimizer-style in-place update of one adapter
        layer.lora_B[names[1]].mul_(2.0)
    check()
    assert pool.copied_rows == before + layer.r[names[1]]
    layer.add_lora("late", r=6, init_lora_weights=False)
    check()
    assert pool.copied_rows == before + layer.r[names[1]] + 6


def test_pool_resyncs_after_fused_optimizer_steps_and_data_assignment(torch_backend):
    """The serving pool is a copy of the parameters: writes that bump no version counter (a
    fused optimizer step, ``p.data = t``) must not leave it stale."""
    layer, names = make_layer(16, 12, [2, 3])
    layer.weight.requires_grad_(False)
    layer.bias.requires_grad_(False)
    x = torch.randn(4, 16, device=DEVICE)
    ids = torch.tensor([layer.adapter_id(names[0]), -1, layer.adapter_id(names[1]), layer.adapter_id(names[0])],
                       device=DEVICE)

    def check():
        with torch.no_grad():
            assert rel_err(layer(x, adapter_ids=ids), rowwise_single(layer, x, ids)) < TOL[torch.float32]

    check()                                     # builds the pool
    opt = torch.optim.AdamW([p for p in layer.parameters() if p.requires_grad], lr=0.1, fused=True)
    layer(x, adapter_ids=ids).square().sum().backward()
    versions = [p._version for p in layer.parameters()]
    opt.step()
    assert [p._version for p in layer.parameters()] == versions   # the step bumped no version
    check()
    layer.lora_B[names[1]].data = torch.randn(12, 3, device=DEVICE)
    check()
    # train, freeze, serve: a fused step taken while trainable, the adapter frozen before the
    # next routed forward (the pool must not take "frozen" for "no optimizer stepped it")
    layer(x).square().sum().backward()  # the active adapter
    opt.step()
    for p in layer.parameters():
        p.requires_grad_(False)
    check()


def test_pool_kept_for_a_backward_survives_an_unrelated_optimizer_step(triton_backend):
    """Frozen LoRA adapters (the serving pool serves, also in grad mode) and a trained base:
    an optimizer step elsewhere between a forward and its backward moved the pool's key,
    and the next routed forward rewrote the pool in place (same values): the first graph's
    backward then raised. An unchanged adapter is no longer written again."""
    layer, names = make_layer(16, 12, [2, 3], seed=1)
    for n in names:
        layer.lora_A[n].requires_grad_(False)
        layer.lora_B[n].requires_grad_(False)
    other = nn.Linear(4, 4)
    other_opt = torch.optim.SGD(other.parameters(), lr=0.1)
    ids = torch.tensor([layer.adapter_id(names[i % 2]) for i in range(6)], device=DEVICE)
    x1, x2 = torch.randn(6, 16, device=DEVICE), torch.randn(6, 16, device=DEVICE)
    y1 = layer(x1, adapter_ids=ids)
    other(torch.randn(2, 4)).sum().backward()
    other_opt.step()
    copied = layer._multi_pool.copied_rows
    y2 = layer(x2, adapter_ids=ids)
    (y1.sum() + y2.sum()).backward()
    assert layer._multi_pool.copied_rows == copied
    assert rel_err(layer.weight.grad, torch.ones(6, 12, device=DEVICE).t() @ (x1 + x2)) < TOL[torch.float32]


def test_tables_that_would_corrupt_gradients_or_reads_are_refused(triton_backend):
    """Two slots sharing pool rows (their pool gradients would overwrite each other), and a
    LoRA factor replaced by one of another rank than the layer recorded (the tables, sized by
    layer.r, would read past the pool): clear ValueErrors."""
    from fusedlora.routing import pack_loras

    A, B = torch.randn(4, 8, device=DEVICE), torch.randn(6, 4, device=DEVICE)
    pool_A, pool_BT, off, rank, scale, rmax = pack_loras([A], [B], [1.0], device=DEVICE)
    two = dict(slot_off=torch.tensor([0, 0], dtype=torch.int32, device=DEVICE),
               slot_rank=torch.tensor([4, 2], dtype=torch.int32, device=DEVICE),
               slot_scale=torch.tensor([1.0, 0.5], device=DEVICE))
    x = torch.randn(3, 8, device=DEVICE)
    slot = torch.tensor([0, 1, -1], dtype=torch.int32, device=DEVICE)
    W = torch.randn(6, 8, device=DEVICE)
    with pytest.raises(ValueError, match="share pool rows"):
        multi.multi_lora_linear(x, W, None, slot, pool_A.requires_grad_(), pool_BT, **two)
    with torch.no_grad():  # shared rows are fine where no pool gradient is taken: one adapter at two scales
        y = multi.multi_lora_linear(x, W, None, slot, pool_A, pool_BT, **two)
    want = x @ W.t()
    want[0] += (x[0] @ A.t()) @ B.t()
    want[1] += 0.5 * (x[1] @ A[:2].t()) @ B[:, :2].t()
    assert rel_err(y, want) < TOL[torch.float32]
    layer, names = make_layer(16, 12, [8, 3], seed=2)
    layer.lora_A[names[0]] = nn.Parameter(torch.randn(2, 16, device=DEVICE))
    layer.lora_B[names[0]] = nn.Parameter(torch.randn(12, 2, device=DEVICE))
    ids = torch.tensor([layer.adapter_id(names[0]), -1], device=DEVICE)
    for grad in (False, True):
        with torch.set_grad_enabled(grad), pytest.raises(ValueError, match="rank 8 as added"):
            layer(torch.randn(2, 16, device=DEVICE), adapter_ids=ids)


def test_bad_ids_raise_and_validate_false_skips(triton_backend):
    layer, names = make_layer(16, 12, [2])
    other = FusedLinear(4, 4)
    other.add_lora("only_elsewhere", r=1)
    x = torch.randn(4, 16, device=DEVICE)
    bad = torch.tensor([layer.adapter_id(names[0]), other.adapter_id("only_elsewhere"), -1, 10**6], device=DEVICE)
    with pytest.raises(ValueError, match="name no adapter of this layer") as info:
        layer(x, adapter_ids=bad)
    assert "only_elsewhere" in str(info.value) and str(10**6) in str(info.value)
    with pytest.raises(ValueError, match="name no adapter"):
        layer(x, adapter_ids=torch.tensor([-2, -1, -1, -1], device=DEVICE))
    fusedlora.reset_dispatch()
    with torch.no_grad():
        y = layer(x, adapter_ids=bad, validate=False)   # no check: unknown ids act as -1
        ok = layer(x, adapter_ids=torch.tensor([bad[0].item(), -1, -1, -1], device=DEVICE))
    assert torch.allclose(y, ok)
    with pytest.raises(TypeError, match="integer"):
        layer(x, adapter_ids=torch.zeros(4))
    with pytest.raises(ValueError, match="one id per sample"):
        layer(x, adapter_ids=torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="device"):
        layer(x, adapter_ids=torch.zeros(4, dtype=torch.long, device="meta"))
    layer.merge()
    with pytest.raises(ValueError, match="unmerge"):
        layer(x, adapter_ids=bad[:1].expand(4))
    layer.unmerge()


@pytest.mark.parametrize("backend,M,base", [("triton", 6, "cublas"), ("triton", 40, "cublas"), ("triton", 40, "fused"),
                                            ("torch", 12, "cublas")], indirect=["base"])
def test_dropout_in_training_per_adapter(monkeypatch, backend, M, base):
    """Each adapter's own lora_dropout on its rows, drawn from one seed as the single-adapter
    path draws it (kernel mask = ops.dropout_keep_mask at that adapter's p); all gradients."""
    monkeypatch.setenv("FUSEDLORA_BACKEND", backend)
    fusedlora.reset_dispatch()
    layer, names = make_layer(24, 18, [3, 5, 2], seed=M)
    for n, p in zip(names, (0.3, 0.0, 0.6)):
        layer.lora_dropout[n] = p
    layer.train()
    x = torch.randn(M, 24, device=DEVICE, requires_grad=True)
    ids = draw_ids(layer, names, M, seed=M)
    torch.manual_seed(77)
    y = layer(x, adapter_ids=ids)
    torch.manual_seed(77)
    seed = int(torch.randint(0, 2**31 - 1, (), dtype=torch.int64))
    gy = torch.randn_like(y)
    y.backward(gy)
    p = {k: v.detach().double().requires_grad_() for k, v in layer.named_parameters()}
    xd = x.detach().double().requires_grad_()
    rows = []
    for m, i in enumerate(ids.tolist()):
        row = nn.functional.linear(xd[m], p["weight"], p["bias"])
        n = name_of(i)
        if n is not None:
            q = layer.lora_dropout[n]
            keep = fusedlora.ops.dropout_keep_mask((M, 24), q, seed, DEVICE)[m].double()
            xm = xd[m] * keep / (1 - q)
            row = row + layer.scaling[n] * p[f"lora_B.{n}"] @ (p[f"lora_A.{n}"] @ xm)
        rows.append(row)
    y_ref = torch.stack(rows)
    y_ref.backward(gy.double())
    assert rel_err(y, y_ref) < TOL[torch.float32]
    assert rel_err(x.grad, xd.grad) < TOL[torch.float32]
    for k, prm in layer.named_parameters():
        assert rel_err(prm.grad, p[k].grad) < TOL[torch.float32], k
    with torch.no_grad():   # eval: no dropout
        assert rel_err(layer.eval()(x, adapter_ids=ids), reference_multi(layer, names, x, ids)[0]) < TOL[torch.float32]


# ------------------------------------------------------ C3A and sparse rows
@pytest.mark.parametrize("backend,validate", [("triton", True), ("triton", False), ("torch", True), ("torch", False)])
def test_mixed_kinds_lora_c3a_sparse(monkeypatch, backend, validate):
    monkeypatch.setenv("FUSEDLORA_BACKEND", backend)
    fusedlora.reset_dispatch()
    layer, names = make_layer(32, 24, [3, 8])
    layer.add_c3a("c3", block_size=8, init_weights="gaussian")
    idx = random_indices((24, 32), density=0.1, seed=4)
    layer.add_sparse("sp", idx, torch.randn(idx.shape[1]), scaling=0.7)
    kinds = names + ["c3", "sp"]
    M = 24
    ids = draw_ids(layer, kinds, M, seed=9)
    ids[:5] = torch.tensor([layer.adapter_id(n) for n in kinds] + [-1])
    x = torch.randn(M, 32, device=DEVICE, requires_grad=True)
    y = layer(x, adapter_ids=ids, validate=validate)
    assert rel_err(y, rowwise_single(layer, x.detach(), ids)) < TOL[torch.float32]
    ran = dispatched("multi.")
    # validate=True counted the rows per slot on the host: slices of one device sort; without
    # it, all rows masked (no host sync), except on the torch backend (rows picked on the host)
    how = "sorted" if validate else "masked" if backend == "triton" else "gathered"
    assert {f"multi.c3a_delta:torch:{how}", f"multi.sparse_delta:torch:{how}"} <= set(ran), ran
    assert any(k.startswith(f"multi.forward:{backend}") for k in ran)
    gy = torch.randn_like(y)
    y.backward(gy)
    # float64 oracle: per row, its own dense weight
    d = {k: v.detach().double() for k, v in layer.state_dict().items()}
    kc = layer.c3a_kernel["c3"].detach().double().requires_grad_()
    vs = layer.sparse_values["sp"].detach().double().requires_grad_()
    xd = x.detach().double()
    out = []
    for m, i in enumerate(ids.tolist()):
        n = name_of(i)
        W = d["weight"]
        if n == "c3":
            W = W + reference.c3a_delta_weight(kc, 32, 24)
        elif n == "sp":
            W = W + reference.sparse_delta_weight(idx, vs, 0.7, (24, 32))
        row = nn.functional.linear(xd[m], W, d["bias"])
        if n in names:
            row = row + layer.scaling[n] * d[f"lora_B.{n}"] @ (d[f"lora_A.{n}"] @ xd[m])
        out.append(row)
    torch.stack(out).backward(gy.double())
    assert rel_err(layer.c3a_kernel["c3"].grad, kc.grad) < TOL[torch.float32]
    assert rel_err(layer.sparse_values["sp"].grad, vs.grad) < TOL[torch.float32]
    assert layer.lora_A[names[0]].grad is not None and x.grad is not None


# -------------------------------------------------------------- use_adapters
def _model():
    torch.manual_seed(3)
    model = nn.Sequential(FusedLinear(16, 24), nn.GELU(), FusedLinear(24, 24), nn.GELU(), FusedLinear(24, 8))
    model[0].add_lora("ua_a", r=2, init_lora_weights=False)
    model[0].add_lora("ua_b", r=6, init_lora_weights=False)
    model[2].add_lora("ua_b", r=3, init_lora_weights=False)   # ua_a absent here: base for its rows
    model[4].add_lora("ua_a", r=5, init_lora_weights=False)
    return model.to(DEVICE).eval()


def _per_sample(model, x, names):
    out = []
    for xi, n in zip(x, names):
        for m in model:
            if isinstance(m, FusedLinear):
                m.set_adapter(n if n in m.adapter_names else None)
        with torch.no_grad():
            out.append(model(xi[None])[0])
    return torch.stack(out)


def test_use_adapters_routes_a_sequential(triton_backend):
    model = _model()
    names = ["ua_b", None, "ua_a", "ua_b"]
    ids = torch.tensor([fusedlora.adapter_id(n) if n else -1 for n in names], device=DEVICE)
    x = torch.randn(4, 3, 16, device=DEVICE)
    with torch.no_grad(), fusedlora.use_adapters(model, ids) as m:
        assert m is model
        y = model(x)
    ref = _per_sample(model, x, names)
    assert rel_err(y, ref) < TOL[torch.float32]
    assert all(m._multi_route is None for m in model if isinstance(m, FusedLinear))
    with pytest.raises(ValueError, match="no adapter of any FusedLinear"):
        with fusedlora.use_adapters(model, torch.tensor([10**6], device=DEVICE)):
            pass
    for m in model:
        if isinstance(m, FusedLinear):
            m.set_adapter(None)
    with torch.no_grad():   # outside the scope: the plain layers again
        assert rel_err(model(x), _per_sample(model, x, [None] * 4)) < 1e-6


def test_use_adapters_nested_exception_and_deleted_ids(torch_backend):
    """Nested scopes route by the innermost ids and restore the outer ones; an exception
    inside restores them; deleting an adapter (then adding others) keeps the survivors'
    ids, and its old id is refused by name at both levels."""
    model = _model()
    x = torch.randn(3, 16, device=DEVICE)
    outer, inner = ["ua_a", None, "ua_b"], ["ua_b", "ua_b", None]
    ids = {tuple(n): torch.tensor([fusedlora.adapter_id(a) if a else -1 for a in n], device=DEVICE)
           for n in (outer, inner)}
    with torch.no_grad(), fusedlora.use_adapters(model, ids[tuple(outer)]):
        with fusedlora.use_adapters(model, ids[tuple(inner)]):
            y_inner = model(x)
        y_outer = model(x)
        with pytest.raises(KeyError):
            with fusedlora.use_adapters(model, ids[tuple(inner)]):
                raise KeyError("inside")
        assert torch.equal(model(x), y_outer)
    assert all(m._multi_route is None for m in model if isinstance(m, FusedLinear))
    assert rel_err(y_inner, _per_sample(model, x, inner)) < 1e-6
    assert rel_err(y_outer, _per_sample(model, x, outer)) < 1e-6
    id_a, id_b = fusedlora.adapter_id("ua_a"), fusedlora.adapter_id("ua_b")
    for m in (model[0], model[4]):
        m.delete_adapter("ua_a")
        m.add_lora("ua_new", r=2)
    assert model[0].adapter_id("ua_b") == model[2].adapter_id("ua_b") == id_b
    assert model[0].adapter_id("ua_new") == model[4].adapter_id("ua_new") not in (id_a, id_b)
    with pytest.raises(ValueError, match=r"'ua_a'\) name no adapter of any FusedLinear"):
        with fusedlora.use_adapters(model, torch.tensor([id_a], device=DEVICE)):
            pass
    with pytest.raises(ValueError, match=r"'ua_a', not in this layer"):
        model[0](x[:1], adapter_ids=torch.tensor([id_a], device=DEVICE))


def test_use_adapters_ids_changed_in_place_are_checked_again(torch_backend):
    """A serving loop that reuses its ids buffer inside one scope: the ids checked at entry
    must not narrow the C3A / sparse deltas to the old batch, nor let an unknown id through."""
    model = _model()
    model[2].add_c3a("ua_c", block_size=4, init_weights="gaussian")
    x = torch.randn(3, 16, device=DEVICE)
    names = ["ua_a", None, "ua_b"]
    ids = torch.tensor([fusedlora.adapter_id(n) if n else -1 for n in names], device=DEVICE)
    with torch.no_grad(), fusedlora.use_adapters(model, ids):
        y0 = model(x)
        ids[1] = fusedlora.adapter_id("ua_c")   # the next step's batch, in place
        y1 = model(x)
        ids[0] = 10**6
        with pytest.raises(ValueError, match="no adapter of any FusedLinear"):
            model(x)
    assert rel_err(y0, _per_sample(model, x, names)) < 1e-6
    assert rel_err(y1, _per_sample(model, x, ["ua_a", "ua_c", "ua_b"])) < 1e-6


def _stack(orders):
    """FusedLinear(16, 16) layers holding adapters sh_a (r=2) and sh_b (r=5) in the given orders."""
    torch.manual_seed(4)
    layers = []
    for order in orders:
        m = FusedLinear(16, 16)
        for n in order:
            m.add_lora(n, r={"sh_a": 2, "sh_b": 5}[n], init_lora_weights=False)
        layers.append(m)
    return nn.Sequential(*layers).to(DEVICE)


def test_use_adapters_layers_share_one_routing_per_pass(triton_backend, monkeypatch):
    """The layers of a use_adapters forward pass that hold the same adapters in the same
    order share the first one's row slots and sort (one route per pass, not per layer);
    a layer in another order routes itself; the next pass routes again, so ids changed in
    place between passes are seen, inference tensors included. Outputs and gradients equal
    the per-layer routed calls."""
    model = _stack([("sh_a", "sh_b")] * 3 + [("sh_b", "sh_a")])
    ids_of = lambda names: [fusedlora.adapter_id(n) if n else -1 for n in names]  # noqa: E731
    names = ["sh_b", None, "sh_a", "sh_a", "sh_b", None, "sh_b", "sh_a"] * 3  # 24 rows: sorted (SGMV) path
    x = torch.randn(len(names), 16, device=DEVICE)
    routes = []
    real = multi.route
    monkeypatch.setattr(multi, "route", lambda *a, **k: routes.append(a[0].shape[0]) or real(*a, **k))

    def per_layer(x, ids):
        for m in model:
            x = m(x, adapter_ids=ids)
        return x

    with torch.inference_mode():
        ids = torch.tensor(ids_of(names), device=DEVICE)
        want = per_layer(x, ids)
        routes.clear()
        with fusedlora.use_adapters(model, ids, validate=False):
            got = model(x)
            assert len(routes) == 2, routes  # the first layer, and the one in the other order
            ids[:4] = torch.tensor(ids_of(["sh_a", "sh_a", None, "sh_b"]), device=DEVICE)  # the next batch, in place
            got2 = model(x)
            assert len(routes) == 4, routes
        assert rel_err(got, want) < TOL[torch.float32]
        assert rel_err(got2, per_layer(x, ids)) < TOL[torch.float32]
        # a layer used twice (tied) and a submodule called on its own: a pass is one forward
        # of the scope's model, so neither keeps a previous pass's row slots
        tied = nn.Sequential(model[0], model[1], model[1])
        with fusedlora.use_adapters(tied, ids, validate=False):
            tied(x)
            ids[:4] = torch.tensor(ids_of(["sh_b", None, "sh_a", "sh_a"]), device=DEVICE)
            y_tied = tied(x)
            routes.clear()
            y_sub = tied[1](x)
            ids[:4] = torch.tensor(ids_of([None, "sh_b", "sh_b", "sh_a"]), device=DEVICE)
            y_sub2 = tied[1](x)
            assert len(routes) == 2  # outside a pass of the model: each call routes itself
        ids_then = torch.tensor(ids_of(["sh_b", None, "sh_a", "sh_a"]) + ids_of(names)[4:], device=DEVICE)
        want_tied = x
        for m in tied:
            want_tied = m(want_tied, adapter_ids=ids_then)
        assert rel_err(y_tied, want_tied) < TOL[torch.float32]
        assert rel_err(y_sub, model[1](x, adapter_ids=ids_then)) < TOL[torch.float32]
        assert rel_err(y_sub2, model[1](x, adapter_ids=ids)) < TOL[torch.float32]
    # training: the backward's grouped gradients read the shared routing too
    ids = torch.tensor(ids_of(names), device=DEVICE)
    xg = x.clone().requires_grad_()
    with fusedlora.use_adapters(model, ids):
        model(xg).square().sum().backward()
    grads = [p.grad.clone() for p in model.parameters() if p.requires_grad and p.grad is not None] + [xg.grad]
    model.zero_grad()
    xg.grad = None
    per_layer(xg, ids).square().sum().backward()
    want_grads = [p.grad for p in model.parameters() if p.requires_grad and p.grad is not None] + [xg.grad]
    assert len(grads) == len(want_grads) > 5
    assert all(rel_err(g, w) < TOL[torch.float32] for g, w in zip(grads, want_grads))


@pytest.mark.parametrize("reentrant", [False, True])
def test_checkpointed_forward_recomputed_outside_its_scope_is_refused(torch_backend, reentrant):
    """Gradient checkpointing recomputes forwards in backward. Inside the scope (per layer or
    a block of layers) they route by its ids: the gradients of the step without checkpoints.
    After the scope exited, a recomputation would route by the active adapters instead (wrong
    gradients with reentrant checkpoints): refused with the way out. Unscoped training with
    scoped evaluations between steps is unaffected."""
    from torch.utils.checkpoint import checkpoint

    model = _stack([("sh_a", "sh_b")] * 2)
    ids = torch.tensor([fusedlora.adapter_id(n) for n in ["sh_a", "sh_b", "sh_a", "sh_b"]], device=DEVICE)
    x = torch.randn(4, 16, device=DEVICE)

    def step(ckpt, inside=True):
        model.zero_grad()
        with fusedlora.use_adapters(model, ids):
            h = x.detach().requires_grad_()  # reentrant checkpoints need an input that does
            if ckpt == "block":
                h = checkpoint(model, h, use_reentrant=reentrant)
            else:
                for m in model:
                    h = checkpoint(m, h, use_reentrant=reentrant) if ckpt else m(h)
            loss = h.square().sum()
            if inside:
                loss.backward()
        if not inside:
            loss.backward()
        return [p.grad.clone() for p in model.parameters() if p.grad is not None]

    want = step(False)
    for ckpt in ("layer", "block"):
        got = step(ckpt)
        assert len(got) == len(want) > 0 and all(rel_err(g, w) < TOL[torch.float32] for g, w in zip(got, want))
        with pytest.raises(RuntimeError, match="outside any scope: call backward"):
            step(ckpt, inside=False)
    assert all(rel_err(g, w) < TOL[torch.float32] for g, w in zip(step(False, inside=False), want))
    # unscoped single-adapter training; a scoped evaluation (no_grad) between steps, or between
    # a forward and its backward (a reference pass): not a forward a recomputation replays
    for m in model:
        m.set_adapter("sh_a")
    model.zero_grad()
    model(x.detach().requires_grad_()).square().sum().backward()
    want = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    for _ in range(2):
        model.zero_grad()
        h = x.detach().requires_grad_()
        for m in model:
            h = checkpoint(m, h, use_reentrant=reentrant)
        with torch.no_grad(), fusedlora.use_adapters(model, ids):
            model(x)
        h.square().sum().backward()
        got = [p.grad.clone() for p in model.parameters() if p.grad is not None]
        assert all(rel_err(g, w) < TOL[torch.float32] for g, w in zip(got, want))
        with torch.no_grad(), fusedlora.use_adapters(model, ids):
            model(x)


def test_plain_reentrant_checkpoint_step_after_a_routed_step(torch_backend):
    """A reentrant checkpoint's first pass runs under no_grad, and a layer behind a LayerNorm
    sees an input that does not require grad: that pass cannot tell the layer its last forward
    was not routed. The model's next training pass outside any scope does (its pass hook):
    the plain step's recomputation is not refused, and its gradients are the step's without
    checkpoints."""
    from torch.utils.checkpoint import checkpoint

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.ln, self.fc, self.ckpt = nn.LayerNorm(16), FusedLinear(16, 16), False
            self.fc.add_lora("ck_a", r=2, init_lora_weights=False)

        def body(self, h):
            return self.fc(self.ln(h))

        def forward(self, h):
            return checkpoint(self.body, h, use_reentrant=True) if self.ckpt else self.body(h)

    torch.manual_seed(0)
    model, x = Block(), torch.randn(4, 16, requires_grad=True)
    with fusedlora.use_adapters(model, torch.full((4,), model.fc.adapter_id("ck_a"))):
        model(x).sum().backward()
    grads = {}
    for ckpt in (True, False):  # the checkpointed step right after the routed one
        model.zero_grad()
        model.ckpt = ckpt
        model(x).square().sum().backward()
        grads[ckpt] = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    assert len(grads[True]) == len(grads[False]) > 0
    assert all(rel_err(g, w) < TOL[torch.float32] for g, w in zip(grads[True], grads[False]))


def test_use_adapters_eager_decode_builds_its_gather_plan_once_per_pass(monkeypatch):
    """The eager gather (auto's eager path for decode rows) derives each row's pool rows,
    rank mask and scale from the row slots and the layer's tables: layers sharing both (same
    adapters at the same pool rows: their tables are shared by content) build it once per
    pass; a layer whose adapters sit elsewhere builds its own. Outputs as per layer."""
    monkeypatch.setenv("FUSEDLORA_BACKEND", "eager")
    fusedlora.reset_dispatch()
    model = _stack([("sh_a", "sh_b")] * 3 + [("sh_b", "sh_a")])
    names = ["sh_b", None, "sh_a", "sh_a", "sh_b"]
    ids = torch.tensor([fusedlora.adapter_id(n) if n else -1 for n in names], device=DEVICE)
    x = torch.randn(len(names), 16, device=DEVICE)
    built = []
    real = multi.shared_plan
    monkeypatch.setattr(multi, "shared_plan", lambda row_slot, key, build: real(
        row_slot, key, lambda: built.append(key[0]) or build()))
    with torch.no_grad():
        want = x
        for m in model:
            want = m(want, adapter_ids=ids)
        assert built.count("gather") == 4  # unshared: one per layer
        built.clear()
        with fusedlora.use_adapters(model, ids, validate=False):
            got = model(x)
        assert built.count("gather") == 2, built
        assert model[0]._multi_cache[2][0] is model[1]._multi_cache[2][0]  # the same Tables object
    assert dispatched("multi.forward") == {"multi.forward:eager:gather": 8}
    assert rel_err(got, want) < TOL[torch.float32]


def test_compiled_model_compiles_once_across_use_adapters_scopes(torch_backend):
    """use_adapters marks a forward pass with hooks on the model registered once and kept:
    new hooks per scope would fail Dynamo's guards, recompiling at every scope (and, past
    the recompile limit, running uncompiled or failing under fullgraph)."""
    import torch._dynamo.testing

    torch._dynamo.reset()
    model = _model()
    counter = torch._dynamo.testing.CompileCounterWithBackend("eager")
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    x = torch.randn(4, 3, 16, device=DEVICE)
    ids = torch.tensor([fusedlora.adapter_id(n) for n in ["ua_a", "ua_b", "ua_a", "ua_b"]], device=DEVICE)
    with torch.no_grad():
        for _ in range(10):
            with fusedlora.use_adapters(model, ids):
                y = compiled(x)
                assert rel_err(y, model(x)) < 1e-6
    assert counter.frame_count == 1
    assert len(model._forward_pre_hooks) == 1 and len(model._forward_hooks) == 1


def test_a_copy_made_inside_a_scope_is_not_routed_by_it(torch_backend):
    import copy

    model = _stack([("sh_a", "sh_b")])
    ids = torch.tensor([fusedlora.adapter_id("sh_a")] * 2, device=DEVICE)
    x = torch.randn(2, 16, device=DEVICE)
    with fusedlora.use_adapters(model, ids):
        twin = copy.deepcopy(model)
    with torch.no_grad():
        assert rel_err(twin(x), model(x)) < 1e-6  # both unrouted: the base (no active adapter)
        assert twin[0]._multi_route is None


def test_pass_hooks_come_back_when_a_user_clears_them(torch_backend):
    """model._forward_hooks.clear() drops use_adapters' end-of-pass hook: the next scope
    registers the pair again, so passes still end and refilled ids are looked up afresh."""
    model = _stack([("sh_a", "sh_b")] * 2)
    x = torch.randn(3, 16, device=DEVICE)
    with torch.inference_mode():
        ids = torch.tensor([fusedlora.adapter_id(n) for n in ["sh_a", "sh_b", "sh_a"]], device=DEVICE)
        with fusedlora.use_adapters(model, ids):
            model(x)
        model._forward_hooks.clear()
        with fusedlora.use_adapters(model, ids):
            model(x)
            ids.copy_(torch.tensor([fusedlora.adapter_id(n) for n in ["sh_b", "sh_b", "sh_a"]], device=DEVICE))
            got = model(x)
        want = x
        for m in model:
            want = m(want, adapter_ids=ids)
    assert rel_err(got, want) < TOL[torch.float32]
    assert len(model._forward_pre_hooks) == 1 and len(model._forward_hooks) == 1


def test_shared_routing_is_only_for_routings_own_row_slots(triton_backend):
    """routing_of computes afresh for a tensor routing did not mark (a caller's, which may be
    changed in place), and forgets a marked tensor with it."""
    slots = torch.tensor([1, 0, -1, 1, 0], dtype=torch.int32, device=DEVICE)
    a = multi.routing_of(slots, 2)
    slots[0] = 0
    b = multi.routing_of(slots, 2)
    assert not torch.equal(a.perm, b.perm)
    mine = slots.clone()
    multi.share_routing(mine)
    assert multi.routing_of(mine, 2) is multi.routing_of(mine, 2)
    other = multi.routing_of(mine, 3)  # another slot count: computed once more, then kept
    assert other.ends.shape[0] == 4 and multi.routing_of(mine, 3) is other
    key = id(mine)
    del mine
    assert key not in multi._SHARED


def test_use_adapters_tiny_llama(triton_backend, monkeypatch):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=64, max_position_embeddings=32)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()

    def patch(mod):
        for name, child in mod.named_children():
            if isinstance(child, nn.Linear) and not isinstance(child, FusedLinear):
                setattr(mod, name, FusedLinear.from_linear(child))
            else:
                patch(child)
    patch(model)
    layers = model.model.layers
    for i, blk in enumerate(layers):
        blk.self_attn.q_proj.add_lora("llama_a", r=4, init_lora_weights=False)
        blk.self_attn.v_proj.add_lora("llama_b", r=2, init_lora_weights=False)
        blk.self_attn.v_proj.add_lora("llama_a", r=8, init_lora_weights=False)
    layers[1].mlp.down_proj.add_lora("llama_b", r=3, init_lora_weights=False)
    model.to(DEVICE)
    ids_of = {n: fusedlora.adapter_id(n) for n in ("llama_a", "llama_b")}
    names = ["llama_a", None, "llama_b"]
    ids = torch.tensor([ids_of[n] if n else -1 for n in names], device=DEVICE)
    tokens = torch.randint(0, 64, (3, 6), device=DEVICE)
    fusedlora.reset_dispatch()
    with torch.no_grad(), fusedlora.use_adapters(model, ids):
        logits = model(tokens).logits
    assert any(k.startswith("multi.forward:triton") for k in dispatched())
    monkeypatch.setenv("FUSEDLORA_BACKEND", "torch")   # the per-sample oracle on the reference path
    ref = []
    for t, n in zip(tokens, names):
        for m in model.modules():
            if isinstance(m, FusedLinear) and m.adapter_names:
                m.set_adapter(n if n in m.adapter_names else None)
        with torch.no_grad():
            ref.append(model(t[None]).logits[0])
    assert rel_err(logits, torch.stack(ref)) < 1e-5


# ---------------------------------------------------- torch backend, compile
def test_torch_backend_matches_reference_and_opcheck(torch_backend):
    layer, names = make_layer(20, 14, [2, 5])
    x = torch.randn(9, 20, requires_grad=True)
    ids = draw_ids(layer, names, 9, seed=2)
    y = layer(x, adapter_ids=ids)
    gy = torch.randn_like(y)
    y.backward(gy)
    y_ref, xd, p = reference_multi(layer, names, x, ids, gy)
    assert rel_err(y, y_ref) < 1e-5 and rel_err(x.grad, xd.grad) < 1e-5
    for k, prm in layer.named_parameters():
        assert rel_err(prm.grad, p[k].grad) < 1e-5, k
    assert all(":torch:" in k for k in dispatched()), dispatched()
    from fusedlora.multi import _multi_backward, _multi_forward
    from fusedlora.routing import pack_loras
    As = [layer.lora_A[n].detach() for n in names]
    Bs = [layer.lora_B[n].detach() for n in names]
    pool_A, pool_BT, off, rank, scale, rmax = pack_loras([None] + As, [None] + Bs, [0.0, 1.5, 0.5])
    slot = torch.tensor([0, 1, 2, -1, 2, 1, 1, 0, -1], dtype=torch.int32)
    drop = torch.tensor([0.0, 0.25, 0.0])
    for dropout in (False, True):
        seed = fusedlora.ops.draw_seed(0.25 if dropout else 0.0)
        args = (x.detach(), layer.weight.detach(), layer.bias.detach(), pool_A.requires_grad_(),
                pool_BT.requires_grad_(), slot, off, rank, scale, drop, rmax, dropout, seed)
        torch.library.opcheck(_multi_forward, args)
        u = torch.randn(9, rmax)
        torch.library.opcheck(_multi_backward, (gy, *args[:2], pool_A.detach(), pool_BT.detach(), u, slot, off, rank,
                                                scale, drop, rmax, dropout, seed, True, [True, False, True, True, True]))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_torch_compile_fullgraph(monkeypatch, backend):
    monkeypatch.setenv("FUSEDLORA_BACKEND", backend)
    torch._dynamo.reset()
    layer, names = make_layer(16, 12, [2, 4])
    ids = draw_ids(layer, names, 6, seed=5)

    def f(x, ids):
        return layer(x, adapter_ids=ids)
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    x = torch.randn(6, 16, requires_grad=True)
    y = compiled(x, ids)
    y.sum().backward()
    gA = layer.lora_A[names[1]].grad.clone()
    for prm in layer.parameters():
        prm.grad = None
    y_eager = f(x, ids)
    y_eager.sum().backward()
    assert rel_err(y, y_eager) < 1e-6 and rel_err(gA, layer.lora_A[names[1]].grad) < 1e-6
    with pytest.raises(RuntimeError, match="names no adapter"):
        compiled(x, torch.full((6,), 10**6))
    model = _model()
    cm = torch.compile(model, backend="aot_eager", fullgraph=True)
    x3 = torch.randn(4, 3, 16)
    for names in (["ua_b", None, "ua_a", "ua_b"], ["ua_a", "ua_a", None, "ua_b"]):
        ids = torch.tensor([fusedlora.adapter_id(n) if n else -1 for n in names])
        with torch.no_grad(), fusedlora.use_adapters(model, ids):
            assert rel_err(cm(x3), model(x3)) < 1e-6


# ------------------------------------------------------------------ GPU only
@pytest.mark.gpu
@pytest.mark.parametrize("M", [1, 64, 333, 4096])
def test_gpu_bf16_large_mixed_ranks(triton_backend, M, base):
    layer, names = make_layer(4096, 4096, [8, 16, 64, 8, 16, 64, 8, 16], torch.bfloat16)
    x = torch.randn(M, 4096, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    ids = draw_ids(layer, names, M, seed=M)
    y = layer(x, adapter_ids=ids)
    gy = torch.randn_like(y)
    y.backward(gy)
    y_ref, xd, p = reference_multi(layer, names, x, ids, gy)
    assert rel_err(y, y_ref) < TOL[torch.bfloat16]
    assert rel_err(x.grad, xd.grad) < TOL[torch.bfloat16]
    for n in names:
        if p[f"lora_A.{n}"].grad.abs().sum() > 0:
            assert rel_err(layer.lora_A[n].grad, p[f"lora_A.{n}"].grad) < TOL[torch.bfloat16], n


@pytest.mark.gpu
@pytest.mark.parametrize("M", [8, 256])
def test_gpu_cuda_graph_capture_validate_false(triton_backend, M, base):
    layer, names = make_layer(1024, 768, [16, 4, 32], torch.bfloat16)
    layer.eval()
    x = torch.randn(M, 1024, device="cuda", dtype=torch.bfloat16)
    ids = draw_ids(layer, names, M, seed=1)
    with torch.no_grad():
        layer(x, adapter_ids=ids, validate=False)     # warm-up: compile, autotune, build the pool
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = layer(x, adapter_ids=ids, validate=False)
        x.copy_(torch.randn_like(x))
        ids.copy_(draw_ids(layer, names, M, seed=2))
        graph.replay()
        torch.cuda.synchronize()
        assert rel_err(out, layer(x, adapter_ids=ids)) < TOL[torch.bfloat16]


def test_multi_lora_linear_rejects_tables_that_would_index_out_of_bounds(triton_backend):
    from fusedlora.multi import multi_lora_linear
    from fusedlora.routing import pack_loras

    K, N = 20, 12
    x, W = torch.randn(5, K, device=DEVICE), torch.randn(N, K, device=DEVICE)
    As = [torch.randn(r, K, device=DEVICE) for r in (4, 16)]
    Bs = [torch.randn(N, r, device=DEVICE) for r in (4, 16)]
    pool_A, pool_BT, off, rank, scale, rmax = pack_loras(As, Bs, [1.0, 0.5])
    slot = torch.tensor([0, 1, -1, 1, 0], dtype=torch.int32, device=DEVICE)
    ok = multi_lora_linear(x, W, None, slot, pool_A, pool_BT, off, rank, scale)
    assert ok.shape == (5, N)
    fusedlora.reset_dispatch()
    bad = [
        (dict(row_slot=torch.tensor([0, 2, -1, 1, 0], dtype=torch.int32, device=DEVICE)), "row_slot"),
        (dict(slot_off=torch.tensor([0, 30], dtype=torch.int32, device=DEVICE)), "slot_off"),
        (dict(slot_rank=torch.tensor([4, -1], dtype=torch.int32, device=DEVICE)), "slot_rank"),
        (dict(max_rank=4), "max_rank"),
        (dict(slot_drop=torch.tensor([0.0, 1.0], device=DEVICE)), "slot_drop"),
    ]
    for change, name in bad:
        args = dict(x=x, weight=W, bias=None, row_slot=slot, pool_A=pool_A, pool_BT=pool_BT, slot_off=off,
                    slot_rank=rank, slot_scale=scale)
        args.update(change)
        with pytest.raises(ValueError, match=name):
            multi_lora_linear(**args)
    assert dispatched() == {}, "a kernel ran before the error"


def test_pack_loras_refuses_mismatched_or_missing_adapters():
    from fusedlora.routing import pack_loras

    A2, A3 = torch.randn(2, 8), torch.randn(3, 8)
    B2, B3 = torch.randn(6, 2), torch.randn(6, 3)
    with pytest.raises(ValueError, match=r"As\[0\], Bs\[0\]: expected A \(r, 8\) and B"):
        pack_loras([A2, A3], [B3, B2], [1.0, 1.0])  # both pools have 5 rows: slot 0 would read slot 1's B
    with pytest.raises(ValueError, match=r"As\[1\], Bs\[1\]"):
        pack_loras([A2, None], [B2, B3], [1.0, 1.0])
    with pytest.raises(ValueError, match="one entry per slot"):
        pack_loras([A2], [B2], [1.0, 2.0])
    with pytest.raises(ValueError, match="at least one adapter"):
        pack_loras([None], [None], [1.0])
    assert pack_loras([A2, None, A3], [B2, None, B3], [1.0, 0.0, 2.0])[0].shape == (5, 8)


def test_unpickled_layer_routes_in_a_process_that_never_registered_its_names(monkeypatch, tmp_path):
    """The adapter-name registry is per process: a layer loaded where its names were never
    added registers them as it is unpickled (a spawned worker, torch.load)."""
    from fusedlora import routing

    layer = FusedLinear(16, 24)
    layer.add_lora("pickled_a", r=2, init_lora_weights=False)
    layer.add_lora("pickled_b", r=5, init_lora_weights=False)
    torch.save(layer, tmp_path / "layer.pt")
    monkeypatch.setattr(routing, "REGISTRY", routing._Registry())  # as in a fresh process
    loaded = torch.load(tmp_path / "layer.pt", weights_only=False)
    ids = routing.adapter_ids(["pickled_b", "__base__", "pickled_a"])
    x = torch.randn(3, 16)
    with torch.no_grad():
        y = loaded(x, adapter_ids=ids)
        for row, name in ((0, "pickled_b"), (2, "pickled_a")):
            loaded.set_adapter(name)
            assert rel_err(y[row], loaded(x[row:row + 1])[0]) < 1e-5
        assert rel_err(y[1], torch.nn.functional.linear(x[1], loaded.weight, loaded.bias)) < 1e-6


@pytest.mark.parametrize("change,exc,name", [
    (dict(pool_A=torch.randn(20, 19)), ValueError, "pool_A"),                          # K columns
    (dict(pool_BT=torch.randn(20, 11)), ValueError, "pool_BT"),                        # N columns
    (dict(pool_BT=torch.randn(19, 12)), ValueError, "pool_BT"),                        # rows unlike pool_A's
    (dict(pool_A=torch.randn(20, 20, dtype=torch.float16)), TypeError, "pool_A"),      # not x's dtype
    (dict(pool_BT=[[0.0]]), TypeError, "pool_BT"),
    (dict(row_slot=torch.zeros(5, dtype=torch.int64)), TypeError, "row_slot"),         # int32 tables
    (dict(row_slot=torch.zeros(4, dtype=torch.int32)), ValueError, "row_slot"),        # one per row
    (dict(slot_scale=torch.ones(2, dtype=torch.float64)), TypeError, "slot_scale"),
    (dict(slot_rank=torch.tensor([4], dtype=torch.int32)), ValueError, "slot_rank"),   # length unlike slot_off's
    (dict(slot_off=torch.zeros(2, dtype=torch.int32, device="meta")), ValueError, "slot_off"),
    (dict(weight=torch.randn(12, 20, dtype=torch.float16)), TypeError, "weight"),
    (dict(bias=torch.randn(11)), ValueError, "bias"),
    (dict(x=torch.randn(5, 1, 20)), ValueError, r"x: expected a 2-D"),                # rows, not samples
    (dict(x=torch.randn(20)), ValueError, r"x: expected a 2-D"),
])
def test_multi_lora_linear_rejects_bad_arguments_before_launch(triton_backend, change, exc, name):
    """The functional form's argument checks (shapes, dtypes, devices of the pools and
    tables) name the argument and run before any kernel."""
    from fusedlora.multi import multi_lora_linear
    from fusedlora.routing import pack_loras

    K, N = 20, 12
    As = [torch.randn(r, K, device=DEVICE) for r in (4, 16)]
    Bs = [torch.randn(N, r, device=DEVICE) for r in (4, 16)]
    pool_A, pool_BT, off, rank, scale, _ = pack_loras(As, Bs, [1.0, 0.5])
    args = dict(x=torch.randn(5, K, device=DEVICE), weight=torch.randn(N, K, device=DEVICE), bias=None,
                row_slot=torch.tensor([0, 1, -1, 1, 0], dtype=torch.int32, device=DEVICE), pool_A=pool_A,
                pool_BT=pool_BT, slot_off=off, slot_rank=rank, slot_scale=scale)
    args.update({k: (v.to(DEVICE) if isinstance(v, torch.Tensor) and v.device.type != "meta" else v)
                 for k, v in change.items()})
    with pytest.raises(exc, match=name):
        multi_lora_linear(**args)
    assert dispatched() == {}, "a kernel ran before the error"


@pytest.mark.parametrize("validate", [True, False])
def test_mixed_kinds_fp16_3d_and_zero_rows(triton_backend, validate):
    """LoRA, C3A and sparse rows in fp16 on a 3-D input, every gradient against the float64
    oracle (each row its own dense weight); and zero rows, with and without validation
    (without it every kind's delta is masked over all rows: 0 rows must mean no FFT)."""
    dtype = torch.float16
    layer, names = make_layer(32, 24, [3], dtype)
    layer.add_c3a("c3h", block_size=8, init_weights="gaussian")
    idx = random_indices((24, 32), density=0.1, seed=6)
    layer.add_sparse("sph", idx, torch.randn(idx.shape[1], dtype=dtype), scaling=0.7)
    kinds = names + ["c3h", "sph"]
    ids = torch.tensor([layer.adapter_id(n) for n in kinds] + [-1] * 3, device=DEVICE)
    ids = ids[torch.randperm(6, generator=torch.Generator().manual_seed(2))].reshape(2, 3)
    x = torch.randn(2, 3, 32, device=DEVICE, dtype=dtype, requires_grad=True)
    fusedlora.reset_dispatch()
    y = layer(x, adapter_ids=ids, validate=validate)
    assert y.shape == (2, 3, 24) and y.dtype == dtype
    gy = torch.randn_like(y)
    y.backward(gy)
    assert any(k.startswith("multi.forward:triton:") for k in dispatched("multi.")), dispatched()
    how = "sorted" if validate else "masked"
    assert {f"multi.c3a_delta:torch:{how}", f"multi.sparse_delta:torch:{how}"} <= set(dispatched("multi.")), \
        dispatched()
    p = {k: v.detach().double().requires_grad_() for k, v in layer.named_parameters()}
    xd = x.detach().double().requires_grad_()
    out = []
    for m, i in enumerate(ids.reshape(-1).tolist()):
        n = name_of(i)
        W = p["weight"]
        if n == "c3h":
            W = W + reference.c3a_delta_weight(p["c3a_kernel.c3h"], 32, 24)
        elif n == "sph":
            W = W + reference.sparse_delta_weight(idx, p["sparse_values.sph"], 0.7, (24, 32))
        row = nn.functional.linear(xd.reshape(6, 32)[m], W, p["bias"])
        if n in names:
            row = row + layer.scaling[n] * p[f"lora_B.{n}"] @ (p[f"lora_A.{n}"] @ xd.reshape(6, 32)[m])
        out.append(row)
    y_ref = torch.stack(out).reshape(2, 3, 24)
    y_ref.backward(gy.double())
    tol = TOL[dtype]
    assert rel_err(y, y_ref) < tol
    assert rel_err(x.grad, xd.grad) < tol
    for k, prm in layer.named_parameters():
        assert prm.grad is not None and rel_err(prm.grad, p[k].grad) < tol, k

    x0 = torch.randn(0, 32, device=DEVICE, dtype=dtype, requires_grad=True)
    y0 = layer(x0, adapter_ids=torch.zeros(0, dtype=torch.long, device=DEVICE), validate=validate)
    assert y0.shape == (0, 24) and y0.dtype == dtype
    y0.sum().backward()
    assert x0.grad.shape == (0, 32)
    with torch.no_grad(), fusedlora.use_adapters(layer, ids[:, 0], validate=validate):  # per sample, 3-D
        y_ua = layer(x.detach())
    assert rel_err(y_ua, layer(x.detach(), adapter_ids=ids[:, :1].expand(2, 3))) < 1e-3


@pytest.mark.parametrize("M,base", [(5, "cublas"), (20, "cublas"), (20, "fused")], indirect=["base"])  # BGMV, SGMV
def test_multi_lora_linear_strided_tables_bias_and_pools(triton_backend, M, base):
    """Every argument of the functional form a strided view: the 1-D tables and the bias with
    junk between their entries (in range, so that a kernel reading them with unit stride gives
    wrong rows, not a crash), the pools and the weight transposed; all gradients vs float64."""
    from fusedlora.multi import multi_lora_linear
    from fusedlora.routing import pack_loras

    def strided(t, junk):  # t's values at stride 2, ``junk`` in between
        return torch.stack([t, torch.full_like(t, junk)], 1)[:, 0]

    K, N = 24, 18
    torch.manual_seed(M)
    As = [torch.randn(r, K, device=DEVICE) / K**0.5 for r in (3, 6)]
    Bs = [torch.randn(N, r, device=DEVICE) for r in (3, 6)]
    pool_A, pool_BT, off, rank, scale, rmax = pack_loras(As, Bs, [0.5, -1.5])
    slot = torch.tensor([0, 1, -1] * (M // 3) + [1] * (M % 3), dtype=torch.int32, device=DEVICE)
    leaves = {"x": torch.randn(M, K, device=DEVICE), "weight": torch.randn(K, N, device=DEVICE).t() / K**0.5,
              "bias": strided(torch.randn(N, device=DEVICE), 1e3),
              "pool_A": pool_A.t().contiguous().t(), "pool_BT": pool_BT.t().contiguous().t()}
    for t in leaves.values():
        t.requires_grad_()
    tables = dict(row_slot=strided(slot, 1), slot_off=strided(off, 1), slot_rank=strided(rank, 2),
                  slot_scale=strided(scale, 1e3))
    assert not any(t.is_contiguous() for t in (*tables.values(), leaves["weight"], leaves["bias"], leaves["pool_A"]))
    fusedlora.reset_dispatch()
    y = multi_lora_linear(**leaves, **tables, max_rank=rmax)
    assert any(k.startswith("multi.forward:triton:" + via(base, M) + ("sgmv" if M > multi.sort_min_rows() else "bgmv"))
               for k in dispatched()), dispatched()
    gy = torch.randn_like(y)
    y.backward(gy)
    ref = {n: t.detach().double().requires_grad_() for n, t in leaves.items()}
    r_As = [ref["pool_A"][0:3], ref["pool_A"][3:9]]
    r_Bs = [ref["pool_BT"][0:3].t(), ref["pool_BT"][3:9].t()]
    y_ref = reference.multi_lora_linear(ref["x"], ref["weight"], ref["bias"], slot.long(), r_As, r_Bs, [0.5, -1.5])
    y_ref.backward(gy.double())
    assert rel_err(y, y_ref) < TOL[torch.float32]
    for n in leaves:
        assert rel_err(leaves[n].grad, ref[n].grad) < TOL[torch.float32], n


# ------------------------------------------------------------------ serve-demo
def test_serve_demo_verdict_catches_a_misrouted_row_in_bf16(monkeypatch, capsys):
    """serve-demo's verdict must notice one request served by the wrong adapter also at a
    16-bit tolerance (the GPU's default): each request is checked against its adapter alone,
    and every adapter is far enough from the others and the base for that to be conclusive."""
    from fusedlora import serve_demo
    import re

    monkeypatch.delenv("FUSEDLORA_BACKEND", raising=False)
    args = ["--requests", "5", "--prompt-len", "3", "--new-tokens", "2", "--adapters", "4", "--dim", "16",
            "--layers", "1", "--vocab", "32", "--dtype", "bfloat16"]
    assert serve_demo.main(args) == 0
    ratio = r"worst err/separation (\S+) "
    assert float(re.search(ratio, capsys.readouterr().out).group(1)) < 0.5
    real = routing._kind_delta
    monkeypatch.setattr(routing, "_kind_delta",   # C3A rows served by the base in the batched run
                        lambda layer, name, kind, x2: real(layer, name, kind, x2) * (kind != "c3a"))
    assert serve_demo.main(args) == 1
    out = capsys.readouterr().out
    assert "MISMATCH" in out and float(re.search(ratio, out).group(1)) >= 0.5
