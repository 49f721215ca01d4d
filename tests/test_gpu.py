"""GPU-only checks: bf16 (wrong under the interpreter), large shapes, the real
autotuner and split-K plans, tf32, and CUDA graph capture of the forward."""
import pytest
import torch

import fusedlora
from conftest import TOL, dispatched, rel_err
from fusedlora import ops
from test_lora_kernels import NAMES, check_against_reference, make_inputs

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("shape", [(1, 4096, 4096, 16), (16, 4096, 11008, 64), (333, 1000, 777, 13),
                                   (4096, 4096, 4096, 16), (5, 4000, 3000, 8)])
def test_large_shapes_match_reference(triton_backend, shape, dtype):
    check_against_reference(make_inputs(*shape, dtype))
    assert dispatched("lora.forward:triton")


def test_bf16_dropout_and_3d(triton_backend):
    check_against_reference(make_inputs(0, 512, 384, 16, torch.bfloat16, lead=(4, 77)), p=0.1, seed=5)


def test_tf32_tolerance(triton_backend):
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        inp = make_inputs(256, 512, 384, 16, torch.float32)
        y = ops.lora_linear(*(inp[n] for n in NAMES), 0.5)
        from fusedlora import reference
        ref = reference.lora_linear(*(inp[n].double() for n in NAMES), 0.5)
        assert rel_err(y, ref) < 1e-3
    finally:
        torch.backends.cuda.matmul.allow_tf32 = False


@pytest.mark.parametrize("M", [1, 8, 256])
def test_cuda_graph_capture_of_forward(triton_backend, M):
    layer = fusedlora.FusedLinear(1024, 768, device="cuda", dtype=torch.bfloat16).eval()
    layer.add_lora("a", r=16)
    torch.nn.init.normal_(layer.lora_B["a"], std=0.02)
    x = torch.randn(M, 1024, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        expected = layer(x)  # warm-up: compiles and autotunes outside the capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = layer(x)
        x.copy_(torch.randn_like(x))
        graph.replay()
        torch.cuda.synchronize()
        assert rel_err(out, layer(x)) < TOL[torch.bfloat16]
        assert not torch.equal(out, expected)


@pytest.mark.parametrize("kind", ["lora", "c3a", "multi"])
def test_auto_warm_up_then_capture(kind, monkeypatch):
    """The usual recipe under auto: eager warm-up calls (HOST_WINS' host path, which also runs
    the capture-time path once per signature), then a capture. The capture must find that
    path's kernels (Triton modules, cuFFT plans) ready, and the replay must be right."""
    monkeypatch.delenv("FUSEDLORA_BACKEND", raising=False)
    torch.manual_seed(0)
    layer = fusedlora.FusedLinear(1024, 768, device="cuda", dtype=torch.bfloat16).eval()
    kw = {}
    if kind == "c3a":
        layer.add_c3a("a", block_size=64, init_weights="gaussian")
    else:
        for name, r in (("a", 16), ("b", 8))[:2 if kind == "multi" else 1]:
            layer.add_lora(name, r=r)
            torch.nn.init.normal_(layer.lora_B[name], std=0.02)
    if kind == "multi":
        a, b = layer.adapter_id("a"), layer.adapter_id("b")  # process-wide ids: not 0 and 1 in every order
        kw = {"adapter_ids": torch.tensor([a, -1, b, a], device="cuda"), "validate": False}
    x = torch.randn(4, 1024, device="cuda", dtype=torch.bfloat16)
    fusedlora.reset_dispatch()
    with torch.no_grad():
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                layer(x, **kw)
        torch.cuda.current_stream().wait_stream(side)
        eager = dispatched(f"{kind}.forward")
        fusedlora.reset_dispatch()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = layer(x, **kw)
        captured = dispatched(f"{kind}.forward")
        x.copy_(torch.randn_like(x))
        graph.replay()
        torch.cuda.synchronize()
        fusedlora.reset_dispatch()
        assert rel_err(out, layer(x, **kw)) < TOL[torch.bfloat16]
    host = [h for h in fusedlora.backend.HOST_WINS[f"{kind}.forward"][1]
            if h != "cuda" or fusedlora.cuda_ext.load(build=False) is not None][0].split("-")[0]  # triton-fused
    assert any(f":{host}:" in k for k in eager), eager
    assert not any(f":{host}:" in k for k in captured), captured


def test_auto_under_torch_compile_cuda_graphs(monkeypatch):
    """torch.compile(mode="reduce-overhead") runs the graph eagerly first, then records a CUDA
    graph and replays it: under auto the eager runs take the host path (warming the capture
    path), the recording the capture path; every replay matches the reference."""
    from fusedlora import reference

    monkeypatch.delenv("FUSEDLORA_BACKEND", raising=False)
    torch._dynamo.reset()
    torch.manual_seed(0)
    layer = fusedlora.FusedLinear(512, 384, device="cuda", dtype=torch.bfloat16).eval()
    layer.add_lora("a", r=16)
    torch.nn.init.normal_(layer.lora_B["a"], std=0.02)
    compiled = torch.compile(layer, mode="reduce-overhead")
    x = torch.randn(4, 512, device="cuda", dtype=torch.bfloat16)
    fusedlora.reset_dispatch()
    with torch.no_grad():
        compiled(x)  # cudagraph trees' warm-up: an eager run, the host path (the capture path once first)
        assert any(":eager:" in k for k in dispatched("lora.forward")), dispatched()
        fusedlora.reset_dispatch()
        for _ in range(3):  # the recording, then replays (which run no Python: nothing recorded)
            y = compiled(x).clone()
    ref = reference.lora_linear(x.double(), layer.weight.double(), layer.bias.double(), layer.lora_A["a"].double(),
                                layer.lora_B["a"].double(), layer.scaling["a"])
    assert rel_err(y, ref) < TOL[torch.bfloat16]
    ran = dispatched("lora.forward")
    assert ran and all(":triton:" in k for k in ran), ran  # the recording took the capture path


@pytest.mark.parametrize("p", [0.0, 0.1])
def test_auto_trains_lora_above_16_rows_on_the_cublas_composition(monkeypatch, p):
    """backend.EAGER_WINS: above 16 rows auto runs LoRA's forward and backward as cuBLAS
    products (F.linear, addmm_ of the rank-r term), dropout from torch's generator, and
    every gradient matches the float64 reference; 3-D x of 2 x 300 rows."""
    monkeypatch.delenv("FUSEDLORA_BACKEND", raising=False)
    fusedlora.reset_dispatch()
    check_against_reference(make_inputs(0, 1000, 777, 13, torch.bfloat16, lead=(2, 300)), p=p, seed=3)
    assert dispatched("lora.forward") == {"lora.forward:eager:composition": 1}
    assert dispatched("lora.backward") == {"lora.backward:eager:composition": 1}
