"""Bad input raises a clear error that names the argument, before any kernel launch."""
import pytest
import torch

import fusedlora
from conftest import dispatched
from fusedlora import ops


def args(M=4, K=8, N=6, r=2, dtype=torch.float32):
    return dict(x=torch.randn(M, K, dtype=dtype), weight=torch.randn(N, K, dtype=dtype),
                bias=torch.randn(N, dtype=dtype), lora_A=torch.randn(r, K, dtype=dtype),
                lora_B=torch.randn(N, r, dtype=dtype), scaling=2.0, dropout_p=0.0)


CASES = [
    ("x", dict(x=torch.randn(4, 7)), ValueError, "in_features=8"),
    ("x", dict(x=[1.0, 2.0]), TypeError, "torch.Tensor"),
    ("x", dict(x=torch.ones(4, 8, dtype=torch.int32)), TypeError, "floating"),
    ("weight", dict(weight=torch.randn(6, 8, dtype=torch.float16)), TypeError, "does not match x's dtype"),
    ("weight", dict(weight=torch.randn(6, 8, device="meta")), ValueError, "device"),
    ("bias", dict(bias=torch.randn(5)), ValueError, "bias: expected shape (6,)"),
    ("lora_A", dict(lora_A=torch.randn(2, 9)), ValueError, "lora_A: expected shape (r, 8)"),
    ("lora_A", dict(lora_A=torch.randn(0, 8), lora_B=torch.randn(6, 0)), ValueError, "rank r >= 1"),
    ("lora_B", dict(lora_B=torch.randn(6, 3)), ValueError, "lora_B: expected shape (6, 2)"),
    ("lora_B", dict(lora_B=torch.randn(6, 2, dtype=torch.float64)), TypeError, "lora_B: dtype"),
    ("scaling", dict(scaling="2"), TypeError, "scaling"),
    ("scaling", dict(scaling=float("nan")), ValueError, "scaling"),
    ("dropout_p", dict(dropout_p=1.0), ValueError, "dropout_p"),
    ("dropout_p", dict(dropout_p=-0.1), ValueError, "dropout_p"),
]


@pytest.mark.parametrize("name,change,exc,msg", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_lora_linear_rejects_bad_input_before_launch(triton_backend, name, change, exc, msg):
    a = args()
    a.update(change)
    with pytest.raises(exc, match=name) as info:
        ops.lora_linear(**a)
    assert msg in str(info.value)
    assert dispatched() == {}, "a kernel ran before the error"


def test_triton_backend_rejects_float64(triton_backend):
    with pytest.raises(TypeError, match="float64"):
        ops.lora_linear(**args(dtype=torch.float64))
    assert dispatched() == {}


def test_triton_backward_rejects_float64_by_name(monkeypatch):
    """The backward runs the backend asked for when it runs: a float64 forward on the torch
    backend, backpropagated under triton, gets the forward's TypeError, not the launcher's KeyError."""
    a = args(dtype=torch.float64)
    a["x"].requires_grad_()
    monkeypatch.setenv("FUSEDLORA_BACKEND", "torch")
    y = ops.lora_linear(**a)
    monkeypatch.setenv("FUSEDLORA_BACKEND", "triton")
    fusedlora.reset_dispatch()
    with pytest.raises(TypeError, match="x: the Triton backend supports"):
        y.sum().backward()
    assert dispatched() == {}


def test_unknown_backend_name(monkeypatch):
    monkeypatch.setenv("FUSEDLORA_BACKEND", "fastest")
    with pytest.raises(ValueError, match="FUSEDLORA_BACKEND"):
        ops.lora_linear(**args())


def test_cuda_backend_without_cuda_tensors_is_an_error(monkeypatch):
    monkeypatch.setenv("FUSEDLORA_BACKEND", "cuda")
    with pytest.raises(RuntimeError, match="needs CUDA tensors"):
        ops.lora_linear(**args())
    assert "available" in fusedlora.backend_info()["cuda_extension"]


def test_model_set_adapter_names_its_argument():
    with pytest.raises(TypeError, match="names: expected an adapter name"):
        fusedlora.set_adapter(torch.nn.Sequential(fusedlora.FusedLinear(4, 4)), 5)


def test_module_rejects_bad_adapters():
    layer = fusedlora.FusedLinear(8, 6)
    with pytest.raises(ValueError, match="r: expected a positive int"):
        layer.add_lora("a", r=0)
    with pytest.raises(ValueError, match="r: expected a positive int"):
        layer.add_lora("a", r=2.0)
    import numpy as np  # a config's integers (numpy, from a loaded json/yaml) are integers

    layer.add_lora("np_r", r=np.int64(2))
    layer.add_c3a("np_b", block_size=np.int32(2))
    assert layer.r["np_r"] == 2 and type(layer.r["np_r"]) is int and layer.c3a_kernel["np_b"].shape == (3, 4, 2)
    layer.delete_adapter("np_r")
    layer.delete_adapter("np_b")
    with pytest.raises(ValueError, match="lora_dropout"):
        layer.add_lora("a", r=2, lora_dropout=1.5)
    with pytest.raises(ValueError, match="init_lora_weights"):
        layer.add_lora("a", r=2, init_lora_weights="pissa")
    with pytest.raises(ValueError, match="adapter name"):
        layer.add_lora("a.b", r=2)
    layer.add_lora("a", r=2)
    with pytest.raises(ValueError, match="already exists"):
        layer.add_lora("a", r=2)
    with pytest.raises(ValueError, match="unknown adapter 'b'"):
        layer.set_adapter(["a", "b"])
    with pytest.raises(TypeError, match="names: expected an adapter name"):
        layer.set_adapter(0)
    with pytest.raises(ValueError, match="names: duplicate"):
        layer.set_adapter(["a", "a"])
    with pytest.raises(ValueError, match="unknown adapter 'b'"):
        layer.merge(["b"])
    with pytest.raises(ValueError, match=r"indices: .*out of range"):
        layer.add_sparse("s", torch.tensor([[0, 6], [0, 1]]))
    with pytest.raises(ValueError, match="indices: duplicate"):
        layer.add_sparse("s", torch.tensor([[1, 1], [2, 2]]))
    with pytest.raises(ValueError, match="values: expected a floating tensor of shape"):
        layer.add_sparse("s", torch.tensor([[0, 1], [0, 1]]), values=torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="block_size"):
        layer.add_c3a("c", block_size=4)  # divides 8, not 6
    assert layer.adapter_names == ["a"] and layer.active_adapters == ["a"]  # nothing half-added
    with pytest.raises(ValueError, match="unknown adapter"):
        layer.delete_adapter("b")
    with pytest.raises(ValueError, match="in_features=8"):
        layer(torch.randn(3, 5))
    with pytest.raises(TypeError, match="nn.Linear"):
        fusedlora.FusedLinear.from_linear(torch.nn.Conv1d(2, 2, 1))


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("rows", [3, 0])
def test_layers_with_no_input_features_are_their_bias(monkeypatch, backend, rows):
    """K = 0: F.linear gives the bias; so must every path (x.reshape(-1, 0) cannot infer the
    row count, and a K split of no K tiles divided by zero)."""
    from fusedlora.sparse import sparse_linear

    monkeypatch.setenv("FUSEDLORA_BACKEND", backend)
    x, W, b = torch.randn(2, rows, 0), torch.randn(4, 0), torch.randn(4)
    want = torch.nn.functional.linear(x, W, b)
    assert torch.equal(ops.lora_linear(x, W, b, torch.randn(1, 0), torch.randn(4, 1), 1.0), want)
    assert torch.equal(sparse_linear(x, W, b, torch.zeros(2, 0, dtype=torch.long), torch.zeros(0), 1.0), want)
    with pytest.warns(UserWarning, match="zero-element"):
        layer = fusedlora.FusedLinear.from_linear(torch.nn.Linear(0, 4))
        layer.add_lora("a", r=2)
    want = torch.nn.functional.linear(x, layer.weight, layer.bias)
    assert torch.equal(layer(x), want)
    assert torch.equal(layer(x, adapter_ids=torch.tensor([layer.adapter_id("a"), -1])), want)


def test_meta_device_traces_shapes():
    """Shape-only tracing on the meta device (deferred init, FSDP's meta-init): nn.Linear
    works there, so must a layer with adapters (no autocast state to ask on meta)."""
    with torch.device("meta"):
        layer = fusedlora.FusedLinear(16, 8)
        layer.add_lora("a", r=2)
        assert layer(torch.randn(5, 3, 16)).shape == (5, 3, 8)


def test_ops_run_on_their_arguments_gpu(monkeypatch):
    """Triton launches on the current CUDA device: an op whose tensors live on cuda:1 while
    cuda:0 is current must switch to cuda:1 for its body (checked here with the device
    calls stubbed: no GPU needed), and not switch when the device is already current."""
    from fusedlora.ops import on_device

    entered = []

    class Device:
        def __init__(self, index):
            self.index = index

        def __enter__(self):
            entered.append(self.index)

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "device", Device)
    with on_device(torch.device("cuda", 1)):
        pass
    with on_device(torch.device("cuda", 0)), on_device(torch.device("cpu")):
        pass
    assert entered == [1]


def test_dropout_keep_mask_launches_on_its_devices_gpu(monkeypatch):
    """ops.dropout_keep_mask runs its Triton kernel outside any fused op's body (which switch
    devices): its launcher must switch to the mask's GPU itself (stubbed: no GPU needed)."""
    import contextlib

    from fusedlora import launch

    state = {"in": None, "launched_in": []}

    @contextlib.contextmanager
    def fake_on_device(device):
        state["in"] = device
        yield
        state["in"] = None

    class Kernel:
        def __getitem__(self, grid):
            return lambda *a, **k: state["launched_in"].append(state["in"])

    monkeypatch.setattr(ops, "on_device", fake_on_device)
    monkeypatch.setattr(launch, "dropout_materialize_kernel", Kernel())
    launch.dropout_mask((4, 8), 0.5, 1, torch.device("cpu"))
    assert state["launched_in"] == [torch.device("cpu")]
