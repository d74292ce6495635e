"""The replay role: the Reverb server (server.py) and the client helpers actors and the learner use
(writer.py: SegmentWriter; sampler.py: SegmentSampler).

This module stays import-light (no Reverb/TensorFlow): it only holds the names every part shares.
"""
from __future__ import annotations

TABLE = "segments"   # the one Reverb table; one item = one trajectory segment (crl/segments.py)


class ReplayError(RuntimeError):
    """Base class of the errors the replay client helpers raise."""


class ReplayTimeout(ReplayError, TimeoutError):
    """A bounded wait on replay ran out (rate limiter closed, server stalled or unreachable).

    Nothing is lost on the caller's side: the writer keeps its unconfirmed items queued and the
    sampler keeps running, so the caller decides whether to retry, back off or reconnect.
    """


class ReplayUnavailable(ReplayError, ConnectionError):
    """The replay server could not be reached or dropped the connection; call reconnect()."""


__all__ = ["TABLE", "ReplayError", "ReplayTimeout", "ReplayUnavailable"]
