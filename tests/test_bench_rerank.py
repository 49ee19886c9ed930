"""nformer-bench rerank at a tiny size: each method in a child process, measured peak RSS, the
dense comparison's speed-up and agreement, --topk, and refused options."""
import json

import pytest

from nformer_bench.cli import main


def test_rerank_bench_measures_children_and_compares_with_dense(tmp_path, capsys):
    out = tmp_path / "sub" / "rerank.json"
    assert main(["rerank", "--queries", "12", "--gallery", "90", "--dim", "8", "--k1", "5", "--k2", "3",
                 "--threads", "1", "--dense", "--dense-queries", "10", "--dense-gallery", "70",
                 "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    rows = result["rows"]
    assert [(r["method"], r["queries"], r["gallery"]) for r in rows] == [("sparse", 12, 90), ("sparse", 10, 70),
                                                                         ("dense", 10, 70)]
    for r in rows:
        assert r["status"] == "ok" and r["torch_threads"] == 1 and r["wall_s"] > 0
        assert r["peak_rss_bytes"] >= r["rss_before_bytes"] > 10 << 20  # measured in the child: torch is loaded
        assert len(r["loadavg_before"]) == 3
    comparison = result["dense_comparison"]
    assert comparison["speedup"] == pytest.approx(rows[2]["wall_s"] / rows[1]["wall_s"])
    assert comparison["max_abs_difference"] < 1e-5  # the same re-ranking
    printed = capsys.readouterr().out
    assert "faster than re_ranking at 10 x 70" in printed and "load average" in printed


def test_rerank_bench_topk_and_refusals(tmp_path, capsys):
    out = tmp_path / "topk.json"
    assert main(["rerank", "--queries", "6", "--gallery", "40", "--dim", "4", "--k1", "3", "--k2", "2",
                 "--topk", "5", "--out", str(out)]) == 0
    (row,) = json.loads(out.read_text())["rows"]
    assert row["status"] == "ok" and row["topk"] == 5 and row["method"] == "sparse"
    for argv, message in ((["--queries", "0"], "--queries must be >= 1"),
                          (["--queries", "2", "--gallery", "3", "--k1", "20"], "must not exceed"),
                          (["--lambda", "1.5"], "--lambda must be in [0, 1]"),
                          (["--topk", "0"], "--topk must be >= 1")):
        with pytest.raises(SystemExit) as exc:
            main(["rerank", *argv])
        assert exc.value.code == 2
        assert message in capsys.readouterr().err
