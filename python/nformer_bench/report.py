"""Markdown tables, PNG plots and the README section made from benchmark result JSON files."""
import json
import os
from pathlib import Path

from nformer_bench.analytic import PAPER_GFLOPS_PER_IMG

BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"
GPU_BEGIN, GPU_END = "<!-- gpu-check:begin -->", "<!-- gpu-check:end -->"
CHECK_JSON = "gpu_check.json"  # nformer_bench.check writes it; that module is for running, this one for reading
HEADLINE_N = 19281  # Market-1501 query + gallery
# The paper's Table 1 figure each method is compared with.
PAPER_ROW = {"nformer": "nformer", "dense-official": "nformer", "dense-transformer": "transformer"}


def fmt_ms(ms):
    return "—" if ms is None else (f"{ms / 1e3:.2f} s" if ms >= 1e3 else f"{ms:.3g} ms")


def _fmt_gbs(value):
    return "" if value is None else f"{value:.3g}"


def fmt_mb(nbytes):
    if nbytes is None:
        return "—"
    return "<1 MB" if nbytes < 2**20 else f"{nbytes / 2**20:.0f} MB"


def _label(row):
    return f"{row['method']} ({row['backend']})"


def knn_case(row):
    """A knn row's column: its dtype, and nk.knn's precision where it is not the default."""
    precision = row.get("precision")
    return row["dtype"] if precision in (None, "auto") else f"{row['dtype']} {precision}"


def row_line(row):
    """One progress line of the sweep."""
    head = f"{_label(row):32s} N={row['n']:>8d}: "
    if row["status"] != "ok":
        return head + row["status"]
    cpu = f", CPU {fmt_ms(row['cpu_time_ms'])}" if row.get("cpu_time_ms") is not None else ""
    return (head + f"{fmt_ms(row['latency_ms'])} (IQR {fmt_ms(row['latency_iqr_ms'])}{cpu}), "
            f"{row['gflops']:.3g} GFLOP, {row['tflops_per_s']:.3g} TFLOP/s, peak {fmt_mb(row['peak_mem_bytes'])}")


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
        parts = [f"At N={n}: nformer ({backend}) {fmt_ms(ours['latency_ms'])}, peak {fmt_mb(ours['peak_mem_bytes'])}"]
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
            parts.append(f"{dense} {fmt_ms(other['latency_ms'])}, peak {fmt_mb(other['peak_mem_bytes'])} "
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
    lines += ["", f"GFLOPs/img: analytic forward FLOPs / N (nformer_bench/analytic.py). Paper Table 1: "
              f"transformer {paper['transformer']}, NFormer {paper['nformer']} GFLOPs/img.", "",
              "| method | backend | N | latency (median) | IQR | CPU time | GFLOP | TFLOP/s | GFLOPs/img (paper) "
              "| GB/s | peak mem | status |",
              "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in result["rows"]:
        ref = PAPER_ROW.get(r["method"])
        paper_txt = f" ({paper[ref]})" if ref else ""
        if r["status"] == "ok":
            lines.append(f"| {r['method']} | {r['backend']} | {r['n']} | {fmt_ms(r['latency_ms'])} | "
                         f"{fmt_ms(r['latency_iqr_ms'])} | {fmt_ms(r.get('cpu_time_ms'))} | {r['gflops']:.3g} | "
                         f"{r['tflops_per_s']:.3g} | {r['gflops_per_img']:.3g}{paper_txt} | "
                         f"{_fmt_gbs(r.get('gbytes_per_s'))} | {fmt_mb(r['peak_mem_bytes'])} | ok |")
        else:
            lines.append(f"| {r['method']} | {r['backend']} | {r['n']} | | | | | | | | | {r['status']} |")
    mem_kind = {r.get("mem_kind") for r in result["rows"] if r.get("mem_kind")}
    lines += ["", "GB/s (attention = neighbor_attention forward + backward): analytic bytes moved without cache "
              "reuse (nformer_bench/analytic.py attention_train_bytes) / latency.",
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


def _rel(path, readme_dir):
    return Path(os.path.relpath(path, readme_dir)).as_posix()


def readme_snippet(results_root, readme_dir):
    """Markdown for the README: per device and dtype, an N x method table and the plots."""
    root = _rel(results_root, readme_dir)
    lines = [f"Generated by `nformer-bench report {root}` from `{root}/*/*.json`; "
             "cells are median latency / peak memory."]
    for path, result in _latest_runs(results_root):
        write_run_files(result, path)
        meta = result["meta"]
        lines += ["", f"### {meta['device_name']}, {meta['dtype']}", ""] + _meta_lines(meta) + [""]
        lines += _latency_memory_grid(result["rows"]) + [""] + headline(result)
        rel = _rel(path.parent, readme_dir)
        stem = path.stem
        lines += ["", f"![latency vs N]({rel}/{stem}-latency.png) ![peak memory vs N]({rel}/{stem}-memory.png)",
                  "", f"Full table: [{rel}/{stem}.md]({rel}/{stem}.md)"]
    return "\n".join(lines) + "\n"


def update_readme(folder, readme):
    """Replace the README section a result folder feeds: between the bench markers for a sweep
    results root (<root>/<device>/*.json), between the gpu-check markers for a `check` folder.
    Prints the section instead when the README lacks the markers; returns whether it was written."""
    readme, folder = Path(readme), Path(folder)
    if (folder / CHECK_JSON).exists():
        begin, end = GPU_BEGIN, GPU_END
        snippet = check_readme(json.loads((folder / CHECK_JSON).read_text()), _rel(folder, readme.parent))
    else:
        begin, end = BEGIN, END
        snippet = readme_snippet(folder, readme.parent)
    text = readme.read_text() if readme.exists() else ""
    start, stop = text.find(begin), text.find(end)
    if start < 0 or stop < start:
        print(f"{readme}: no {begin} ... {end} markers; the section is:\n")
        print(snippet)
        return False
    readme.write_text(text[:start + len(begin)] + "\n" + snippet + text[stop:])
    print(f"updated the {'GPU check' if begin == GPU_BEGIN else 'benchmark'} section of {readme}")
    return True


# ----------------------------------------------------------------------------- nformer-bench check
def _fmt_err(value):
    return "—" if value is None else f"{value:.1e}"


def _smoke_by_backend(result):
    by_backend = {}
    for case in result["smoke"]:
        by_backend.setdefault(case["backend"], []).append(case)
    return by_backend


def _smoke_cell(cases):
    last = cases[-1]
    if not last["ok"]:
        why = last["error"] or f"error {_fmt_err(last['max_err'])} > {_fmt_err(last['tol'])}"
        return f"**failed** at {last['case']}: {why.splitlines()[0][:120]}"
    return f"ok ({len(cases)} cases)"


def _tests_line(tests):
    if "tests" not in tests:
        return f"Tests: {tests.get('status', 'not run')}."
    passed = tests["tests"] - tests["failures"] - tests["errors"] - tests["skipped"]
    line = (f"Tests (`{tests.get('command', 'pytest')}`): {passed} passed, {tests['failures']} failed, "
            f"{tests['errors']} errors, {tests['skipped']} skipped in {tests['time_s']:.0f} s ({tests['status']}).")
    if tests.get("failed"):
        line += " Failing: " + ", ".join(f"`{name}`" for name in tests["failed"][:10]) + "."
    return line


def _check_header(result):
    meta, build = result["meta"], result["build"]
    v = meta.get("versions") or {}
    commit = (meta.get("git_commit") or "unknown")[:12] + (" (dirty)" if meta.get("git_dirty") else "")
    mode = " (dry run on the CPU: tiny sizes)" if meta["dry_run"] else ""
    return [f"Device: **{meta.get('device_name') or meta['device']}**{mode}, commit {commit}, {meta['started']}; "
            f"torch {v.get('torch')}, CUDA {v.get('cuda')}, triton {v.get('triton')}, python {v.get('python')}.",
            f"Build: {build.get('compile', 'not run')}; backends: {', '.join(build.get('backends') or []) or '—'} "
            f"(automatic: {build.get('automatic_backend', '—')}). "
            + (f"Budget {meta['budget_s']:g} s, " if meta.get("budget_s") is not None else "No budget, ")
            + f"wall {meta.get('wall_s', 0):.0f} s{'' if meta.get('complete') else ', not every stage ran to its end'}"
            + (f"; plots {meta['plots']}" if meta.get("plots") else "") + ".",
            f"Command: `{meta['command']}`"]


def _knn_rows(result):
    lines = ["| dtype | method | N | latency | recall | peak mem | status |", "|---|---|---:|---:|---:|---:|---|"]
    for r in result["knn"]:
        ok = r["status"] == "ok"
        recall = f"{r['recall']:.6f}" if r.get("recall") is not None else "—"
        lines.append(f"| {knn_case(r)} | {_label(r)} | {r['n']} | {fmt_ms(r.get('latency_ms')) if ok else ''} | "
                     f"{recall if ok else ''} | {fmt_mb(r.get('peak_mem_bytes')) if ok else ''} | {r['status']} |")
    return lines


def _attention_rows(result):
    lines = ["| dtype | backend | N | fwd+bwd latency | GB/s (analytic bytes) | peak mem | status |",
             "|---|---|---:|---:|---:|---:|---|"]
    for r in result["attention"]:
        ok = r["status"] == "ok"
        lines.append(f"| {r['dtype']} | {r['backend']} | {r['n']} | {fmt_ms(r.get('latency_ms')) if ok else ''} | "
                     f"{_fmt_gbs(r.get('gbytes_per_s')) if ok else ''} | "
                     f"{fmt_mb(r.get('peak_mem_bytes')) if ok else ''} | {r['status']} |")
    return lines


def _latency_memory_grid(rows):
    """An N x method markdown table of "latency / peak memory" cells (the status where a run failed)."""
    methods = list(dict.fromkeys(_label(r) for r in rows))
    cells = {(_label(r), r["n"]): r for r in rows}
    lines = ["| N | " + " | ".join(methods) + " |", "|---:|" + "---:|" * len(methods)]
    for n in sorted({r["n"] for r in rows}):
        row = []
        for m in methods:
            r = cells.get((m, n))
            if r is None:
                row.append("")
            elif r["status"] == "ok":
                row.append(f"{fmt_ms(r['latency_ms'])} / {fmt_mb(r['peak_mem_bytes'])}")
            else:
                row.append(r["status"].split(" (")[0])
        lines.append(f"| {n} | " + " | ".join(row) + " |")
    return lines


def _nformer_grid(result):
    rows = result["nformer"]["rows"]
    return _latency_memory_grid(rows) if rows else ["No NFormer measurements."]


def _agreement_line(result):
    parts = [f"{a['backend']} {a['max_abs_diff']:.1e} (max |ref| {a['max_abs_ref']:.3g}, knn index match "
             f"{a['knn_index_match']:.4f})" if "max_abs_diff" in a else f"{a['backend']}: {a.get('status')}"
             for a in result["nformer"]["agreement"]]
    if not parts:
        return []
    n = next((a.get("n") for a in result["nformer"]["agreement"] if a.get("n")), "?")
    return [f"Fused vs dense official NFormer at N={n}, fp32, same weights and landmarks, max |difference|: "
            + "; ".join(parts) + "."]


def _tune_lines(result, best=5):
    grids = {}
    for r in result["tune"]:
        grids.setdefault((r["kernel"], r["dtype"]), []).append(r)
    lines = []
    for (kernel, dtype), rows in grids.items():
        current = rows[0]
        ok = sorted((r for r in rows if r["ms"] is not None), key=lambda r: r["ms"])
        failed = sum(1 for r in rows if r["error"])
        lines += ["", f"Triton {kernel} {dtype}: {len(rows)} configurations, {failed} failed to run; "
                  "the launcher's current choice first, then the fastest:", "",
                  "| variant | ms | rate | match |", "|---|---:|---:|---:|"]
        for r in [current] + [r for r in ok if r is not current][:best]:
            rate = f"{r['rate']:.1f} {r['unit']}" if r["rate"] is not None else "-"
            ms = f"{r['ms']:.3f}" if r["ms"] is not None else f"failed: {(r['error'] or '')[:60]}"
            match = f"{r['match']:.4f}" if r.get("match") is not None else "-"
            lines.append(f"| {r['variant'].replace('|', chr(92) + '|')} | {ms} | {rate} | {match} |")
    return lines


def check_markdown(result):
    """The summary of one `nformer-bench check` run (gpu_check.md), complete or still running."""
    lines = ["# nformer-bench check", ""] + _check_header(result) + ["", "| stage | status | seconds | limit (s) |",
                                                                    "|---|---|---:|---:|"]
    lines += [f"| {s['name']} | {s['status']} | {s['seconds']:.0f} | {s['limit_s']:.0f} |" for s in result["stages"]]
    lines += ["", "## Smoke check (each backend vs the reference backend)", "",
              "| backend | case | ok | max error | tolerance | s |", "|---|---|---|---:|---:|---:|"]
    for c in result["smoke"]:
        lines.append(f"| {c['backend']} | {c['case']} | {'ok' if c['ok'] else '**FAILED**'} | "
                     f"{_fmt_err(c['max_err'])} | {_fmt_err(c['tol'])} | {c['seconds']} |")
        if c["error"]:
            lines.append(f"| | {c['error'].splitlines()[0][:200]} | | | | |")
    lines += ["", "## knn (nk.knn vs chunked torch.mm + topk)", ""] + _knn_rows(result)
    lines += ["", "## neighbor_attention forward + backward", ""] + _attention_rows(result)
    lines += ["", "GB/s: analytic bytes moved without cache reuse (nformer_bench/analytic.py attention_train_bytes) "
              "/ latency."]
    lines += ["", "## NFormer eval (median latency / peak memory)", ""] + _agreement_line(result) + [""]
    lines += _nformer_grid(result)
    lines += ["", "![NFormer latency vs N](nformer-latency.png) ![NFormer peak memory vs N](nformer-memory.png)",
              "", "## Tests", "", _tests_line(result["tests"])]
    if result["tune"]:
        lines += ["", "## Triton launch configurations"] + _tune_lines(result)
    return "\n".join(lines) + "\n"


def check_readme(result, rel_folder):
    """The README's GPU table from one `check` folder (rel_folder: that folder, relative to the README)."""
    meta = result["meta"]
    by_backend = _smoke_by_backend(result)
    knn = {(r["method"], r["backend"], knn_case(r)): r for r in result["knn"]}
    attention = {(r["backend"], r["dtype"]): r for r in result["attention"]}
    nformer = {(r["method"], r["backend"], r["n"]): r for r in result["nformer"]["rows"]}
    knn_dtypes = list(dict.fromkeys(knn_case(r) for r in result["knn"]))
    attention_dtypes = list(dict.fromkeys(r["dtype"] for r in result["attention"]))
    ns = sorted({r["n"] for r in result["nformer"]["rows"]})
    knn_n = result["knn"][0]["n"] if result["knn"] else None
    attention_n = result["attention"][0]["n"] if result["attention"] else None

    def knn_cell(r):
        if r is None:
            return ""
        if r["status"] != "ok":
            return r["status"].split(" (")[0]
        return fmt_ms(r["latency_ms"]) + (f" (recall {r['recall']:.4f})" if r.get("recall") is not None else "")

    def nformer_cell(r):
        if r is None:
            return ""
        if r["status"] != "ok":
            return r["status"].split(" (")[0]
        return f"{fmt_ms(r['latency_ms'])} / {fmt_mb(r['peak_mem_bytes'])}"

    header = (["implementation", "smoke check"] + [f"knn {dt}" for dt in knn_dtypes]
              + [f"attention fwd+bwd {dt}" for dt in attention_dtypes] + [f"NFormer N={n:,}" for n in ns])
    lines = [f"Generated by `nformer-bench report {rel_folder}` from `{rel_folder}/{CHECK_JSON}` "
             f"(`scripts/gpu_check.sh`). knn: N={knn_n}, d=256, k=20, latency (recall vs an fp64 brute force of 2,000 sampled rows); "
             f"attention: N={attention_n}, latency, achieved GB/s; NFormer: 4-block eval, fp32, median latency / "
             "peak memory.", ""] + _check_header(result) + ["",
             "| " + " | ".join(header) + " |", "|---|---|" + "---:|" * (len(header) - 2)]
    backends = list(dict.fromkeys([*by_backend, *(b for m, b, _ in knn if m == "knn")]))
    for backend in backends:
        cells = [f"`{backend}` backend", _smoke_cell(by_backend[backend]) if backend in by_backend else "not run"]
        cells += [knn_cell(knn.get(("knn", backend, dt))) for dt in knn_dtypes]
        for dt in attention_dtypes:
            r = attention.get((backend, dt))
            cells.append("" if r is None else (f"{fmt_ms(r['latency_ms'])}, {_fmt_gbs(r['gbytes_per_s'])} GB/s"
                                               if r["status"] == "ok" else r["status"].split(" (")[0]))
        cells += [nformer_cell(nformer.get(("nformer", backend, n))) for n in ns]
        lines.append("| " + " | ".join(cells) + " |")
    baselines = [("chunked torch.mm + topk", "knn-torch", None), ("dense official NFormer", None, "dense-official"),
                 ("dense SDPA transformer (4 layers)", None, "dense-transformer")]
    for name, knn_method, nformer_method in baselines:
        cells = [name, ""] + [knn_cell(knn.get((knn_method, "torch", dt))) for dt in knn_dtypes]
        cells += [""] * len(attention_dtypes)
        cells += [nformer_cell(nformer.get((nformer_method, "torch", n))) for n in ns]
        if any(cells[2:]):
            lines.append("| " + " | ".join(cells) + " |")
    lines += [""] + _agreement_line(result) + ["", _tests_line(result["tests"])]
    lines += ["", f"Summary with every case and the tuning grids: [{rel_folder}/gpu_check.md]({rel_folder}/gpu_check.md)"]
    return "\n".join(lines) + "\n"
