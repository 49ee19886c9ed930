"""The build without ninja: nformer_kernels/_build.py compiles an extension's sources in parallel."""
import os

import pytest

from nformer_kernels import _build

ccompiler = pytest.importorskip("setuptools._distutils.ccompiler", reason="needs setuptools' distutils")


def _compiler(tmp_path):
    compiler = ccompiler.new_compiler()
    if compiler.compiler_type != "unix":
        pytest.skip("the parallel compile is exercised with the unix C compiler")
    from setuptools._distutils.sysconfig import customize_compiler
    customize_compiler(compiler)
    original = compiler._compile

    def recording(obj, src, ext, cc_args, extra_postargs, pp_opts):
        # runs in the forked child: leave which process compiled this source beside the object
        with open(obj + ".pid", "w") as fh:
            fh.write(str(os.getpid()))
        original(obj, src, ext, cc_args, extra_postargs, pp_opts)

    compiler._compile = recording
    return compiler


def _sources(tmp_path, bodies):
    paths = []
    for i, body in enumerate(bodies):
        path = tmp_path / f"unit{i}.c"
        path.write_text(body)
        paths.append(str(path))
    return paths


def test_sources_compile_in_separate_processes(tmp_path):
    compiler = _compiler(tmp_path)
    _build.parallel_compile(compiler, jobs=3)
    sources = _sources(tmp_path, [f"int f{i}(int x) {{ return x + {i}; }}\n" for i in range(4)])
    objects = compiler.compile(sources, output_dir=str(tmp_path / "build"))
    assert [os.path.basename(obj) for obj in objects] == [f"unit{i}.o" for i in range(4)]  # source order
    assert all(os.path.getsize(obj) > 0 for obj in objects)
    pids = {open(obj + ".pid").read() for obj in objects}
    assert str(os.getpid()) not in pids and len(pids) == 4


def test_a_failing_source_is_named(tmp_path):
    compiler = _compiler(tmp_path)
    _build.parallel_compile(compiler, jobs=2)
    sources = _sources(tmp_path, ["int ok(void) { return 0; }\n", "int broken(void) { return }\n"])
    with pytest.raises(Exception, match="unit1.c") as info:
        compiler.compile(sources, output_dir=str(tmp_path / "build"))
    assert type(info.value).__name__ == "CompileError"


@pytest.mark.parametrize("value, expected", [("3", 3), ("", None), ("0", None), ("many", None)])
def test_jobs_follow_max_jobs(monkeypatch, value, expected):
    monkeypatch.setenv("MAX_JOBS", value)
    cores = len(os.sched_getaffinity(0))
    assert _build.default_jobs() == (expected or cores)
