"""The benchmark harness runs end to end (tiny shapes, CPU): a smoke test, not a timing."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PATHS = {  # path -> implementations every row of it must have
    "lora": ("fused", "base", "eager", "compile", "peft"),
    "c3a": ("fused", "base", "eager", "compile", "peft"),
    "sparse": ("fused", "base", "eager", "compile", "peft"),
    "switch": ("sparse", "sparse-module", "index_add", "lora", "lora-module", "peft-lora", "peft-shira"),
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


def test_bench_refuses_full_size_on_cpu_except_cheap_paths(tmp_path):
    run = subprocess.run([sys.executable, "bench/run.py", "--device", "cpu", "--paths", "lora",
                          "--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and "--paths switch" in run.stderr, run.stderr[-2000:]
    assert not list(tmp_path.iterdir())
