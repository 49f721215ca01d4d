"""Under torch.autocast the fused ops and FusedLinear behave as F.linear / nn.Linear do:
x, W, b and the LoRA factors (or pools) are cast to the autocast dtype, the result is in
that dtype, and gradients reach the float32 parameters; C3A's kernel and sparse values
keep their own dtype. Without autocast nothing changes."""
import pytest
import torch
import torch.nn.functional as F

import fusedlora
from conftest import DEVICE, TOL, dispatched, rel_err
from fusedlora import reference
from fusedlora.c3a import c3a_linear
from fusedlora.multi import multi_lora_linear
from fusedlora.ops import lora_linear
from fusedlora.routing import pack_loras
from fusedlora.sparse import random_indices, sparse_linear

# fp16: the interpreter's bf16 tl.dot is wrong (triton 3.8/3.9); the GPU runs both
AMP = torch.float16
K, N, M = 48, 40, 5


def _leaf(*shape, scale=1.0):
    return (torch.randn(*shape, device=DEVICE) * scale).requires_grad_()


def _cases():
    """name -> (fused call, float64 reference of the same leaves, the leaves, which of them
    autocast casts)."""
    x, W, b = _leaf(M, K), _leaf(N, K, scale=K ** -0.5), _leaf(N)
    A, B = _leaf(6, K, scale=K ** -0.5), _leaf(N, 6, scale=0.3)
    kernel = _leaf(N // 8, K // 8, 8, scale=0.5)
    idx = random_indices((N, K), density=0.05, seed=1).to(DEVICE)
    vals = _leaf(idx.shape[1], scale=0.1)
    A2, B2 = _leaf(3, K, scale=K ** -0.5), _leaf(N, 3, scale=0.3)
    slot = torch.tensor([1, -1, 0, 1, 0], dtype=torch.int32, device=DEVICE)

    def multi():
        pool_A, pool_BT, off, rank, scale, rmax = pack_loras([A, A2], [B, B2], [0.5, 2.0])
        return multi_lora_linear(x, W, b, slot, pool_A, pool_BT, off, rank, scale, max_rank=rmax)

    return {
        "lora": (lambda: lora_linear(x, W, b, A, B, 0.5), lambda *t: reference.lora_linear(*t, 0.5),
                 (x, W, b, A, B), 5),
        "c3a": (lambda: c3a_linear(x, W, b, kernel), reference.c3a_linear, (x, W, b, kernel), 3),
        "sparse": (lambda: sparse_linear(x, W, b, idx, vals, 2.0),
                   lambda x, W, b, v: reference.sparse_linear(x, W, b, idx, v, 2.0), (x, W, b, vals), 3),
        "multi": (multi, lambda x, W, b, A, B, A2, B2: reference.multi_lora_linear(
                      x, W, b, slot.long(), [A, A2], [B, B2], [0.5, 2.0]), (x, W, b, A, B, A2, B2), 7),
    }


@pytest.mark.parametrize("path", ["lora", "c3a", "sparse", "multi"])
def test_fused_ops_follow_autocast_like_f_linear(triton_backend, path):
    _check_autocast(path, AMP)


@pytest.mark.gpu
@pytest.mark.parametrize("path", ["lora", "c3a", "sparse", "multi"])
def test_gpu_bf16_autocast(triton_backend, path):
    _check_autocast(path, torch.bfloat16)


def _check_autocast(path, amp):
    torch.manual_seed(0)
    fused, ref, leaves, n_cast = _cases()[path]
    with torch.autocast(DEVICE, dtype=amp):
        y = fused()
        assert y.dtype == F.linear(leaves[0], leaves[1]).dtype == amp
    assert any(k.split(":")[1] == "triton" for k in dispatched(f"{path}.forward")), dispatched()
    # float64 on what autocast makes of the leaves (the first n_cast rounded to 16 bits)
    exact = [(t.detach().to(amp) if i < n_cast else t.detach()).double().requires_grad_()
             for i, t in enumerate(leaves)]
    y_ref = ref(*exact)
    assert rel_err(y, y_ref) < TOL[amp]
    g = torch.randn_like(y_ref)
    (y.float() * g.to(y.device).float()).sum().backward()
    (y_ref * g).sum().backward()
    for t, e in zip(leaves, exact):  # the casts carry the gradients back to the float32 leaves
        assert t.grad is not None and t.grad.dtype == torch.float32
        assert rel_err(t.grad, e.grad) < 2 * TOL[amp]


@pytest.mark.parametrize("path", ["lora", "c3a", "sparse", "multi"])
def test_without_autocast_nothing_is_cast(triton_backend, path):
    torch.manual_seed(0)
    fused = _cases()[path][0]
    y = fused()
    assert y.dtype == torch.float32
    with torch.autocast(DEVICE, dtype=AMP, enabled=False):
        assert fused().dtype == torch.float32


def test_float64_passes_autocast_as_in_f_linear():
    x, W = torch.randn(3, 16, dtype=torch.float64), torch.randn(8, 16, dtype=torch.float64)
    A, B = torch.randn(2, 16, dtype=torch.float64), torch.randn(8, 2, dtype=torch.float64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = lora_linear(x, W, None, A, B, 1.0)
        assert y.dtype == F.linear(x, W).dtype == torch.float64
    assert rel_err(y, reference.lora_linear(x, W, None, A, B, 1.0)) < TOL[torch.float64]


def _layers():
    torch.manual_seed(1)
    base = torch.nn.Linear(K, N, device=DEVICE)
    return base, fusedlora.FusedLinear.from_linear(base)  # shares W and b


def test_fused_linear_is_a_drop_in_nn_linear_under_autocast(triton_backend):
    """A float32 model under AMP: FusedLinear gives what nn.Linear plus PEFT's LoRA gives
    (16-bit result, float32 gradients), not a float32 result in the middle of the model."""
    peft = pytest.importorskip("peft")
    base, layer = _layers()
    layer.add_lora("a", r=4, lora_alpha=8)
    torch.nn.init.normal_(layer.lora_B["a"], std=0.2)
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["lin"])
    holder = torch.nn.Module()
    holder.lin = base
    pm = peft.get_peft_model(holder, cfg)
    with torch.no_grad():
        pm.base_model.model.lin.lora_A["default"].weight.copy_(layer.lora_A["a"])
        pm.base_model.model.lin.lora_B["default"].weight.copy_(layer.lora_B["a"])
    x = torch.randn(2, 3, K, device=DEVICE)
    with torch.autocast(DEVICE, dtype=AMP):
        y = layer(x)
        y_peft = pm.base_model.model.lin(x)
    assert y.dtype == y_peft.dtype == AMP and y.shape == y_peft.shape
    assert rel_err(y, y_peft) < TOL[AMP]
    y.float().sum().backward()
    assert layer.lora_A["a"].grad.dtype == torch.float32 and layer.lora_B["a"].grad.dtype == torch.float32


def test_fused_linear_adapter_kinds_under_autocast(triton_backend):
    """C3A and sparse adapters in a float32 layer under AMP: 16-bit result within the
    16-bit tolerance of the float64 layer on the cast operands; the deltas' parameters
    (kept in float32) get float32 gradients."""
    _, layer = _layers()
    layer.add_c3a("c", block_size=8, init_weights="gaussian")
    idx = random_indices((N, K), density=0.05, seed=2)
    layer.add_sparse("s", idx.to(DEVICE), torch.randn(idx.shape[1], device=DEVICE) * 0.1)
    x = torch.randn(4, K, device=DEVICE)
    W, b = layer.weight.detach().to(AMP).double(), layer.bias.detach().to(AMP).double()
    for name in ("c", "s"):
        layer.set_adapter(name)
        with torch.autocast(DEVICE, dtype=AMP):
            y = layer(x)
        assert y.dtype == AMP
        if name == "c":
            ref = reference.c3a_linear(x.to(AMP).double(), W, b, layer.c3a_kernel["c"].detach().double())
            param = layer.c3a_kernel["c"]
        else:
            ref = reference.sparse_linear(x.to(AMP).double(), W, b, idx, layer.sparse_values["s"].detach().double(), 1.0)
            param = layer.sparse_values["s"]
        assert rel_err(y, ref) < TOL[AMP]
        y.float().sum().backward()
        assert param.grad is not None and param.grad.dtype == torch.float32


def test_autocast_under_torch_compile(torch_backend):
    """torch.compile(fullgraph=True) traces the casts: same dtype and values as eager."""
    _, layer = _layers()
    layer.add_lora("a", r=4)
    torch.nn.init.normal_(layer.lora_B["a"], std=0.2)
    x = torch.randn(3, K, device=DEVICE)

    def run(t):
        with torch.autocast(DEVICE, dtype=torch.bfloat16):
            return layer(t)

    eager = run(x)
    compiled = torch.compile(run, fullgraph=True)(x)
    assert eager.dtype == compiled.dtype == torch.bfloat16
    assert rel_err(compiled, eager) < TOL[torch.bfloat16]


@pytest.mark.parametrize("rows", [5, 40])   # BGMV and, above multi.sort_min_rows(), SGMV
def test_routed_rows_under_autocast_equal_their_single_adapter_forward(triton_backend, rows):
    """adapter_ids (and use_adapters) under AMP: each row is what its own adapter's forward
    gives under the same autocast, in the autocast dtype."""
    _, layer = _layers()
    layer.add_lora("a", r=4)
    torch.nn.init.normal_(layer.lora_B["a"], std=0.3)
    layer.add_lora("b", r=6)
    torch.nn.init.normal_(layer.lora_B["b"], std=0.3)
    layer.add_c3a("c", block_size=8, init_weights="gaussian")
    idx = random_indices((N, K), density=0.05, seed=4)
    layer.add_sparse("s", idx.to(DEVICE), torch.randn(idx.shape[1], device=DEVICE) * 0.3)
    names = ["a", "b", "c", "s", None]
    torch.manual_seed(5)
    pick = torch.randint(0, len(names), (rows,)).tolist()
    ids = torch.tensor([layer.adapter_id(names[i]) if names[i] else -1 for i in pick], device=DEVICE)
    x = torch.randn(rows, K, device=DEVICE)
    with torch.no_grad(), torch.autocast(DEVICE, dtype=AMP):
        y = layer(x, adapter_ids=ids)
        with fusedlora.use_adapters(torch.nn.Sequential(layer), ids):
            y_scope = layer(x)
        single = {}
        for n in names:
            layer.set_adapter(n)
            single[n] = layer(x)
    assert y.dtype == y_scope.dtype == AMP
    expected = torch.stack([single[names[i]][r] for r, i in enumerate(pick)])
    assert rel_err(y, expected) < TOL[AMP] and rel_err(y_scope, expected) < TOL[AMP]


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_add_multi_lora_into_an_autocast_base_output(monkeypatch, backend):
    """The delta-only form after an F.linear under AMP: y is in the autocast dtype, x and the
    pools in float32, as a float32 model keeps them; x and the pools are cast as that F.linear
    cast its own operands (it raised a dtype mismatch). A float32 y (a base computed without
    autocast) keeps the float32 operands: nothing is cast."""
    monkeypatch.setenv("FUSEDLORA_BACKEND", backend)
    torch.manual_seed(6)
    W = torch.randn(N, K, device=DEVICE) / K ** 0.5
    As = [torch.randn(r, K, device=DEVICE) / K ** 0.5 for r in (4, 6)]
    Bs = [torch.randn(N, r, device=DEVICE) * 0.3 for r in (4, 6)]
    pool = pack_loras(As, Bs, [0.5, 2.0])
    x = torch.randn(M, K, device=DEVICE)
    slots = torch.tensor([1, -1, 0, 1, 0], dtype=torch.int32, device=DEVICE)
    with torch.no_grad(), torch.autocast(DEVICE, dtype=AMP):
        y = F.linear(x, W)
        assert y.dtype == AMP
        y0 = y.clone()
        fusedlora.add_multi_lora_(y, x, slots, *pool)
        y32 = F.linear(x, W).float()   # outside autocast's dtype: used as given
        y32_0 = y32.clone()
        fusedlora.add_multi_lora_(y32, x, slots, *pool)
    assert y.dtype == AMP and y32.dtype == torch.float32

    def expected(y_base, cast):
        c = (lambda t: t.to(AMP).double()) if cast else (lambda t: t.double())
        d = torch.zeros(M, N, dtype=torch.float64, device=DEVICE)
        for m, s in enumerate(slots.tolist()):
            if s >= 0:
                d[m] = [0.5, 2.0][s] * (c(x[m]) @ c(As[s]).t()) @ c(Bs[s]).t()
        return y_base.double() + d

    assert rel_err(y, expected(y0, True)) < TOL[AMP]
    assert rel_err(y32, expected(y32_0, False)) < TOL[torch.float32]


def test_routed_rows_of_a_second_layer_under_autocast(torch_backend):
    """Two FusedLinear layers of a float32 model, routed (adapter_ids / use_adapters), under
    AMP: the first layer's output is 16-bit, as nn.Linear's is, and the second layer must
    take it, as nn.Linear does."""
    torch.manual_seed(7)
    first, second = fusedlora.FusedLinear(K, K, device=DEVICE), fusedlora.FusedLinear(K, N, device=DEVICE)
    for layer in (first, second):
        layer.add_lora("a", r=4)
        torch.nn.init.normal_(layer.lora_B["a"], std=0.3)
    model = torch.nn.Sequential(first, second)
    ids = torch.tensor([first.adapter_id("a"), -1, first.adapter_id("a")], device=DEVICE)
    x = torch.randn(3, K, device=DEVICE)
    with torch.no_grad(), torch.autocast(DEVICE, dtype=AMP):
        with fusedlora.use_adapters(model, ids):
            y = model(x)
        first.set_adapter("a")
        second.set_adapter("a")
        plain = model(x)                      # every row through "a" (rows 0 and 2 compared)
    assert y.dtype == AMP
    assert rel_err(y[[0, 2]], plain[[0, 2]]) < TOL[AMP]


def test_float32_factors_of_a_16bit_layer_are_cast_once_under_autocast(torch_backend):
    """fp32 LoRA factors (add_lora(dtype=...)) of a float16 layer under bfloat16 autocast go
    straight to bfloat16, as F.linear's autocast casts them, not through float16 first
    (a factor beyond float16's range became inf there)."""
    torch.manual_seed(7)
    layer = fusedlora.FusedLinear(K, N, dtype=torch.float16)
    layer.add_lora("a", r=2, dtype=torch.float32)
    with torch.no_grad():
        layer.lora_A["a"].fill_(1.0 / K)
        layer.lora_B["a"].fill_(7e4)         # beyond float16's range (65504), not bfloat16's
    x = torch.randn(3, K, dtype=torch.float16) * 1e-3
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16 and torch.isfinite(y).all()


def test_routed_pool_is_cast_once_until_an_adapter_changes(triton_backend):
    """A float32 model's serving pool under autocast: cast to the autocast dtype at the first
    routed call and kept (not O(pool) per call), cast again once an adapter changes."""
    _, layer = _layers()
    for n, r in (("pa", 4), ("pb", 6)):
        layer.add_lora(n, r=r)
        torch.nn.init.normal_(layer.lora_B[n], std=0.3)
    ids = torch.tensor([layer.adapter_id("pa"), -1, layer.adapter_id("pb")], device=DEVICE)
    x = torch.randn(3, K, device=DEVICE)

    def routed_and_single():
        with torch.no_grad(), torch.autocast(DEVICE, dtype=AMP):
            y = layer(x, adapter_ids=ids)
            single = []
            for r, n in enumerate(("pa", None, "pb")):
                layer.set_adapter(n)
                single.append(layer(x[r:r + 1])[0])
        return y, torch.stack(single)

    y, expected = routed_and_single()
    assert y.dtype == AMP and rel_err(y, expected) < TOL[AMP]
    cast = layer._multi_pool._cast
    assert cast is not None and cast[1].dtype == AMP
    routed_and_single()
    assert layer._multi_pool._cast is cast  # the second call reused it
    with torch.no_grad():
        layer.lora_B["pb"].mul_(-3.0)
    y, expected = routed_and_single()
    assert layer._multi_pool._cast is not cast and rel_err(y, expected) < TOL[AMP]
