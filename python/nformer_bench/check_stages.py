"""The stages of `nformer-bench check` that run in child processes (`nformer-bench _worker check`):
the environment probe, the extension check, the smoke cases against the reference backend, and the
measurements. Each prints a RESULT_MARK line per result; check.py orchestrates them."""
import argparse
import json
import sys
import time
from pathlib import Path

from nformer_bench import RESULT_MARK
from nformer_bench.environment import git_commit


def stage_worker(cfg):
    """Runs one stage in this (child) process, printing a RESULT_MARK line per result."""
    def emit(item):
        print(RESULT_MARK + json.dumps(item), flush=True)

    {"probe": _probe, "extension": _extension, "smoke": _smoke, "knn": _knn, "attention": _attention,
     "nformer": _nformer, "tune": _tune}[cfg["stage"]](cfg, emit)


def _probe(cfg, emit):
    """Software and device, without importing nformer_kernels (whose extension may be rebuilt next)."""
    import platform

    import torch

    versions = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda}
    for mod in ("triton", "numpy"):
        try:
            versions[mod] = __import__(mod).__version__
        except ImportError:
            versions[mod] = None
    from torch.utils.cpp_extension import is_ninja_available

    info = {"versions": versions, "capability": None, "device_name": None, "ninja": is_ninja_available(),
            "torch_site": str(Path(torch.__file__).resolve().parent.parent)}
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        info.update(capability=f"{major}.{minor}", device_name=torch.cuda.get_device_name())
    info["git_commit"] = git_commit()
    print(f"torch {versions['torch']} (CUDA {versions['cuda']}), triton {versions['triton']}, python "
          f"{versions['python']}; device: {info['device_name'] or 'no CUDA device'} "
          f"(capability {info['capability']}); commit {info['git_commit']}")
    emit(info)


def _extension(cfg, emit):
    import torch

    import nformer_kernels as nk
    from nformer_bench.environment import environment

    device = torch.device(cfg["device"])
    env = environment(device)
    info = {"extension": nk.extension_available(), "extension_cuda": nk.extension_has_cuda(),
            "backends": nk.available_backends(device), "automatic_backend": nk.get_backend(device),
            **{key: env[key] for key in ("device_name", "device_slug", "git_commit", "git_dirty")}}
    print(f"nformer_kernels {nk.__version__}: extension {info['extension']}, CUDA kernels {info['extension_cuda']}; "
          f"backends on {device.type}: {info['backends']} (automatic: {info['automatic_backend']})")
    emit(info)


# ------------------------------------------------------------------ smoke cases
def _randn(*shape, seed, device):
    """Seeded normal values, drawn in fp64 (no ties at fp32 precision)."""
    import torch

    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).float().to(device)


def _rel_err(got, want):
    """max |got - want| / max(1, max |want|): the project's tolerance scale."""
    return ((got.float() - want.float()).abs().max() / max(1.0, want.float().abs().max().item())).item()


def _knn_mismatches(backend, x, k, precision="auto", margin=None):
    """knn's index tensor on `backend` against the reference's, entry for entry (the canonical top-k
    is the same tensor on every backend): the number of entries that differ, tolerance 0."""
    import nformer_kernels as nk

    with nk.use_backend(backend):
        idx = nk.knn(x, k, precision=precision, margin=margin)
    with nk.use_backend("reference"):
        ref = nk.knn(x, k)
    if idx.shape != ref.shape:
        raise AssertionError(f"shape {tuple(idx.shape)}, expected {tuple(ref.shape)}")
    return (idx != ref).sum().item(), 0


def _knn_case(dtype, kind="gaussian", precision="auto", margin=None):
    """knn of the benchmark's `kind` features in `dtype` (_knn_mismatches)."""
    def case(backend, p, device):
        import torch

        from nformer_bench.certified import features

        x = features(kind, p["n"], p["d"], device)[0].to(getattr(torch, dtype))
        return _knn_mismatches(backend, x, p["k"], precision, margin)
    return case


def _knn_batch_case(backend, p, device):
    """A bf16 batch of one 256-row item per SM: B * ceil(N / 128) >= SMs makes the CUDA knn take its
    128-row tiles, the variant the 1M-row measurement runs (the other cases take the 64-row ones).
    On the CPU (the dry run) two items of 128 rows: the CUDA emulation then counts 2 SMs.
    _knn_mismatches."""
    import torch

    if device.type == "cuda":
        items, rows = torch.cuda.get_device_properties(device).multi_processor_count, 256
    else:
        items, rows = 2, 128
    return _knn_mismatches(backend, _randn(items, rows, 64, seed=10, device=device).to(torch.bfloat16), p["k"])


def _reciprocal_case(backend, p, device):
    import nformer_kernels as nk

    with nk.use_backend("reference"):
        idx = nk.knn(_randn(p["n"], p["d"], seed=1, device=device), p["k"])
        ref = nk.reciprocal_mask(idx)
    with nk.use_backend(backend):
        keep = nk.reciprocal_mask(idx)
    return (keep != ref).sum().item(), 0


def _attention_inputs(p, device, dtype):
    import torch

    import nformer_kernels as nk

    with nk.use_backend("reference"):
        idx = nk.knn(_randn(p["n"], p["d"], seed=2, device=device), p["k"])
        keep = nk.reciprocal_mask(idx)
    q, k, v = (_randn(p["n"], p["d"], seed=s, device=device).to(dtype) for s in (3, 4, 5))
    landmarks = torch.randperm(p["n"], generator=torch.Generator().manual_seed(6))[:p["landmarks"]].to(device)
    return q, k, v, idx, keep, landmarks


def _attention_train_case(backend, p, device):
    import torch

    import nformer_kernels as nk

    q, k, v, idx, keep, landmarks = _attention_inputs(p, device, torch.float32)
    grad_out = _randn(p["n"], p["d"], seed=7, device=device)

    def forward_backward(name):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        with nk.use_backend(name):
            out = nk.neighbor_attention(*leaves, idx, keep, landmarks, p["heads"])
            grads = torch.autograd.grad(out, leaves, grad_out)
        return [out.detach(), *grads]

    return max(_rel_err(a, b) for a, b in zip(forward_backward(backend), forward_backward("reference"))), 1e-4


def _attention_half_case(backend, p, device):
    import torch

    import nformer_kernels as nk

    inputs = _attention_inputs(p, device, torch.bfloat16)
    with torch.no_grad():
        with nk.use_backend(backend):
            out = nk.neighbor_attention(*inputs, p["heads"])
        with nk.use_backend("reference"):
            ref = nk.neighbor_attention(*inputs, p["heads"])
    return _rel_err(out, ref), 1.6e-2


def _nformer_case(backend, p, device):
    import torch

    import nformer_kernels as nk
    from nformer_bench.baselines import DenseOfficialNFormer, random_official_state_dict

    n, d, k = p["nformer_n"], p["nformer_d"], p["k"]
    sd = random_official_state_dict(dim=d, depth=2, classes=None, prefix="", std=0.1)
    dense = DenseOfficialNFormer.from_official(sd, heads=2, topk=k).to(device).eval()
    fused = nk.NFormer.from_official(sd, topk=k).to(device).eval()
    x = _randn(1, n, d, seed=8, device=device)
    gen = torch.Generator().manual_seed(9)
    landmarks = torch.stack([torch.randperm(n, generator=gen)[:5] for _ in range(2)]).to(device)
    with torch.no_grad():
        ref = dense(x, landmarks=landmarks)
        with nk.use_backend(backend):
            out = fused(x, landmarks=landmarks)
    return _rel_err(out, ref), 1e-4


# Tolerances: docs/design.md, "Numerics" (knn: none, the index tensor is the reference's; the rest:
# max |error| / max(1, max |ref|) in the output dtype).
SMOKE_CASES = {"knn fp32": _knn_case("float32"), "knn bf16": _knn_case("bfloat16"),
               "knn fp32 exact, near-duplicates": _knn_case("float32", "near-duplicates", "exact"),
               "knn certified margin 0 (knn_rows rescan)": _knn_case("float32", "near-duplicates", "certified", 0),
               "knn bf16, one item per SM (cuda: 128-row tiles)": _knn_batch_case,
               "reciprocal_mask": _reciprocal_case, "neighbor_attention fp32 fwd+bwd": _attention_train_case,
               "neighbor_attention bf16 fwd": _attention_half_case,
               "NFormer eval fp32 vs dense official": _nformer_case}


# The backend of tests/cuda_emulation (csrc/cuda's kernel bodies on CPU tensors), smoke-checked by the dry run.
EMULATED = "cuda-emulated"


def _smoke(cfg, emit):
    """cfg["backend"]'s smoke cases against the reference backend, stopping at the first failure."""
    import traceback

    import torch

    device, backend = torch.device(cfg["device"]), cfg["backend"]
    if backend == EMULATED:  # the dry run: csrc/cuda's kernel bodies on the CPU (a source checkout)
        from tests.cuda_emulation.backend import NAME, register

        assert register() == NAME == EMULATED
    print(f"{backend} on {device.type} tensors, checked against the reference backend")
    for name, case in SMOKE_CASES.items():
        start = time.monotonic()
        row = {"backend": backend, "case": name, "ok": False, "max_err": None, "tol": None, "error": None}
        try:
            row["max_err"], row["tol"] = case(backend, cfg, device)
            row["ok"] = row["max_err"] <= row["tol"]
        except Exception as exc:  # noqa: BLE001 - the failing case is the result
            traceback.print_exc(file=sys.stdout)
            row["error"] = f"{type(exc).__name__}: {exc}"[:500]
        row["seconds"] = round(time.monotonic() - start, 2)
        print(f"{backend:>10} {name:<38} {'ok' if row['ok'] else 'FAILED'}  err {row['max_err']} "
              f"tol {row['tol']} {row['error'] or ''} ({row['seconds']} s)", flush=True)
        emit(row)
        if not row["ok"]:
            break  # fail fast: the rest of this backend's cases would only repeat it


# ------------------------------------------------------------------ measurements
def _knn(cfg, emit):
    from nformer_bench.knn import compare

    for dtype, precision in cfg["cases"]:
        # the chunked torch.mm baseline once per dtype, beside nk.knn's default precision
        methods = (["knn"] if cfg["backends"] else []) + (["knn-torch"] if precision == "auto" else [])
        for row in compare(cfg["n"], cfg["d"], cfg["k"], cfg["device"], dtype, methods, cfg["backends"],
                           repeats=cfg["repeats"], repeat_budget_s=cfg["repeat_budget_s"], isolated=False,
                           precision=precision):
            print(f"knn {dtype} {precision} {row['method']} ({row['backend']}): {row['status']} "
                  f"{row.get('latency_ms')} ms, recall {row.get('recall')}", flush=True)
            emit(row)


def _attention(cfg, emit):
    import torch

    import nformer_kernels as nk
    from nformer_bench import runner

    device = torch.device(cfg["device"])
    n, d, k = cfg["n"], cfg["d"], cfg["k"]
    params = {"d": d, "heads": cfg["heads"], "landmarks": cfg["landmarks"], "k": k, "ffn": 1, "depth": 1}
    # One neighbour list for every configuration: the bf16 knn of the features (seconds at N=1M).
    with nk.use_backend(cfg["backends"][0]), torch.inference_mode():
        idx = nk.knn(runner.synthetic_features(n, d, device, torch.bfloat16)[0], k)
        keep = nk.reciprocal_mask(idx)
    for dtype in cfg["dtypes"]:
        for backend in cfg["backends"]:
            mcfg = {"method": "attention", "backend": backend, "n": n, "device": str(device), "dtype": dtype,
                    "warmup": 1, "repeats": cfg["repeats"], "repeat_budget_s": cfg["repeat_budget_s"],
                    "threads": None, "params": params}
            row = {"method": "attention", "backend": backend, "n": n, "dtype": dtype, **params,
                   **runner.launch("measure", mcfg, None, isolated=False, neighbours=(idx, keep))}
            print(f"attention {dtype} ({backend}): {row['status']} {row.get('latency_ms')} ms, "
                  f"{row.get('gbytes_per_s')} GB/s", flush=True)
            emit(row)


def _nformer(cfg, emit):
    import argparse

    from nformer_bench import report, sweep

    methods = (["nformer"] if cfg["backends"] else []) + ["dense-official", "dense-transformer"]
    margin = 0.1 * cfg["limit_s"]  # the last configuration started must end before the stage's limit
    argv = ["run", "--device", cfg["device"], "--dtype", "float32", "--methods", ",".join(methods),
            "--n-list", ",".join(map(str, cfg["n_list"])), "--d", str(cfg["d"]), "--ffn", str(cfg["ffn"]),
            "--repeats", str(cfg["repeats"]), "--warmup", "1",
            "--repeat-budget-s", str(cfg["repeat_budget_s"]), "--timeout-s", str(cfg["limit_s"] - margin),
            "--time-budget-s", str(cfg["limit_s"] - margin), "--isolation", "none", "--check-n", str(cfg["check_n"])]
    if cfg["backends"]:
        argv += ["--backends", ",".join(cfg["backends"])]
    parser = argparse.ArgumentParser(prog="nformer-bench run")  # `nformer-bench run`'s options, as it parses them
    sweep.add_arguments(parser)
    args = parser.parse_args(argv[1:])
    args.argv = argv
    runs = sweep.Sweep(args)
    emit({"kind": "meta", **runs.meta()})
    for kind, item in runs:
        print(report.row_line(item) if kind == "rows" else f"agreement: {item}", flush=True)
        emit({"kind": kind, **item})


def _tune(cfg, emit):
    try:
        import triton  # noqa: F401
    except ImportError:
        print("triton is not importable: no tuning")
        return
    from nformer_bench import tune

    for kernel, dtype, most in cfg["specs"]:
        args = argparse.Namespace(kernel=kernel, n=cfg["n"], d=cfg["d"], k=cfg["k"], heads=2, landmarks=5,
                                  dtype=dtype, repeats=cfg["repeats"], max_configs=most)
        for row in tune.rows(args):
            print(f"tune {kernel} {dtype} {row['variant']}: {row['ms']} ms {row['error'] or ''}", flush=True)
            emit({"kernel": kernel, "dtype": dtype, **row})
