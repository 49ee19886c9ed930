"""Runs one benchmark configuration (method, backend, N, dtype) and measures it.

On the CPU the CLI calls `measure` in a fresh subprocess per configuration (`python -m nformer_bench
_worker`) so that peak-RSS figures of different methods do not mix and an out-of-memory kill
ends only that child; on CUDA it calls it in-process (peak stats reset, OOM is an exception).
`agreement` checks the fused model against the dense official one.
"""
import functools
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

import nformer_kernels as nk
from nformer_bench import RESULT_MARK, baselines
from nformer_bench.analytic import DTYPE_NAMES, FUSED_METHODS, PLAIN_BACKENDS, attention_train_bytes, method_flops

DTYPES = {name: getattr(torch, name) for name in DTYPE_NAMES}



def kernel_backends(device):
    """The nformer_kernels backends with kernels of their own that run tensors on `device`."""
    return [b for b in nk.available_backends(device) if b not in PLAIN_BACKENDS]


def synthetic_features(n, d, device, dtype, seed=0):
    """(1, n, d) features clustered like Re-ID embeddings: ~16 images per identity around a centre."""
    return _cpu_features(n, d, seed).to(device=device, dtype=dtype).unsqueeze(0)


@functools.lru_cache(maxsize=1)  # a sweep asks for the same set once per method; n=1M takes seconds
@torch.inference_mode(False)  # a normal tensor even when first asked for under inference mode
def _cpu_features(n, d, seed):
    gen = torch.Generator().manual_seed(seed)
    centres = torch.randn(max(1, n // 16), d, generator=gen)
    ids = torch.randint(0, centres.shape[0], (n,), generator=gen)
    return centres[ids] + 0.5 * torch.randn(n, d, generator=gen)


def explicit_landmarks(n, depth, num_landmarks, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(n, generator=gen)[:num_landmarks] for _ in range(depth)])


def method_call(cfg, x, neighbours=None):
    """A zero-argument callable running the method once on x (inputs and weights prepared here)."""
    method, p = cfg["method"], cfg["params"]
    d, heads, l, k, f, depth = p["d"], p["heads"], p["landmarks"], p["k"], p["ffn"], p["depth"]
    n = x.shape[1]
    k = min(k, n)
    device, dtype = x.device, x.dtype
    if method == "nformer":
        model = nk.NFormer(dim=d, depth=depth, num_heads=heads, num_landmarks=l, topk=k, ffn_dim=f)
        model = model.to(device=device, dtype=dtype).eval()
        lms = explicit_landmarks(n, depth, l).to(device)
        return lambda: model(x, landmarks=lms)
    if method == "nformer-layer":
        layer = nk.NFormerLayer(dim=d, num_heads=heads, num_landmarks=l, ffn_dim=f).to(device=device, dtype=dtype)
        layer.eval()
        idx = nk.knn(x, k)
        keep = nk.reciprocal_mask(idx)
        lms = explicit_landmarks(n, 1, l)[0].to(device)
        return lambda: layer(x, idx, keep, landmarks=lms)
    if method == "knn":
        precision = p.get("precision", "auto")
        return lambda: nk.knn(x, k, precision=precision)
    if method == "attention":
        return attention_step(x, heads, l, k, neighbours)
    if method == "dense-official":
        model = baselines.DenseOfficialNFormer(d, depth, heads, l, k, f).to(device=device, dtype=dtype).eval()
        lms = explicit_landmarks(n, depth, l).to(device)
        return lambda: model(x, landmarks=lms)
    if method == "dense-transformer":
        model = baselines.dense_transformer(d, heads, f, depth).to(device=device, dtype=dtype).eval()
        return lambda: model(x)
    if method == "knn-torch":
        chunk_bytes = (1 << 30) if device.type == "cuda" else (256 << 20)  # big chunks keep a GPU busy
        return lambda: baselines.knn_torch_chunked(x[0], k, chunk_bytes)
    if method == "knn-faiss":
        if device.type != "cpu":
            raise ValueError("knn-faiss runs on the CPU only")
        x_np = torch.nn.functional.normalize(x[0].float(), dim=1).numpy()
        return lambda: baselines.knn_faiss(x_np, k, threads=torch.get_num_threads())
    raise ValueError(f"unknown method {method!r}")


def attention_step(x, heads, l, k, neighbours=None):
    """neighbor_attention forward + backward on q, k, v = x (ordinary tensors, outside inference mode).

    neighbours: (idx, keep) of x[0] when already known (nk.knn of x otherwise)."""
    with torch.inference_mode(False):
        if neighbours is None:
            idx = nk.knn(x, k)[0].clone()
            keep = nk.reciprocal_mask(idx).clone()
        else:
            idx, keep = (t.clone() for t in neighbours)
        leaves = [x[0].clone().requires_grad_() for _ in range(3)]
        landmarks = explicit_landmarks(x.shape[1], 1, l)[0].to(x.device)

    def step():
        with torch.inference_mode(False), torch.enable_grad():
            for t in leaves:
                t.grad = None
            out = nk.neighbor_attention(*leaves, idx, keep, landmarks, heads, check_inputs=False)
            out.backward(torch.ones_like(out))

    return step


def time_call_ms(fn, on_gpu):
    """One timed call of fn: (wall ms, process CPU ms). CUDA events on the GPU (CPU time None),
    perf_counter and process_time on the CPU."""
    if on_gpu:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end), None
    t0, c0 = time.perf_counter(), time.process_time()
    fn()
    return 1e3 * (time.perf_counter() - t0), 1e3 * (time.process_time() - c0)


def _set_threads(cfg):
    if cfg.get("threads"):
        torch.set_num_threads(cfg["threads"])


def _rss_bytes():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _is_oom(exc):
    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()


def measure(cfg, isolated=True, neighbours=None):
    """Time one configuration; returns the measured fields of a result row.

    cfg: method, backend, n, device, dtype, warmup, repeats, repeat_budget_s, params (d, heads,
    landmarks, k, ffn, depth). Latency: CUDA events on the GPU, perf_counter on the CPU; median and
    IQR over up to `repeats` timed calls after `warmup` calls (timed calls stop early once they
    have taken repeat_budget_s in total); on the CPU also the median process CPU time (all threads).
    Peak memory: growth of torch.cuda.max_memory_allocated over the state after setup (GPU), or
    growth of this process's peak RSS (CPU; only meaningful when `isolated`, i.e. this process ran
    nothing else).
    neighbours: (idx, keep) for the "attention" method (else nk.knn of the inputs).
    Optional: warmup_n runs the warm-up calls on the first warmup_n rows instead (compiles and
    thread pools warm, without paying for full-size calls); save_output, a path, gets the last
    timed call's output (torch.save, on the CPU).
    """
    device = torch.device(cfg["device"])
    dtype = DTYPES[cfg["dtype"]]
    _set_threads(cfg)
    on_gpu = device.type == "cuda"
    last = [None]
    backend = cfg["backend"] if cfg["method"] in FUSED_METHODS else None
    try:
        with nk.use_backend(backend), torch.inference_mode():
            x = synthetic_features(cfg["n"], cfg["params"]["d"], device, dtype)
            fn = method_call(cfg, x, neighbours)
            warm = method_call(cfg, x[:, :cfg["warmup_n"]]) if cfg.get("warmup_n") else fn
            if cfg.get("save_output"):
                timed = fn

                def fn():
                    last[0] = None  # free the previous output first: peak memory stays one call's
                    last[0] = timed()

            if on_gpu:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                mem_before = torch.cuda.memory_allocated()
            else:
                mem_before = _rss_bytes()
            for _ in range(cfg["warmup"]):
                warm()
            warm = None
            times_ms, cpu_ms = [], []
            while len(times_ms) < cfg["repeats"] and sum(times_ms) < 1e3 * cfg["repeat_budget_s"]:
                wall, cpu = time_call_ms(fn, on_gpu)
                times_ms.append(wall)
                if cpu is not None:
                    cpu_ms.append(cpu)
            if on_gpu:
                peak, mem_kind = torch.cuda.max_memory_allocated() - mem_before, "cuda_max_allocated"
            else:
                peak, mem_kind = (_rss_bytes() - mem_before, "rss_growth") if isolated else (None, "in-process")
    except (torch.cuda.OutOfMemoryError, RuntimeError) as exc:
        if not _is_oom(exc):
            raise
        return {"status": "OOM"}
    finally:
        if cfg.get("save_output") and last[0] is not None:
            out = last[0]
            torch.save(torch.as_tensor(out).reshape(-1, out.shape[-1]).cpu(), cfg["save_output"])
        x = fn = warm = last[0] = None  # free the inputs before empty_cache, so an OOM leaves the GPU clean
        if on_gpu:
            torch.cuda.empty_cache()
    q1, _, q3 = statistics.quantiles(times_ms, n=4) if len(times_ms) > 1 else (times_ms[0],) * 3
    p = cfg["params"]
    flops = method_flops(cfg["method"], cfg["n"], p["d"], p["heads"], p["landmarks"], min(p["k"], cfg["n"]),
                         p["ffn"], p["depth"])
    median = statistics.median(times_ms)
    bandwidth = None
    if cfg["method"] == "attention":
        moved = attention_train_bytes(cfg["n"], p["d"], p["heads"], p["landmarks"], min(p["k"], cfg["n"]),
                                      dtype.itemsize)
        bandwidth = moved / (median * 1e-3) / 1e9
    return {"status": "ok", "latency_ms": median, "gbytes_per_s": bandwidth, "latency_iqr_ms": q3 - q1,
            "latency_all_ms": times_ms, "cpu_time_ms": statistics.median(cpu_ms) if cpu_ms else None,
            "gflops": flops / 1e9, "tflops_per_s": flops / (median * 1e-3) / 1e12,
            "gflops_per_img": flops / 1e9 / cfg["n"], "peak_mem_bytes": peak, "mem_kind": mem_kind}


def agreement(cfg):
    """Fused NFormer (on cfg's backend) vs DenseOfficialNFormer with the same weights and explicit
    landmarks, eval mode: max |difference| of the outputs, and nk.knn vs the chunked torch top-k."""
    backend, n, device, dtype, params = (cfg[key] for key in ("backend", "n", "device", "dtype", "params"))
    _set_threads(cfg)
    d, heads, l, k, f, depth = (params[key] for key in ("d", "heads", "landmarks", "k", "ffn", "depth"))
    device, dtype = torch.device(device), DTYPES[dtype]
    torch.manual_seed(0)
    dense = baselines.DenseOfficialNFormer(d, depth, heads, l, k, f)
    with torch.no_grad():  # non-trivial BatchNorm statistics so the eval head is checked too
        dense.bottleneck.running_mean.normal_()
        dense.bottleneck.running_var.uniform_(0.5, 2.0)
        dense.bottleneck.weight.uniform_(0.5, 2.0)
    fused = nk.NFormer.from_official(dense.state_dict(), num_heads=heads, num_landmarks=l, topk=k)
    dense = dense.to(device=device, dtype=dtype).eval()
    fused = fused.to(device=device, dtype=dtype).eval()
    x = synthetic_features(n, d, device, dtype, seed=1)
    lms = explicit_landmarks(n, depth, l, seed=1).to(device)
    with nk.use_backend(backend), torch.inference_mode():
        ref = dense(x, landmarks=lms).float()
        out = fused(x, landmarks=lms).float()
        idx = nk.knn(x[0], k)
        idx_torch = baselines.knn_torch_chunked(x[0], k)
    return {"backend": backend, "n": n, "dtype": str(dtype).replace("torch.", ""),
            "max_abs_diff": (out - ref).abs().max().item(), "max_abs_ref": ref.abs().max().item(),
            "knn_index_match": (idx == idx_torch).float().mean().item()}


# ----------------------------------------------------------------------------- where a configuration runs
def import_roots():
    """The folders holding nformer_bench and nformer_kernels, so a child imports the same copies."""
    return list(dict.fromkeys(str(Path(m.__file__).resolve().parent.parent)
                              for m in (sys.modules["nformer_bench"], nk)))


def run_child(kind, cfg, timeout_s):
    """Run `measure` or `agreement` in a fresh interpreter; its result dict (status OOM/timeout/error
    on failure)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [*import_roots(), env.get("PYTHONPATH")]))
    env["PYTHONWARNINGS"] = "ignore"  # e.g. the missing-extension warning, once per child
    cmd = [sys.executable, "-m", "nformer_bench", "_worker", kind, json.dumps(cfg)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=env)
    except subprocess.TimeoutExpired:
        return {"status": f"timeout (> {timeout_s:g} s)"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_MARK):
            return json.loads(line[len(RESULT_MARK):])
    if proc.returncode in (-9, 137):  # SIGKILL: almost always the kernel's OOM killer
        return {"status": "OOM (killed)"}
    tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    return {"status": f"error: {tail[:300]}"}


def launch(kind, cfg, timeout_s, isolated, neighbours=None):
    """`measure` (kind "measure") or `agreement` of cfg, in a child process when isolated."""
    if isolated:
        return run_child(kind, cfg, timeout_s)
    try:  # one failing backend must not end a sweep (a child process would just exit)
        if kind == "measure":
            return measure(cfg, isolated=False, neighbours=neighbours)
        return agreement(cfg)
    except Exception as exc:  # noqa: BLE001
        return {"status": f"error: {type(exc).__name__}: {exc}"[:300]}
