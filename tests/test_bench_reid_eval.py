"""nformer-bench eval-features at tiny sizes: the Market-like split, one measurement in this process,
and the subcommand end to end (child processes, JSON, the full-matrix comparison)."""
import json

import numpy as np
import pytest
import torch

from nformer_bench import cli, reid_eval


def test_market_like_split_has_markets_id_layout():
    qf, gf, q_pids, g_pids, q_cams, g_cams = reid_eval.market_like_split(40, 300, 8, 10, seed=3)
    assert qf.shape == (40, 8) and gf.shape == (300, 8) and qf.dtype == gf.dtype == torch.float32
    ident, zero, own = reid_eval.split_sizes(40, 300, 10)
    assert (ident, zero, own) == (170, 37, 93)
    assert sorted(set(q_pids.tolist())) == list(range(1, 11))
    assert (g_pids[:ident] >= 1).all() and (g_pids[:ident] <= 10).all()
    assert (g_pids[ident:ident + zero] == 0).all()
    own_ids = g_pids[ident + zero:]
    assert own_ids.unique().numel() == own and (own_ids > 10).all()  # distractors of their own ids
    assert 0 <= int(q_cams.min()) and int(g_cams.max()) < reid_eval.NUM_CAMS
    again = reid_eval.market_like_split(40, 300, 8, 10, seed=3)
    assert all(torch.equal(a, b) for a, b in zip(again, (qf, gf, q_pids, g_pids, q_cams, g_cams)))
    # a small gallery is all identity images
    assert reid_eval.split_sizes(5, 12, 10) == (12, 0, 0)


def test_measure_in_process_both_paths_agree():
    cfg = {"queries": 30, "gallery": 400, "dim": 16, "ids": 12, "seed": 1, "normalize": True, "device": "cpu",
           "threads": None, "query_chunk": 7, "gallery_chunk": 33}
    streamed = reid_eval.measure(dict(cfg, path="features"))
    matrix = reid_eval.measure(dict(cfg, path="matrix"))
    for r in (streamed, matrix):
        assert r["status"] == "ok" and r["time_s"] > 0 and r["cpu_s"] > 0 and r["process_peak_rss_bytes"] > 0
        assert r["peak_rss_bytes"] >= r["rss_data_bytes"] > 0 and r["peak_rss_exact"]  # Linux: reset high-water mark
        assert 0 < r["mAP"] <= 1 and 0 < r["mINP"] <= 1 and len(r["cmc"]) == 20
    assert streamed["cmc_bits"] == matrix["cmc_bits"] and streamed["mAP"] == matrix["mAP"]
    assert np.all(np.diff(streamed["cmc"]) >= 0)


def test_subcommand_end_to_end(tmp_path, capsys):
    out = tmp_path / "res"
    cli.main(["eval-features", "--queries", "24", "--gallery", "500", "--dim", "8", "--ids", "8",
              "--compare-gallery", "200", "--threads", "1", "--out", str(out)])
    text = capsys.readouterr().out
    assert "load average" in text and "identical cmc / mAP / mINP" in text
    (path,) = out.glob("*.json")
    result = json.loads(path.read_text())
    assert result["comparison_equal"] is True and len(result["meta"]["load_average_before"]) == 3
    rows = result["rows"]
    assert [(r["path"], r["gallery"]) for r in rows] == [("features", 500), ("matrix", 200), ("features", 200)]
    for r in rows:
        assert r["status"] == "ok" and r["peak_rss_bytes"] > r["rss_data_bytes"] > 0 and r["threads"] == 1
        assert "cmc_bits" not in r
    assert rows[1]["mAP"] == rows[2]["mAP"]


def test_subcommand_refuses_bad_sizes(tmp_path):
    with pytest.raises(SystemExit, match="--queries must be >= 1"):
        cli.main(["eval-features", "--queries", "0", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="--compare-gallery must be >= 0"):
        cli.main(["eval-features", "--compare-gallery", "-1", "--out", str(tmp_path)])
