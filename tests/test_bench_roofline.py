"""The analytic roofline (python/nformer_bench/roofline.py) and the tables docs/design.md carries:
the roofline as the module computes it, and the AOT report of exactly the variants the launchers list."""
import re
from pathlib import Path

import pytest

from nformer_bench import roofline
from nformer_bench.analytic import knn_flops

DESIGN = Path(__file__).resolve().parent.parent / "docs" / "design.md"


def _between(text, name):
    begin, end = f"<!-- {name}:begin -->\n", f"<!-- {name}:end -->"
    return text[text.index(begin) + len(begin):text.index(end)]


def test_design_carries_the_roofline_as_computed():
    assert _between(DESIGN.read_text(), "roofline") == roofline.markdown()


def test_scan_traffic_follows_the_tile_shape():
    n, d = 1000, 256
    # a program of 64 rows streams every key once, and without residency its query tile once per key tile
    assert roofline.scan_l2_bytes(n, d, 2, 64, 64, True) == pytest.approx(n * n * d * 2 / 64)
    assert roofline.scan_l2_bytes(n, d, 2, 64, 64, False) == pytest.approx(2 * n * n * d * 2 / 64)
    assert roofline.scan_l2_bytes(n, d, 2, 128, 128, True) == pytest.approx(roofline.scan_l2_bytes(n, d, 2, 64, 64, False) / 4)


def test_floors_take_the_binding_limit():
    scan, rescore = roofline.costs()[0], next(c for c in roofline.costs() if c.kernel.startswith("knn_rescore"))
    seconds, bound = roofline.floor_s(scan, "H100 SXM")
    assert bound == "tensor" and seconds == pytest.approx(knn_flops(10**6, 256) / 989.4e12)
    seconds, bound = roofline.floor_s(rescore, "RTX 4090")
    assert bound == "DRAM" and seconds == pytest.approx(rescore.dram_bytes / 1.008e12)


def test_design_lists_every_triton_variant_of_the_aot_report():
    pytest.importorskip("triton", reason="the variant lists are Triton's")
    from nformer_kernels.triton.aot import all_variants

    table = _between(DESIGN.read_text(), "aot")
    labels = [m.replace("\\|", "|") for m in re.findall(r"^\| `(.+?)` \|", table, re.M)]
    assert labels == [v.label for v in all_variants()], "rerun python -m nformer_kernels.triton.aot --markdown"
    # the Hopper tiles are compiled for sm_90 only: "-" in the sm_86 column
    resident = [line for line in table.splitlines() if "Q_RESIDENT=True" in line]
    assert resident and all(line.split(" | ")[1] == "-" and line.split(" | ")[2] != "-" for line in resident)
