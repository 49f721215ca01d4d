"""FusedLinear: drop-in nn.Linear, PEFT's LoRA semantics, merge, compile."""
import math

import pytest
import torch
from torch import nn

import fusedlora
from conftest import DEVICE, TOL, dispatched, rel_err
from fusedlora import FusedLinear, reference


def randomize_(layer, scale=0.3):
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn_like(p) * scale)
    return layer


def test_no_adapter_is_exactly_nn_linear():
    torch.manual_seed(0)
    ref = nn.Linear(20, 12)
    torch.manual_seed(0)
    layer = FusedLinear(20, 12)
    assert torch.equal(ref.weight, layer.weight) and torch.equal(ref.bias, layer.bias)
    assert list(layer.state_dict()) == list(ref.state_dict()) == ["weight", "bias"]
    x = torch.randn(5, 3, 20)
    assert torch.equal(layer(x), ref(x))
    layer2 = FusedLinear(20, 12, bias=False)
    assert layer2.bias is None and list(layer2.state_dict()) == ["weight"]
    assert isinstance(layer, nn.Linear)


def test_from_linear_shares_parameters():
    lin = nn.Linear(10, 7)
    layer = FusedLinear.from_linear(lin)
    assert layer.weight is lin.weight and layer.bias is lin.bias
    x = torch.randn(4, 10)
    assert torch.equal(layer(x), lin(x))
    with torch.no_grad():
        layer.weight.add_(1.0)
    assert torch.equal(layer.weight, lin.weight)


def test_add_lora_parameters_and_inits():
    layer = FusedLinear(32, 24, dtype=torch.float16)
    layer.add_lora("task", r=8, lora_alpha=16)
    assert layer.lora_A["task"].shape == (8, 32) and layer.lora_B["task"].shape == (24, 8)
    assert layer.lora_A["task"].dtype == torch.float16
    assert layer.scaling["task"] == 2.0 and layer.active_adapters == ["task"]
    assert layer.lora_B["task"].abs().sum() == 0
    bound = 1 / math.sqrt(32)  # kaiming_uniform(a=sqrt(5)) on fan_in 32
    assert layer.lora_A["task"].abs().max() <= bound and layer.lora_A["task"].std() > bound / 4
    layer.add_lora("rs", r=16, lora_alpha=8, use_rslora=True, init_lora_weights="gaussian")
    assert layer.scaling["rs"] == 8 / 4 and layer.active_adapters == ["task"]
    assert abs(layer.lora_A["rs"].float().std().item() - 1 / 16) < 0.02
    layer.add_lora("raw", r=4, init_lora_weights=False)
    assert layer.lora_B["raw"].abs().sum() > 0 and layer.scaling["raw"] == 1.0
    assert set(layer.state_dict()) == {"weight", "bias", "lora_A.task", "lora_B.task", "lora_A.rs",
                                       "lora_B.rs", "lora_A.raw", "lora_B.raw"}


def test_state_dict_round_trip():
    a = randomize_(FusedLinear(16, 8))
    a.add_lora("x", r=4)
    randomize_(a)
    b = FusedLinear(16, 8)
    b.add_lora("x", r=4)
    b.load_state_dict(a.state_dict())
    inp = torch.randn(3, 16)
    assert torch.equal(a(inp), b(inp))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_forward_equals_reference_and_grads_flow(monkeypatch, backend):
    monkeypatch.setenv("FUSEDLORA_BACKEND", backend)
    fusedlora.reset_dispatch()
    layer = randomize_(FusedLinear(30, 20, device=DEVICE))
    layer.add_lora("t", r=6, lora_alpha=12)
    randomize_(layer)
    x = torch.randn(2, 5, 30, device=DEVICE, requires_grad=True)
    y = layer(x)
    y.square().sum().backward()
    ref = reference.lora_linear(x.double(), layer.weight.double(), layer.bias.double(),
                                layer.lora_A["t"].double(), layer.lora_B["t"].double(), 2.0)
    assert rel_err(y, ref) < TOL[torch.float32]
    assert layer.lora_A["t"].grad is not None and layer.lora_B["t"].grad is not None
    assert layer.weight.grad is not None and x.grad is not None
    assert any(k.startswith(f"lora.forward:{backend}") for k in dispatched())


def test_several_active_adapters_sum(triton_backend):
    layer = randomize_(FusedLinear(24, 16, device=DEVICE))
    layer.add_lora("a", r=3, lora_alpha=6)
    layer.add_lora("b", r=5, lora_alpha=2, use_rslora=True)
    randomize_(layer)
    layer.set_adapter(["a", "b"])
    x = torch.randn(7, 24, device=DEVICE)
    d = {k: v.double() for k, v in layer.state_dict().items()}
    ref = (reference.lora_linear(x.double(), d["weight"], d["bias"], d["lora_A.a"], d["lora_B.a"], 2.0)
           + reference.lora_linear(x.double(), 0 * d["weight"], None, d["lora_A.b"], d["lora_B.b"],
                                   2 / math.sqrt(5)))
    assert rel_err(layer(x), ref) < TOL[torch.float32]
    assert dispatched("lora.forward:triton")  # one fused pass for both adapters
    layer.set_adapter(None)
    assert torch.equal(layer(x), nn.functional.linear(x, layer.weight, layer.bias))
    layer.set_adapter("b")
    with pytest.warns(UserWarning, match="Setting active adapter to a"):
        layer.delete_adapter("b")  # PEFT's rule: the first remaining adapter becomes active
    assert layer.active_adapters == ["a"] and layer.adapter_names == ["a"]


def test_several_adapters_with_dropout_in_training():
    layer = randomize_(FusedLinear(24, 16))
    layer.add_lora("a", r=3, lora_dropout=0.5)
    layer.add_lora("b", r=2, lora_dropout=0.5)
    randomize_(layer)
    layer.set_adapter(["a", "b"])
    x = torch.randn(64, 24)
    fusedlora.reset_dispatch()
    y_train = layer.train()(x)
    assert "lora.extra_adapter:torch:eager" in dispatched()
    y_eval = layer.eval()(x)
    assert not torch.allclose(y_train, y_eval)
    # dropout is unbiased: the mean over many draws approaches the eval output
    layer.train()
    mean = sum(layer(x) for _ in range(200)) / 200
    assert rel_err(mean, y_eval) < 0.05


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_replays_the_dropout_mask(monkeypatch, backend, reentrant):
    """HF's gradient_checkpointing recomputes the forward in the backward: the recomputed
    dropout mask must be the forward's (the seed comes from torch's CPU generator, whose
    state checkpoint restores), so gradients equal the plain forward's exactly."""
    from torch.utils.checkpoint import checkpoint

    monkeypatch.setenv("FUSEDLORA_BACKEND", backend)
    torch.manual_seed(0)
    layer = FusedLinear(32, 24, device=DEVICE)
    layer.add_lora("a", r=4, lora_dropout=0.3)
    nn.init.normal_(layer.lora_B["a"], std=0.2)
    layer.train()
    x0 = torch.randn(5, 32, device=DEVICE)

    def run(ckpt):
        x = x0.clone().requires_grad_()
        layer.zero_grad()
        torch.manual_seed(1)
        f = lambda t: torch.tanh(layer(t)).square().sum(-1)  # noqa: E731
        y = checkpoint(f, x, use_reentrant=reentrant) if ckpt else f(x)
        y.sum().backward()
        return y.detach(), x.grad, layer.lora_A["a"].grad.clone(), layer.lora_B["a"].grad.clone()

    plain, ckpt = run(False), run(True)
    for a, b in zip(plain, ckpt):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_merge_unmerge_round_trip(triton_backend, dtype):
    layer = randomize_(FusedLinear(40, 24, device=DEVICE, dtype=dtype))
    layer.add_lora("a", r=4)
    layer.add_lora("b", r=2)
    randomize_(layer)
    layer.set_adapter(["a", "b"])
    w0 = layer.weight.detach().clone()
    x = torch.randn(9, 40, device=DEVICE, dtype=dtype)
    y = layer(x)
    layer.merge()
    assert layer.merged and layer.merged_adapters == ["a", "b"]
    fusedlora.reset_dispatch()
    y_merged = layer(x)
    assert dispatched() == {}  # merged forward is the plain base GEMM
    assert rel_err(y_merged, y) < TOL[dtype]
    with pytest.raises(ValueError, match="unmerge"):
        layer.delete_adapter("a")
    layer.unmerge()
    assert not layer.merged
    tol = 0 if dtype == torch.float32 else 1e-3
    assert rel_err(layer.weight, w0) <= max(tol, 1e-6)


def test_to_dtype_moves_adapters(triton_backend):
    layer = randomize_(FusedLinear(16, 12))
    layer.add_lora("a", r=4)
    randomize_(layer)
    x = torch.randn(5, 16)
    y32 = layer(x)
    layer.to(torch.float16)
    assert layer.lora_A["a"].dtype == torch.float16 and layer.lora_B["a"].dtype == torch.float16
    assert rel_err(layer(x.half()), y32) < TOL[torch.float16]


def test_matches_peft_lora_layer_forward_and_grads():
    peft = pytest.importorskip("peft")

    torch.manual_seed(0)
    cfg = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, use_rslora=True, init_lora_weights="gaussian",
                          target_modules=["0"])
    pmodel = peft.get_peft_model(nn.Sequential(nn.Linear(36, 20)), cfg)
    pl = pmodel.base_model.model[0]
    base = pl.base_layer
    with torch.no_grad():
        pl.lora_B["default"].weight.normal_()
    base_copy = nn.Linear(36, 20)
    base_copy.load_state_dict(base.state_dict())
    layer = FusedLinear.from_linear(base_copy)
    layer.add_lora("task", r=4, lora_alpha=8, use_rslora=True)
    with torch.no_grad():
        layer.lora_A["task"].copy_(pl.lora_A["default"].weight)
        layer.lora_B["task"].copy_(pl.lora_B["default"].weight)
    assert layer.scaling["task"] == pl.scaling["default"]
    x = torch.randn(3, 6, 36)
    y_peft, y = pl(x), layer(x)
    assert rel_err(y, y_peft) < 1e-6
    y_peft.sum().backward()
    y.sum().backward()
    assert rel_err(layer.lora_A["task"].grad, pl.lora_A["default"].weight.grad) < 1e-6
    assert rel_err(layer.lora_B["task"].grad, pl.lora_B["default"].weight.grad) < 1e-6


def test_delete_active_adapter_activates_as_peft():
    """Deleting an active adapter keeps the other active ones; with none left, PEFT's layer
    activates the first remaining adapter in sorted order (the same on every layer)."""
    peft = pytest.importorskip("peft")
    import warnings

    torch.manual_seed(0)
    names = ["zeta", "beta", "alpha", "gamma"]
    cfg = peft.LoraConfig(r=2, lora_alpha=2)
    pl = peft.tuners.lora.Linear(nn.Linear(8, 6), names[0], cfg, r=2, lora_alpha=2)
    layer = FusedLinear(8, 6)
    for n in names:
        if n != names[0]:
            pl.update_layer(n, r=2, lora_alpha=2, config=cfg)
        layer.add_lora(n, r=2)
    for active, deleted in ([["zeta"], "zeta"], [["beta", "gamma"], "gamma"], [["beta"], "beta"]):
        pl.set_adapter(active)
        layer.set_adapter(active)
        with warnings.catch_warnings(record=True) as peft_warned:
            warnings.simplefilter("always")
            pl.delete_adapter(deleted)
        with warnings.catch_warnings(record=True) as ours_warned:
            warnings.simplefilter("always")
            layer.delete_adapter(deleted)
        assert layer.active_adapters == list(pl.active_adapters), (active, deleted)
        assert len(ours_warned) == len(peft_warned)
    assert layer.active_adapters == ["alpha"] and layer.adapter_names == ["alpha"]
    layer.delete_adapter("alpha")  # the last one: nothing left to activate
    assert layer.active_adapters == [] and layer.adapter_names == []


def test_only_the_first_adapter_is_activated_by_adding():
    """README: the first adapter added becomes active, later ones wait for set_adapter, also
    after set_adapter(None) chose the base layer."""
    layer = FusedLinear(8, 6)
    layer.add_lora("a", r=2)
    assert layer.active_adapters == ["a"]
    layer.set_adapter(None)
    layer.add_lora("b", r=2)
    layer.add_c3a("c", block_size=2)
    assert layer.active_adapters == []
    x = torch.randn(3, 8)
    assert torch.equal(layer(x), nn.functional.linear(x, layer.weight, layer.bias))
    for n in ("a", "b", "c"):
        layer.delete_adapter(n)
    layer.add_lora("d", r=2)  # the first adapter of an empty layer again
    assert layer.active_adapters == ["d"]


@pytest.mark.parametrize("name", ["to", "update", "training", "forward", "_parameters", "keys", "__class__"])
def test_adapter_names_that_are_container_attributes_are_refused(name):
    """nn.ParameterDict keys become attributes: 'to' or 'update' used to fail half-way through
    add_sparse (leaving its indices in the state_dict), 'training' replaced the dict's flag
    (then layer.eval() raised), '_parameters' broke state_dict(). Refused up front, as '.'."""
    from fusedlora.sparse import random_indices

    layer = FusedLinear(8, 6)
    idx = random_indices((6, 8), density=0.25, seed=0)
    for add in (lambda: layer.add_lora(name, r=2), lambda: layer.add_c3a(name, block_size=2),
                lambda: layer.add_sparse(name, idx)):
        with pytest.raises(ValueError, match="adapter name"):
            add()
    assert layer.adapter_names == [] and list(layer.state_dict()) == ["weight", "bias"]
    layer.eval()
    layer.add_lora("weight", r=2)  # not an attribute of the containers: fine, as in PEFT
    layer.train()
    assert "lora_A.weight" in layer.state_dict()


def test_merge_checks_every_name_first_and_safe_merge():
    """merge(adapter_names) merges nothing if one name is unknown; safe_merge=True (PEFT's
    keyword) refuses an adapter that would make the weight non-finite and leaves W as it was;
    merge(True), PEFT's positional safe_merge, is refused, not taken as a list."""
    layer = randomize_(FusedLinear(8, 6))
    layer.add_lora("a", r=2, init_lora_weights=False)
    layer.add_lora("b", r=2, init_lora_weights=False)
    w0 = layer.weight.detach().clone()
    with pytest.raises(ValueError, match="unknown adapter 'zz'"):
        layer.merge(["a", "zz"])
    assert layer.merged_adapters == [] and torch.equal(layer.weight, w0)
    with pytest.raises(TypeError, match="safe_merge"):
        layer.merge(True)
    with torch.no_grad():
        layer.lora_B["b"][1, 0] = float("nan")
    with pytest.raises(ValueError, match="NaNs detected in the merged weights. The adapter 'b'"):
        layer.merge(["b"], safe_merge=True)
    assert layer.merged_adapters == [] and torch.equal(layer.weight, w0)
    layer.merge(["a"], safe_merge=True)  # inactive adapters too, as PEFT's adapter_names
    assert layer.merged_adapters == ["a"] and layer.active_adapters == ["a"]
    layer.unmerge()
    half = FusedLinear(8, 6, dtype=torch.float16)
    half.add_lora("big", r=2, lora_alpha=1e7, init_lora_weights=False)  # finite in float32, inf in float16
    with pytest.raises(ValueError, match="NaNs detected"):
        half.merge(safe_merge=True)
    assert not half.merged and torch.isfinite(half.weight).all()


def _tiny_model():
    torch.manual_seed(0)
    model = nn.Sequential(FusedLinear(16, 32), nn.GELU(), FusedLinear(32, 8))
    for m in model:
        if isinstance(m, FusedLinear):
            m.add_lora("t", r=4, lora_dropout=0.1)
            nn.init.normal_(m.lora_B["t"])
    return model


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_torch_compile_fullgraph_no_graph_break(monkeypatch, backend):
    monkeypatch.setenv("FUSEDLORA_BACKEND", backend)
    torch._dynamo.reset()
    model = _tiny_model()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    x = torch.randn(5, 16)
    for train in (True, False):
        model.train(train)
        y = compiled(x)
        y.sum().backward()
    explain = torch._dynamo.explain(model)(x)
    assert explain.graph_break_count == 0 and explain.graph_count == 1
    model.eval()
    assert rel_err(compiled(x), model(x)) < 1e-6


def test_compiled_forward_follows_sparse_indices_loaded_after_it_was_traced(torch_backend):
    """A traced forward reads the layout eager code built last: load_state_dict (new indices
    copied in place) forgets it, and the next eager use checks the indices."""
    from fusedlora.sparse import random_indices

    torch._dynamo.reset()
    torch.manual_seed(0)
    x = torch.randn(4, 16)
    layer, source = FusedLinear(16, 32), FusedLinear(16, 32)
    for m, seed in ((layer, 0), (source, 1)):
        idx = random_indices((32, 16), density=0.1, seed=seed)
        m.add_sparse("s", idx, torch.randn(idx.shape[1]))
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        compiled(x)  # traced against the first indices
        layer.load_state_dict(source.state_dict())
        assert rel_err(compiled(x), source(x)) < 1e-6
        assert rel_err(layer(x), source(x)) < 1e-6
    bad = source.state_dict()
    bad["sparse_indices.s"] = bad["sparse_indices.s"].clone()
    bad["sparse_indices.s"][0, 0] = 32  # row out of range: checked at the next eager use
    layer.load_state_dict(bad)
    with torch.no_grad():
        assert torch.isfinite(compiled(x)).all()  # a traced build clamps: wrong numbers, no stray reads
    with pytest.raises(ValueError, match="indices"):
        layer(x)


def test_meta_built_sparse_layer_materialised_with_to_empty_then_loaded(torch_backend):
    """init_empty_weights-style loading: to_empty's indices are unwritten memory, so a device
    move does not check them (it drops the cached layouts); the load that follows does."""
    from fusedlora.sparse import random_indices

    torch._dynamo.reset()
    idx = random_indices((12, 16), density=0.2, seed=0)
    src = FusedLinear(16, 12)
    src.add_sparse("s", idx, torch.randn(idx.shape[1]))
    layer = FusedLinear(16, 12, device="meta")
    layer.add_sparse("s", idx.to("meta"), torch.randn(idx.shape[1], device="meta"))
    layer.to_empty(device="cpu")
    layer.load_state_dict(src.state_dict())
    x = torch.randn(3, 16)
    with torch.no_grad():
        assert rel_err(layer(x), src(x)) < 1e-6
        assert rel_err(torch.compile(layer, backend="aot_eager", fullgraph=True)(x), src(x)) < 1e-6


@pytest.mark.parametrize("traced,now", [("triton", "torch"), ("torch", "triton")])
def test_compiled_dropout_backward_replays_the_mask_its_forward_drew(monkeypatch, traced, now):
    """Under torch.compile the autograd context is filled at trace time: a backend changed since
    (use_backend, FUSEDLORA_BACKEND, a compile cache from another process) made the forward draw
    one mask family (torch's generator or the kernels' Philox) and the backward replay the
    other, silently. The output is linear in the adapter P, so L(P + E) - L(P) = <dP, E> holds
    exactly only with the forward's own mask: LoRA's A, and a routed pool's A rows."""
    from fusedlora import ops
    from fusedlora.multi import multi_lora_linear
    from fusedlora.routing import pack_loras

    torch.manual_seed(0)
    x, W, gy = torch.randn(20, 32), torch.randn(16, 32), torch.randn(20, 16)
    B = torch.randn(16, 4)
    pool_A, pool_BT, off, rank, scale, rmax = pack_loras([torch.randn(2, 32), torch.randn(3, 32)],
                                                         [torch.randn(16, 2), torch.randn(16, 3)], [1.0, 0.5])
    slots, drop = torch.tensor([0, 1, -1, 1] * 5, dtype=torch.int32), torch.tensor([0.5, 0.3])
    cases = [(lambda x, P: ops.lora_linear(x, W, None, P, B, 1.0, 0.5), torch.randn(4, 32)),
             (lambda x, P: multi_lora_linear(x, W, None, slots, P, pool_BT, off, rank, scale, rmax, drop),
              pool_A.detach())]
    for fn, P in cases:
        P.requires_grad_()
        monkeypatch.setenv("FUSEDLORA_BACKEND", traced)
        torch._dynamo.reset()
        f = torch.compile(fn, backend="aot_eager", fullgraph=True)
        f(x, P)  # traced under the first backend
        monkeypatch.setenv("FUSEDLORA_BACKEND", now)
        E = torch.randn_like(P)
        torch.manual_seed(5)
        loss = (f(x, P) * gy).sum()
        loss.backward()
        with torch.no_grad():
            torch.manual_seed(5)
            moved = (f(x, P + E) * gy).sum()
        assert abs((moved - loss).item() - (P.grad * E).sum().item()) < 1e-3 * abs((moved - loss).item())


def test_compiled_graph_feeds_no_seed_tensor_without_dropout(torch_backend):
    """Without dropout the fused ops get no seed tensor: a CPU tensor among a CUDA op's inputs
    puts the op in a CUDA-graph partition that then rejects the CPU storage (torch 2.11,
    mode="reduce-overhead": "storage data ptrs are not allocated in pool"). With dropout the
    seed is there, a fresh draw per call."""
    graphs = []

    def keep(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    def seeds(gm):  # the seed arguments of the fused ops in a traced graph
        calls = [n for n in gm.graph.nodes if n.op == "call_function" and "fusedlora" in str(n.target)]
        assert calls, gm.graph
        return [n.args[-1] for n in calls]

    torch.manual_seed(0)
    layer = FusedLinear(16, 12)
    layer.add_lora("a", r=4)
    x = torch.randn(3, 16, requires_grad=True)
    for p in (0.0, 0.2):
        layer.lora_dropout["a"] = p
        torch._dynamo.reset()
        graphs.clear()
        torch.compile(layer, backend=keep, fullgraph=True)(x).sum().backward()
        got = seeds(graphs[0])
        assert all((s is None) == (p == 0.0) for s in got), (p, got)
    # the routed (multi-adapter) op too
    layer.lora_dropout["a"] = 0.0
    layer.add_lora("b", r=2)
    ids = torch.tensor([layer.adapter_id("a"), -1, layer.adapter_id("b")])
    torch._dynamo.reset()
    graphs.clear()
    torch.compile(lambda t: layer(t, adapter_ids=ids, validate=False), backend=keep, fullgraph=True)(x)
    assert all(s is None for s in seeds(graphs[0]))


def test_dropout_inside_a_cuda_graph_capture_is_refused(torch_backend, monkeypatch):
    """A capture bakes the seed read on the host into the graph: every replay would draw the
    forward's one mask. Refused with the way out; without dropout the capture goes on."""
    from fusedlora import ops

    layer = FusedLinear(16, 12)
    layer.add_lora("a", r=4, lora_dropout=0.1)
    layer.add_lora("b", r=2)
    x = torch.randn(3, 16)
    ids = torch.tensor([layer.adapter_id("a"), layer.adapter_id("b"), -1])
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    with pytest.raises(RuntimeError, match="dropout inside a CUDA graph.*lora_dropout=0"):
        layer(x)
    with pytest.raises(RuntimeError, match="dropout inside a CUDA graph"):
        layer(x, adapter_ids=ids)
    assert ops.seed_value(None) == 0
    layer.eval()  # no dropout in eval: nothing to refuse
    layer(x)
    layer(x, adapter_ids=ids)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_torch_compile_dynamic_shapes_every_adapter_kind(monkeypatch, backend):
    """torch.compile(dynamic=True) traces Python floats (the layer's scaling, dropout p) as
    symbols: the argument checks must trace too (math.isfinite broke the graph), and new
    row counts must not recompile."""
    import torch._dynamo.testing
    from fusedlora.sparse import random_indices

    monkeypatch.setenv("FUSEDLORA_BACKEND", backend)
    torch.manual_seed(0)
    layer = FusedLinear(32, 24)
    layer.add_lora("a", r=4, lora_dropout=0.1)
    nn.init.normal_(layer.lora_B["a"])
    layer.add_c3a("c", block_size=8, init_weights="gaussian")
    layer.add_sparse("s", random_indices((24, 32), density=0.05, seed=0))
    layer.eval()
    for names in (["a"], ["c"], ["s"], ["a", "c"]):
        layer.set_adapter(names)
        layer(torch.randn(1, 32))  # builds the sparse layout cache outside the trace
        torch._dynamo.reset()
        counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
        compiled = torch.compile(layer, backend=counter, fullgraph=True, dynamic=True)
        frames = []
        for rows in (3, 5, 9):
            x = torch.randn(2, rows, 32, requires_grad=True)
            y = compiled(x)
            y.sum().backward()
            assert rel_err(y, layer(x)) < 1e-6, names
            frames.append(counter.frame_count)
        assert frames[0] == frames[-1], (names, frames)  # nothing recompiled for new row counts


@pytest.mark.gpu
def test_gpu_inductor_compiles_every_adapter_kind_without_a_graph_break(monkeypatch):
    """torch.compile with Inductor (the default backend) and fullgraph=True on the GPU, in
    training and inference, over layers that hold LoRA, C3A and sparse adapters at once:
    every op runs as its custom op there, and the compiled model matches the eager one."""
    from fusedlora.sparse import random_indices

    monkeypatch.delenv("FUSEDLORA_BACKEND", raising=False)
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = nn.Sequential(FusedLinear(64, 128), nn.GELU(), FusedLinear(128, 64)).cuda().to(torch.bfloat16)
    for i, m in enumerate((model[0], model[2])):
        m.add_lora("l", r=8, lora_dropout=0.0)
        nn.init.normal_(m.lora_B["l"], std=0.02)
        m.add_c3a("c", block_size=16, init_weights="gaussian")
        N, K = m.weight.shape
        m.add_sparse("s", random_indices((N, K), density=0.02, seed=i), scaling=1.0)
        m.set_adapter(["l", "c", "s"])
    compiled = torch.compile(model, fullgraph=True)
    x = torch.randn(37, 64, device="cuda", dtype=torch.bfloat16)
    for train in (True, False):
        model.train(train)
        y = compiled(x)
        y.float().sum().backward()
    model.eval()
    with torch.no_grad():
        assert rel_err(compiled(x), model(x)) < TOL[torch.bfloat16]


def test_custom_ops_pass_opcheck(torch_backend):
    from fusedlora.ops import _lora_backward, _lora_forward, draw_seed

    x, w, b = torch.randn(5, 8), torch.randn(6, 8), torch.randn(6)
    A, B = torch.randn(2, 8), torch.randn(6, 2)
    for p in (0.0, 0.3):
        args = (x, w, b, A.requires_grad_(), B.requires_grad_(), 0.5, p, draw_seed(p))
        torch.library.opcheck(_lora_forward, args)
    u = torch.randn(5, 2)
    torch.library.opcheck(_lora_backward, (torch.randn(5, 6), x, w, A.detach(), B.detach(), u, 0.5, 0.0,
                                           draw_seed(0.0), False, [True, False, True, True, False]))


def test_inference_calls_skip_the_custom_op_dispatch(monkeypatch):
    """No autograd graph, no tracing, no dispatch mode: the op body runs directly
    (a decode step without CUDA graphs saves the dispatcher's time per layer); otherwise
    the registered custom op runs, as autograd, torch.compile and FakeTensor need."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from fusedlora import ops

    calls = []
    direct = ops._lora_forward.direct
    monkeypatch.setattr(ops._lora_forward, "direct", lambda *a: calls.append(1) or direct(*a))
    monkeypatch.setenv("FUSEDLORA_BACKEND", "torch")
    x, W, A, B = torch.randn(3, 8), torch.randn(5, 8), torch.randn(2, 8), torch.randn(5, 2)
    with torch.no_grad():
        y = ops.lora_linear(x, W, None, A, B, 2.0)
    assert calls == [1]
    assert torch.allclose(y, x @ W.t() + 2.0 * (x @ A.t()) @ B.t(), atol=1e-5)
    # A graph to record, eagerly: the same formulas as a torch.autograd.Function (its
    # apply costs a fraction of the custom op's autograd dispatch), whose forward is the body.
    y = ops.lora_linear(x, W, None, A, B.requires_grad_(), 2.0)
    assert type(y.grad_fn.next_functions[0][0]).__name__ == "lora_linearBackward" and calls == [1, 1]
    y.sum().backward()
    assert B.grad is not None
    ops.lora_linear(x, W, None, A, B.detach(), 2.0)  # grad mode on, nothing requires grad: direct
    assert calls == [1, 1, 1]
    B = B.detach()
    with FakeTensorMode(allow_non_fake_inputs=True) as mode, torch.no_grad():  # the seed is a real tensor
        fake = [mode.from_tensor(t) for t in (x, W, A, B)]
        assert ops.lora_linear(fake[0], fake[1], None, fake[2], fake[3], 2.0).shape == (3, 5)
    assert calls == [1, 1, 1]
