"""Markdown tables, PNG plots and the README section made from benchmark result JSON files."""
import json
import os
from pathlib import Path

from nformer_bench.analytic import PAPER_GFLOPS_PER_IMG

BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"
HEADLINE_N = 19281  # Market-1501 query + gallery
# The paper's Table 1 figure each method is compared with.
PAPER_ROW = {"nformer": "nformer", "dense-official": "nformer", "dense-transformer": "transformer"}


def _fmt_ms(ms):
    return "—" if ms is None else (f"{ms / 1e3:.2f} s" if ms >= 1e3 else f"{ms:.3g} ms")


def _fmt_gbs(value):
    return "" if value is None else f"{value:.3g}"


def _fmt_mb(nbytes):
    if nbytes is None:
        return "—"
    return "<1 MB" if nbytes < 2**20 else f"{nbytes / 2**20:.0f} MB"


def _label(row):
    return f"{row['method']} ({row['backend']})"


def row_line(row):
    """One progress line of the sweep."""
    head = f"{_label(row):32s} N={row['n']:>8d}: "
    if row["status"] != "ok":
        return head + row["status"]
    cpu = f", CPU {_fmt_ms(row['cpu_time_ms'])}" if row.get("cpu_time_ms") is not None else ""
    return (head + f"{_fmt_ms(row['latency_ms'])} (IQR {_fmt_ms(row['latency_iqr_ms'])}{cpu}), "
            f"{row['gflops']:.3g} GFLOP, {row['tflops_per_s']:.3g} TFLOP/s, peak {_fmt_mb(row['peak_mem_bytes'])}")


def _meta_lines(meta):
    v = meta["versions"]
    commit = (meta["git_commit"] or "unknown")[:12] + (" (dirty)" if meta.get("git_dirty") else "")
    p = meta["params"]
    return [f"Device: **{meta['device_name']}**, dtype {meta['dtype']}, torch {v['torch']}, triton {v['triton']}, "
            f"{meta['torch_threads']} threads, commit {commit}, {meta['timestamp']}.",
            f"d={p['d']}, H={p['heads']}, FFN {p['ffn']}, k={p['k']}, {p['landmarks']} landmarks, "
            f"depth {p['depth']} (nformer-layer: 1 block, neighbours given); batch 1, eval, inference mode; "
            f"median of {meta['repeats']} after {meta['warmup']} warm-up.",
            f"Command: `{meta['command']}`"]


def headline(result, n_target=HEADLINE_N):
    """Lines comparing nformer with the dense baselines at n_target (or the largest N they share)."""
    ok = {(r["method"], r["backend"], r["n"]): r for r in result["rows"] if r["status"] == "ok"}
    fused = sorted({(m, b) for m, b, _ in ok if m == "nformer"})
    lines = []
    for method, backend in fused:
        ns = sorted(n for m, b, n in ok if (m, b) == (method, backend))
        n = n_target if n_target in ns else (ns[-1] if ns else None)
        if n is None:
            continue
        ours = ok[method, backend, n]
        parts = [f"At N={n}: nformer ({backend}) {_fmt_ms(ours['latency_ms'])}, peak {_fmt_mb(ours['peak_mem_bytes'])}"]
        for dense in ("dense-official", "dense-transformer"):
            other = ok.get((dense, "torch", n))
            if other is None:
                status = next((r["status"] for r in result["rows"] if r["method"] == dense and r["n"] == n), None)
                if status:
                    parts.append(f"{dense}: {status}")
                continue
            mem = ""
            if other["peak_mem_bytes"] and ours["peak_mem_bytes"]:
                mem = f", {other['peak_mem_bytes'] / ours['peak_mem_bytes']:.0f}x its peak memory"
            parts.append(f"{dense} {_fmt_ms(other['latency_ms'])}, peak {_fmt_mb(other['peak_mem_bytes'])} "
                         f"({other['latency_ms'] / ours['latency_ms']:.1f}x nformer's latency{mem})")
        lines.append("; ".join(parts) + ".")
    return lines


def run_markdown(result, json_path=None):
    """The full Markdown report of one run: metadata, agreement check, every row."""
    meta = result["meta"]
    lines = [f"## nformer-bench: {meta['device_name']}, {meta['dtype']}", ""] + _meta_lines(meta) + [""]
    if json_path is not None:
        lines += [f"Raw results: `{Path(json_path).name}`.", ""]
    if result["agreement"]:
        lines += ["Fused NFormer vs dense official (same weights, explicit landmarks, eval):", "",
                  "| backend | N | dtype | max abs diff | max abs ref | knn index match |", "|---|---|---|---|---|---|"]
        for a in result["agreement"]:
            if "max_abs_diff" in a:
                lines.append(f"| {a['backend']} | {a['n']} | {a['dtype']} | {a['max_abs_diff']:.2e} | "
                             f"{a['max_abs_ref']:.3g} | {a['knn_index_match']:.4f} |")
            else:
                lines.append(f"| {a.get('backend', '?')} | | | {a['status']} | | |")
        lines.append("")
    lines += headline(result)
    paper = PAPER_GFLOPS_PER_IMG
    lines += ["", f"GFLOPs/img: analytic forward FLOPs / N (bench/analytic.py). Paper Table 1: "
              f"transformer {paper['transformer']}, NFormer {paper['nformer']} GFLOPs/img.", "",
              "| method | backend | N | latency (median) | IQR | CPU time | GFLOP | TFLOP/s | GFLOPs/img (paper) "
              "| GB/s | peak mem | status |",
              "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in result["rows"]:
        ref = PAPER_ROW.get(r["method"])
        paper_txt = f" ({paper[ref]})" if ref else ""
        if r["status"] == "ok":
            lines.append(f"| {r['method']} | {r['backend']} | {r['n']} | {_fmt_ms(r['latency_ms'])} | "
                         f"{_fmt_ms(r['latency_iqr_ms'])} | {_fmt_ms(r.get('cpu_time_ms'))} | {r['gflops']:.3g} | "
                         f"{r['tflops_per_s']:.3g} | {r['gflops_per_img']:.3g}{paper_txt} | "
                         f"{_fmt_gbs(r.get('gbytes_per_s'))} | {_fmt_mb(r['peak_mem_bytes'])} | ok |")
        else:
            lines.append(f"| {r['method']} | {r['backend']} | {r['n']} | | | | | | | | | {r['status']} |")
    mem_kind = {r.get("mem_kind") for r in result["rows"] if r.get("mem_kind")}
    lines += ["", "GB/s (attention = neighbor_attention forward + backward): analytic bytes moved without cache "
              "reuse (bench/analytic.py attention_train_bytes) / latency.",
              "", "CPU time: process CPU seconds of the call, all threads (CPU runs; shows the work done "
              "when other load inflates wall time).",
              "", "Peak memory: " + {"cuda_max_allocated": "torch.cuda.max_memory_allocated growth over inputs "
                                                          "and weights.",
                                     "rss_growth": "peak RSS growth (ru_maxrss) of a fresh process per "
                                                   "configuration, over inputs and weights.",
                                     "in-process": "not measured (in-process run)."}.get(
        next(iter(mem_kind), ""), "—"), ""]
    return "\n".join(lines)


def plot_run(result, latency_png, memory_png):
    """Log-log latency and peak memory vs N, one line per (method, backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    meta = result["meta"]
    series = {}
    for r in result["rows"]:
        series.setdefault(_label(r), []).append(r)
    for path, key, scale, ylabel in ((latency_png, "latency_ms", 1e-3, "latency (s)"),
                                     (memory_png, "peak_mem_bytes", 2.0**-20, "peak memory (MB)")):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for label, rows in series.items():
            pts = [(r["n"], r[key] * scale) for r in rows if r["status"] == "ok" and r.get(key)]
            first_fail = next((r for r in rows if r["status"].startswith(("OOM", "timeout"))), None)
            if first_fail is not None:
                label += f" — {first_fail['status'].split(' ')[0]} at N={first_fail['n']}"
            if pts:
                ax.plot(*zip(*pts), marker="o", label=label)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("N (features in the set)")
        ax.set_ylabel(ylabel)
        ax.set_title(f"{meta['device_name']}, {meta['dtype']}", fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)


def write_run_files(result, json_path, overwrite=False):
    """The .md table and the two plots beside a run's JSON (made when missing: a run cut short
    by a time limit leaves only its JSON)."""
    json_path = Path(json_path)
    md, lat, mem = (json_path.with_name(json_path.stem + s) for s in (".md", "-latency.png", "-memory.png"))
    if overwrite or not md.exists():
        md.write_text(run_markdown(result, json_path))
    if overwrite or not (lat.exists() and mem.exists()):
        plot_run(result, lat, mem)
    return md.read_text()


def _latest_runs(results_root):
    """The newest result JSON per (device slug, dtype) under results_root/<slug>/."""
    latest = {}
    for path in sorted(Path(results_root).glob("*/*.json")):  # timestamps sort chronologically
        result = json.loads(path.read_text())
        latest[path.parent.name, result["meta"]["dtype"]] = (path, result)
    return [latest[key] for key in sorted(latest)]


def readme_snippet(results_root, readme_dir):
    """Markdown for the README: per device and dtype, an N x method table and the plots."""
    lines = ["Generated by `python -m nformer_bench report` from `bench/results/*/*.json`; "
             "cells are median latency / peak memory."]
    for path, result in _latest_runs(results_root):
        write_run_files(result, path)
        meta = result["meta"]
        methods = list(dict.fromkeys(_label(r) for r in result["rows"]))
        cells = {(_label(r), r["n"]): r for r in result["rows"]}
        lines += ["", f"### {meta['device_name']}, {meta['dtype']}", ""] + _meta_lines(meta) + [""]
        lines += ["| N | " + " | ".join(methods) + " |", "|---:|" + "---:|" * len(methods)]
        for n in sorted({r["n"] for r in result["rows"]}):
            row = []
            for m in methods:
                r = cells.get((m, n))
                if r is None:
                    row.append("")
                elif r["status"] == "ok":
                    row.append(f"{_fmt_ms(r['latency_ms'])} / {_fmt_mb(r['peak_mem_bytes'])}")
                else:
                    row.append(r["status"].split(" (")[0])
            lines.append(f"| {n} | " + " | ".join(row) + " |")
        lines += [""] + headline(result)
        rel = Path(os.path.relpath(path.parent, readme_dir)).as_posix()
        stem = path.stem
        lines += ["", f"![latency vs N]({rel}/{stem}-latency.png) ![peak memory vs N]({rel}/{stem}-memory.png)",
                  "", f"Full table: [{rel}/{stem}.md]({rel}/{stem}.md)"]
    return "\n".join(lines) + "\n"


def update_readme(results_root, readme):
    """Replace the text between the bench markers of README.md; print the snippet if there are none."""
    readme = Path(readme)
    snippet = readme_snippet(results_root, readme.parent)
    text = readme.read_text() if readme.exists() else ""
    start, end = text.find(BEGIN), text.find(END)
    if start < 0 or end < start:
        print(f"{readme}: no {BEGIN} ... {END} markers; the section is:\n")
        print(snippet)
        return False
    readme.write_text(text[:start + len(BEGIN)] + "\n" + snippet + text[end:])
    print(f"updated the benchmark section of {readme}")
    return True
