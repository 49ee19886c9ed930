"""scripts/gpu_check.sh: its control flow on the CPU (--dry-run, on a simulated bare machine: the
optional packages hidden), its refusal without a GPU, and `nformer-bench report` of its folder."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from nformer_bench import check, check_process, check_stages, report

ROOT = Path(__file__).resolve().parents[1]
FILES = {"gpu_check.log", "gpu_tests.xml", "gpu_check.json", "gpu_check.md", "nformer-latency.png",
         "nformer-memory.png"}
PLOTS = {"nformer-latency.png", "nformer-memory.png"}
# What a bare CUDA machine may lack. numpy stays: the Triton interpreter of the dry run needs it
# (test_environment_without_numpy covers the rest).
BARE = "hypothesis,torchvision,matplotlib,faiss,scipy,tqdm,yaml"


def bare_machine_env(hidden=BARE):
    """os.environ with the packages `hidden` unimportable (tests/bare_machine/sitecustomize.py)."""
    path = os.pathsep.join(filter(None, [str(ROOT / "tests" / "bare_machine"), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path, "NFORMER_HIDE_PACKAGES": hidden,
            "PYTEST_ADDOPTS": (os.environ.get("PYTEST_ADDOPTS", "") + " -p no:hypothesispytest").strip()}


def _script(*args, timeout, env=None):
    env = {**(env or os.environ), "PYTHON": sys.executable}
    start = time.monotonic()
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), *args], env=env, capture_output=True,
                          text=True, timeout=timeout)
    return proc, time.monotonic() - start


def _files(folder):
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*")}


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-check")
    (out / "gpu_check.md").write_text("a previous run\n")  # replaced, not appended to
    proc, seconds = _script("--dry-run", str(out), timeout=300, env=bare_machine_env())
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, json.loads((out / "gpu_check.json").read_text()), seconds


@pytest.mark.slow
def test_dry_run_runs_every_stage_in_order_and_leaves_a_compact_folder(dry_run):
    out, result, seconds = dry_run
    assert seconds < 180  # ~2 minutes alone; the triton-interpreted and cuda-emulated smoke take most
    assert _files(out) == FILES - PLOTS  # flat, at most 8 files; no matplotlib here, so no plots
    assert all((out / name).stat().st_size > 0 for name in FILES - PLOTS)
    assert result["meta"]["plots"] == "skipped: matplotlib is not installed"
    assert [s["name"] for s in result["stages"]] == list(check.STAGES)
    assert [s["status"] for s in result["stages"]] == ["ok"] * len(check.STAGES), result["stages"]
    meta = result["meta"]
    assert meta["dry_run"] and meta["complete"] and meta["device"] == "cpu" and meta["wall_s"] < 180
    assert "previous run" not in (out / "gpu_check.md").read_text()


@pytest.mark.slow
def test_dry_run_results(dry_run):
    _, result, _ = dry_run
    smoke = {(c["backend"], c["case"]): c for c in result["smoke"]}
    assert {case for _, case in smoke} == set(check_stages.SMOKE_CASES)
    assert all(c["ok"] and c["max_err"] <= c["tol"] for c in smoke.values())
    assert "reference" not in {b for b, _ in smoke}  # the oracle is not checked against itself
    if _importable("triton"):  # the GPU run's Triton code, interpreted: smoke-checked, not measured
        assert {case for b, case in smoke if b == "triton"} == set(check_stages.SMOKE_CASES)
    if result["build"]["ninja"]:  # the GPU run's CUDA kernel bodies, emulated: smoke-checked, not measured
        assert {case for b, case in smoke if b == check_stages.EMULATED} == set(check_stages.SMOKE_CASES)
    assert {r["backend"] for r in result["knn"] if r["method"] == "knn"} == {"cpu"}
    knn = {(r["method"], r["dtype"], r["precision"]): r for r in result["knn"]}
    assert len(knn) == len(result["knn"])
    # nk.knn at its default and, on fp32, at precision="exact" (the FMA stage 1 on a GPU); the torch
    # baseline once per dtype
    assert set(knn) == {("knn", "bfloat16", "auto"), ("knn", "float32", "auto"), ("knn", "float32", "exact"),
                        ("knn-torch", "bfloat16", None), ("knn-torch", "float32", None)}
    assert all(r["status"] == "ok" for r in knn.values())
    assert knn["knn", "float32", "exact"]["recall"] == knn["knn", "float32", "auto"]["recall"] == 1.0
    assert knn["knn-torch", "float32", None]["recall"] == 1.0
    assert {r["dtype"] for r in result["attention"]} == {"bfloat16", "float32"}
    assert all(r["status"] == "ok" and r["gbytes_per_s"] > 0 for r in result["attention"])
    nformer = result["nformer"]
    assert {r["method"] for r in nformer["rows"]} == {"nformer", "dense-official", "dense-transformer"}
    assert all(r["status"] == "ok" for r in nformer["rows"])
    (agree,) = nformer["agreement"]
    assert agree["max_abs_diff"] <= 1e-4 * max(1.0, agree["max_abs_ref"])
    tests = result["tests"]
    assert tests["tests"] >= 1 and tests["failures"] == tests["errors"] == 0
    assert tests["gpu_selected"] >= 100  # `pytest tests -m gpu`, collected without hypothesis & co.
    assert result["build"]["ninja"] in (True, False) and result["build"]["versions"]["numpy"]
    try:
        import triton  # noqa: F401
    except ImportError:
        assert result["tune"] == []
    else:
        assert {(r["kernel"], r["dtype"]) for r in result["tune"]} == {("knn", "float32"), ("attention", "float32")}
        assert all(r["error"] is None and r["match"] >= 0.95 for r in result["tune"])


@pytest.mark.slow
def test_report_turns_the_folder_into_the_readme_gpu_table(dry_run, tmp_path):
    out, result, _ = dry_run
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{report.GPU_BEGIN}\nold\n{report.GPU_END}\n{report.BEGIN}\nsweep\n{report.END}\n")
    proc = subprocess.run([sys.executable, "-m", "nformer_bench", "report", str(out), "--readme", str(readme)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "python")])})
    assert proc.returncode == 0, proc.stderr
    text = readme.read_text()
    assert "old" not in text and text.startswith("intro\n") and f"{report.BEGIN}\nsweep\n{report.END}" in text
    table = text[text.index(report.GPU_BEGIN):text.index(report.GPU_END)]
    assert f"| `cpu` backend | ok ({len(check_stages.SMOKE_CASES)} cases) |" in table
    assert "dense official NFormer" in table and "chunked torch.mm + topk" in table
    assert "| knn bfloat16 | knn float32 | knn float32 exact |" in table
    assert f"{os.path.relpath(out, tmp_path)}/gpu_check.md" in table
    assert _files(out) == FILES - PLOTS  # report reads the folder, adds nothing to it


def test_without_a_gpu_it_stops_after_the_build_stage(tmp_path):
    pytest.importorskip("torch").cuda.is_available() and pytest.skip("a CUDA device is visible")
    proc, _ = _script(str(tmp_path), "--budget-s", "60", timeout=120)
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    build, *rest = result["stages"]
    assert build["status"] == "failed: no CUDA device visible to torch"
    assert [s["name"] for s in rest] == list(check.STAGES[1:])
    assert all(s["status"].startswith("skipped (no CUDA device") for s in rest)
    assert _files(tmp_path) == FILES - (PLOTS if not _importable("matplotlib") else set())
    assert 'skipped message="skipped (no CUDA device' in (tmp_path / "gpu_tests.xml").read_text()


def test_script_without_arguments_prints_its_usage():
    proc, _ = _script(timeout=30)
    assert proc.returncode == 2 and "gpu_check.sh OUT_DIR [--budget-s S] [--stages ...] [--dry-run]" in proc.stdout
    assert "NFORMER_GIT_COMMIT=$(git rev-parse HEAD)" in proc.stdout


def test_a_stage_past_its_limit_is_interrupted(tmp_path):
    runner = check.Check(tmp_path, budget_s=60, dry_run=True)
    start = time.monotonic()
    status = runner._stream([sys.executable, "-c", "import time; print('started', flush=True); time.sleep(60)"], 1.0)
    # SIGINT at 1 s, SIGKILL after the grace if that did not end it (a loaded machine has been seen
    # to need it): either way well before the child's 60 s.
    assert status == "timeout (> 1 s)" and time.monotonic() - start < check_process.INTERRUPT_GRACE_S + 15
    assert runner._stream([sys.executable, "-c", "import sys; sys.exit(3)"], 10.0) == "failed (exit 3)"
    runner._log.close()
    assert "started" in (tmp_path / "gpu_check.log").read_text()


def _importable(name):
    import importlib.util

    return importlib.util.find_spec(name) is not None


def test_results_are_replaced_atomically(tmp_path, monkeypatch):
    runner = check.Check(tmp_path, budget_s=None, dry_run=True)
    runner.result = {"stages": [], "meta": {}}
    monkeypatch.setattr("nformer_bench.report.check_markdown", lambda result: f"{len(result)} keys\n")
    runner.save()
    assert json.loads((tmp_path / check.JSON).read_text()) == runner.result
    runner.result["meta"]["more"] = 1

    def fail(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(ValueError, match=f"cannot write .*{check.JSON}: No space left"):
        runner.save()
    assert json.loads((tmp_path / check.JSON).read_text()) == {"stages": [], "meta": {}}  # the previous file
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]  # no temporary left


def test_the_file_helpers_import_on_a_bare_machine():
    """nformer_bench writes its results with nformer_reid.utils.io: importing it (and the package)
    must not pull numpy, tqdm or matplotlib, which a bare GPU machine may lack."""
    code = ("import nformer_reid, nformer_reid.utils.io as io\n"
            "assert callable(io.atomic_write) and nformer_reid.ReIDInputError\n"
            "try:\n    nformer_reid.evaluate_rank\nexcept ImportError as exc:\n    print('lazy', exc.name)\n")
    proc = subprocess.run([sys.executable, "-c", code], env=bare_machine_env("numpy,tqdm,matplotlib," + BARE),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "lazy numpy"


def test_a_gpu_selection_that_does_not_collect_fails_the_stage(tmp_path, monkeypatch):
    (tmp_path / "test_broken.py").write_text("import pytest\n\n@pytest.mark.gpu\ndef test_x(:\n    pass\n")
    runner = check.Check(tmp_path / "out", budget_s=None, dry_run=True)
    monkeypatch.setattr(check, "TEST_ARGS", {False: [str(tmp_path), "-m", "gpu"], True: []})
    assert runner._gpu_selection(120).startswith("failed: collecting the GPU test selection: failed (exit")
    (tmp_path / "test_broken.py").write_text("def test_not_gpu():\n    pass\n")
    assert runner._gpu_selection(120) == "failed: the GPU test selection is empty"
    (tmp_path / "test_broken.py").write_text("import pytest\n\n@pytest.mark.gpu\ndef test_x():\n    pass\n")
    assert runner._gpu_selection(120) == 1
    runner._log.close()


def test_no_budget_means_stage_caps_and_stages_can_be_chosen(tmp_path):
    runner = check.Check(tmp_path, budget_s=None, dry_run=True, stages=["knn"])
    assert runner.left() == float("inf") and runner.stage_limit("tests") == check.STAGE_CAP_S["tests"]
    assert runner.result["meta"]["command"] == f"nformer-bench check {tmp_path} --dry-run --stages knn"
    for name in ("attention", "nformer", "tests", "tune"):
        runner._stage(name)
    assert {s["status"] for s in runner.result["stages"]} == {"skipped (not selected)"}
    runner._log.close()
    budgeted = check.Check(tmp_path, budget_s=100, dry_run=True)
    assert budgeted.stage_limit("knn") == pytest.approx(20, abs=0.5) and budgeted.stage_limit("tests") <= 100
    budgeted._log.close()
    parser = check.argparse.ArgumentParser()
    check.add_arguments(parser)
    with pytest.raises(SystemExit):
        parser.parse_args([str(tmp_path), "--stages", "knn,build"])
    with pytest.raises(SystemExit):
        parser.parse_args([str(tmp_path), "--budget-s", "0"])


def test_environment_without_numpy_records_none():
    code = ("import json, torch; from nformer_bench.environment import environment; "
            "print(json.dumps(environment(torch.device('cpu'))['versions']))")
    env = {**bare_machine_env("numpy"), "PYTHONPATH": os.pathsep.join(
        [str(ROOT / "tests" / "bare_machine"), str(ROOT), str(ROOT / "python")])}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    versions = json.loads(proc.stdout.strip().splitlines()[-1])
    assert versions["numpy"] is None and versions["torch"]


def test_the_extension_rebuilds_when_a_header_changes():
    """setup.py lists csrc's headers as the extension's dependencies (setuptools compares their times)."""
    code = ("import json, setuptools, sys; seen = {}; setuptools.setup = lambda **kw: seen.update(kw); "
            "sys.argv = ['setup.py', '--name']; exec(compile(open('setup.py').read(), 'setup.py', 'exec'), "
            "{'__file__': 'setup.py', '__name__': '__main__'}); "
            "print(json.dumps([sorted(e.depends) for e in seen['ext_modules']]))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "NFORMER_BUILD_CUDA": "0"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    (depends,) = json.loads(proc.stdout.strip().splitlines()[-1])
    headers = {p.relative_to(ROOT).as_posix() for p in (ROOT / "csrc").rglob("*") if p.suffix in (".h", ".cuh")}
    assert "csrc/common/canonical.h" in headers and set(depends) == headers


def test_plots_are_drawn_where_matplotlib_is_installed(tmp_path):
    pytest.importorskip("matplotlib", reason="the plots need matplotlib (the bare-machine dry run skips them)")
    runner = check.Check(tmp_path, budget_s=None, dry_run=True)
    runner.result["nformer"]["rows"] = [{"method": "nformer", "backend": "cpu", "n": n, "status": "ok",
                                         "latency_ms": n / 10, "peak_mem_bytes": n * 1e3} for n in (100, 200)]
    runner._plots()
    runner._log.close()
    assert PLOTS <= _files(tmp_path) and "plots" not in runner.result["meta"]
