"""Ahead-of-time compilation of every kernel variant the launchers can pick; no GPU needed.

    from nformer_kernels.triton.aot import compile_all, format_table
    print(format_table(compile_all()))      # or: python -m nformer_kernels.triton.aot [--json|--markdown] (all cores)

Each variant is compiled with triton.compile(ASTSource(fn, signature, constexprs), target=...)
in a fresh cache directory, so ptxas really runs, and its `ptxas -v` log gives registers and spills.
Arguments get the divisibility-by-16 hints the runtime would give in the NFormer configuration:
every pointer (torch allocations are aligned) and the integers in Variant.aligned_ints (d, dv).
Other specialisations the runtime may make (a value of 1, other multiples of 16) run the same
kernel code.
"""
import contextlib
import io
import multiprocessing
import os
import re
import tempfile
import time

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from nformer_kernels.triton.knn import variants as knn_variants
from nformer_kernels.triton.knn_rescore import variants as rescore_variants
from nformer_kernels.triton.knn_rows import variants as rows_variants
from nformer_kernels.triton.reciprocal import variants as reciprocal_variants
from nformer_kernels.triton.sparse_attention import variants as attention_variants

DEFAULT_TARGETS = (GPUTarget("cuda", 86, 32), GPUTarget("cuda", 90, 32))

_REGS = re.compile(r"Used (\d+) registers")
_SPILLS = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")


# Per-SM limits of the targets (CUDA occupancy calculator): warps, CTAs, registers (allocated per
# warp in units of 256), shared memory (each CTA also reserves 1 KiB).
SM_LIMITS = {"sm_86": {"warps": 48, "ctas": 16, "regs": 65536, "smem": 100 * 1024},
             "sm_90": {"warps": 64, "ctas": 32, "regs": 65536, "smem": 228 * 1024}}


def ctas_per_sm(target: str, regs: int, shared: int, warps: int) -> int:
    """Resident CTAs per SM of a kernel using `regs` registers a thread, `shared` bytes of shared
    memory and `warps` warps a CTA on `target` ("sm_86" or "sm_90"): the least of the limits."""
    lim = SM_LIMITS[target]
    regs_per_warp = -(-regs * 32 // 256) * 256
    return min(lim["ctas"], lim["warps"] // warps, lim["regs"] // (regs_per_warp * warps),
               lim["smem"] // (shared + 1024))


def compile_targets(variant, targets=DEFAULT_TARGETS) -> list:
    """The targets a variant is compiled for: those its launcher can pick it on (Variant.min_arch)."""
    return [target for target in targets if target.arch >= variant.min_arch]


def all_variants() -> list:
    return knn_variants() + rescore_variants() + rows_variants() + reciprocal_variants() + attention_variants()


def _compile(variant, target):
    arg_index = variant.kernel.arg_names.index
    attrs = {(arg_index(name),): [["tt.divisibility", 16]]
             for name, ty in variant.signature.items()
             if ty.startswith("*") or name in variant.aligned_ints}
    signature = {**variant.signature, **{name: "constexpr" for name in variant.constexprs}}
    src = ASTSource(variant.kernel, signature, dict(variant.constexprs), attrs)
    return triton.compile(src, target=target,
                          options={"num_warps": variant.num_warps, "num_stages": variant.num_stages})


def _compile_share(share):
    """compile_all of every workers-th variant from `first` on, in a pool process."""
    first, workers, targets = share
    return compile_all(targets, all_variants()[first::workers])


def compile_all(targets=DEFAULT_TARGETS, variants=None, workers: int = 1) -> list:
    """Compile every variant for every target. Returns one dict per (variant, target), in order:
    kernel, target, regs, spill_stores, spill_loads, shared (bytes), seconds, error (None if ok).
    workers > 1 (only for all variants) compiles in that many forked processes: LLVM and ptxas
    are single-threaded, so the wall time divides by the cores."""
    if triton.knobs.runtime.interpret:
        raise RuntimeError("compile_all needs compiled kernels; unset TRITON_INTERPRET")
    if workers > 1 and variants is None:
        with multiprocessing.get_context("fork").Pool(workers) as pool:
            shares = pool.map(_compile_share, [(i, workers, targets) for i in range(workers)])
        rows, taken = [], [0] * workers
        for v, variant in enumerate(all_variants()):  # variant v is the (v // workers)-th of share v % workers
            count = len(compile_targets(variant, targets))
            rows += shares[v % workers][taken[v % workers]:taken[v % workers] + count]
            taken[v % workers] += count
        return rows
    rows = []
    with tempfile.TemporaryDirectory() as cache_dir, \
            triton.knobs.cache.scope(), triton.knobs.nvidia.scope():
        triton.knobs.cache.dir = cache_dir  # fresh cache: ptxas runs and logs every time
        triton.knobs.nvidia.dump_ptxas_log = True
        for variant in variants if variants is not None else all_variants():
            for target in compile_targets(variant, targets):
                row = {"kernel": variant.label, "target": f"sm_{target.arch}", "regs": None,
                       "spill_stores": None, "spill_loads": None, "shared": None, "warps": variant.num_warps,
                       "ctas_per_sm": None, "error": None}
                log = io.StringIO()
                start = time.perf_counter()
                try:
                    with contextlib.redirect_stdout(log):
                        compiled = _compile(variant, target)
                except Exception as exc:  # reported per row; the caller decides
                    row["error"] = f"{type(exc).__name__}: {exc}"[:2000]
                else:
                    text = log.getvalue()
                    regs, spills = _REGS.search(text), _SPILLS.search(text)
                    row["regs"] = int(regs.group(1)) if regs else None
                    if spills:
                        row["spill_stores"], row["spill_loads"] = map(int, spills.groups())
                    row["shared"] = compiled.metadata.shared
                    if row["regs"] is not None and row["target"] in SM_LIMITS:
                        row["ctas_per_sm"] = ctas_per_sm(row["target"], row["regs"], row["shared"], variant.num_warps)
                row["seconds"] = round(time.perf_counter() - start, 2)
                rows.append(row)
    return rows


def format_table(rows) -> str:
    lines = [f"{'kernel variant':<100} {'target':<6} {'regs':>4} {'spill st/ld':>11} {'smem':>6} {'CTAs/SM':>7} "
             f"{'s':>5}"]
    for r in rows:
        if r["error"]:
            lines.append(f"{r['kernel']:<100} {r['target']:<6} FAILED: {r['error'].splitlines()[0]}")
            continue
        spill = f"{r['spill_stores']}/{r['spill_loads']}"
        lines.append(f"{r['kernel']:<100} {r['target']:<6} {r['regs']!s:>4} {spill:>11} "
                     f"{r['shared']!s:>6} {r.get('ctas_per_sm')!s:>7} {r['seconds']:>5}")
    return "\n".join(lines)


def format_markdown(rows) -> str:
    """One markdown row per variant (its label, then per target: registers, spill stores/loads in
    bytes, shared memory, CTAs per SM; "-" where the variant is not compiled for that target):
    the table of docs/design.md."""
    targets = list(dict.fromkeys(r["target"] for r in rows))
    by_variant = {}
    for r in rows:
        by_variant.setdefault(r["kernel"], {})[r["target"]] = r

    def cells(r):
        if r is None:
            return "-"
        if r["error"]:
            return "failed"
        kib = r["shared"] / 1024
        return f"{r['regs']} / {r['spill_stores']}+{r['spill_loads']} B / {kib:g} KiB / {r['ctas_per_sm']}"

    lines = ["| variant | " + " | ".join(f"{t}: regs / spills / smem / CTAs per SM" for t in targets) + " |",
             "|---|" + "---|" * len(targets)]
    for label, per_target in by_variant.items():
        escaped = label.replace("|", "\\|")  # GitHub tables split cells on | even in code spans
        lines.append(f"| `{escaped}` | " + " | ".join(cells(per_target.get(t)) for t in targets) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":  # python -m nformer_kernels.triton.aot [--json | --markdown]
    import json
    import sys

    rows = compile_all(workers=len(os.sched_getaffinity(0)))
    if "--json" in sys.argv[1:]:
        print(json.dumps(rows))
    else:
        print(format_markdown(rows) if "--markdown" in sys.argv[1:] else format_table(rows))
