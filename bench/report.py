"""Plots of a benchmark run: ``python bench/report.py RESULTS.json [...]`` or ``run.py --report``.

From the JSON that run.py writes (nothing is re-measured), draws two PNGs
next to it and links them from its markdown report:

  <stem>_speedup.png   per path and variant: X time / ref time against M for
                       each peer X (> 1: the fused path is faster). The line
                       is the median over the other shape parameters (K, N,
                       r, block size, density), the band their min..max.
                       Paths without M (switch) are bars, one group per shape.
  <stem>_roofline.png  percent of roofline of each path's roof_impls
                       (the fused op and the base F.linear), drawn the same way.

Needs matplotlib (``pip install -e .[bench]``); without it the report says
so and no plot is drawn. Nothing else in fusedlora or its tests needs it.

``python bench/report.py --readme RESULTS.json [MORE.json ...]`` writes the README's results
block (between its two ``results`` markers): one summary line per path and
variant, a link to the full tables, and the plots.
"""
from __future__ import annotations

import json
import math
import statistics
import sys
from pathlib import Path
from typing import Dict, List, Optional, Tuple

PLOTS_MARK = "<!-- plots: bench/report.py -->"
COLORS = {"fused": "#1f77b4", "base": "#7f7f7f", "eager": "#ff7f0e", "compile": "#2ca02c", "peft": "#d62728",
          "sparse": "#08306b", "sparse-module": "#17becf", "index_add": "#2ca02c", "lora": "#8c564b", "lora-module": "#bcbd22",
          "peft-lora": "#e377c2", "peft-shira": "#9467bd"}
# tab20 and a few more: for implementations not in COLORS, or whose color another one took
_EXTRA = ["#aec7e8", "#ffbb78", "#98df8a", "#ff9896", "#c5b0d5", "#c49c94", "#f7b6d2", "#c7c7c7",
          "#dbdb8d", "#9edae5", "#393b79", "#637939", "#8c6d31", "#843c39", "#7b4173", "#000000"]


def plot_paths(json_path: Path) -> Tuple[Path, Path]:
    stem = json_path.with_suffix("")
    return Path(f"{stem}_speedup.png"), Path(f"{stem}_roofline.png")


def _color(impl: str, seen: Dict[str, str]) -> str:
    """One color per implementation within a figure, never shared by two of them."""
    if impl not in seen:
        used = set(seen.values())
        free = [c for c in [COLORS.get(impl)] + list(COLORS.values()) + _EXTRA if c and c not in used]
        seen[impl] = free[0] if free else _EXTRA[len(seen) % len(_EXTRA)]
    return seen[impl]


def _groups(rows: List[dict]) -> Dict[Tuple[str, str, str], List[dict]]:
    groups: Dict[Tuple[str, str, str], List[dict]] = {}
    for r in rows:
        groups.setdefault((r["path"], r["variant"], r["dtype"]), []).append(r)
    return groups


def _by_shape(grp: List[dict]) -> Dict[tuple, Dict[str, dict]]:
    out: Dict[tuple, Dict[str, dict]] = {}
    for r in grp:
        if r.get("status") == "ok":
            out.setdefault(tuple(sorted(r["shape"].items())), {})[r["impl"]] = r
    return out


def _ref(grp: List[dict]) -> str:
    """The group's declared reference, or, where none of its rows ran (the CUDA
    extension missing on that machine, say), the first implementation that did."""
    ref = grp[0].get("ref") or grp[0].get("_meta", {}).get("ref", "fused")
    ran = [r["impl"] for r in grp if r.get("status") == "ok"]
    return ref if ref in ran or not ran else ran[0]


def _roof_impls(grp: List[dict]) -> List[str]:
    return list(grp[0].get("roof_impls") or grp[0].get("_meta", {}).get("roof_impls", ("fused",)))


def _series(grp: List[dict], impls: List[str], value) -> Dict[str, Dict[int, List[float]]]:
    """impl -> M -> values over the other shape parameters; value(by_impl, impl) or None."""
    out: Dict[str, Dict[int, List[float]]] = {}
    for shape, by_impl in _by_shape(grp).items():
        M = dict(shape)["M"]
        for impl in impls:
            v = value(by_impl, impl)
            if v is not None and v > 0 and math.isfinite(v):
                out.setdefault(impl, {}).setdefault(M, []).append(v)
    return out


def best_ms(row: dict) -> Optional[float]:
    """The time a row is compared by: its CUDA-graph replay time where one was
    measured (device time), else its eager median."""
    return row.get("graph_ms") or row.get("median_ms")


def _ratio(ref: str):
    def value(by_impl, impl):
        if impl in by_impl and ref in by_impl:
            return best_ms(by_impl[impl]) / best_ms(by_impl[ref])
        return None
    return value


def _roof(by_impl, impl):
    return by_impl.get(impl, {}).get("roofline_pct")


def _shape_labels(shapes: List[tuple]) -> List[str]:
    """Short labels: the shape keys whose value differs between the shapes (all of them if none does)."""
    dicts = [dict(s) for s in shapes]
    keys = [k for k in dicts[0] if len({d[k] for d in dicts}) > 1] if dicts else []
    keys = keys or (list(dicts[0]) if dicts else [])
    return ["\n".join(f"{k}={_fmt(d[k])}" for k in keys) for d in dicts]


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{100 * v:g}%" if v < 1 else f"{v:g}"
    return str(v)


def _other_keys(grp: List[dict]) -> str:
    keys = [k for k in grp[0]["shape"] if k != "M"]
    return ", ".join(keys) or "nothing"


def _line_panel(ax, grp, series, colors, ylabel: str, log_y: bool) -> None:
    Ms = sorted({M for s in series.values() for M in s})
    for impl, by_m in series.items():
        xs = sorted(by_m)
        med = [statistics.median(by_m[m]) for m in xs]
        lo = [min(by_m[m]) for m in xs]
        hi = [max(by_m[m]) for m in xs]
        c = _color(impl, colors)
        ax.plot(xs, med, marker="o", color=c, label=impl, lw=1.8)
        if any(h > l for h, l in zip(hi, lo)):
            ax.fill_between(xs, lo, hi, color=c, alpha=0.15, lw=0)
    ax.set_xscale("log", base=2)
    if Ms:
        ax.set_xticks(Ms)
        ax.set_xticklabels([str(m) for m in Ms])
    if log_y:
        _log_y(ax)
    ax.set_xlabel(f"M (rows of x)\nline: median over {_other_keys(grp)}; band: min..max", fontsize=9)
    ax.set_ylabel(ylabel)
    ax.grid(True, which="major", alpha=0.3)


def _bar_panel(ax, grp, impls, value, colors, ylabel: str, log_y: bool) -> None:
    by_shape = _by_shape(grp)
    shapes = list(by_shape)
    labels = _shape_labels(shapes)
    width = 0.8 / max(1, len(impls))
    for j, impl in enumerate(impls):
        xs, ys = [], []
        for k, shape in enumerate(shapes):
            v = value(by_shape[shape], impl)
            if v is not None and v > 0:
                xs.append(k + (j - (len(impls) - 1) / 2) * width)
                ys.append(v)
        if not xs:
            continue
        bars = ax.bar(xs, ys, width=width, color=_color(impl, colors), label=impl)
        for b, y in zip(bars, ys):
            ax.annotate(f"{y:.3g}", (b.get_x() + b.get_width() / 2, y), ha="center", va="bottom", fontsize=7,
                        xytext=(0, 1), textcoords="offset points")
    ax.set_xticks(range(len(shapes)))
    ax.set_xticklabels(labels, fontsize=8)
    if log_y:
        _log_y(ax)
    ax.set_ylabel(ylabel)
    ax.grid(True, axis="y", which="major", alpha=0.3)


def _log_y(ax) -> None:
    """Log scale with plain tick labels at 1, 2, 5 x 10^k (not just powers of ten)."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    ax.set_yscale("log")
    ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_minor_formatter(NullFormatter())


def _figure(doc: dict, kind: str, png: Path) -> Optional[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = [(k, g) for k, g in _groups(doc["rows"]).items() if _by_shape(g)]
    if not groups:
        return None
    ncols = min(3, len(groups))
    nrows = math.ceil(len(groups) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(max(5.2 * ncols, 10.0), 3.9 * nrows + 1.4), squeeze=False)
    colors: Dict[str, str] = {}
    for ax, ((path, variant, dtype), grp) in zip(axes.flat, groups):
        ref = _ref(grp)
        has_m = all("M" in r["shape"] for r in grp)
        if kind == "speedup":
            impls = [i for i in dict.fromkeys(r["impl"] for r in grp) if i != ref]
            ylabel = f"X time / {ref} time (> 1: {ref} faster)"
            if has_m:
                _line_panel(ax, grp, _series(grp, impls, _ratio(ref)), colors, ylabel, log_y=True)
            else:
                _bar_panel(ax, grp, impls, _ratio(ref), colors, ylabel, log_y=True)
            ax.axhline(1.0, color="black", lw=0.8, ls="--")
        else:
            impls = _roof_impls(grp)
            ylabel = "% of roofline"
            if has_m:
                _line_panel(ax, grp, _series(grp, impls, _roof), colors, ylabel, log_y=False)
            else:
                _bar_panel(ax, grp, impls, _roof, colors, ylabel, log_y=False)
            top = max([r.get("roofline_pct") or 0 for r in grp] + [1.0])
            ax.set_ylim(0, max(5.0, 1.15 * top))
            if top > 60:
                ax.axhline(100.0, color="black", lw=0.8, ls="--")
        ax.set_title(f"{path} · {variant} · {dtype}", fontsize=11)
    for ax in list(axes.flat)[len(groups):]:
        ax.axis("off")
    handles: Dict[str, object] = {}
    for ax in axes.flat:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(lab, h)
    env = doc["env"]
    what = ("speedup of the fused op: each peer's median time over the fused op's" if kind == "speedup"
            else "percent of roofline: max(FLOPs / peak, bytes / bandwidth) over the measured median")
    fig.suptitle(f"fusedlora · {what}\n{env['device']} · torch {env['torch']} · triton {env['triton']} · "
                 f"{env['date'][:10]} · commit {(env.get('git_commit') or '?')[:10]}"
                 f"{'+dirty' if env.get('git_dirty') else ''}", fontsize=11)
    fig.legend(list(handles.values()), list(handles), loc="lower center", ncol=min(5 if ncols == 1 else 8, len(handles)),
               frameon=False, fontsize=9)
    fig.tight_layout(rect=(0, 0.1 if nrows == 1 else 0.05, 1, 0.93))
    fig.savefig(png, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return png


def draw(doc: dict, json_path: Path) -> List[Path]:
    """The PNGs of one run (see the module docstring); raises ImportError without matplotlib."""
    import matplotlib  # noqa: F401  (fail early and clearly)

    speedup_png, roof_png = plot_paths(json_path)
    return [p for p in (_figure(doc, "speedup", speedup_png), _figure(doc, "roofline", roof_png)) if p]


def write_report(json_path: Path, md_path: Path) -> List[Path]:
    """Draw the plots of ``json_path`` and link them from ``md_path`` (replacing
    the links of an earlier call); returns the PNGs written."""
    json_path, md_path = Path(json_path), Path(md_path)
    doc = json.loads(json_path.read_text())
    try:
        pngs = draw(doc, json_path)
        section = [f"![{p.stem.rsplit('_', 1)[-1]}]({p.name})" for p in pngs] or ["No rows to plot."]
    except ImportError as e:
        pngs = []
        section = [f"No plots: matplotlib is not importable ({e}); `pip install -e .[bench]`."]
        print(f"bench: report: {section[0]}", file=sys.stderr)
    md = md_path.read_text() if md_path.exists() else ""
    md = md.split(PLOTS_MARK)[0].rstrip("\n")
    md_path.write_text(f"{md}\n\n{PLOTS_MARK}\n## Plots\n\n" + "\n\n".join(section) + "\n")
    return pngs


README_BEGIN = "<!-- results: python bench/report.py --readme RESULTS.json -->"
README_END = "<!-- /results -->"


def _median(values: List[float]) -> Optional[float]:
    values = [v for v in values if v is not None and math.isfinite(v) and v > 0]
    return statistics.median(values) if values else None


def readme_section(doc: dict, json_path: Path, readme: Path) -> str:
    """One line per (path, variant): each peer's time over the reference's and the
    reference's percent of roofline, medians over the shapes (the full tables are in
    the run's markdown, linked), then the plots."""
    env = doc["env"]
    rel = lambda p: Path(p).resolve().relative_to(readme.resolve().parent).as_posix()  # noqa: E731
    groups = _groups(doc["rows"])
    peers = list(dict.fromkeys(r["impl"] for g in groups.values() for r in g if r["impl"] != _ref(g)))
    lines = [f"{env['device']} · torch {env['torch']} · triton {env['triton']} · {env['date'][:10]} · "
             f"commit {(env.get('git_commit') or '?')[:10]}. Each peer's time over the reference's "
             "(> 1: the reference is faster), median over the shapes of the row (graph-replay times for "
             f"rows of at most 64 tokens); full tables: [{json_path.with_suffix('.md').name}]"
             f"({rel(json_path.with_suffix('.md'))}).", "",
             "| path · variant | ref | " + " | ".join(f"{p}/ref" for p in peers) + " | ref %roof |",
             "|---|---|" + "---|" * len(peers) + "---|"]
    for (path, variant, dtype), grp in groups.items():
        ref = _ref(grp)
        by_shape = _by_shape(grp)
        cells = []
        for peer in peers:
            m = _median([_ratio(ref)(b, peer) for b in by_shape.values()])
            cells.append(f"{m:.3g}" if m is not None else "—")
        roof = _median([_roof(b, ref) for b in by_shape.values()])
        lines.append(f"| {path} · {variant} · {dtype} | {ref} | " + " | ".join(cells) +
                     f" | {f'{roof:.0f}%' if roof is not None else '—'} |")
    pngs = [p for p in plot_paths(json_path) if p.exists()]
    lines += [""] + [f"![{p.stem.rsplit('_', 1)[-1]}]({rel(p)})" for p in pngs]
    return "\n".join(lines).rstrip() + "\n"


def update_readme(readme: Path, json_paths: List[Path]) -> None:
    """Replace what stands between README_BEGIN and README_END with one readme_section
    per run, in the order given (a later run that timed some paths first, then the
    run that has the others)."""
    text = readme.read_text()
    if README_BEGIN not in text or README_END not in text:
        raise SystemExit(f"bench: report: {readme} has no {README_BEGIN} ... {README_END} block")
    head, rest = text.split(README_BEGIN, 1)
    tail = rest.split(README_END, 1)[1]
    sections = [readme_section(json.loads(Path(p).read_text()), Path(p), readme) for p in json_paths]
    readme.write_text(f"{head}{README_BEGIN}\n" + "\n".join(sections) + f"{README_END}{tail}")


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    if argv[0] == "--readme":
        if len(argv) < 2:
            print("usage: python bench/report.py --readme RESULTS.json [MORE.json ...]", file=sys.stderr)
            return 2
        update_readme(Path(__file__).resolve().parent.parent / "README.md", [Path(a) for a in argv[1:]])
        return 0
    for name in argv:
        json_path = Path(name)
        for p in write_report(json_path, json_path.with_suffix(".md")):
            print(f"wrote {p}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
