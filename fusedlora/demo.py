"""``python -m fusedlora demo``: a small model of FusedLinear layers with LoRA
adapters, run fused (forward and backward) and checked against the float64
reference; prints what ran and how long it took. Exits 1 on a mismatch.

Without a GPU the Triton kernels run under the Triton interpreter on the CPU
(slow but exact); with one they run compiled on CUDA. Either way on the Triton backend
unless FUSEDLORA_BACKEND says otherwise: under auto a CUDA device would run these row
counts on the cuBLAS compositions (backend.EAGER_WINS), and the demo is of the kernels.
"""
from __future__ import annotations

import argparse
import os
import time

import torch


def _setup_backend() -> str:
    os.environ.setdefault("FUSEDLORA_BACKEND", "triton")
    if torch.cuda.is_available():
        return "cuda"
    # The interpreter flag is read when triton is first imported: set it now.
    os.environ.setdefault("TRITON_INTERPRET", "1")
    return "cpu"


def _reference_forward(model, x):
    """The same model in float64 through fusedlora.reference, one layer at a time."""
    from fusedlora import FusedLinear, reference

    h = x.double()
    for m in model:
        if not isinstance(m, FusedLinear):
            h = m(h)
            continue
        y = torch.nn.functional.linear(h, m.weight.double(), m.bias.double())
        for n in m.active_adapters:
            y = y + reference.lora_linear(h, torch.zeros_like(m.weight.double()), None, m.lora_A[n].double(),
                                          m.lora_B[n].double(), m.scaling[n])
        h = y
    return h


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fusedlora demo", description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--dim", type=int, default=96)
    args = parser.parse_args(argv)
    device = _setup_backend()

    import fusedlora
    from fusedlora import FusedLinear

    torch.manual_seed(0)
    d = args.dim
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = torch.nn.Sequential(FusedLinear(d, 2 * d), torch.nn.GELU(), FusedLinear(2 * d, 2 * d),
                                torch.nn.GELU(), FusedLinear(2 * d, d)).to(device, dtype)
    for i, m in enumerate(model):
        if isinstance(m, FusedLinear):
            m.add_lora("task", r=8, lora_alpha=16, lora_dropout=0.05)
            m.add_lora("style", r=4, use_rslora=True)
            m.set_adapter(["task", "style"] if i == 2 else "task")
            for B in m.lora_B.values():  # trained-looking adapters, not PEFT's zero init
                torch.nn.init.normal_(B, std=0.05)
    model.eval()
    x = torch.randn(2, args.tokens // 2, d, device=device, dtype=dtype, requires_grad=True)

    fusedlora.reset_dispatch()
    t0 = time.perf_counter()
    y = model(x)
    y.square().mean().backward()
    if device == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - t0

    # The float64 reference, forward and backward: the gradients of x and of every
    # parameter that got one (torch.autograd.grad leaves the fused run's .grad alone).
    params = [p for p in model.parameters() if p.grad is not None]
    xd = x.detach().double().requires_grad_()
    ref = _reference_forward(model, xd)
    ref_grads = torch.autograd.grad(ref.square().mean(), [xd] + params)

    def rel(a, b):
        return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()

    err = rel(y, ref)
    grad_err = max(rel(g, r) for g, r in zip([x.grad] + [p.grad for p in params], ref_grads))
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-5
    info = fusedlora.backend_info()
    print(f"fusedlora demo: 3 FusedLinear layers ({d}->{2 * d}->{2 * d}->{d}), LoRA r=8 (+ r=4 on layer 2), "
          f"x {tuple(x.shape)} {str(dtype).replace('torch.', '')} on {info['device']}")
    print(f"backend: {info['requested']} (triton {info['triton']}, interpreter={info['triton_interpret']}, "
          f"CUDA extension: {'yes' if info['cuda_extension']['available'] else 'no'})")
    print("kernels that ran (op:backend:variant x launches):")
    for k, v in sorted(info["dispatch"].items()):
        print(f"  {k:40s} x{v}")
    grads = sum(p.grad is not None for p in model.parameters())
    print(f"forward+backward: {elapsed * 1e3:.1f} ms; {grads} parameters got gradients")
    ok = err < tol and grad_err < tol
    print(f"relative error vs float64 reference: forward {err:.2e}, gradients (x and {len(params)} parameters, "
          f"worst) {grad_err:.2e} (tolerance {tol:.0e}) -> {'OK' if ok else 'MISMATCH'}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
