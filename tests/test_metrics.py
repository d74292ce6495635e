"""crl.metrics' final figures: what a role writes as it exits, and what `crl local` reads back
into summary.json (in place of its last scrape, which can predate the role's last work)."""
from __future__ import annotations

import logging
import os

import prometheus_client

from crl import metrics as M


def _registry(written: float):
    registry = prometheus_client.CollectorRegistry()
    c = prometheus_client.Counter("crl_test_segments_written", "test", registry=registry)
    c.inc(written)
    prometheus_client.Counter("crl_test_reconnects", "test", ["to"],
                              registry=registry).labels(to="replay").inc()
    return registry


def test_final_metrics_round_trip_and_only_for_the_process_that_wrote_them(tmp_path):
    log = logging.getLogger("test")
    M.write_final_metrics(str(tmp_path), "actor0", log, _registry(48))
    own = M.read_final_metrics(str(tmp_path), "actor0", os.getpid())
    assert own["crl_test_segments_written_total"] == 48.0
    assert own['crl_test_reconnects_total{to="replay"}'] == 1.0
    # Named as a scrape of the same registry would name them: the summary mixes both.
    text = prometheus_client.generate_latest(_registry(48)).decode()
    assert set(own) == set(M.parse_metrics(text))
    # Another process's file (an earlier life of the role, then SIGKILLed) is not its figures.
    assert M.read_final_metrics(str(tmp_path), "actor0", os.getpid() + 1) is None
    assert M.read_final_metrics(str(tmp_path), "actor1", os.getpid()) is None
    # A newer write replaces the file whole (no .tmp left behind).
    M.write_final_metrics(str(tmp_path), "actor0", log, _registry(64))
    assert M.read_final_metrics(str(tmp_path), "actor0", os.getpid())[
        "crl_test_segments_written_total"] == 64.0
    assert sorted(os.listdir(tmp_path / M.FINAL_METRICS_DIR)) == ["actor0.json"]


def test_an_unwritable_run_dir_is_logged_not_raised(tmp_path, caplog):
    (tmp_path / M.FINAL_METRICS_DIR).write_text("a file where the directory goes")
    with caplog.at_level(logging.WARNING):
        M.write_final_metrics(str(tmp_path), "learner", logging.getLogger("test"), _registry(1))
    assert "could not write" in caplog.text and "learner.json" in caplog.text
    assert M.read_final_metrics(str(tmp_path), "learner", os.getpid()) is None
    (tmp_path / "truncated").mkdir()
    path = M.final_metrics_path(str(tmp_path / "truncated"), "replay")
    os.makedirs(os.path.dirname(path))
    with open(path, "w") as f:
        f.write('{"pid": ')              # not JSON (not ours: ours are replaced whole)
    assert M.read_final_metrics(str(tmp_path / "truncated"), "replay", os.getpid()) is None
