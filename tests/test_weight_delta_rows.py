"""C3A and sparse rows of a routed batch in one Triton launch (fusedlora.weight_delta_rows):
row by row against the float64 oracle of each row's adapter alone, for any mix of LoRA,
C3A (block sizes incl. non-powers of two) and sparse adapters (values in three dtypes),
and the cases that must not take it."""
import pytest
import torch
from torch import nn

import fusedlora
from conftest import DEVICE, TOL, dispatched, rel_err
from fusedlora import FusedLinear, reference
from fusedlora.sparse import random_indices

K, N = 48, 36


def mixed_layer(dtype=torch.float32, bias=True):
    torch.manual_seed(0)
    layer = FusedLinear(K, N, bias=bias, device=DEVICE, dtype=dtype)
    layer.add_lora("wd_l", r=4)
    with torch.no_grad():
        layer.lora_B["wd_l"].normal_()
    layer.add_c3a("wd_c6", block_size=6, init_weights="gaussian")
    layer.add_c3a("wd_c12", block_size=12, init_weights="gaussian")
    for name, seed, vdt, s in (("wd_s32", 1, torch.float32, 0.7), ("wd_s16", 2, torch.float16, 1.3),
                               ("wd_sbf", 3, torch.bfloat16, -0.4)):
        idx = random_indices((N, K), density=0.08, seed=seed)
        layer.add_sparse(name, idx, torch.randn(idx.shape[1], dtype=vdt), scaling=s)
    with torch.no_grad():  # C3A deltas are divided by K: make them visible at fp16 tolerance
        for k in layer.c3a_kernel.values():
            k.mul_(8.0)
    return layer


def oracle(layer, x, ids):
    """float64: each row through its own adapter's dense weight (the base for -1)."""
    d = {k: v.detach().double() for k, v in layer.state_dict().items()}
    names = {layer.adapter_id(n): n for n in layer._kind}
    x2 = x.detach().double().reshape(-1, K)
    out = []
    for m, i in enumerate(ids.reshape(-1).tolist()):
        n, W, xm = names.get(i), d["weight"], x2[m]
        kind = layer._kind.get(n)
        if kind == "c3a":
            W = W + reference.c3a_delta_weight(d[f"c3a_kernel.{n}"], K, N)
        elif kind == "sparse":
            W = W + reference.sparse_delta_weight(layer.sparse_indices[n], d[f"sparse_values.{n}"],
                                                  layer.sparse_scaling[n], (N, K))
        row = nn.functional.linear(xm, W, d.get("bias"))
        if kind == "lora":
            row = row + layer.scaling[n] * d[f"lora_B.{n}"] @ (d[f"lora_A.{n}"] @ xm)
        out.append(row)
    return torch.stack(out).reshape(*x.shape[:-1], N)


def ids_for(layer, names, extra=()):
    return torch.tensor([layer.adapter_id(n) for n in names] + list(extra), device=DEVICE)


ALL = ["wd_l", "wd_c6", "wd_c12", "wd_s32", "wd_s16", "wd_sbf"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("validate", [True, False])
def test_every_kind_in_one_launch_rowwise(triton_backend, dtype, validate):
    layer = mixed_layer(dtype)
    ids = ids_for(layer, ALL + ["wd_c12", "wd_s16"], [-1])
    x = torch.randn(len(ids), K, device=DEVICE, dtype=dtype)
    with torch.no_grad():
        y = layer(x, adapter_ids=ids, validate=validate)
    assert y.dtype == dtype
    assert rel_err(y, oracle(layer, x, ids)) < TOL[dtype]
    ran = dispatched("multi.")
    assert ran.get("multi.c3a_delta:triton:rows") == 1 and ran.get("multi.sparse_delta:triton:rows") == 1, ran
    assert not [k for k in ran if ":torch:" in k], ran  # no per-adapter PyTorch delta


def test_3d_noncontiguous_per_sample_ids_no_bias_inference_mode(triton_backend):
    layer = mixed_layer(bias=False)
    x = torch.randn(K, 3, 4, device=DEVICE).permute(1, 2, 0)  # (3, 4, K), not contiguous
    assert not x.is_contiguous()
    ids = ids_for(layer, ["wd_c6", "wd_sbf"], [-1])  # one per sample
    with torch.inference_mode():
        y = layer(x, adapter_ids=ids)
    assert rel_err(y, oracle(layer, x, ids[:, None].expand(3, 4))) < TOL[torch.float32]
    assert dispatched("multi.c3a_delta:triton:rows") and dispatched("multi.sparse_delta:triton:rows")
    with torch.no_grad():  # the table kept from inference mode serves a call outside it
        y2 = layer(x, adapter_ids=ids)
    assert torch.equal(y, y2)


def test_rows_of_other_kinds_only_and_zero_rows(triton_backend):
    layer = mixed_layer()
    x = torch.randn(5, K, device=DEVICE)
    ids = ids_for(layer, ["wd_l", "wd_l"], [-1, -1, -1])
    with torch.no_grad():
        y = layer(x, adapter_ids=ids, validate=False)  # no host count: the launch runs, every row returns
        assert rel_err(y, oracle(layer, x, ids)) < TOL[torch.float32]
        assert dispatched("multi.c3a_delta:triton:rows") and dispatched("multi.sparse_delta:triton:rows")
        fusedlora.reset_dispatch()
        layer(x, adapter_ids=ids)  # validated: no C3A or sparse row counted, no launch
        assert not dispatched("multi.c3a_delta") and not dispatched("multi.sparse_delta")
        empty = layer(torch.randn(0, K, device=DEVICE), adapter_ids=torch.empty(0, dtype=torch.long, device=DEVICE))
    assert empty.shape == (0, N)


def test_table_follows_changed_adapters(triton_backend):
    """Values changed in place are read live; a replaced storage, a new index buffer, a new
    scaling and adapters added or deleted rebuild the table, in place when its shape allows."""
    layer = mixed_layer()
    x = torch.randn(6, K, device=DEVICE)
    ids = ids_for(layer, ["wd_c6", "wd_c12", "wd_s32", "wd_s16", "wd_sbf"], [-1])

    def check():
        with torch.no_grad():
            y = layer(x, adapter_ids=ids, validate=False)
        assert rel_err(y, oracle(layer, x, ids)) < TOL[torch.float32]

    check()
    table = layer._delta_rows[1]
    with torch.no_grad():
        layer.sparse_values["wd_s32"].mul_(-2.0)
        layer.c3a_kernel["wd_c6"].add_(1.0)
    check()
    assert layer._delta_rows[1] is table
    layer.c3a_kernel["wd_c12"].data = layer.c3a_kernel["wd_c12"].data.clone() * 3  # new storage
    layer.sparse_scaling["wd_s16"] = 2.5
    check()
    assert layer._delta_rows[1] is table  # rebuilt in place: a captured graph reads the new addresses
    with torch.no_grad():  # new nonzeros for wd_sbf, copied into its index buffer in place
        layer.sparse_indices["wd_sbf"].copy_(random_indices((N, K), density=0.08, seed=11))
    check()
    layer.delete_adapter("wd_c6")
    layer.add_c3a("wd_c6", block_size=3, init_weights="gaussian")
    with torch.no_grad():
        layer.c3a_kernel["wd_c6"].mul_(8.0)
    ids = ids_for(layer, ["wd_c6", "wd_c12", "wd_s32", "wd_s16", "wd_sbf"], [-1])
    check()


def test_not_taken_when_gradients_or_prefill_need_the_torch_form(triton_backend, monkeypatch):
    layer = mixed_layer()
    ids = ids_for(layer, ALL)
    x = torch.randn(len(ids), K, device=DEVICE)
    y = layer(x, adapter_ids=ids)  # grad mode, parameters that require grad: autograd's form
    assert y.requires_grad and dispatched("multi.c3a_delta:torch")
    assert not dispatched("multi.c3a_delta:triton")
    fusedlora.reset_dispatch()
    with torch.no_grad():
        big = torch.randn(17, K, device=DEVICE)  # above multi.sort_min_rows() under the interpreter
        big_ids = ids.repeat(3)[:17]
        y = layer(big, adapter_ids=big_ids)
    assert rel_err(y, oracle(layer, big, big_ids)) < TOL[torch.float32]
    assert dispatched("multi.c3a_delta:torch:sorted") and not dispatched("multi.c3a_delta:triton")
    fusedlora.reset_dispatch()
    monkeypatch.setenv("FUSEDLORA_BACKEND", "torch")
    with torch.no_grad():
        layer(x, adapter_ids=ids)
    assert not dispatched("multi.c3a_delta:triton") and dispatched("multi.c3a_delta:torch")


def test_frozen_adapters_take_it_with_grad_mode_on(triton_backend):
    """Serving without no_grad: a frozen layer and an x without grad are enough."""
    layer = mixed_layer()
    for p in list(layer.c3a_kernel.values()) + list(layer.sparse_values.values()):
        p.requires_grad_(False)
    layer.lora_A["wd_l"].requires_grad_(False)
    layer.lora_B["wd_l"].requires_grad_(False)
    layer.bias.requires_grad_(False)
    ids = ids_for(layer, ALL, [-1])
    x = torch.randn(len(ids), K, device=DEVICE)
    layer.weight.requires_grad_(False)
    y = layer(x, adapter_ids=ids)
    assert rel_err(y, oracle(layer, x, ids)) < TOL[torch.float32]
    assert dispatched("multi.sparse_delta:triton:rows")


def test_replaced_index_buffers_are_never_mistaken_for_the_old_ones(triton_backend):
    """A serving loop swapping a sparse adapter's mask by assignment (twice between forwards:
    the freed buffer's id and address can come back for the new one at version 0): every
    forward uses the current mask."""
    layer = mixed_layer()
    ids = ids_for(layer, ["wd_s32", "wd_s32", "wd_c6"], [-1])
    x = torch.randn(4, K, device=DEVICE)
    masks = [random_indices((N, K), density=0.08, seed=100 + s).to(DEVICE) for s in range(12)]
    for step in range(1, 12):
        with torch.no_grad():
            layer(x, adapter_ids=ids)
        layer.sparse_indices["wd_s32"] = masks[step - 1].clone()
        layer.sparse_indices["wd_s32"] = masks[step].clone()
        with torch.no_grad():
            y = layer(x, adapter_ids=ids)
        assert rel_err(y, oracle(layer, x, ids)) < TOL[torch.float32], step


def test_index_storage_swapped_through_data_is_never_mistaken_for_the_old(triton_backend):
    """As above, but the mask's storage swapped under the same object (``indices.data = new``,
    twice between forwards: the version stays 0 and a freed address could come back): the
    one launch's table and the layout cache both hold the storage they were built from, so
    every forward uses the current mask. Pickling drops the table (it holds raw addresses)."""
    import io

    layer = mixed_layer()
    ids = ids_for(layer, ["wd_s32", "wd_s32", "wd_c6"], [-1])
    x = torch.randn(4, K, device=DEVICE)
    masks = [random_indices((N, K), density=0.08, seed=200 + s).to(DEVICE) for s in range(12)]
    masks = [m for m in masks if m.shape == layer.sparse_indices["wd_s32"].shape]
    assert len(masks) > 4
    for step in range(1, len(masks)):
        with torch.no_grad():
            layer(x, adapter_ids=ids)
        layer.sparse_indices["wd_s32"].data = masks[step - 1].clone()
        layer.sparse_indices["wd_s32"].data = masks[step].clone()
        with torch.no_grad():
            y = layer(x, adapter_ids=ids)
        assert rel_err(y, oracle(layer, x, ids)) < TOL[torch.float32], step
    assert layer._delta_rows is not None
    buf = io.BytesIO()
    torch.save(layer, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert loaded._delta_rows is None and loaded._multi_cache is None and layer._delta_rows is not None
    with torch.no_grad():
        assert rel_err(loaded(x, adapter_ids=ids), oracle(layer, x, ids)) < TOL[torch.float32]


def test_values_and_kernels_the_kernel_cannot_read_go_to_the_torch_form(triton_backend):
    """Strided or expanded sparse values are served right (by the PyTorch form, recorded);
    values or a C3A kernel of the wrong size raise there instead of being read out of bounds."""
    layer = mixed_layer()
    ids = ids_for(layer, ["wd_s32", "wd_c6"], [-1])
    x = torch.randn(3, K, device=DEVICE)
    v = layer.sparse_values["wd_s32"]
    v.data = torch.stack([v.data, torch.full_like(v.data, 1e30)], 1).reshape(-1)[::2]  # stride 2
    with torch.no_grad():
        y = layer(x, adapter_ids=ids)
    assert rel_err(y, oracle(layer, x, ids)) < TOL[torch.float32]
    assert dispatched("multi.sparse_delta:torch") and not dispatched("multi.sparse_delta:triton")
    v.data = v.data[:-1].contiguous()  # one value short of the layout
    with torch.no_grad(), pytest.raises((IndexError, RuntimeError, ValueError)):
        layer(x, adapter_ids=ids)
    layer.delete_adapter("wd_s32")
    k = layer.c3a_kernel["wd_c6"]
    k.data = k.data[:, :-1]  # (N/b, K/b - 1, b): a kernel for another in_features
    with torch.no_grad(), pytest.raises((IndexError, RuntimeError, ValueError)):
        layer(x, adapter_ids=ids_for(layer, ["wd_c6"], [-1, -1]))


def test_forward_mode_ad_gets_its_tangent_or_a_clear_error(triton_backend):
    """Under forward-mode AD the C3A rows' deltas carry x's tangent (the PyTorch form serves,
    not the one launch); a fused op (here the LoRA rows' multi-adapter op), which carries
    no tangents, raises instead of dropping them."""
    import torch.autograd.forward_ad as fwAD

    layer = FusedLinear(K, N, device=DEVICE)
    layer.add_c3a("wd_fc6", block_size=6, init_weights="gaussian")
    layer.add_c3a("wd_fc12", block_size=12, init_weights="gaussian")
    for p in layer.parameters():
        p.requires_grad_(False)
    ids = ids_for(layer, ["wd_fc6", "wd_fc12"], [-1])
    x, t = torch.randn(3, K, device=DEVICE), torch.randn(3, K, device=DEVICE)
    with fwAD.dual_level():
        y = layer(fwAD.make_dual(x, t), adapter_ids=ids)
        primal, tangent = fwAD.unpack_dual(y)
    assert rel_err(primal, oracle(layer, x, ids)) < TOL[torch.float32]
    # the layer is affine in x: its tangent is the layer without bias at t
    assert rel_err(tangent, oracle(layer, t, ids) - layer.bias.detach().double()) < 1e-5
    assert not dispatched("multi.c3a_delta:triton")
    layer.add_lora("wd_fl", r=2)
    with fwAD.dual_level(), pytest.raises(NotImplementedError, match="forward-mode AD"):
        layer(fwAD.make_dual(x, t), adapter_ids=ids_for(layer, ["wd_fl", "wd_fc6"], [-1]))


@pytest.mark.gpu
def test_gpu_bf16_rowwise_and_cuda_graph_capture(triton_backend):
    """bf16 (the interpreter's bf16 dots are wrong, so on the GPU only), and a CUDA graph
    captured with validate=False replays the table's current addresses."""
    layer = mixed_layer(torch.bfloat16)
    ids = ids_for(layer, ALL + ALL[::-1], [-1, -1])
    x = torch.randn(len(ids), K, device=DEVICE, dtype=torch.bfloat16)
    with torch.no_grad():
        y = layer(x, adapter_ids=ids, validate=False)
        assert rel_err(y, oracle(layer, x, ids)) < TOL[torch.bfloat16]
        assert dispatched("multi.sparse_delta:triton:rows") and dispatched("multi.c3a_delta:triton:rows")
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            layer(x, adapter_ids=ids, validate=False)  # warm-up outside capture
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = layer(x, adapter_ids=ids, validate=False)
        layer.sparse_values["wd_s16"].mul_(3.0)  # read live by the replay
        graph.replay()
        torch.cuda.synchronize()
        assert rel_err(out, oracle(layer, x, ids)) < TOL[torch.bfloat16]


def test_table_of_adapters_added_under_inference_mode_is_built_once(triton_backend, monkeypatch):
    """Index buffers made under torch.inference_mode keep no version counter: the table takes
    them as unchanged (as the layouts' cache does) instead of rebuilding, with a host copy,
    at every call (which a CUDA-graph capture could not take)."""
    from fusedlora import weight_delta_rows

    with torch.inference_mode():
        layer = mixed_layer()
    builds = []
    real = weight_delta_rows._entries
    monkeypatch.setattr(weight_delta_rows, "_entries", lambda *a: builds.append(1) or real(*a))
    ids = ids_for(layer, ["wd_c6", "wd_s32", "wd_sbf"], [-1])
    x = torch.randn(4, K, device=DEVICE)
    with torch.inference_mode():
        for _ in range(3):
            y = layer(x, adapter_ids=ids, validate=False)
    assert len(builds) == 1
    assert rel_err(y, oracle(layer, x, ids)) < TOL[torch.float32]
