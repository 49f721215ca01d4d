"""``python -m fusedlora serve-demo``: batched generation where every request uses its own adapter.

A small decoder (random weights, no downloads) built from FusedLinear layers
carries N adapters of mixed ranks and kinds (LoRA of several ranks, C3A,
sparse). A batch of requests, each naming one adapter (or none), is served
three ways and reported in tokens/s:

  fusedlora   one batched generation under ``fusedlora.use_adapters(model, ids)``
              (prefill and every decode step route each row to its adapter)
  peft        PEFT's mixed-batch inference (``adapter_names=``) on the same model
              (same weights, nn.Linear + peft LoRA layers); PEFT's mixed batch is
              LoRA-only, so it serves the requests of LoRA adapters and the base
  merge       merging each request's adapter into the weights, generating that
              request alone, unmerging (FusedLinear.switch_merged)

and checked (the exit status is 1 otherwise): the first-step logits of the
batched run equal, request by request, those of that request's adapter alone
(``set_adapter``, unmerged), to well under the distance between that adapter
and the nearest other one or the base (so that a request served by the wrong
adapter cannot pass); they equal those of the per-request merged run (and of
PEFT's mixed batch for its requests); and how many greedy tokens agree.

On CPU it runs whatever backend is selected (default: the PyTorch reference
path; ``FUSEDLORA_BACKEND=triton TRITON_INTERPRET=1`` runs the Triton kernels
in the interpreter, slowly), so CPU tokens/s time that path, not the kernels.
"""
from __future__ import annotations

import argparse
import copy
import time
from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import nn

TARGETS = ("q", "k", "v", "o", "up", "down")


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, linear):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.q, self.k, self.v, self.o = (linear(dim, dim) for _ in range(4))
        self.up, self.down = linear(dim, 4 * dim), linear(4 * dim, dim)

    def forward(self, h, cache):
        B, T, D = h.shape
        a = self.norm1(h)
        q, k, v = (p(a).view(B, T, self.heads, D // self.heads).transpose(1, 2) for p in (self.q, self.k, self.v))
        if cache is not None:
            k, v = torch.cat([cache[0], k], 2), torch.cat([cache[1], v], 2)
        att = F.scaled_dot_product_attention(q, k, v, is_causal=cache is None and T > 1)
        h = h + self.o(att.transpose(1, 2).reshape(B, T, D))
        h = h + self.down(F.gelu(self.up(self.norm2(h))))
        return h, (k, v)


class TinyDecoder(nn.Module):
    """Token + position embeddings, pre-norm attention/MLP blocks, a linear head; KV cache."""

    def __init__(self, vocab: int = 256, dim: int = 64, layers: int = 2, heads: int = 4, max_len: int = 128,
                 linear=None):
        super().__init__()
        from .module import FusedLinear

        linear = linear or FusedLinear
        self.embed, self.pos = nn.Embedding(vocab, dim), nn.Embedding(max_len, dim)
        self.blocks = nn.ModuleList(Block(dim, heads, linear) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)

    def forward(self, tokens, cache: Optional[List] = None, start: int = 0):
        h = self.embed(tokens) + self.pos(torch.arange(start, start + tokens.shape[1], device=tokens.device))
        new = []
        for i, blk in enumerate(self.blocks):
            h, kv = blk(h, None if cache is None else cache[i])
            new.append(kv)
        return self.head(self.norm(h)), new


@torch.no_grad()
def generate(model, prompts, steps: int, **kw):
    """Greedy decoding with a KV cache: (tokens (B, steps), first-step logits)."""
    logits, cache = model(prompts, None, 0, **kw)
    first = logits[:, -1].float()
    tok = first.argmax(-1, keepdim=True)
    out = [tok]
    for i in range(steps - 1):
        logits, cache = model(tok, cache, prompts.shape[1] + i, **kw)
        tok = logits[:, -1].argmax(-1, keepdim=True)
        out.append(tok)
    return torch.cat(out, 1), first


def build(args, device, dtype):
    from .module import FusedLinear
    from .sparse import random_indices

    torch.manual_seed(0)
    model = TinyDecoder(args.vocab, args.dim, args.layers, 4, args.prompt_len + args.new_tokens + 1).to(device, dtype)
    if args.adapters < 1:
        raise SystemExit(f"serve-demo: --adapters must be at least 1, got {args.adapters}")
    n_lora = max(1, args.adapters - 2)                      # then one C3A, one sparse
    ranks = [(2, 4, 8, 16, 4, 8, 32, 2)[i % 8] for i in range(n_lora)]
    adapters = [(f"lora{i}_r{r}", "lora", r) for i, r in enumerate(ranks)]
    if args.adapters > len(ranks):
        adapters.append(("c3a_b16", "c3a", 16))
    if args.adapters > len(ranks) + 1:
        adapters.append(("sparse_1pct", "sparse", 0))
    # Every adapter moves the logits by several percent (each is checked against the others
    # and the base per request: weak adapters would hide a misrouted row in rounding noise).
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if not isinstance(m, FusedLinear):
            continue
        for name, kind, r in adapters:
            if kind == "lora":
                m.add_lora(name, r=r, lora_alpha=2 * r)
                with torch.no_grad():
                    m.lora_B[name].copy_(torch.randn(m.lora_B[name].shape, generator=g) * 0.08)
            elif kind == "c3a":
                m.add_c3a(name, block_size=r, init_weights="xavier_uniform")
                with torch.no_grad():
                    m.c3a_kernel[name].mul_(16)
            else:
                idx = random_indices(tuple(m.weight.shape), density=0.01, seed=7)
                m.add_sparse(name, idx, torch.randn(idx.shape[1], generator=g).to(dtype) * 0.3)
        m.set_adapter(None)
    return model.eval(), adapters


def peft_copy(model, adapters):
    """The same decoder with nn.Linear layers (shared base weights) and PEFT LoRA adapters
    holding the same LoRA weights; None when peft is missing."""
    try:
        import peft
    except Exception:
        return None
    from .module import FusedLinear

    plain = copy.deepcopy(model)
    for blk in plain.blocks:
        for t in TARGETS:
            f = getattr(blk, t)
            lin = nn.Linear(f.in_features, f.out_features, device="meta")
            lin.weight, lin.bias = f.weight, f.bias
            setattr(blk, t, lin)
    loras = [(n, r) for n, kind, r in adapters if kind == "lora"]
    pmodel = None
    for n, r in loras:
        cfg = peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=list(TARGETS), init_lora_weights=False)
        if pmodel is None:
            pmodel = peft.get_peft_model(plain, cfg, adapter_name=n)
        else:
            pmodel.add_adapter(n, cfg)
    for fblk, pblk in zip(model.blocks, pmodel.base_model.model.blocks):
        for t in TARGETS:
            f, p = getattr(fblk, t), getattr(pblk, t)
            assert isinstance(f, FusedLinear)
            for n, _ in loras:
                with torch.no_grad():
                    p.lora_A[n].weight.copy_(f.lora_A[n])
                    p.lora_B[n].weight.copy_(f.lora_B[n])
                assert abs(p.scaling[n] - f.scaling[n]) < 1e-12
    return pmodel.eval()


def _timed(fn, device):
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return out, time.perf_counter() - t0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m fusedlora serve-demo", description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=8)
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--adapters", type=int, default=8, help="N adapters: LoRA of mixed ranks, then one C3A, one sparse")
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--vocab", type=int, default=256)
    p.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto",
                   help="model dtype (auto: bfloat16 on a GPU, float32 on the CPU)")
    p.add_argument("--threads", type=int, default=1,
                   help="CPU threads for torch (default 1: these tiny ops only lose to thread wake-ups)")
    args = p.parse_args(argv)
    threads = torch.get_num_threads()
    if not torch.cuda.is_available():
        torch.set_num_threads(args.threads)
    try:
        return _run(args)
    finally:
        torch.set_num_threads(threads)


def _run(args) -> int:

    import fusedlora
    from .module import FusedLinear

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype) if args.dtype != "auto" else \
        torch.bfloat16 if device.type == "cuda" else torch.float32
    model, adapters = build(args, device, dtype)
    names = [n for n, _, _ in adapters] + [None]            # None: the base model
    req_names = [names[i % len(names)] for i in range(args.requests)]
    ids = torch.tensor([fusedlora.adapter_id(n) if n else -1 for n in req_names], device=device)
    prompts = torch.randint(0, args.vocab, (args.requests, args.prompt_len),
                            generator=torch.Generator().manual_seed(2)).to(device)
    n_tok = args.requests * args.new_tokens
    info = fusedlora.backend_info()
    print(f"serve-demo: decoder dim={args.dim} layers={args.layers} vocab={args.vocab}, "
          f"{len(adapters)} adapters ({', '.join(n for n, _, _ in adapters)}), {args.requests} requests x "
          f"({args.prompt_len} prompt + {args.new_tokens} new tokens), {str(dtype).replace('torch.', '')} on "
          f"{info['device']}, backend {info['requested']} (interpreter={info['triton_interpret']})")

    def batched():
        with fusedlora.use_adapters(model, ids):
            return generate(model, prompts, args.new_tokens)

    def merged():
        toks, firsts = [], []
        for i, n in enumerate(req_names):
            for m in model.modules():
                if isinstance(m, FusedLinear):
                    if n is None:
                        m.unmerge()
                        m.set_adapter(None)
                    else:
                        m.switch_merged(n)
            t, f = generate(model, prompts[i:i + 1], args.new_tokens)
            toks.append(t)
            firsts.append(f)
        for m in model.modules():
            if isinstance(m, FusedLinear):
                m.unmerge()
                m.set_adapter(None)
        return torch.cat(toks), torch.cat(firsts)

    @torch.no_grad()
    def alone():
        """First-step logits of every prompt under each adapter alone (set_adapter, unmerged:
        the single-adapter forward the routed rows must equal), and under the base (None)."""
        fused = [m for m in model.modules() if isinstance(m, FusedLinear)]
        out = {}
        for n in names:
            for m in fused:
                m.set_adapter(n)
            out[n] = model(prompts, None, 0)[0][:, -1].float()
        for m in fused:
            m.set_adapter(None)
        return out

    fusedlora.reset_dispatch()
    batched()                                               # warm-up (JIT, autotune, pools)
    (tok_b, first_b), t_b = _timed(batched, device)
    dispatch = sorted(fusedlora.backend_info()["dispatch"])
    merged()
    (tok_m, first_m), t_m = _timed(merged, device)
    err = ((first_b.double() - first_m.double()).norm() / first_m.double().norm()).item()
    agree = (tok_b == tok_m).float().mean().item()
    # Row by row against each request's adapter alone; and how far the nearest other adapter
    # (or the base) is from it: a row served by the wrong adapter is off by at least that much,
    # so the check is conclusive only where each row's error is well below its separation.
    ref = alone()
    rel = lambda a, b: ((a.double() - b.double()).norm() / b.double().norm()).item()  # noqa: E731
    row_err = [rel(first_b[i], ref[n][i]) for i, n in enumerate(req_names)]
    row_sep = [min((rel(ref[o][i], ref[n][i]) for o in names if o != n), default=float("inf"))
               for i, n in enumerate(req_names)]
    worst = max(range(len(req_names)), key=lambda i: row_err[i] / row_sep[i])
    rows = [("fusedlora use_adapters (batched)", args.requests, t_b), ("merge per request", args.requests, t_m)]

    pmodel = peft_copy(model, adapters)
    peft_note, perr = "peft not importable", None
    if pmodel is not None:
        lora_names = {n for n, kind, _ in adapters if kind == "lora"}
        sel = [i for i, n in enumerate(req_names) if n is None or n in lora_names]
        pnames = ["__base__" if req_names[i] is None else req_names[i] for i in sel]
        sub_ids = ids[sel]
        run_peft = lambda: generate(pmodel, prompts[sel], args.new_tokens, adapter_names=pnames)  # noqa: E731
        run_sub = lambda: _with(model, sub_ids, lambda: generate(model, prompts[sel], args.new_tokens))  # noqa: E731
        run_peft()
        (tok_p, first_p), t_p = _timed(run_peft, device)
        run_sub()
        (tok_s, first_s), t_s = _timed(run_sub, device)
        perr = ((first_p.double() - first_s.double()).norm() / first_s.double().norm()).item()
        rows += [(f"peft adapter_names (LoRA+base requests: {len(sel)})", len(sel), t_p),
                 (f"fusedlora, the same {len(sel)} requests", len(sel), t_s)]
        peft_note = f"peft vs fusedlora first-step logits rel err {perr:.1e}"
    print(f"{'mode':48s} {'requests':>8s} {'seconds':>9s} {'tokens/s':>10s}")
    for label, n, t in rows:
        print(f"{label:48s} {n:8d} {t:9.3f} {n * args.new_tokens / t:10.1f}")
    print(f"speed-up batched vs merge-per-request: {t_m / t_b:.2f}x over {n_tok} tokens")
    print(f"check: batched vs merged first-step logits rel err {err:.1e}, greedy tokens agree {agree:.0%}; "
          f"{peft_note}")
    print(f"check: batched vs each request's adapter alone, per request: worst rel err {max(row_err):.1e}; "
          f"worst err/separation {row_err[worst] / row_sep[worst]:.2f} (request {worst}, "
          f"{req_names[worst] or 'base'}: err {row_err[worst]:.1e}, nearest other adapter or base "
          f"{row_sep[worst]:.1e} away; a misrouted request would be about 1 or more; OK needs < 0.5)")
    print("kernels that ran in the batched run: " + ", ".join(dispatch))
    if device.type == "cpu":
        print("(CPU: these times are of the selected backend on this machine, not of the GPU kernels)")
    tol = {torch.bfloat16: 2e-2, torch.float16: 5e-3}.get(dtype, 1e-4)
    ok = err < tol and (perr is None or perr < tol) and max(row_err) < tol and \
        all(e < sep / 2 for e, sep in zip(row_err, row_sep))
    print(f"logits within tolerance {tol:.0e}: {'OK' if ok else 'MISMATCH'}")
    return 0 if ok else 1


def _with(model, ids, fn):
    import fusedlora

    with fusedlora.use_adapters(model, ids):
        return fn()


if __name__ == "__main__":
    raise SystemExit(main())
