"""FusedLinear with C3A and sparse-delta adapters, alone and mixed with LoRA."""
import pytest
import torch

import fusedlora

from conftest import DEVICE, TOL, dispatched, rel_err
from fusedlora import FusedLinear, reference
from fusedlora.sparse import random_indices


def make_layer(K=48, N=32):
    layer = FusedLinear(K, N, device=DEVICE)
    with torch.no_grad():
        layer.weight.normal_(0, K**-0.5)
        layer.bias.normal_()
    return layer


def test_c3a_adapter_forward_grads_merge(triton_backend):
    layer = make_layer()
    layer.add_c3a("c", block_size=16)
    k = layer.c3a_kernel["c"]
    assert k.shape == (2, 3, 16) and k.dtype == torch.float32 and k.abs().sum() == 0
    x = torch.randn(2, 5, 48, device=DEVICE)
    assert rel_err(layer(x), torch.nn.functional.linear(x, layer.weight, layer.bias)) < 1e-6  # zero init
    with torch.no_grad():
        k.normal_()
    y = layer(x)
    ref = reference.c3a_linear(x.double(), layer.weight.double(), layer.bias.double(), k.double())
    assert rel_err(y, ref) < TOL[torch.float32]
    assert dispatched("c3a.forward:triton") or any(key.startswith("c3a") and ":triton:" in key
                                                   for key in dispatched())
    y.sum().backward()
    assert k.grad is not None and k.grad.abs().sum() > 0
    w0 = layer.weight.detach().clone()
    layer.merge()
    assert rel_err(layer(x), ref) < TOL[torch.float32]
    layer.unmerge()
    assert rel_err(layer.weight, w0) < 1e-6
    with pytest.raises(ValueError, match="block_size"):
        layer.add_c3a("bad", block_size=5)


def test_sparse_adapter_forward_grads_switch_state_dict(triton_backend):
    layer = make_layer()
    idx1 = random_indices((32, 48), density=0.05, seed=1)
    idx2 = random_indices((32, 48), density=0.05, seed=2)
    v1, v2 = torch.randn(idx1.shape[1]), torch.randn(idx2.shape[1])
    layer.add_sparse("s1", idx1, v1, scaling=0.5)
    layer.add_sparse("s2", idx2, v2)
    assert layer.active_adapters == ["s1"]
    assert {"sparse_indices.s1", "sparse_values.s1", "sparse_indices.s2"} <= set(layer.state_dict())
    x = torch.randn(7, 48, device=DEVICE)
    y = layer(x)
    ref = reference.sparse_linear(x.double(), layer.weight.double(), layer.bias.double(), idx1, v1.double(), 0.5)
    assert rel_err(y, ref) < TOL[torch.float32]
    assert any(k.startswith("sparse") and ":triton:" in k for k in dispatched())
    y.square().sum().backward()
    assert layer.sparse_values["s1"].grad is not None and layer.sparse_values["s2"].grad is None

    w0 = layer.weight.detach().clone()
    layer.switch_merged("s2")                      # O(nnz) scatter, no dense delta
    assert layer.merged_adapters == ["s2"] and layer.active_adapters == ["s2"]
    expect = w0 + reference.sparse_delta_weight(idx2, v2, 1.0, (32, 48))
    assert rel_err(layer.weight, expect) < 1e-6
    layer.switch_merged("s1")
    expect = w0 + reference.sparse_delta_weight(idx1, v1, 0.5, (32, 48))
    assert rel_err(layer.weight, expect) < 1e-6
    layer.unmerge()
    assert rel_err(layer.weight, w0) < 1e-6

    other = make_layer()
    other.add_sparse("s1", idx1)
    other.add_sparse("s2", idx2)
    other.load_state_dict(layer.state_dict())
    assert torch.equal(other.sparse_values["s1"], layer.sparse_values["s1"])
    other.sparse_scaling["s1"] = 0.5
    assert rel_err(other(x), layer(x)) < 1e-6
    with pytest.warns(UserWarning, match="Setting active adapter to s2"):  # PEFT's rule
        layer.delete_adapter("s1")
    assert "sparse_indices.s1" not in layer.state_dict() and layer.adapter_names == ["s2"]
    assert layer.active_adapters == ["s2"]


def test_mixed_lora_c3a_sparse_adapters_sum(triton_backend):
    layer = make_layer()
    layer.add_lora("l", r=4, init_lora_weights=False)
    layer.add_c3a("c", block_size=8, init_weights="gaussian")
    idx = random_indices((32, 48), density=0.04, seed=3)
    layer.add_sparse("s", idx, torch.randn(idx.shape[1]))
    layer.set_adapter(["l", "c", "s"])
    x = torch.randn(6, 48, device=DEVICE)
    y = layer(x)
    d = {k: v.detach().double() for k, v in layer.state_dict().items()}
    W = d["weight"]
    dW = (reference.c3a_delta_weight(d["c3a_kernel.c"], 48, 32)
          + reference.sparse_delta_weight(idx, d["sparse_values.s"], 1.0, (32, 48)))
    ref = reference.lora_linear(x.double(), W + dW, d["bias"], d["lora_A.l"], d["lora_B.l"], layer.scaling["l"])
    assert rel_err(y, ref) < TOL[torch.float32]
    ran = dispatched()
    assert any(k.startswith("c3a") and ":triton:" in k for k in ran), ran
    assert "sparse.extra_adapter:torch:eager" in ran and "lora.extra_adapter:torch:eager" in ran
    y.sum().backward()
    assert all(p.grad is not None for p in (layer.lora_A["l"], layer.c3a_kernel["c"], layer.sparse_values["s"]))
    with pytest.raises(ValueError, match="already exists"):
        layer.add_sparse("l", idx)
    with pytest.raises(ValueError, match="values"):
        layer.add_sparse("t", idx, torch.randn(3))


def test_sparse_layout_follows_indices_loaded_in_place(triton_backend):
    """load_state_dict copies other indices into the buffer in place: the fused
    forward must use them, not the layout built for the old ones."""
    a, b = make_layer(), make_layer()
    b.load_state_dict(a.state_dict())
    idx_a = random_indices((32, 48), density=0.05, seed=11)
    idx_b = random_indices((32, 48), density=0.05, seed=12)
    a.add_sparse("s", idx_a, torch.randn(idx_a.shape[1]))
    b.add_sparse("s", idx_b, torch.randn(idx_b.shape[1]))
    x = torch.randn(5, 48, device=DEVICE)
    b(x)  # builds b's layout for idx_b
    b.load_state_dict(a.state_dict())
    assert rel_err(b(x), a(x)) < 1e-6
    b.merge()
    assert rel_err(b(x), a(x)) < 1e-5


def test_sparse_adapter_added_and_run_under_inference_mode():
    """Serving code often builds and runs layers under torch.inference_mode(): inference
    tensors keep no version counter, which the layout caches must not ask for."""
    from fusedlora.sparse import random_indices

    with torch.inference_mode():
        layer = FusedLinear(32, 24)
        idx = random_indices((24, 32), density=0.1, seed=0)
        layer.add_sparse("s", idx, values=torch.randn(idx.shape[1]), scaling=0.5)
        x = torch.randn(3, 32)
        y = layer(x)
        assert torch.allclose(y, layer(x))
        ref = reference.sparse_linear(x.double(), layer.weight.double(), layer.bias.double(), idx,
                                      layer.sparse_values["s"].double(), 0.5)
    assert rel_err(y, ref) < TOL[torch.float32]


def _mixed_layer(dtype):
    torch.manual_seed(7)
    layer = FusedLinear(48, 32, device=DEVICE, dtype=dtype)
    with torch.no_grad():
        layer.weight.normal_(0, 48**-0.5)
        layer.bias.normal_()
    layer.add_lora("l", r=4, init_lora_weights=False)
    layer.add_c3a("c", block_size=8, init_weights="gaussian")
    idx = random_indices((32, 48), density=0.04, seed=3)
    layer.add_sparse("s", idx, torch.randn(idx.shape[1], dtype=dtype), scaling=0.6)
    return layer, idx


def _mixed_reference(layer, idx, x, active, grad_y):
    """float64 oracle of the active adapters summed, with autograd gradients."""
    p = {k: v.detach().double().requires_grad_() for k, v in layer.named_parameters()}
    xd = x.detach().double().requires_grad_()
    W = p["weight"]
    if "c" in active:
        W = W + reference.c3a_delta_weight(p["c3a_kernel.c"], 48, 32)
    if "s" in active:
        W = W + reference.sparse_delta_weight(idx, p["sparse_values.s"], 0.6, (32, 48))
    y = torch.nn.functional.linear(xd, W, p["bias"])
    if "l" in active:
        y = y + layer.scaling["l"] * (xd @ p["lora_A.l"].t()) @ p["lora_B.l"].t()
    y.backward(grad_y.double())
    return y, xd, p


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("active", [["c", "s", "l"], ["s", "l"]])
def test_mixed_active_adapters_every_gradient_matches_reference(triton_backend, dtype, active):
    """The first C3A / sparse adapter fused with the base GEMM, the others added eagerly:
    y and the gradients of x, W, b and every adapter's parameters against float64, on a
    3-D input and on zero rows; inactive adapters get no gradient; the fused op ran on Triton."""
    layer, idx = _mixed_layer(dtype)
    layer.set_adapter(active)
    for lead in ((2, 5), (0,)):
        layer.zero_grad(set_to_none=True)
        fusedlora.reset_dispatch()
        x = torch.randn(*lead, 48, device=DEVICE, dtype=dtype, requires_grad=True)
        y = layer(x)
        assert y.shape == (*lead, 32) and y.dtype == dtype
        gy = torch.randn_like(y)
        y.backward(gy)
        y_ref, xd, p = _mixed_reference(layer, idx, x, active, gy)
        tol = TOL[dtype]
        assert rel_err(y, y_ref) < tol
        assert rel_err(x.grad, xd.grad) < tol
        for k, prm in layer.named_parameters():
            if k.split(".")[-1] in active or k in ("weight", "bias"):
                assert prm.grad is not None and rel_err(prm.grad, p[k].grad) < tol, (k, lead)
            else:
                assert prm.grad is None, k
        if not x.numel():
            continue  # zero rows launch nothing (and record nothing)
        ran = dispatched()
        fused = {"c": "c3a.forward:triton:", "s": "sparse."}[active[0]]
        assert any(k.startswith(fused) and ":triton:" in k for k in ran), ran
        extra = {"c3a.extra_adapter:torch:eager"} if "c" in active[1:] else set()
        extra |= {"sparse.extra_adapter:torch:eager"} if "s" in active[1:] else set()
        assert extra | {"lora.extra_adapter:torch:eager"} <= set(ran), ran


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_c3a_and_sparse_merge_unmerge_round_trip(triton_backend, dtype):
    """Merging C3A and sparse adapters (with LoRA) gives the unmerged output on the plain base
    GEMM (no fused op dispatched); unmerge restores W: the sparse O(nnz) merge bit for bit,
    the dense C3A delta to the dtype's rounding."""
    layer, idx = _mixed_layer(dtype)
    w0 = layer.weight.detach().clone()
    x = torch.randn(2, 3, 48, device=DEVICE, dtype=dtype)
    for names in (["s"], ["c"], ["c", "s", "l"]):
        layer.set_adapter(names)
        with torch.no_grad():
            y = layer(x)
        layer.merge()
        assert layer.merged_adapters == names
        fusedlora.reset_dispatch()
        with torch.no_grad():
            y_merged = layer(x)
        assert dispatched() == {}
        assert rel_err(y_merged, y) < TOL[dtype], names
        layer.unmerge()
        assert not layer.merged
        if names == ["s"]:
            assert torch.equal(layer.weight, w0)
        else:
            assert rel_err(layer.weight, w0) < (1e-6 if dtype == torch.float32 else 1e-3), names
        with torch.no_grad():
            layer.weight.copy_(w0)


def test_sparse_merged_then_cast_or_pickled_unmerges():
    """A merged sparse adapter keeps W's overwritten entries to restore them; after .half()
    (a new W whose version counter may read the same) they are of another dtype, and a
    pickled layer (torch.save of the module) must still unmerge. merge() takes a name."""
    import io

    layer = make_layer(16, 8)
    w0 = layer.weight.detach().clone()
    idx = random_indices((8, 16), density=0.2, seed=3)
    layer.add_sparse("task", idx, torch.randn(idx.shape[1]))
    layer.add_lora("lora", r=2, init_lora_weights=False)
    x = torch.randn(3, 16, device=DEVICE)
    layer.set_adapter(["task", "lora"])
    y = layer(x)  # builds the layout (a weakly referenced cache) too
    layer.merge("task")  # a name, not list("task")
    assert layer.merged_adapters == ["task"]
    buf = io.BytesIO()
    torch.save(layer, buf)
    buf.seek(0)
    copy = torch.load(buf, weights_only=False)
    layer.merge(["lora"])
    assert rel_err(layer(x), y) < 1e-5
    copy.unmerge()
    assert (copy.weight - w0).abs().max() <= 1e-6 and rel_err(copy(x), y) < 1e-6
    copy.merge()
    layer.half()
    layer.unmerge()
    assert (layer.weight.float() - w0).abs().max() <= 2e-3
    copy.double()
    copy.unmerge()
    assert (copy.weight - w0.double()).abs().max() <= 1e-6


def add_three_kinds(layer, seed):
    """A sparse ("s"), a LoRA ("l") and a C3A ("c") adapter on a 16 -> 8 layer; the sparse indices."""
    idx = random_indices((8, 16), density=0.2, seed=seed)
    layer.add_sparse("s", idx, torch.randn(idx.shape[1]))
    layer.add_lora("l", r=2, init_lora_weights=False)
    layer.add_c3a("c", block_size=4, init_weights="gaussian")
    return idx


@pytest.mark.parametrize("routed", [False, True])
def test_caches_built_under_inference_mode_serve_later_training(routed):
    """Serving runs under torch.inference_mode(); the layer's caches (sparse layout, row
    order, the LoRA pool and its tables) built there must not be inference tensors, which
    later calls outside it could neither update in place nor save for backward."""
    layer = make_layer(16, 8)
    add_three_kinds(layer, seed=4)
    x = torch.randn(3, 16, device=DEVICE)
    ids = torch.tensor([layer.adapter_id(n) for n in ("s", "l", "c")], device=DEVICE)
    run = (lambda: layer(x, adapter_ids=ids)) if routed else (lambda: layer(x))
    layer.set_adapter(["s", "l"])
    with torch.inference_mode():
        run()
    with torch.no_grad():  # an optimizer-style update: the pool copies it in place
        layer.lora_B["l"].mul_(2.0)
        ref = run()
    y = run()
    assert rel_err(y, ref) < 1e-6
    y.sum().backward()
    assert layer.sparse_values["s"].grad is not None and layer.lora_B["l"].grad is not None


def test_model_set_adapter_unmerges_first_as_peft():
    """PEFT's model-level set_adapter unmerges a merged model first; without that a merged
    layer would keep serving the merged adapter instead of the one asked for."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(make_layer(16, 12), torch.nn.ReLU(), make_layer(12, 8))
    for layer in (model[0], model[2]):
        layer.add_lora("a", r=2, init_lora_weights=False)
        layer.add_lora("b", r=3, init_lora_weights=False)
    x = torch.randn(4, 16, device=DEVICE)
    fusedlora.set_adapter(model, "b")
    want = model(x)
    fusedlora.set_adapter(model, "a")
    model[0].merge()
    model[2].merge()
    with pytest.warns(UserWarning, match="unmerging"):
        fusedlora.set_adapter(model, "b")
    assert not model[0].merged and not model[2].merged
    assert rel_err(model(x), want) < 1e-5


def test_layer_built_under_inference_mode_routes_and_switches():
    """Every tensor of a layer built under torch.inference_mode() is an inference tensor,
    which keeps no version counter: the routing caches and the sparse merge must not ask
    for one, and must still see an in-place update of an adapter."""
    with torch.inference_mode():
        layer = make_layer(16, 8)
        w0 = layer.weight.clone()
        add_three_kinds(layer, seed=5)
        x = torch.randn(3, 16, device=DEVICE)
        ids = torch.tensor([layer.adapter_id(n) for n in ("l", "s", "c")], device=DEVICE)
        y = layer(x, adapter_ids=ids)
        layer.lora_B["l"].mul_(2.0)  # in place: the pool must copy it again
        y2 = layer(x, adapter_ids=ids)
        for i, n in enumerate(("l", "s", "c")):
            layer.set_adapter(n)
            assert rel_err(y2[i], layer(x[i:i + 1])[0]) < 1e-5
        assert rel_err(y2[1:], y[1:]) < 1e-6 and rel_err(y2[0], y[0]) > 1e-2
        layer.switch_merged("s")
        layer.switch_merged("l")
        layer.unmerge()
        assert (layer.weight - w0).abs().max() <= 1e-6


def test_merge_checks_sparse_indices_loaded_in_place():
    """load_state_dict copies unchecked indices into the buffer; the forward checks them when it
    rebuilds the layout, and merging must too: an out-of-range column used to land in the next
    row of W, a duplicate pair to drop one of its values, both silently."""
    layer = make_layer(16, 8)
    layer.add_sparse("s", torch.tensor([[0, 1], [0, 1]]), torch.tensor([1.0, 2.0]))
    w0 = layer.weight.detach().clone()
    for bad, msg in (([[0, 0], [16, 17]], "out of range"), ([[3, 3], [4, 4]], "duplicate")):
        sd = layer.state_dict()
        sd["sparse_indices.s"] = torch.tensor(bad)
        layer.load_state_dict(sd)
        for merge in (layer.merge, lambda: layer.switch_merged("s"), lambda: layer.merge(safe_merge=True)):
            with pytest.raises(ValueError, match=msg):
                merge()
            assert torch.equal(layer.weight, w0) and not layer.merged
    sd["sparse_indices.s"] = torch.tensor([[2, 5], [3, 7]])
    layer.load_state_dict(sd)
    layer.merge()
    assert rel_err(layer.weight, w0 + reference.sparse_delta_weight(sd["sparse_indices.s"], sd["sparse_values.s"],
                                                                     1.0, (8, 16))) < 1e-7
    layer.unmerge()
    assert torch.equal(layer.weight, w0)


def test_safe_merge_of_every_adapter_kind():
    """safe_merge=True as PEFT's C3A and SHiRA layers: a NaN in the kernel or in a value is
    refused before the weight changes; a finite adapter merges as without it."""
    layer, idx = _mixed_layer(torch.float32)
    w0 = layer.weight.detach().clone()
    layer.merge(["l", "c", "s"], safe_merge=True)
    merged = layer.weight.detach().clone()
    layer.unmerge()
    with torch.no_grad():
        layer.weight.copy_(w0)
    layer.merge(["l", "c", "s"])
    assert torch.equal(layer.weight, merged)
    layer.unmerge()
    with torch.no_grad():
        layer.weight.copy_(w0)
    for name, param in (("c", layer.c3a_kernel["c"]), ("s", layer.sparse_values["s"])):
        with torch.no_grad():
            saved = param.detach().clone()
            param.view(-1)[0] = float("nan")
        with pytest.raises(ValueError, match=f"The adapter '{name}' seems to be broken"):
            layer.merge([name], safe_merge=True)
        assert not layer.merged and torch.equal(layer.weight, w0)
        with torch.no_grad():
            param.copy_(saved)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_float32_adapters_beside_a_16bit_weight(monkeypatch, backend):
    """add_lora(dtype=torch.float32) on a float16 layer (PEFT's autocast_adapter_dtype): the
    factors and their optimizer updates stay float32, each forward reads them in the weight's
    dtype (fused, stacked with another adapter, routed by ids, merged), gradients arrive in
    float32."""
    from conftest import TOL, rel_err
    from fusedlora import reference

    monkeypatch.setenv("FUSEDLORA_BACKEND", backend)
    torch.manual_seed(0)
    layer = fusedlora.FusedLinear(40, 24, dtype=torch.float16)
    layer.add_lora("a", r=4, dtype=torch.float32)
    layer.add_lora("b", r=2)                       # the weight's dtype, beside it
    for n in ("a", "b"):
        torch.nn.init.normal_(layer.lora_B[n], std=0.3)
    assert layer.lora_A["a"].dtype == layer.lora_B["a"].dtype == torch.float32
    assert layer.lora_A["b"].dtype == torch.float16
    x = torch.randn(5, 40, dtype=torch.float16)
    W, b = layer.weight.double(), layer.bias.double()

    def ref(names, rows=x):
        y = torch.nn.functional.linear(rows.double(), W, b)
        for n in names:
            A, B = (t.detach().half().double() for t in layer.factors(n))
            y = y + reference.lora_linear(rows.double(), torch.zeros_like(W), None, A, B, layer.scaling[n])
        return y

    y = layer(x)
    assert y.dtype == torch.float16 and rel_err(y, ref(["a"])) < TOL[torch.float16]
    (y.float() * torch.linspace(-1, 1, 24)).sum().backward()
    A32 = layer.lora_A["a"]
    assert A32.grad.dtype == torch.float32 and torch.isfinite(A32.grad).all()
    before = A32.detach().clone()
    torch.optim.SGD([A32], lr=1e-3).step()          # a float32 update: below float16's step here
    assert torch.allclose(A32.detach(), before - 1e-3 * A32.grad, rtol=0, atol=1e-8)
    layer.set_adapter(["a", "b"])
    assert rel_err(layer(x), ref(["a", "b"])) < TOL[torch.float16]
    ids = torch.tensor([layer.adapter_id("a"), -1, layer.adapter_id("b"), layer.adapter_id("a"), -1])
    routed = layer(x, adapter_ids=ids)
    want = torch.stack([ref(["a"])[0], ref([])[1], ref(["b"])[2], ref(["a"])[3], ref([])[4]])
    assert rel_err(routed, want) < TOL[torch.float16]
    with torch.no_grad():
        layer.merge(["a"])
        assert rel_err(torch.nn.functional.linear(x, layer.weight, layer.bias), ref(["a"])) < TOL[torch.float16]
        layer.unmerge()
    with pytest.raises(TypeError, match="dtype: expected None or one of"):
        layer.add_lora("c", r=2, dtype=torch.int8)


def test_unmerge_after_indices_loaded_while_merged_restores_the_merged_positions():
    """The merge keeps its own copy of the positions it wrote: indices loaded in place while
    merged (load_state_dict does not unmerge first, as in PEFT) do not move where the unmerge
    restores W."""
    layer = make_layer(16, 8)
    layer.add_sparse("s", torch.stack([torch.arange(8)] * 2), torch.randn(8))
    w0 = layer.weight.detach().clone()
    layer.merge()
    layer.load_state_dict({"sparse_indices.s": torch.stack([torch.arange(8), torch.arange(8) + 5])}, strict=False)
    layer.unmerge()
    assert torch.equal(layer.weight, w0)


def test_sparse_indices_loaded_under_inference_mode_are_read(torch_backend):
    """Inference tensors keep no version counter: a load under inference_mode (a serving
    setup) drops the cached layouts of the adapter instead of trusting their stamps."""
    x = torch.randn(4, 16)
    with torch.inference_mode():
        layer = FusedLinear(16, 12)
        layer.add_sparse("s", torch.stack([torch.arange(8)] * 2), torch.randn(8))
        layer(x)
        sd = {k: v.clone() for k, v in layer.state_dict().items()}
        sd["sparse_indices.s"] = torch.stack([torch.arange(8), torch.arange(8) + 5])
        layer.load_state_dict(sd)
        y = layer(x)
    ref = reference.sparse_linear(x, layer.weight, layer.bias, sd["sparse_indices.s"], sd["sparse_values.s"], 1.0)
    assert rel_err(y, ref) < 1e-6


def test_patched_linear_with_load_hooks_keeps_the_layout_refresh(torch_backend):
    """patch_model hands the replaced nn.Linear's hooks to the FusedLinear: its own load
    post-hook (which builds sparse layouts again for compiled forwards) stays beside them."""
    from torch import nn

    torch._dynamo.reset()
    model = nn.Sequential(nn.Linear(16, 12))
    seen = []
    model[0].register_load_state_dict_post_hook(lambda module, keys: seen.append(1))
    fusedlora.patch_model(model)
    model[0].add_sparse("s", torch.stack([torch.arange(8)] * 2), torch.randn(8))
    x = torch.randn(4, 16)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        compiled(x)
        sd = {k: v.clone() for k, v in model.state_dict().items()}
        sd["0.sparse_indices.s"] = torch.stack([torch.arange(8), torch.arange(8) + 5])
        model.load_state_dict(sd)
        ref = reference.sparse_linear(x, model[0].weight, model[0].bias, sd["0.sparse_indices.s"],
                                      sd["0.sparse_values.s"], 1.0)
        assert rel_err(compiled(x), ref) < 1e-6
    assert seen == [1]
    # the replaced layer's handle still removes its hook (the table is shared, not copied)
    handle = model[0].register_load_state_dict_post_hook(lambda module, keys: seen.append(2))
    other = nn.Sequential(nn.Linear(16, 12))
    gone = other[0].register_load_state_dict_post_hook(lambda module, keys: seen.append(3))
    fusedlora.patch_model(other)
    gone.remove()
    other.load_state_dict(other.state_dict())
    handle.remove()
    assert seen == [1]


def test_deleted_sparse_adapter_leaves_no_cached_order_in_the_pool(torch_backend):
    layer = FusedLinear(16, 12)
    layer.add_lora("keep", r=2)
    x = torch.randn(3, 16)
    for i in range(5):
        name = f"gone_{i}"
        layer.add_sparse(name, torch.stack([torch.arange(8)] * 2), torch.randn(8))
        with torch.no_grad():
            layer(x, adapter_ids=torch.full((3,), layer.adapter_id(name)))
        layer.delete_adapter(name)
    assert len(layer._multi_pool.sparse_order) == 0
