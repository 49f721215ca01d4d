"""The benchmark harness runs end to end (tiny shapes, CPU): a smoke test, not a timing."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
PATHS = {  # path -> implementations every row of it must have
    "lora": ("fused", "base", "eager", "compile", "peft"),
    "c3a": ("fused", "auto", "base", "eager", "compile", "peft"),
    "sparse": ("fused", "auto", "base", "eager", "compile", "peft"),
    "switch": ("sparse", "sparse-module", "index_add", "lora", "lora-module", "peft-lora", "peft-shira"),
    "kinds": ("rows", "per-adapter", "validated", "base"),
}


def _has_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def test_bench_smoke_writes_table_json_and_report(tmp_path):
    """Every path in one run (one interpreter start, one ceiling measurement), with --report.
    One thread: on a loaded machine two OpenMP threads wait on each other for milliseconds."""
    run = subprocess.run([sys.executable, "-m", "fusedlora", "bench", "--smoke", "--report", "--threads", "1",
                          "--paths", ",".join(PATHS), "--out", str(tmp_path)],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    for path in PATHS:
        assert f"## {path} · " in run.stdout, path
    (js,) = tmp_path.glob("*.json")
    assert "_torch" in js.name and "_triton" in js.name  # the file name states the versions
    data = json.loads(js.read_text())
    rows = data["rows"]
    for path, impls in PATHS.items():
        mine = [r for r in rows if r["path"] == path]
        assert mine, path
        shapes = {json.dumps(r["shape"], sort_keys=True) + r["variant"] for r in mine}
        for impl in impls:
            got = [r for r in mine if r["impl"] == impl]
            assert len(got) == len(shapes), (path, impl)
            # peft may legitimately be missing; everything else must have run
            ok = {r["status"] for r in got} <= ({"ok", "skipped"} if impl.startswith("peft") else {"ok"})
            assert ok, (path, impl, [(r["status"], r["reason"]) for r in got])
            assert all(r["ref"] and r["roof_impls"] for r in got)
    (md,) = tmp_path.glob("*.md")
    text = md.read_text()
    assert "## Plots" in text
    pngs = sorted(p.name.rsplit("_", 1)[-1] for p in tmp_path.glob("*.png"))
    if _has_matplotlib():
        assert pngs == ["roofline.png", "speedup.png"], pngs
        assert all(f"]({p.name})" in text for p in tmp_path.glob("*.png"))
    else:
        assert not pngs and "matplotlib is not importable" in text


def test_every_discovered_path_is_a_bench_path():
    """`--paths all` (the default) runs what discover_paths finds: tools of bench/ with a
    function named cases (profile_step) must not be among them."""
    from bench import run

    assert run.discover_paths() == ["c3a", "decode", "kinds", "lora", "multi", "sparse", "switch"]


def test_bench_refuses_full_size_on_cpu_except_cheap_paths(tmp_path):
    run = subprocess.run([sys.executable, "bench/run.py", "--device", "cpu", "--paths", "lora",
                          "--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and "--paths switch" in run.stderr, run.stderr[-2000:]
    assert not list(tmp_path.iterdir())


def test_decode_path_times_both_backends_or_says_why(tmp_path):
    """bench/decode.py (CUDA vs Triton at decode sizes) runs end to end; without a GPU the
    CUDA rows are skipped with the reason, and Triton runs under the interpreter."""
    run = subprocess.run([sys.executable, "-m", "fusedlora", "bench", "--smoke", "--threads", "1",
                          "--paths", "decode", "--out", str(tmp_path)],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    rows = json.loads(next(tmp_path.glob("*.json")).read_text())["rows"]
    variants = {r["variant"] for r in rows}
    assert variants == {"lora r16", "multi r16", "c3a b64", "c3a b16", "sparse 1%"}
    for r in rows:
        if r["impl"] in ("cuda", "cuda-mma") and r["device"] == "cpu":
            assert r["status"] == "skipped" and "CUDA device" in r["reason"]
        elif r["impl"] == "cublas-rows" and r["variant"] != "sparse 1%":  # a candidate for sparse rows only
            assert r["status"] == "skipped" and "sparse rows only" in r["reason"]
        else:
            assert r["status"] == "ok", r
    triton = [d for r in rows if r["impl"] == "triton" for d in r["dispatch"]]
    for op in ("lora.forward:triton", "multi.forward:triton", "c3a.forward:triton", "sparse.forward:triton"):
        assert any(d.startswith(op) for d in triton), (op, triton)
    assert "CUDA_WINS = {}" in run.stdout


def test_budget_writes_what_ran_and_lists_the_rest(tmp_path):
    run = subprocess.run([sys.executable, "bench/run.py", "--smoke", "--paths", "decode", "--budget", "0",
                          "--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    doc = json.loads(next(tmp_path.glob("*.json")).read_text())
    assert doc["rows"] == [] and doc["options"]["cases_not_run"] == 10
    assert "Not run (time budget or SIGTERM): 10 cases" in next(tmp_path.glob("*.md")).read_text()


def test_first_runs_the_matching_cases_first(tmp_path):
    run = subprocess.run([sys.executable, "bench/run.py", "--smoke", "--paths", "decode", "--budget", "0",
                          "--first", "sparse .*M=16", "--out", str(tmp_path)], cwd=ROOT, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    left = next(tmp_path.glob("*.md")).read_text().split("Not run (time budget or SIGTERM): 10 cases: ")[1]
    assert left.startswith("decode sparse 1% {'M': 16") and left.count("decode ") == 10


def _row(variant, M, impl, ms, graph=None, ran=True):
    op = __import__("bench.decode", fromlist=["OPS"]).OPS[variant]
    row = {"path": "decode", "variant": variant, "shape": {"M": M, "K": 4096, "N": 4096}, "impl": impl,
           "status": "ok", "median_ms": ms, "dispatch": [f"{op}:{impl if ran else 'triton'}:x"]}
    if graph is not None:
        row["graph_ms"] = graph
    return row


def test_cuda_wins_is_the_prefix_of_row_counts_where_cuda_ran_and_won():
    sys.path.insert(0, str(ROOT))
    from bench.decode import cuda_wins

    rows = []
    for M, cuda, triton in ((1, 5.0, 6.0), (4, 5.0, 6.0), (16, 7.0, 6.0), (64, 1.0, 6.0)):
        rows += [_row("lora r16", M, "cuda", 99.0, cuda), _row("lora r16", M, "triton", 1.0, triton)]
    # graph times decide (the eager medians say the opposite); 16 lost, so 64 does not count
    assert cuda_wins(rows) == {"lora.forward": 4}
    # a win inside run-to-run noise (under WIN_MARGIN) does not move the table
    rows = [_row("lora r16", 1, "cuda", 1.0, 21.4), _row("lora r16", 1, "triton", 1.0, 21.6)]
    assert cuda_wins(rows) == {}
    # a row where the extension did not run (fell back to Triton) is no win
    rows = [_row("c3a b64", 1, "cuda", 1.0, ran=False), _row("c3a b64", 1, "triton", 2.0)]
    assert cuda_wins(rows) == {}
    # C3A's two block sizes share an op: both must win
    rows = [_row("c3a b64", 1, "cuda", 1.0), _row("c3a b64", 1, "triton", 2.0),
            _row("c3a b16", 1, "cuda", 3.0), _row("c3a b16", 1, "triton", 2.0)]
    assert cuda_wins(rows) == {}
    # every shape of a row count must win
    rows = [_row("sparse 1%", 1, "cuda", 1.0), _row("sparse 1%", 1, "triton", 2.0),
            dict(_row("sparse 1%", 1, "cuda", 3.0), shape={"M": 1, "K": 4096, "N": 11008}),
            dict(_row("sparse 1%", 1, "triton", 2.0), shape={"M": 1, "K": 4096, "N": 11008})]
    assert cuda_wins(rows) == {}


def test_decode_summary_prints_both_gemv_tables_and_the_eager_call_times():
    sys.path.insert(0, str(ROOT))
    from bench.decode import summary

    rows = [_row("lora r16", 1, "cuda", 0.050, 0.030), _row("lora r16", 1, "triton", 0.400, 0.020),
            _row("lora r16", 1, "cuda-mma", 0.045, 0.010), _row("lora r16", 1, "auto", 0.090, 0.020)]
    rows[2]["dispatch"] = ["lora.forward:cuda:decode-mma"]
    text = "\n".join(summary(rows))
    assert "CUDA_WINS = {}`  (FUSEDLORA_CUDA_GEMV=fma" in text
    assert "CUDA_WINS = {'lora.forward': 1}`  (FUSEDLORA_CUDA_GEMV=mma)" in text
    assert "| lora.forward | 1 | 4096 | 4096 | 90.0 | 400.0 | 50.0 | 45.0 | — |" in text


def test_markdown_compares_graph_times_and_marks_mixed_ratios():
    sys.path.insert(0, str(ROOT))
    from bench import harness

    env = {"date": "d", "device": "GPU", "torch": "t", "cuda": "c", "triton": "tr", "git_commit": None,
           "git_dirty": False}
    ceil = {"bytes_per_s": 1e12, "flops_per_s": 1e15, "matmul": {"dtype": "bfloat16", "n": 8}}
    base = {"path": "decode", "variant": "v", "dtype": "bfloat16", "shape": {"M": 1}, "status": "ok",
            "ref": "cuda", "roof_impls": ["cuda"], "roofline_pct": 50.0, "bound": "bw"}
    rows = [dict(base, impl="cuda", median_ms=0.030, graph_ms=0.010),
            dict(base, impl="triton", median_ms=0.020, graph_ms=0.015),
            dict(base, impl="peft", median_ms=0.100)]
    md = harness.markdown(rows, env, ceil)
    line = next(x for x in md.splitlines() if x.startswith("| 1 |"))
    cells = [c.strip() for c in line.strip("|").split("|")]
    # M, three eager medians, two graph times, then triton/cuda from graph times, peft/cuda mixed
    assert cells[4:6] == ["10.0", "15.0"] and cells[6] == "1.5" and cells[7] == "10*", cells


def test_readme_block_summarises_a_run_and_is_replaced_in_place(tmp_path):
    sys.path.insert(0, str(ROOT))
    from bench import report

    base = {"path": "lora", "variant": "fwd", "dtype": "bfloat16", "status": "ok", "ref": "fused",
            "roof_impls": ["fused"]}
    rows = []
    for M, fused, peft in ((1, 0.010, 0.050), (4096, 0.200, 0.300)):
        rows += [dict(base, shape={"M": M}, impl="fused", median_ms=fused, roofline_pct=80.0 if M > 1 else 60.0),
                 dict(base, shape={"M": M}, impl="peft", median_ms=peft)]
    rows[0]["graph_ms"] = 0.005   # graph time of the decode row wins over its eager median
    env = {"device": "NVIDIA H200", "torch": "2.11", "triton": "3.6", "date": "2026-12-01T00:00:00+00:00",
           "git_commit": "abcdef1234"}
    results = tmp_path / "bench" / "results"
    results.mkdir(parents=True)
    js = results / "run.json"
    js.write_text(json.dumps({"env": env, "rows": rows}))
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\n{report.README_BEGIN}\nold\n{report.README_END}\n\n## After\n")
    for _ in range(2):  # idempotent: the block is replaced, not appended
        report.update_readme(readme, [js])
    text = readme.read_text()
    assert text.count(report.README_BEGIN) == 1 and "old" not in text and text.endswith("## After\n")
    # peft/fused: median of 0.050/0.005 = 10 and 0.300/0.200 = 1.5 -> 5.75; %roof median 70
    assert "| lora · fwd · bfloat16 | fused | 5.75 | 70% |" in text, text
    assert "(bench/results/run.md)" in text and "NVIDIA H200" in text


def test_decode_sized_cases_are_the_ones_timed_by_graph():
    sys.path.insert(0, str(ROOT))
    import torch
    from bench.harness import DECODE_ROWS, Case

    def case(shape, device="cuda", graph=None):
        return Case(path="p", variant="v", shape=shape, dtype=torch.float16, device=torch.device(device),
                    make_inputs=dict, impls={}, work={}, graph=graph)

    assert case({"M": DECODE_ROWS}).timed_by_graph() and case({"T": 1, "A": 8}).timed_by_graph()
    assert not case({"M": DECODE_ROWS + 1}).timed_by_graph()
    assert not case({"N": 4096, "K": 4096}).timed_by_graph()          # no rows (switch): never
    assert not case({"M": 1}, device="cpu").timed_by_graph()           # graphs are CUDA's
    assert not case({"M": 1}, graph=False).timed_by_graph() and case({"M": 4096}, graph=True).timed_by_graph()


def test_report_reference_falls_back_to_an_implementation_that_ran():
    sys.path.insert(0, str(ROOT))
    from bench.report import _ref

    rows = [{"impl": "cuda", "ref": "cuda", "status": "error"}, {"impl": "triton", "ref": "cuda", "status": "ok"},
            {"impl": "base", "ref": "cuda", "status": "ok"}]
    assert _ref(rows) == "triton"
    assert _ref([{**r, "status": "ok"} for r in rows]) == "cuda"


def test_host_overhead_script_runs(tmp_path):
    run = subprocess.run([sys.executable, "bench/host_overhead.py", "2"], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    for line in ("F.linear", "ops.lora_linear", "FusedLinear lora", "FusedLinear multi", "tottime"):
        assert line in run.stdout, line


def test_decode_plan_sweep_refuses_without_a_gpu():
    if torch.cuda.is_available():
        pytest.skip("on a GPU the sweep runs for real: python bench/decode_plans.py")
    run = subprocess.run([sys.executable, "bench/decode_plans.py"], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 2 and "needs a CUDA device" in run.stderr


def test_implementations_are_checked_against_the_reference_before_timing():
    """METHOD.md, "Correct first": an implementation that computes something else (or NaN) is
    recorded as a mismatch with its error and not timed; the others are timed as usual."""
    sys.path.insert(0, str(ROOT))
    from bench import harness

    def make_inputs():
        return {"x": torch.randn(4, 8), "W": torch.randn(8, 8)}

    def impl(scale=1.0, nan=False):
        def setup(i):
            def run():
                y = (i["x"] @ i["W"].T) * scale
                return y.fill_(float("nan")) if nan else y
            return run
        return setup

    case = harness.Case(path="p", variant="v", shape={"M": 4}, dtype=torch.float32, device=torch.device("cpu"),
                        make_inputs=make_inputs, work={"*": (1.0, 1.0)}, ref="good",
                        impls={"good": impl(), "wrong": impl(1.01), "nan": impl(nan=True), "ref": impl(),
                               "other": impl(2.0)},
                        check=("ref", "good", "wrong", "nan"))
    ceil = {"bytes_per_s": 1e9, "flops_per_s": 1e9, "matmul": {"dtype": "float32"}}
    rows = {r["impl"]: r for r in harness.run_case(case, ceil)}
    assert list(rows) == ["good", "wrong", "nan", "ref", "other"]          # the case's order
    assert rows["ref"]["check"] == {"reference": True} and rows["ref"]["status"] == "ok"
    assert rows["good"]["status"] == "ok" and rows["good"]["check"]["rel_err"] == 0.0
    for bad in ("wrong", "nan"):
        assert rows[bad]["status"] == "mismatch" and "median_ms" not in rows[bad], rows[bad]
    assert rows["other"]["status"] == "ok" and "check" not in rows["other"]   # not in case.check
