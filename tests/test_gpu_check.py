"""scripts/gpu_check.sh: its control flow on the CPU (--dry-run), its refusal without a GPU, and
`nformer-bench report` of its folder."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from nformer_bench import check, report

ROOT = Path(__file__).resolve().parents[1]
FILES = {"gpu_check.log", "gpu_tests.xml", "gpu_check.json", "gpu_check.md", "nformer-latency.png",
         "nformer-memory.png"}


def _script(*args, timeout):
    env = {**os.environ, "PYTHON": sys.executable}
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
    proc, seconds = _script("--dry-run", str(out), timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, json.loads((out / "gpu_check.json").read_text()), seconds


@pytest.mark.slow
def test_dry_run_runs_every_stage_in_order_and_leaves_a_compact_folder(dry_run):
    out, result, seconds = dry_run
    assert seconds < 120
    assert _files(out) == FILES  # flat, at most 8 files
    assert all((out / name).stat().st_size > 0 for name in FILES)
    assert [s["name"] for s in result["stages"]] == list(check.STAGES)
    assert [s["status"] for s in result["stages"]] == ["ok"] * len(check.STAGES), result["stages"]
    meta = result["meta"]
    assert meta["dry_run"] and meta["complete"] and meta["device"] == "cpu" and meta["wall_s"] < 120
    assert "previous run" not in (out / "gpu_check.md").read_text()


@pytest.mark.slow
def test_dry_run_results(dry_run):
    _, result, _ = dry_run
    smoke = {(c["backend"], c["case"]): c for c in result["smoke"]}
    assert {case for _, case in smoke} == set(check.SMOKE_CASES)
    assert all(c["ok"] and c["max_err"] <= c["tol"] for c in smoke.values())
    assert "reference" not in {b for b, _ in smoke}  # the oracle is not checked against itself
    knn = {(r["method"], r["dtype"]): r for r in result["knn"]}
    assert set(knn) == {(m, dt) for m in ("knn", "knn-torch") for dt in ("bfloat16", "float32")}
    assert all(r["status"] == "ok" for r in knn.values())
    assert knn["knn", "float32"]["recall"] == 1.0 and knn["knn-torch", "float32"]["recall"] == 1.0
    assert {r["dtype"] for r in result["attention"]} == {"bfloat16", "float32"}
    assert all(r["status"] == "ok" and r["gbytes_per_s"] > 0 for r in result["attention"])
    nformer = result["nformer"]
    assert {r["method"] for r in nformer["rows"]} == {"nformer", "dense-official", "dense-transformer"}
    assert all(r["status"] == "ok" for r in nformer["rows"])
    (agree,) = nformer["agreement"]
    assert agree["max_abs_diff"] <= 1e-4 * max(1.0, agree["max_abs_ref"])
    tests = result["tests"]
    assert tests["tests"] >= 1 and tests["failures"] == tests["errors"] == 0
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
    assert f"| `cpu` backend | ok ({len(check.SMOKE_CASES)} cases) |" in table
    assert "dense official NFormer" in table and "chunked torch.mm + topk" in table
    assert f"{os.path.relpath(out, tmp_path)}/gpu_check.md" in table
    assert _files(out) == FILES  # report reads the folder, adds nothing to it


def test_without_a_gpu_it_stops_after_the_build_stage(tmp_path):
    pytest.importorskip("torch").cuda.is_available() and pytest.skip("a CUDA device is visible")
    proc, _ = _script(str(tmp_path), "--budget-s", "60", timeout=120)
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    build, *rest = result["stages"]
    assert build["status"] == "failed: no CUDA device visible to torch"
    assert [s["name"] for s in rest] == list(check.STAGES[1:])
    assert all(s["status"].startswith("skipped (no CUDA device") for s in rest)
    assert _files(tmp_path) == FILES
    assert 'skipped message="skipped (no CUDA device' in (tmp_path / "gpu_tests.xml").read_text()


def test_script_without_arguments_prints_its_usage():
    proc, _ = _script(timeout=30)
    assert proc.returncode == 2 and "gpu_check.sh OUT_DIR [--budget-s 480] [--dry-run]" in proc.stdout


def test_a_stage_past_its_limit_is_interrupted(tmp_path):
    runner = check.Check(tmp_path, budget_s=60, dry_run=True)
    start = time.monotonic()
    status = runner._stream([sys.executable, "-c", "import time; print('started', flush=True); time.sleep(60)"], 1.0)
    assert status == "timeout (> 1 s)" and time.monotonic() - start < 15
    assert runner._stream([sys.executable, "-c", "import sys; sys.exit(3)"], 10.0) == "failed (exit 3)"
    runner._log.close()
    assert "started" in (tmp_path / "gpu_check.log").read_text()
