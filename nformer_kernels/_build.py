"""Build helper used by setup.py (loaded there by path, before the package can be imported).

Without ninja, torch's BuildExtension compiles an extension's sources one after another: minutes per
CUDA translation unit, so a bare GPU machine waits for nvcc a dozen times in a row. `parallel_compile`
makes a distutils compiler compile the sources of one call in up to `jobs` forked
processes. Forked, not threaded: torch's per-source wrapper swaps the compiler executable on the
shared compiler object while it runs (nvcc for .cu, c++ otherwise), which threads would race on.
"""
import multiprocessing
import multiprocessing.connection
import os
import sys


def default_jobs() -> int:
    """MAX_JOBS (torch's own variable) when set, else the cores this process may use."""
    text = os.environ.get("MAX_JOBS", "").strip()
    if text.isdigit() and int(text) > 0:
        return int(text)
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _compile_one(compiler, obj, src, ext, cc_args, extra_postargs, pp_opts):
    try:
        compiler._compile(obj, src, ext, cc_args, extra_postargs, pp_opts)
    except BaseException as exc:  # the compiler's own output is already on stderr
        print(f"nformer_kernels: compiling {src} failed: {exc}", file=sys.stderr, flush=True)
        os._exit(1)
    os._exit(0)


def parallel_compile(compiler, jobs: int) -> None:
    """Replace compiler.compile (distutils CCompiler) by one that runs compiler._compile for each
    source it would build in its own forked process, at most `jobs` at once, longest (CUDA) first.
    A failed source raises the compiler's CompileError naming it, after the running ones finish."""
    try:
        from setuptools.errors import CompileError
    except ImportError:  # setuptools < 59
        from distutils.errors import CompileError

    if jobs <= 1:
        return

    def compile(sources, output_dir=None, macros=None, include_dirs=None, debug=0, extra_preargs=None,
                extra_postargs=None, depends=None):
        macros, objects, extra_postargs, pp_opts, build = compiler._setup_compile(
            output_dir, macros, include_dirs, sources, depends, extra_postargs)
        cc_args = compiler._get_cc_args(pp_opts, debug, extra_preargs)
        todo = sorted((obj for obj in objects if obj in build), key=lambda obj: build[obj][1] != ".cu")
        fork = multiprocessing.get_context("fork")
        running, failed = {}, []
        while todo or running:
            while todo and len(running) < jobs:
                obj = todo.pop(0)
                src, ext = build[obj]
                proc = fork.Process(target=_compile_one,
                                    args=(compiler, obj, src, ext, cc_args, extra_postargs, pp_opts))
                proc.start()
                running[proc.sentinel] = (proc, src)
            for sentinel in multiprocessing.connection.wait(list(running)):
                proc, src = running.pop(sentinel)
                proc.join()
                if proc.exitcode != 0:
                    failed.append(src)
                    todo.clear()  # let the running ones finish; start nothing new
        if failed:
            raise CompileError(f"compiling {', '.join(failed)} failed (the compiler's output is above)")
        return objects

    compiler.compile = compile
