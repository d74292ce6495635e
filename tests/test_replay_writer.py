"""replay.writer.ReconnectingWriter against real replay server processes (`python -m
replay.server`, stopped by PID): it rides over a replay restart by itself, counting its
reconnects, and after a stop request gives a held write one deadline, then reports it unconfirmed.
"""
from __future__ import annotations

import threading

import pytest

from crl.segments import segment_spec
from replay.writer import ReconnectingWriter
from test_replay import ACTION_DIM, STATE_DIM, T, ServerProc, make_segments, table_size


@pytest.mark.slow          # two replay processes and Reverb's reconnect: about a minute here
def test_writer_reconnects_by_itself_across_a_replay_restart(tmp_path):
    s1 = ServerProc(tmp_path, tmp_path / "ckpt1")
    stop, reconnected = threading.Event(), []
    w = ReconnectingWriter(s1.address, segment_spec(STATE_DIM, ACTION_DIM, T), stop,
                           write_timeout_s=1.0, final_s=1.0,
                           on_reconnect=lambda: reconnected.append(1))
    s2 = None
    try:
        assert w.write(make_segments([1, 2, 3])) == 3 and w.reconnects == 0
        s1.kill()
        result = []
        writer = threading.Thread(target=lambda: result.append(w.write(make_segments([4, 5]))),
                                  daemon=True)
        writer.start()                # replay is down: the write waits and retries meanwhile
        s2 = ServerProc(tmp_path, tmp_path / "ckpt2", port=s1.port)     # restarted, empty
        writer.join(timeout=120)
        assert not writer.is_alive(), "the write did not survive the restart"
        assert result == [2]
        assert table_size(s2.address) == 2             # the unconfirmed segments, re-sent
        assert w.reconnects >= 1 and len(reconnected) == w.reconnects
        # No learner samples: the rate limiter holds inserts after 6 items (test_replay's
        # OVERRIDES). A stop request gives the held write final_s, then it reports None.
        held = threading.Thread(target=lambda: result.append(w.write(make_segments(range(6, 11)))),
                                daemon=True)
        held.start()
        held.join(timeout=3)
        assert held.is_alive(), "inserts were not held"
        assert w.held >= 1
        stop.set()
        held.join(timeout=30)
        assert not held.is_alive() and result[-1] is None
    finally:
        stop.set()
        w.close()
        for s in (s1, s2):
            if s is not None and s.proc.poll() is None:
                s.kill()
