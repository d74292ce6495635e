"""PolicyFollower: the newest policy a role steps with, refreshed in the background.

Actors and the evaluator follow the learner the same way (Acme's VariableClient is the pattern):

    follower = PolicyFollower(client_from_config(cfg, template=policy_template(nets)),
                              period_s=cfg.actor.param_refresh_s, log=log)
    if follower.wait_first(stop, timeout_s=3600.0):   # blocks only until the first params
        policy = follower.latest()                     # Policy(version, params, progress)
        ...                                            # never blocks: the thread refreshes
    follower.close()                                   # stops the thread, closes the client

What it holds: the template of what it fetches, `policy_template(nets)` = the actor params and
the progress subset (crl.learning.progress_template: env steps, SGD steps, finished), so a payload
that does not fit the network is refused with the first differing leaf (ParamsMismatchError).

How it refreshes: a daemon thread asks every `period_s` for a version newer than the one it
holds; every RPC carries the client's deadline (service.rpc_timeout_s). The newest version wins:
the held policy is replaced only by a newer one, whole (version, params and progress together,
under one lock). The actor params are put on the default device in that thread, so the caller's
loop never waits for a transfer. With `wanted` (the evaluator's schedule), a poll first fetches
the progress of the newest version (three integers) and the actor params only if
`wanted(progress)` or the version is the run's last (finished = 1): a follower always gets the
final version.

Errors: a failed poll keeps the last policy, calls `on_error(e)`, and is logged in one form,
describe_error's "CODE: cause" (a TLS failure names the certificate problem, UNAVAILABLE names
the address): once when the failures start or their cause changes, then again when params flow
again, with how many polls failed meanwhile.
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable, Dict, NamedTuple, Optional

import jax

from crl.learning import PROGRESS_KEY, progress_template
from crl.metrics import Backoff
from params.client import ParameterClient

Progress = Dict[str, int]          # {"env_steps", "sgd_steps", "finished"} as Python ints
ACTOR_KEY = "actor"


class Policy(NamedTuple):
    """One params version as a follower holds it."""
    version: int
    params: Any            # the actor params (device arrays)
    progress: Progress     # that version's place on the run's axes

    @property
    def finished(self) -> bool:
        """The run's final version: the learner reached its budget."""
        return bool(self.progress.get("finished", 0))


def policy_template(nets) -> Dict[str, Any]:
    """What a follower fetches: {"actor": shapes of nets.init's actor params, "progress": ...}."""
    actor = jax.eval_shape(nets.init, jax.random.PRNGKey(0))[0]
    return {ACTOR_KEY: actor, **progress_template()}


def _progress(tree) -> Progress:
    return {k: int(v) for k, v in tree[PROGRESS_KEY].items()}


class PolicyFollower:
    """Keeps the newest policy from a ParameterClient (module docstring).

    client: a ParameterClient whose template is policy_template(...) (it checks every payload).
    period_s: seconds between two polls of the background thread.
    wanted: optional predicate on a version's progress: fetch its actor params only if true.
    on_update(policy): called in the thread after each newer policy is taken.
    on_error(exception): called in the thread after each failed poll.
    """

    def __init__(self, client: ParameterClient, period_s: float, *, log=None,
                 wanted: Optional[Callable[[Progress], bool]] = None,
                 on_update: Optional[Callable[[Policy], None]] = None,
                 on_error: Optional[Callable[[BaseException], None]] = None):
        if not period_s or period_s <= 0:
            raise ValueError(f"period_s = {period_s!r}: must be > 0 (seconds between polls)")
        template = client.template
        if not isinstance(template, dict) or not {ACTOR_KEY, PROGRESS_KEY} <= set(template):
            raise ValueError("PolicyFollower needs a client whose template is "
                             "policy_template(nets) (the actor params and the progress subset)")
        self.client, self.period_s = client, float(period_s)
        self.template = template
        self.log = log or logging.getLogger("crl.params.follower")
        self.wanted, self.on_update, self.on_error = wanted, on_update, on_error
        self._lock = threading.Lock()
        self._policy: Optional[Policy] = None
        self.newest_version = -1           # newest version whose progress this follower read
        self.failures = 0                  # failed polls since the last good one
        self._last_error: Optional[str] = None
        self._halt = threading.Event()
        self._thread = threading.Thread(target=self._run, name="policy-follower", daemon=True)

    @property
    def address(self) -> str:
        return self.client.address

    # -- what the caller reads (never blocks on the network) ---------------------------------
    def latest(self) -> Optional[Policy]:
        """The newest policy held (None before the first)."""
        with self._lock:
            return self._policy

    @property
    def version(self) -> int:
        p = self.latest()
        return -1 if p is None else p.version

    # -- life cycle ----------------------------------------------------------------------------
    def start(self) -> "PolicyFollower":
        """Starts the background refresh without waiting for params."""
        if not self._thread.is_alive() and not self._halt.is_set():
            self._thread.start()
        return self

    def wait_first(self, stop: threading.Event, timeout_s: float) -> bool:
        """Polls (with backoff, logged) until the first policy arrives, then starts the thread.
        False if `stop` was set or timeout_s passed first."""
        deadline = time.monotonic() + timeout_s
        backoff = Backoff()
        while not stop.is_set() and time.monotonic() < deadline:
            if self.poll() or self.latest() is not None:
                self.start()
                return True
            self.log.info("waiting for the first params from %s", self.address)
            stop.wait(min(backoff.next(), max(0.0, deadline - time.monotonic())))
        return False

    def close(self, join_s: float = 2.0) -> None:
        """Stops the thread and closes the client (which cancels a call in flight)."""
        self._halt.set()
        self.client.close()
        if self._thread.is_alive():
            self._thread.join(join_s)

    def __enter__(self) -> "PolicyFollower":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- one refresh ---------------------------------------------------------------------------
    def poll(self) -> bool:
        """One refresh (the thread calls it every period_s): True if a newer policy was taken."""
        held = self.version
        try:
            if self.wanted is not None:
                head = self.client.get(min_version=max(held, self.newest_version),
                                       subset=[PROGRESS_KEY])
                if head is None:
                    self._recovered()
                    return False
                self.newest_version = max(self.newest_version, head[0])
                progress = _progress(head[1])
                if not (progress.get("finished") or self.wanted(progress)):
                    self._recovered()
                    return False
            got = self.client.get(min_version=held, subset=[ACTOR_KEY, PROGRESS_KEY])
        except Exception as e:     # keep the last policy; the next poll tries again
            if not self._halt.is_set():
                self._failed(e)
            return False
        self._recovered()
        if got is None:
            return False
        version, tree = got
        policy = Policy(version, jax.device_put(tree[ACTOR_KEY]), _progress(tree))
        with self._lock:
            if self._policy is not None and self._policy.version >= version:
                return False      # newest wins
            self._policy = policy
        self.newest_version = max(self.newest_version, version)
        if self.on_update is not None:
            self.on_update(policy)
        return True

    def _run(self) -> None:
        while not self._halt.wait(self.period_s):
            self.poll()

    def _failed(self, e: BaseException) -> None:
        self.failures += 1
        why = self.client.describe(e)
        if why != self._last_error:
            self.log.warning("params from %s: %s; keeping version %d, retrying every %gs",
                             self.address, why, self.version, self.period_s)
            self._last_error = why
        if self.on_error is not None:
            self.on_error(e)

    def _recovered(self) -> None:
        if self._last_error is not None:
            self.log.info("params from %s flow again (after %d failed polls)", self.address,
                          self.failures)
        self._last_error, self.failures = None, 0
