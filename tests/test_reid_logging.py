"""Plain-log progress lines (no terminal): counts from `initial` of `total`, elapsed time and ETA."""
import logging

from nformer_reid.utils import logging as reid_logging


def test_log_progress_lines_count_from_initial_with_an_eta(caplog, monkeypatch):
    clock = iter(range(0, 1000, 10))  # every monotonic() call: 10 s later
    monkeypatch.setattr(reid_logging.time, "monotonic", lambda: next(clock))
    with caplog.at_level(logging.INFO, logger=reid_logging.ROOT_LOGGER):
        bar = reid_logging.LogProgress(range(3, 7), "stage2", interval=1, initial=3, total=7)
        bar.set_postfix(loss="0.5")
        assert list(bar) == [3, 4, 5, 6]
    lines = [r.getMessage() for r in caplog.records if r.name.endswith(".progress")]
    # start at t=0; item 4 of 7 done at t=10 -> 1 of this loop's 4 items in 10 s, 3 left: eta 30 s
    assert lines[0] == "stage2: 4/7 (57%) elapsed 0:00:10 eta 0:00:30 loss=0.5"
    assert lines[-1] == "stage2: 7/7 (100%) elapsed 0:00:40 eta 0:00:00 loss=0.5"


def test_log_progress_without_a_length_counts_only():
    bar = reid_logging.LogProgress(iter(range(2)), "features")
    assert bar.total is None and bar._line(2, 5.0) == "features: 2 elapsed 0:00:05"
