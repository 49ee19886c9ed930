"""The nformer-bench CLI: a tiny sweep (in-process and as a subprocess), report, knn, help, --version, where results go."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import nformer_kernels as nk
from nformer_bench import cli, report

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "cpu-test"
    backend = nk.get_backend(torch.device("cpu"))  # "cpu" with the extension, else "reference"
    # Budget 0.2 MB: the dense methods' N^2 estimates fit at N=64 and not at N=128.
    cli.main(["run", "--n-list", "64,128,256", "--device", "cpu", "--backends", backend,
              "--repeats", "2", "--depth", "2", "--check-n", "64", "--mem-budget-gb", "0.0002",
              "--isolation", "none", "--out", str(out)])
    (json_path,) = out.glob("*.json")
    return json_path, json.loads(json_path.read_text())


def test_sweep_writes_every_output(sweep):
    json_path, _ = sweep
    for suffix in (".md", "-latency.png", "-memory.png"):
        assert json_path.with_name(json_path.stem + suffix).stat().st_size > 0


def test_sweep_rows_and_cpu_memory_budget(sweep):
    _, result = sweep
    rows = {(r["method"], r["n"]): r for r in result["rows"]}
    for method in ("nformer", "nformer-layer", "knn", "knn-torch"):
        assert all(rows[method, n]["status"] == "ok" for n in (64, 128, 256))
    ok = rows["nformer", 256]
    assert ok["latency_ms"] > 0 and ok["gflops"] > 0 and ok["gflops_per_img"] == pytest.approx(ok["gflops"] / 256)
    for method in ("dense-official", "dense-transformer"):
        assert rows[method, 64]["status"] == "ok"
        assert rows[method, 128]["status"].startswith("OOM (est.")
        assert rows[method, 256]["status"] == "skipped (stopped at N=128)"
    meta = result["meta"]
    assert meta["versions"]["torch"] == torch.__version__ and meta["device_slug"]


def test_sweep_fused_agrees_with_dense_official(sweep):
    _, result = sweep
    (check,) = result["agreement"]
    assert check["max_abs_diff"] <= 1e-4 * max(1.0, check["max_abs_ref"])


def test_module_entry_point_runs_in_a_subprocess(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "python")])}  # a checkout
    proc = subprocess.run([sys.executable, "-m", "nformer_bench", "--n-list", "64", "--methods", "knn-torch",
                           "--device", "cpu", "--repeats", "1", "--out", str(tmp_path)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    (json_path,) = tmp_path.glob("*.json")
    (row,) = json.loads(json_path.read_text())["rows"]
    assert row["status"] == "ok" and row["mem_kind"] == "rss_growth"


def test_report_fills_readme_markers(sweep, tmp_path):
    json_path, _ = sweep
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{report.BEGIN}\nold\n{report.END}\noutro\n")
    assert report.update_readme(json_path.parent.parent, readme)
    text = readme.read_text()
    assert "old" not in text and text.startswith("intro\n") and text.endswith(f"{report.END}\noutro\n")
    assert "| N |" in text and f"{json_path.stem}-latency.png" in text

    readme.write_text("no markers\n")
    assert not report.update_readme(json_path.parent.parent, readme)
    assert readme.read_text() == "no markers\n"


def test_worker_agreement_protocol(capsys):
    backend = nk.get_backend(torch.device("cpu"))
    params = {"d": 32, "heads": 2, "ffn": 64, "k": 5, "landmarks": 3, "depth": 1}
    cli.main(["_worker", "agree", json.dumps({"backend": backend, "n": 40, "device": "cpu", "dtype": "float32",
                                              "params": params})])
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith(cli.RESULT_MARK)
    check = json.loads(line[len(cli.RESULT_MARK):])
    assert check["max_abs_diff"] <= 1e-4 * max(1.0, check["max_abs_ref"]) and check["knn_index_match"] == 1.0


COMMANDS = ("run", "knn", "certified", "distributed", "eval-features", "rerank", "tune", "check", "report")


def test_no_arguments_prints_help_listing_every_command(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main([])
    assert exit_info.value.code == 2
    out = capsys.readouterr().out
    assert out.startswith("usage: nformer-bench") and all(f"nformer-bench {c} " in out for c in COMMANDS)


def test_help_lists_every_command_and_version_is_the_library_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--help"])
    assert exit_info.value.code == 0
    assert "{" + ",".join(COMMANDS) + "}" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        cli.main(["--version"])
    assert capsys.readouterr().out.strip() == f"nformer-bench {nk.__version__}"
    with pytest.raises(SystemExit):
        cli.main(["tune", "--help"])
    assert "--kernel {knn,attention,cuda-knn}" in capsys.readouterr().out


def test_results_go_to_the_working_directory_not_the_package(tmp_path, monkeypatch):
    import nformer_bench

    package = Path(nformer_bench.__file__).parent
    before = sorted(p for p in package.rglob("*") if "__pycache__" not in p.parts)
    monkeypatch.chdir(tmp_path)
    cli.main(["run", "--n-list", "64", "--methods", "knn-torch", "--device", "cpu", "--repeats", "1",
              "--isolation", "none"])
    (json_path,) = (tmp_path / "nformer_bench_results").glob("*/*.json")
    assert json.loads(json_path.read_text())["rows"][0]["status"] == "ok"
    assert sorted(p for p in package.rglob("*") if "__pycache__" not in p.parts) == before


def test_knn_command_compares_methods_with_recall(capsys):
    backend = nk.get_backend(torch.device("cpu"))
    rows = cli.knn.run(cli._parser().parse_args(["knn", "--n", "300", "--d", "32", "--k", "10", "--device", "cpu",
                                                 "--methods", "knn,knn-torch", "--backends", backend,
                                                 "--repeats", "1"]))
    assert [(r["method"], r["status"]) for r in rows] == [("knn", "ok"), ("knn-torch", "ok")]
    assert rows[0]["recall"] == 1.0 and rows[1]["recall"] >= 0.999  # exact methods agree up to ties
    assert all(r["mem_kind"] == "rss_growth" and r["recall_vs"] == "fp64 brute force, 300 rows" for r in rows)
    assert "knn-torch (torch)" in capsys.readouterr().out


def test_knn_recall_truth_is_an_fp64_brute_force_on_sampled_rows():
    """The truth is plain PyTorch in fp64 over key chunks, never a kernel being measured: on a
    sample of rows it is the dense fp64 top-k, self first, whatever the chunk."""
    from nformer_bench import knn

    rows = knn.sample_rows(500, count=40)
    assert len(rows) == 40 and len(set(rows.tolist())) == 40 and torch.equal(knn.sample_rows(30, count=40), torch.arange(30))
    x = torch.randn(500, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64).float()
    xd = torch.nn.functional.normalize(x.double(), dim=1)
    dense = (xd[rows] @ xd.T).index_put_((torch.arange(40), rows), torch.tensor(float("inf"), dtype=torch.float64))
    want = dense.topk(7, dim=1).indices
    for chunk in (64, 500, 4096):
        assert torch.equal(knn.fp64_truth(x, rows, 7, chunk=chunk), want)
    assert knn.recall(want.flip(1), want) == 1.0  # a set measure
    other = want.clone()
    other[0, -1] = next(j for j in range(500) if j not in want[0])
    assert knn.recall(other, want) == 1.0 - 1.0 / want.numel()


def test_certified_command_writes_stage_split_and_agreement(tmp_path, capsys):
    cli.main(["certified", "--device", "cpu", "--n-list", "200,700", "--d", "16", "--k", "5", "--margin", "3",
              "--kinds", "gaussian,reid", "--repeats", "1", "--out", str(tmp_path)])
    (json_path,) = tmp_path.glob("certified-*.json")
    assert json_path.with_suffix(".md").is_file()
    result = json.loads(json_path.read_text())
    meta, rows = result["meta"], result["rows"]
    assert meta["complete"] and meta["margin"] == 3 and meta["device_slug"].startswith("cpu-")
    assert "N = 1e6 is for a GPU" in meta["note"]
    assert [(r["kind"], r["n"], r["status"]) for r in rows] == [
        ("gaussian", 200, "ok"), ("reid", 200, "ok"), ("gaussian", 700, "ok"), ("reid", 700, "ok")]
    for r in rows:
        assert r["candidates_per_row"] == 8 and r["backend"] == nk.get_backend(torch.device("cpu"))
        assert all(r[key] >= 0 for key in ("exact_ms", "certified_ms", "stage1_ms", "stage2_ms", "fallback_ms",
                                            "torch_mm_topk_ms"))
        assert (r["fallback_ms"] == 0) == (r["rows_recomputed"] == 0)
        assert r["certified_rows"] + r["rows_recomputed"] == r["rows"] == r["n"]
        assert r["certified_fraction"] == r["certified_rows"] / r["n"] and r["candidates_rescored"] == 8 * r["n"]
        assert r["stages_rows_recomputed"] == r["rows_recomputed"] and r["stages_equal_certified"]
        assert r["certified_equals_exact"] == (r["rows_differing_from_exact"] == 0)
        assert r["certified_rows_equal"] == 1 - r["rows_differing_from_exact"] / r["n"]
        assert r["differing_rows_certified_as_fp64"] == r["rows_differing_from_exact"]  # certified is exact
        assert r["certified_recall"] >= 0.999
        assert r["torch_mm_topk_recall"] >= 0.999
    md = json_path.with_suffix(".md").read_text()
    assert md.count("| gaussian |") == 2 and md.count("| reid |") == 2 and "stage 1" in md
    assert "wrote" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="--kinds"):
        cli.main(["certified", "--device", "cpu", "--kinds", "uniform", "--out", str(tmp_path)])


def test_parser_leaves_nformer_kernels_unimported():
    """`check` rebuilds the extension from the CLI's process, which must not have loaded it."""
    code = "import sys; from nformer_bench import cli; cli._parser(); print('nformer_kernels' in sys.modules)"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "python")])}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "False", proc.stderr


def test_report_command_takes_the_results_folder(sweep, tmp_path):
    json_path, _ = sweep
    readme = tmp_path / "README.md"
    readme.write_text(f"{report.BEGIN}\n{report.END}\n")
    cli.main(["report", str(json_path.parent.parent), "--readme", str(readme)])
    assert f"{json_path.stem}-latency.png" in readme.read_text()


@pytest.mark.parametrize("argv,message", [
    (["run", "--n-list", "0"], "--n-list: expected comma-separated integers >= 1"),
    (["run", "--n-list", "-5"], "--n-list"), (["run", "--d", "0"], "--d: must be >= 1"),
    (["knn", "--n", "0"], "--n: must be >= 1"), (["knn", "--k", "0"], "--k: must be >= 1"),
    (["knn", "--n", "10", "--k", "100"], "--k 100 exceeds --n 10"),
    (["report", "/nonexistent-folder"], "no such folder"),
    (["distributed", "--procs", "0"], "--procs"),
    (["run", "--device", "banana"], "--device must be cpu or cuda"),
    (["knn", "--device", "banana"], "--device must be cpu or cuda"),
    (["eval-features", "--device", "banana"], "--device must be cpu or cuda"),
    (["run", "--methods", "bogus", "--n-list", "100"], "--methods: unknown"),
    (["eval-features", "--queries", "0"], "--queries must be >= 1"),
    (["eval-features", "--ids", "0"], "--ids must be >= 1"),
    (["certified", "--margin", "-1"], "--margin: must be >= 0"),
    (["run", "--bogus-option"], "unrecognized arguments"),
])
def test_bad_arguments_are_one_line_and_exit_2(argv, message, capsys, tmp_path):
    """As nformer-reid: a user error is one line on stderr, exit status 2, no traceback, no output."""
    with pytest.raises(SystemExit) as exit_info:
        cli.main([*argv, *(["--out", str(tmp_path / "o")] if argv[0] in ("run", "certified", "eval-features") else [])])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith("nformer-bench: error: ") and message in err, err
    assert not (tmp_path / "o").exists()


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_device_cuda_without_a_gpu_is_a_user_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["knn", "--device", "cuda", "--n", "10", "--k", "2"])
    assert exit_info.value.code == 2 and "no CUDA device" in capsys.readouterr().err
