"""Publishes params off the learner's update loop.

The update loop hands over ("offers") a params snapshot with its version; a background thread
copies it to the host, checks it is finite, serialises and publishes it through the
ParameterServer. The loop never waits for any of that:

  - one-slot mailbox: a newer offer replaces one not yet taken (that version is skipped: versions
    published still strictly increase, with gaps), so what gets published is always the newest;
  - at most one publication per `interval_s` (measured from the start of the previous one): the
    actors poll every actor.param_refresh_s and cannot use more. `wants()` tells the loop when a
    snapshot would be taken at once, so it only makes the (on-device) copy then;
  - a snapshot holding NaN/Inf is never published (counted, logged): the loop offers only states
    it found finite, this is the second guard;
  - `stop()` ends the thread (an in-flight publication completes) and returns the offer it had not
    taken, for the caller to publish as the final state with `publish_now`.

Versions are assigned by the loop (it checkpoints them; learner/role.py), not here.
"""
from __future__ import annotations

import threading
import time
from typing import Any, Callable, Optional, Tuple

import jax
import numpy as np

Offer = Tuple[int, Any]   # (version, params pytree: device or host arrays)


def _host_finite(tree) -> Tuple[Any, bool]:
    host = jax.device_get(tree)
    ok = all(np.isfinite(x).all() for x in jax.tree_util.tree_leaves(host)
             if np.issubdtype(np.asarray(x).dtype, np.inexact))
    return host, ok


class ParamsPublisher:
    def __init__(self, server, interval_s: float, log,
                 on_published: Optional[Callable[[int, float], None]] = None,
                 on_rejected: Optional[Callable[[int], None]] = None):
        """server: anything with publish(params, version). on_published(version, seconds) and
        on_rejected(version) run on the publishing thread."""
        self.server, self.interval_s, self.log = server, float(interval_s), log
        self.on_published, self.on_rejected = on_published, on_rejected
        self._cv = threading.Condition()
        self._publish_lock = threading.Lock()    # one server.publish at a time, in version order
        self._offer: Optional[Offer] = None
        self._busy = False
        self._halt = False
        self._next_at = 0.0                      # monotonic time the next publication may start
        self.published_version = -1
        self.skipped = 0                         # offers replaced before they were taken
        self.errors = 0
        self._thread = threading.Thread(target=self._run, name="params-publisher", daemon=True)

    def start(self) -> "ParamsPublisher":
        self._thread.start()
        return self

    # -- the update loop's side (never blocks beyond a lock held for a few assignments) --------

    def wants(self) -> bool:
        """True if an offer made now would be taken at once (idle, nothing waiting, interval
        over): the loop makes a snapshot only then."""
        with self._cv:
            return not self._busy and self._offer is None and time.monotonic() >= self._next_at

    def idle(self) -> bool:
        """Nothing waiting and nothing being published."""
        with self._cv:
            return not self._busy and self._offer is None

    def offer(self, version: int, params: Any) -> None:
        with self._cv:
            if self._offer is not None:
                if version <= self._offer[0]:
                    raise ValueError(f"params version {version} offered after {self._offer[0]}")
                self.skipped += 1
            self._offer = (version, params)
            self._cv.notify_all()

    # -- the publishing thread ---------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._halt:
                    if self._offer is not None:
                        wait = self._next_at - time.monotonic()
                        if wait <= 0:
                            break
                        self._cv.wait(wait)
                    else:
                        self._cv.wait()
                if self._halt:
                    return
                item, self._offer = self._offer, None
                self._busy = True
                self._next_at = time.monotonic() + self.interval_s
            try:
                self.publish_now(*item)
            except Exception as e:   # keep serving: the next offer may well publish
                self.errors += 1
                self.log.error("publishing params version %d failed: %s: %s", item[0],
                               type(e).__name__, e)
            finally:
                with self._cv:
                    self._busy = False

    def publish_now(self, version: int, params: Any) -> bool:
        """Publishes in the calling thread (also used for the initial and the final params).
        False, and nothing published, if the params hold NaN/Inf or the version is not newer
        than the last published one."""
        with self._publish_lock:
            if version <= self.published_version:
                return False
            t0 = time.perf_counter()
            host, finite = _host_finite(params)
            if not finite:
                self.log.error("params version %d hold NaN/Inf: not published", version)
                if self.on_rejected is not None:
                    self.on_rejected(version)
                return False
            self.server.publish(host, version)
            self.published_version = version
            if self.on_published is not None:
                self.on_published(version, time.perf_counter() - t0)
            return True

    def stop(self, timeout_s: float = 30.0) -> Optional[Offer]:
        """Ends the thread (a publication in flight completes, within timeout_s) and returns the
        offer it had not taken (None if none)."""
        with self._cv:
            self._halt = True
            self._cv.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout_s)
        with self._cv:
            item, self._offer = self._offer, None
        return item
