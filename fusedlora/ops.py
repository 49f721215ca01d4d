"""Functional fused ops, registered as torch.library custom ops.

Each op is a forward custom op plus a backward custom op tied together by
``register_autograd``, with fake implementations, so torch.compile traces a
model of FusedLinear layers without a graph break. Arguments are validated
here, before any kernel is launched.
"""
from __future__ import annotations

import collections
import contextlib
import functools
import math
import numbers
import threading
from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor
from torch.autograd import forward_ad

from . import reference
from .backend import dispatch, interpreting, record, requested_backend, select_backend

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def triton_serves(device: torch.device, *dtypes: torch.dtype) -> bool:
    """Whether Triton kernels run for tensors of ``dtypes`` on ``device``: CUDA, or the CPU
    under the interpreter; 16/32-bit floats only (no float64 kernels)."""
    return (device.type == "cuda" or interpreting()) and all(d in _TRITON_DTYPES for d in dtypes)


def triton_dtype_ok(t: Tensor, name: str = "x") -> None:
    """Raises before a Triton launch on a dtype it has no kernel for (float64)."""
    if t.dtype not in _TRITON_DTYPES:
        raise TypeError(f"{name}: the Triton backend supports {_TRITON_DTYPES}, got {t.dtype}; "
                        "use FUSEDLORA_BACKEND=torch for float64")


def bias_grad(grad_y: Tensor, dtype: torch.dtype) -> Tensor:
    """db = the column sums of grad_y, accumulated in float32 at least (float64 stays float64)."""
    return grad_y.sum(0, dtype=torch.promote_types(grad_y.dtype, torch.float32)).to(dtype)


def no_autocast(device_type: str):
    """A scope without autocast; entering a disabled autocast costs ~3 us, so only when it is on.
    (The meta device has no autocast state: nothing to turn off.)"""
    if autocasting(torch.device(device_type)):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def autocasting(device: torch.device) -> bool:
    """Whether torch.autocast is on for ``device`` (the meta device has no autocast state)."""
    return device.type != "meta" and torch.is_autocast_enabled(device.type)


def autocast_inputs(x, *tensors):
    """``(x, *tensors)`` as ``F.linear`` would see them under ``torch.autocast`` on x's device:
    floating tensors cast to the autocast dtype (float64 passes, as autocast leaves it), so a
    FusedLinear under AMP computes and returns what its nn.Linear would, in 16 bits on the
    tensor cores, with gradients flowing to the float32 parameters through the casts.
    The public ops pass only what F.linear's autocast would cast (activations, W, b, LoRA
    factors, pools); C3A's kernel and sparse values keep their own dtype (PEFT computes
    both deltas at their parameters' precision). Outside autocast: returned as given."""
    # (the meta device has no autocast state to ask: shape-only tracing, nothing is cast)
    if not isinstance(x, Tensor) or not autocasting(x.device):
        return (x, *tensors)
    dtype = torch.get_autocast_dtype(x.device.type)
    return tuple(t.to(dtype) if isinstance(t, Tensor) and t.is_floating_point() and t.dtype != torch.float64 else t
                 for t in (x, *tensors))


def on_device(device: torch.device):
    """A scope whose current CUDA device is ``device``: Triton launches on the current device
    (and its stream), not on its arguments' one, so a layer on cuda:1 called while cuda:0 is
    current (pipeline-parallel or device_map models) would run its kernels on the wrong GPU."""
    if device.type == "cuda" and device.index is not None and device.index != torch.cuda.current_device():
        return torch.cuda.device(device.index)
    return contextlib.nullcontext()


# ------------------------------------------------------------- op plumbing
def fused_op(name: str, mutates_args=()):
    """``torch.library.custom_op(name)`` that keeps the plain function as ``.direct``. Its body
    runs without autocast (the first argument's device): the op's dtypes are its contract
    (the fake implementations say so), and the torch compositions and references inside
    must not have their matmuls recast where the Triton kernels are not. It also runs with
    the first argument's GPU as the current device (``on_device``)."""
    def wrap(fn):
        @functools.wraps(fn)
        def body(*args):
            device = args[0].device
            with no_autocast(device.type), on_device(device):
                return fn(*args)

        op = torch.library.custom_op(name, mutates_args=mutates_args)(body)
        op.direct = body
        return op
    return wrap


def register_autograd(op, backward, setup_context) -> None:
    """``op.register_autograd(backward, setup_context=...)``, and ``op.autograd``: the same
    two formulas as a torch.autograd.Function, for eager calls that record a graph."""
    op.register_autograd(backward, setup_context=setup_context)

    def forward(ctx, *inputs):
        output = op.direct(*inputs)
        setup_context(ctx, inputs, output)
        return output

    # named after the op: its grad_fn reads <name>Backward
    function = type(op._name.split("::")[-1], (torch.autograd.Function,),
                    {"forward": staticmethod(forward), "backward": staticmethod(backward)})
    op.autograd = function.apply


def pick(op, *tensors):
    """How to call a fused op whose differentiable inputs are ``tensors``:
      op.direct    nothing to record (no grad needed), no tracing, plain tensors
      op.autograd  eager, with a graph to record: the autograd.Function of register_autograd
      op           torch.compile, dispatch modes (FakeTensorMode, ...), tensor subclasses
    The custom op's Python dispatch costs ~12 us a call on a small CPU, and ~100 us with
    its autograd wrapper (bench: sparse fwd+bwd at 8 rows, 400 us against 160 us for
    PEFT's): paid per layer by an eager decode step or training step, not by a graph."""
    if torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack():
        return op
    if not all(t is None or type(t) in (Tensor, torch.nn.Parameter) for t in tensors):
        return op
    if any(t is not None and t.is_meta for t in tensors):
        return op  # the dispatcher sends meta tensors to the op's fake: shapes only
    if forward_ad._current_level >= 0 and any(t is not None and forward_ad.unpack_dual(t).tangent is not None
                                              for t in tensors):
        # neither the kernels nor the custom ops carry tangents: they would be dropped
        raise NotImplementedError(f"{getattr(op, '_qualname', op)}: forward-mode AD (dual tensors, "
                                  "torch.func.jvp) is not supported by fusedlora's fused ops; use reverse mode")
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        return getattr(op, "autograd", op)  # backward ops have no formula: the op says so
    return op.direct


# ----------------------------------------------------------------- validation
def _check_tensor(name: str, t, ndim: Optional[int] = None) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name}: expected a floating dtype {_FLOAT_DTYPES}, got {t.dtype}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name}: expected a {ndim}-D tensor, got shape {tuple(t.shape)}")


def _check_same(name: str, t: Tensor, x: Tensor) -> None:
    if t.dtype != x.dtype:
        raise TypeError(f"{name}: dtype {t.dtype} does not match x's dtype {x.dtype}; "
                        f"cast one of them (e.g. {name}.to({x.dtype}))")
    if t.device != x.device:
        raise ValueError(f"{name}: device {t.device} does not match x's device {x.device}")


def check_linear_args(x, weight, bias) -> None:
    """Checks of the base layer shared by every fused op."""
    _check_tensor("x", x)
    if x.dim() < 1:
        raise ValueError("x: expected at least 1 dimension (..., in_features), got a scalar")
    _check_tensor("weight", weight, 2)
    _check_same("weight", weight, x)
    if x.shape[-1] != weight.shape[1]:
        raise ValueError(f"x: expected last dimension in_features={weight.shape[1]} (weight is "
                         f"{tuple(weight.shape)}), got x of shape {tuple(x.shape)}")
    if bias is not None:
        _check_tensor("bias", bias, 1)
        _check_same("bias", bias, x)
        if bias.shape[0] != weight.shape[0]:
            raise ValueError(f"bias: expected shape ({weight.shape[0]},), got {tuple(bias.shape)}")


def rows_of(x: Tensor) -> Tensor:
    """x (..., K) as 2-D rows; reshape(-1, K) cannot infer the row count when K = 0."""
    return x.reshape(math.prod(x.shape[:-1]), x.shape[-1])


def check_scalar(name: str, value, low: float = -math.inf, high: float = math.inf, high_open=False) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name}: expected a real number, got {type(value).__name__}")
    value = float(value)
    # value - value == 0 is math.isfinite that torch.compile(dynamic=True) can trace: it
    # makes Python floats (a layer's scaling, its dropout p) symbols, which math rejects
    if not value - value == 0 or value < low or value > high or (high_open and value == high):
        bound = f"[{low}, {high})" if high_open else f"[{low}, {high}]"
        raise ValueError(f"{name}: expected a finite number in {bound}, got {value}")
    return value


def check_lora_args(x, weight, bias, lora_A, lora_B, scaling, dropout_p) -> Tuple[float, float]:
    check_linear_args(x, weight, bias)
    _check_tensor("lora_A", lora_A, 2)
    _check_tensor("lora_B", lora_B, 2)
    _check_same("lora_A", lora_A, x)
    _check_same("lora_B", lora_B, x)
    r, k = lora_A.shape
    if r < 1:
        raise ValueError(f"lora_A: expected rank r >= 1 rows, got shape {tuple(lora_A.shape)}")
    if k != weight.shape[1]:
        raise ValueError(f"lora_A: expected shape (r, {weight.shape[1]}), got {tuple(lora_A.shape)}")
    if tuple(lora_B.shape) != (weight.shape[0], r):
        raise ValueError(f"lora_B: expected shape ({weight.shape[0]}, {r}) to match weight and lora_A, "
                         f"got {tuple(lora_B.shape)}")
    return check_scalar("scaling", scaling), check_scalar("dropout_p", dropout_p, 0.0, 1.0, high_open=True)


def draw_seed(dropout_p: float) -> Optional[Tensor]:
    """A dropout seed from torch's CPU generator (so torch.manual_seed governs it).
    It stays a CPU tensor: no device sync, and torch.compile keeps it in the graph.
    None without dropout: a CPU tensor among a CUDA op's inputs puts that op in a CUDA-graph
    partition that rejects the CPU storage (torch 2.11, mode="reduce-overhead"; pytorch #190233)."""
    if dropout_p == 0.0:
        return None
    return torch.randint(0, 2**31 - 1, (), dtype=torch.int64)


def seed_value(seed: Optional[Tensor]) -> int:
    """draw_seed's seed as an int (0 for None: no dropout). A seed read inside a CUDA-graph
    capture would be baked into the graph, and every replay would draw the same mask: refused."""
    if seed is None:
        return 0
    if torch.cuda.is_initialized() and torch.cuda.is_current_stream_capturing():
        raise RuntimeError("fusedlora: dropout inside a CUDA graph (torch.compile mode='reduce-overhead' or a "
                           "manual capture) would replay one mask on every call; train with lora_dropout=0, "
                           "or compile without CUDA graphs (mode='default' or 'max-autotune-no-cudagraphs')")
    return int(seed.item())


def dtype_fallback(backend: str, device: torch.device, dtype: Optional[torch.dtype], fallback: str = "eager") -> str:
    """auto's kernel pick (Triton, the extension) for a dtype no kernel takes (float64 on CUDA):
    ``fallback``, the op's composition, instead, at every row count (its dispatch record says
    so; without this a float64 layer ran above 16 rows and raised below). A backend asked for
    by name is kept: it raises."""
    if dtype is not None and backend in ("triton", "cuda") and requested_backend() == "auto" and \
            not triton_serves(device, dtype):
        return fallback
    return backend


def torch_masks(device: torch.device, op: str, rows: int, dtype: Optional[torch.dtype] = None) -> bool:
    """Whether the forward of ``op`` draws its dropout from torch's generator (the torch and
    eager backends) rather than the kernels' Philox. Read where the forward ran (its autograd
    context) and given to the backward, which must draw the same mask even when the backend
    asked for has changed by then (a use_backend scope left before .backward())."""
    return dtype_fallback(select_backend(device, op, rows), device, dtype) in ("torch", "eager")


def backward_backend(device: torch.device, dropout: bool, torch_mask: bool, op: Optional[str] = None,
                     rows: int = 0, dtype: Optional[torch.dtype] = None, fallback: str = "eager") -> str:
    """The backward's backend: the one asked for now (for ``op`` on ``rows`` rows), unless
    dropout needs the forward's mask family (torch's generator: the torch or eager backend;
    Philox: Triton, which the forward ran)."""
    backend = dtype_fallback(select_backend(device, op, rows), device, dtype, fallback)
    if dropout and torch_mask != (backend in ("torch", "eager")):
        return "torch" if torch_mask else "triton"
    return backend


# (seed, x's shape, dtype, device) -> the mask family (True: torch's generator) a dropout forward
# drew with them, as it ran (the shape too: a seed repeated by a torch.manual_seed reset per
# micro-batch must not hand one call's family to another of other rows).
# The backward reads it back at run time: under torch.compile the autograd context (ctx.torch_mask)
# is filled once, at trace time, so a backend changed since (use_backend, FUSEDLORA_BACKEND, an
# on-disk compile cache made by another process) would replay the other family's mask, silently.
# The last 2^14 dropout forwards (layers x micro-batches before one backward); the context's
# value serves a seed no longer held.
_MASK_FAMILY: "collections.OrderedDict[int, bool]" = collections.OrderedDict()
_MASK_FAMILY_SIZE = 1 << 14
_MASK_FAMILY_LOCK = threading.Lock()


def _family_key(seed: int, x: Tensor) -> tuple:
    return seed, tuple(x.shape), x.dtype, x.device


def note_mask_family(seed: int, x: Tensor, torch_mask: bool) -> None:
    key = _family_key(seed, x)
    with _MASK_FAMILY_LOCK:
        _MASK_FAMILY[key] = torch_mask
        _MASK_FAMILY.move_to_end(key)
        if len(_MASK_FAMILY) > _MASK_FAMILY_SIZE:
            _MASK_FAMILY.popitem(last=False)


def drawn_mask_family(seed: int, x: Tensor, traced: bool) -> bool:
    """The family the forward of x with ``seed`` drew (``traced``, the context's, if not held)."""
    with _MASK_FAMILY_LOCK:
        return _MASK_FAMILY.get(_family_key(seed, x), traced)


def torch_keep_mask(shape, p: float, seed: int, device) -> Optional[Tensor]:
    """The torch backend's dropout mask: a pure function of the seed, so the
    backward pass draws it again instead of storing it."""
    if p == 0.0:
        return None
    gen = torch.Generator(device=device).manual_seed(int(seed))
    # uniform draws against p, as the multi-adapter torch path draws them (one p per row
    # there): the two ops' masks agree at the same seed and probability
    return torch.rand(shape, generator=gen, device=device) >= p


# ------------------------------------------------------------------ LoRA ops
_inference = threading.local()  # .on: lora_linear's current call is a direct (graph-free) one


@fused_op("fusedlora::lora_linear")
def _lora_forward(x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_A: Tensor, lora_B: Tensor,
                  scaling: float, dropout_p: float, seed: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
    """2-D x -> (y, u) with u = s * drop(x) A^T in float32, saved for backward."""
    # the host path (HOST_WINS) only without dropout: a forward on it would leave its backward
    # (Triton's, at 1..16 rows) a mask of the other family
    return dispatch("lora.forward", _lora_forward_on, x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed,
                    host_ok=dropout_p == 0.0)


def _lora_forward_on(backend: str, x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_A: Tensor,
                     lora_B: Tensor, scaling: float, dropout_p: float, seed: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
    backend = dtype_fallback(backend, x.device, x.dtype)
    seed_i = seed_value(seed)
    if dropout_p > 0.0:  # the extension has no dropout: its callers below go to Triton
        note_mask_family(seed_i, x, backend in ("torch", "eager"))
    if backend == "cuda":
        from .cuda_ext import decode_serves

        if decode_serves(x, weight) and dropout_p == 0.0:
            from .cuda_ext import gemv_for, load

            return load().lora_decode(x, weight, bias, lora_A, lora_B, scaling,
                                      gemv=gemv_for("lora.forward", "decode", x, weight))
        backend = "triton"  # the extension has no kernel for this shape: recorded below
    if backend in ("torch", "eager"):
        mask = torch_keep_mask(x.shape, dropout_p, seed_i, x.device)
        if backend == "torch":
            u = scaling * (reference.apply_dropout(x, mask, dropout_p) @ lora_A.t())
            record("lora.forward", "torch", "reference")
            return torch.nn.functional.linear(x, weight, bias) + u @ lora_B.t(), u.float()
        # three cuBLAS launches: the fewest a host-bound call can pay for; u (float32, what
        # the backward reads) two more, skipped when nothing will read it (_inference). With
        # dropout, x * mask is one more pass: 1 / (1 - p) rides in the scaling
        alpha = scaling / (1.0 - dropout_p)
        xa = torch.nn.functional.linear(x if mask is None else x * mask, lora_A)
        y = torch.nn.functional.linear(x, weight, bias).addmm_(xa, lora_B.t(), alpha=alpha)
        record("lora.forward", "eager", "composition")
        return y, (xa if getattr(_inference, "on", False) else xa.float().mul_(alpha))
    triton_dtype_ok(x)
    from .launch import Dropout, decode_pair_serves, lora_decode, matmul

    if decode_pair_serves(x, weight, dropout_p > 0.0):
        return lora_decode(x, weight, bias, lora_A, lora_B, scaling)
    u = matmul(x, lora_A.t(), out_dtype=torch.float32, dot_dtype=x.dtype, alpha=scaling,
               dropout=Dropout(dropout_p, seed_i, "a"), tag="lora.shrink")
    y = matmul(x, weight.t(), out_dtype=x.dtype, dot_dtype=x.dtype, bias=bias, u=u, v=lora_B.t(),
               tag="lora.forward")
    return y, u


@_lora_forward.register_fake
def _(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed):
    return (x.new_empty((x.shape[0], weight.shape[0])),
            x.new_empty((x.shape[0], lora_A.shape[0]), dtype=torch.float32))


@fused_op("fusedlora::lora_linear_backward")
def _lora_backward(grad_y: Tensor, x: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor, u: Tensor,
                   scaling: float, dropout_p: float, seed: Optional[Tensor], torch_mask: bool,
                   needs: List[bool]) -> List[Tensor]:
    """(dx, dW, db, dA, dB); an empty tensor stands for a gradient not asked for.
    ``torch_mask``: the forward drew its dropout from torch's generator (ops.torch_masks)."""
    need_x, need_w, need_b, need_a, need_bb = needs
    seed_i = seed_value(seed)
    if dropout_p > 0.0:
        torch_mask = drawn_mask_family(seed_i, x, torch_mask)
    backend = backward_backend(x.device, dropout_p > 0, torch_mask, "lora.backward", x.shape[0], x.dtype)
    if backend in ("torch", "eager"):
        mask = torch_keep_mask(x.shape, dropout_p, seed_i, x.device)
        if backend == "eager":
            record("lora.backward", "eager", "composition")
            return _lora_grads_eager(grad_y, x, weight, lora_A, lora_B, u, scaling, mask, dropout_p, needs)
        grads = reference.lora_linear_grads(grad_y, x, weight, lora_A, lora_B, scaling, mask, dropout_p)
        record("lora.backward", "torch", "reference")
        return [g if n else grad_y.new_empty(0) for g, n in zip(grads, needs)]
    triton_dtype_ok(x)
    from .launch import Dropout, matmul

    dt = x.dtype
    # A fresh empty tensor per slot: custom op outputs may not alias each other.
    dx, dW, db, dA, dB = (grad_y.new_empty(0) for _ in range(5))
    g = None
    if need_x or need_a:
        g = matmul(grad_y, lora_B, out_dtype=torch.float32, dot_dtype=dt, alpha=scaling, tag="lora.grad_shrink")
    if need_x:
        dx = matmul(grad_y, weight, out_dtype=dt, dot_dtype=dt, u=g, v=lora_A,
                    dropout=Dropout(dropout_p, seed_i, "epi"), tag="lora.grad_x")
    if need_w:
        dW = matmul(grad_y.t(), x, out_dtype=weight.dtype, dot_dtype=dt, tag="lora.grad_weight")
    if need_b:
        db = bias_grad(grad_y, dt)
    if need_a:
        dA = matmul(g.t(), x, out_dtype=lora_A.dtype, dot_dtype=dt,
                    dropout=Dropout(dropout_p, seed_i, "b"), tag="lora.grad_A")
    if need_bb:
        dB = matmul(grad_y.t(), u, out_dtype=lora_B.dtype, dot_dtype=dt, tag="lora.grad_B")
    return [dx, dW, db, dA, dB]


def _lora_grads_eager(grad_y: Tensor, x: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor, u: Tensor,
                      scaling: float, mask: Optional[Tensor], dropout_p: float, needs: List[bool]) -> List[Tensor]:
    """The eager composition's backward: one cuBLAS product (or two) per gradient asked for,
    none for the others (the reference computes all five: dW alone is a full GEMM)."""
    need_x, need_w, need_b, need_a, need_bb = needs
    dx, dW, db, dA, dB = (grad_y.new_empty(0) for _ in range(5))
    alpha = scaling / (1.0 - dropout_p) if mask is not None else scaling  # dropout's 1 / (1 - p) folded in
    g = grad_y @ lora_B if need_x or need_a else None  # (M, r), scaling applied below
    if need_x:
        if mask is None:
            dx = torch.addmm(grad_y @ weight, g, lora_A, alpha=scaling)
        else:
            dx = (grad_y @ weight).add_((g @ lora_A).mul_(mask), alpha=alpha)
    if need_w:
        dW = (grad_y.t() @ x).to(weight.dtype)
    if need_b:
        db = bias_grad(grad_y, x.dtype)
    xd = x if mask is None or not (need_a or (need_bb and grad_y.dtype == torch.float64)) else x * mask
    if need_a:
        dA = (g.t() @ xd).mul_(alpha).to(lora_A.dtype)
    if need_bb:  # u is float32: a float64 layer's is formed again at its own precision
        u = u.to(grad_y.dtype) if grad_y.dtype != torch.float64 else alpha * (xd @ lora_A.t())
        dB = (grad_y.t() @ u).to(lora_B.dtype)
    return [dx, dW, db, dA, dB]


@_lora_backward.register_fake
def _(grad_y, x, weight, lora_A, lora_B, u, scaling, dropout_p, seed, torch_mask, needs):
    shapes = [x, weight, weight[:, 0], lora_A, lora_B]
    return [t.new_empty(t.shape) if n else grad_y.new_empty(0) for t, n in zip(shapes, needs)]


def _lora_setup_context(ctx, inputs, output):
    x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed = inputs
    ctx.save_for_backward(x, weight, lora_A, lora_B, output[1], seed)
    ctx.scaling, ctx.dropout_p = scaling, dropout_p
    ctx.torch_mask = dropout_p > 0 and torch_masks(x.device, "lora.forward", x.shape[0], x.dtype)
    ctx.mark_non_differentiable(output[1])


def _lora_autograd(ctx, grad_y, grad_u):
    x, weight, lora_A, lora_B, u, seed = ctx.saved_tensors
    n = ctx.needs_input_grad
    needs = [n[0], n[1], n[2], n[3], n[4]]
    backward = pick(_lora_backward, grad_y, x, weight, lora_A, lora_B, u)
    grads = backward(grad_y, x, weight, lora_A, lora_B, u, ctx.scaling, ctx.dropout_p, seed, ctx.torch_mask, needs)
    dx, dW, db, dA, dB = (g if need else None for g, need in zip(grads, needs))
    return dx, dW, db, dA, dB, None, None, None


register_autograd(_lora_forward, _lora_autograd, _lora_setup_context)


def lora_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_A: Tensor, lora_B: Tensor,
                scaling: float, dropout_p: float = 0.0) -> Tensor:
    """y = x W^T + b + scaling * (dropout(x) A^T) B^T, fused; x of shape (..., in_features).

    Differentiable in every tensor argument. ``dropout_p`` > 0 applies inverted
    dropout to the adapter input only (PEFT's ``lora_dropout``), drawn in-kernel
    from a seed of torch's CPU generator. Under ``torch.autocast`` the tensors are cast
    to the autocast dtype first, as ``F.linear``'s are.
    """
    x, weight, bias, lora_A, lora_B = autocast_inputs(x, weight, bias, lora_A, lora_B)
    scaling, dropout_p = check_lora_args(x, weight, bias, lora_A, lora_B, scaling, dropout_p)
    lead = x.shape[:-1]
    op = pick(_lora_forward, x, weight, bias, lora_A, lora_B)
    _inference.on = op is _lora_forward.direct  # no graph records u: its float32 copy need not be made
    try:
        y, _ = op(rows_of(x), weight, bias, lora_A, lora_B, scaling, dropout_p, draw_seed(dropout_p))
    finally:
        _inference.on = False
    return y.reshape(*lead, weight.shape[0])


def dropout_keep_mask(x_shape: Sequence[int], dropout_p: float, seed: int, device) -> Tensor:
    """The keep-mask (float 0/1, shape (rows, in_features)) that lora_linear's backend for
    these rows draws for a flattened x of ``x_shape`` and this seed: for tests and debugging."""
    rows = int(math.prod(x_shape[:-1]))
    shape = (rows, int(x_shape[-1]))
    if torch_masks(torch.device(device), "lora.forward", rows):
        mask = torch_keep_mask(shape, dropout_p, seed, device)
        return torch.ones(shape, device=device) if mask is None else mask.float()
    from .launch import dropout_mask

    return dropout_mask(shape, dropout_p, seed, device)


# The other fused paths' functional forms, also reachable as fusedlora.ops.* (the
# names the issues give them); they live with their launchers. Imported last:
# those modules import this one's checks.
from .c3a import c3a_linear  # noqa: E402,F401
from .sparse import sparse_linear  # noqa: E402,F401
