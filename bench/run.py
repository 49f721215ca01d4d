"""Run the microbenchmarks: ``python bench/run.py [--paths lora] [--quick|--smoke] [--out DIR] [--report]``.

A path is a module of bench/ with a ``cases(opts)`` generator: adding
bench/c3a.py makes ``--paths c3a`` work, and ``--paths all`` (the default)
picks it up, without touching this file. A path whose full-size rows are
cheap on a CPU says so with ``CPU_FULL_SIZE = True`` (bench/switch.py).
``--report`` also draws the plots of bench/report.py next to the results.
"""
from __future__ import annotations

import argparse
import importlib
import pkgutil
import re
import signal
import sys
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
if __package__ in (None, ""):  # run as a script: make `bench` importable as a package
    sys.path.insert(0, str(BENCH_DIR.parent))

import torch  # noqa: E402

from bench import harness  # noqa: E402

# modules of bench/ that are tools, not bench paths (profile_step has a cases() of its own)
_NOT_PATHS = {"harness", "run", "report", "profile_step", "host_overhead", "decode_plans"}


def discover_paths() -> list:
    names = [m.name for m in pkgutil.iter_modules([str(BENCH_DIR)])
             if m.name not in _NOT_PATHS and not m.name.startswith("_")]
    return [n for n in sorted(names) if hasattr(importlib.import_module(f"bench.{n}"), "cases")]


def _fail(msg: str):
    print(f"bench: error: {msg}", file=sys.stderr)
    raise SystemExit(2)


def load_path(name: str):
    try:
        mod = importlib.import_module(f"bench.{name}")
    except ModuleNotFoundError as e:
        if e.name != f"bench.{name}":
            raise
        _fail(f"unknown path {name!r}; available: {', '.join(discover_paths())}")
    if not hasattr(mod, "cases"):
        _fail(f"bench/{name}.py defines no cases(opts)")
    return mod


def case_label(case) -> str:
    return f"{case.path} {case.variant} " + " ".join(f"{k}={v}" for k, v in case.shape.items())


def parse_args(argv):
    p = argparse.ArgumentParser(prog="bench", description="fusedlora microbenchmarks (see docs/benchmarks.md)")
    p.add_argument("--paths", default="all", help="comma list of adapter paths, e.g. lora (default: all found)")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="a few representative shapes")
    size.add_argument("--smoke", action="store_true", help="tiny float32 shapes: checks the harness, on CPU in seconds")
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"], help="default: cuda if available")
    p.add_argument("--out", type=Path, default=BENCH_DIR / "results", help="folder for the results: <date>_<device>_torch<v>_triton<v>[_<paths>].json/.md")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU runs: torch.set_num_threads (default: torch's); on a shared machine 1 avoids "
                        "OpenMP threads waiting on each other for cores other jobs hold")
    p.add_argument("--budget", type=float, default=None, metavar="SECONDS",
                   help="stop starting cases after this many seconds (and on SIGTERM) and write what was "
                        "measured, the cases left listed as not run: for leased GPU time")
    p.add_argument("--first", action="append", default=[], metavar="REGEX",
                   help="run the cases matching REGEX first (repeatable, in the order given; matched against "
                        "e.g. 'c3a fwd M=4096 K=4096 N=4096 b=128'): the rows a short lease must not miss")
    p.add_argument("--report", action="store_true",
                   help="also draw the plots (PNG, needs matplotlib: pip install -e .[bench]) and link them "
                        "from the markdown report; shows a progress bar (tqdm if installed)")
    args = p.parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device visible")
    return args


def _check_cpu_sizes(args, names, mods) -> None:
    slow = [n for n, m in zip(names, mods) if not getattr(m, "CPU_FULL_SIZE", False)]
    if args.device == "cpu" and not args.smoke and slow:
        cheap = [n for n in discover_paths() if getattr(load_path(n), "CPU_FULL_SIZE", False)]
        _fail(f"full-size shapes of {', '.join(slow)} on CPU would take hours; use --smoke, run on a GPU, "
              f"or pick paths that are cheap on a CPU: --paths {','.join(cheap) or '(none)'}")


class Progress:
    """A tqdm bar on stderr when ``bar`` and tqdm is installed, else one
    ``[i/n]`` line per case; either way each case's timings are printed."""

    def __init__(self, total: int, bar: bool):
        self.total, self.done, self.t0, self.bar = total, 0, time.perf_counter(), None
        if bar:
            try:
                from tqdm import tqdm
            except ImportError:
                pass
            else:
                self.bar = tqdm(total=total, unit="case", file=sys.stderr, dynamic_ncols=True)

    def step(self, text: str) -> None:
        self.done += 1
        line = f"[{self.done}/{self.total} {time.perf_counter() - self.t0:6.1f}s] {text}"
        if self.bar is not None:
            self.bar.write(line, file=sys.stderr)
            self.bar.update(1)
        else:
            print(line, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class _Stopped(BaseException):
    """SIGTERM during a case: end the run, write the results so far."""


def _stop(signum, frame):
    raise _Stopped()


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    names = discover_paths() if args.paths == "all" else [n.strip() for n in args.paths.split(",") if n.strip()]
    mods = [load_path(n) for n in names]
    _check_cpu_sizes(args, names, mods)
    device = torch.device(args.device)
    if args.threads is not None:
        if args.threads < 1:
            _fail(f"--threads: expected a positive count, got {args.threads}")
        torch.set_num_threads(args.threads)
    # bf16 on the GPU; float32 for smoke runs and on the CPU (no fast bf16 matmul there).
    dtype = torch.float32 if args.smoke or device.type == "cpu" else torch.bfloat16
    opts = harness.Options(device=device, dtype=dtype, quick=args.quick, smoke=args.smoke)
    torch.manual_seed(0)
    env = harness.environment(device)
    ceilings = harness.measure_ceilings(device, opts.dtype, small=args.smoke)
    cases = [case for mod in mods for case in mod.cases(opts)]
    # A row in another dtype (switch's float32 rows on the GPU) is held to that dtype's FLOP/s peak.
    per_dtype = {opts.dtype: ceilings}
    for dt in dict.fromkeys(c.dtype for c in cases):
        if dt not in per_dtype:
            per_dtype[dt] = harness.measure_ceilings(device, dt, small=args.smoke, bandwidth_of=ceilings)
            ceilings.setdefault("other_dtypes", {})[str(dt).replace("torch.", "")] = per_dtype[dt]
    if args.first:
        def rank(c):  # the first --first that matches; unmatched cases last; stable within each
            return next((i for i, rx in enumerate(args.first) if re.search(rx, case_label(c))), len(args.first))
        cases.sort(key=rank)
    progress, rows, left = Progress(len(cases), bar=args.report), [], []
    before = signal.signal(signal.SIGTERM, _stop)  # `timeout` kills with SIGTERM: keep what was measured
    deadline = None if args.budget is None else time.perf_counter() + args.budget
    try:
        for n, case in enumerate(cases):
            if deadline is not None and time.perf_counter() > deadline:
                left = cases[n:]
                break
            try:
                new = harness.run_case(case, per_dtype[case.dtype])
            except _Stopped:
                left = cases[n:]
                break
            rows += new
            done = ", ".join(f"{r['impl']} {r['median_ms'] * 1e3:.1f}us" if r["status"] == "ok"
                             else f"{r['impl']} {r['status']}" for r in new)
            progress.step(f"{case.path} {case.variant} {str(case.dtype).replace('torch.', '')} {case.shape}: {done}")
    finally:
        signal.signal(signal.SIGTERM, before)
        progress.close()
    md = harness.markdown(rows, env, ceilings, smoke=args.smoke)
    for mod in mods:
        if hasattr(mod, "summary"):
            md += "\n" + "\n".join(mod.summary(rows))
    if left:
        md += f"\nNot run (time budget or SIGTERM): {len(left)} cases: " + \
              "; ".join(f"{c.path} {c.variant} {c.shape}" for c in left) + "\n"
    print(md)
    options = {"paths": names, "quick": args.quick, "smoke": args.smoke, "device": args.device,
               "threads": args.threads, "budget_s": args.budget, "cases_not_run": len(left),
               "dtype": str(opts.dtype).replace("torch.", ""), "report": args.report,
               "rotate_below_bytes": harness.ROTATE_BELOW_BYTES, "rotating_sets": harness.N_ROTATING_SETS}
    tag = None if args.paths == "all" else "-".join(names)
    written = harness.write_results(args.out, env, ceilings, options, rows, md, tag=tag)
    if args.report:
        from bench import report

        written += report.write_report(*written)
    for path in written:
        print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
