"""The learner's update loop: one object with named state, its parts injected.

Used by the learner role (learner/role.py) and by benchmarks/learner_pipeline.py, so the
benchmark times this very loop. The in-process driver (crl/driver.py) runs the synchronous form
of the same algorithm and shares its update (crl.learning.Updater) and its UTD rule
(crl.learning.update_calls_owed); what only a distributed learner needs lives here:

  - dispatch: call k+1 is dispatched (its batch already copied to the device) before the
    results of call k are read, so sampling, the host-side checks and the copy overlap the
    compute. A sampled batch holding NaN/Inf or |x| > MAX_ABS_VALUE is not used and its items
    are deleted from replay;
  - settle: a call counts (update_calls, published, checkpointed) only once its results are read
    and found finite;
  - rollback: a non-finite call restores the newest checkpoint and drops the call dispatched on
    top of it; MAX_CONSECUTIVE_NONFINITE in a row end the loop with exit code 1;
  - publish: the newest settled state is offered to the publisher (learner/publisher.py) under
    the next params version, at least `publish_every` calls apart and only when the publisher
    would take it at once (the on-device copy is made only then); while idle (rate limiter) the
    newest state is offered too, so it reaches the actors without further updates;
  - checkpoint every `checkpoint_every` calls (of a settled state: the pipeline is drained first;
    written in the background);
  - owed updates: when replay has received the budget (`total_env_steps`), the update calls still
    owed for the data received (crl.learning.update_calls_owed) are done, the rate limiter
    permitting (none if the learner is already ahead: the limiter lets it train up to its error
    buffer past the insert count read at the budget, so the final SGD steps are the owed ones
    plus at most that slack);
  - finish: the final state is checkpointed, then published (a newer version if it was not
    offered yet); at the budget that version carries progress finished=1 and the marker
    `finished.json` is written (atomically) beside the run.

Injected: the Updater, a sampler factory (sample(timeout_s) -> batch with .data and .info,
raising replay.ReplayTimeout while the rate limiter holds it and ReplayUnavailable when the server
is gone), the publisher, the checkpointer, replay's insert count (a cached and a fresh reading),
the item deleter and the clock. The loop never reads the config itself (LoopSettings).
"""
from __future__ import annotations

import dataclasses
import threading
import time
from typing import Any, Callable, List, Optional, Tuple

import jax
import numpy as np

from crl.learning import (PROGRESS_KEY, all_finite, measured_utd, params_of, progress_of,
                          update_calls_owed)
from crl.metrics import Backoff
from crl.run_marker import write_marker
from learner import metrics as M
from replay import ReplayTimeout, ReplayUnavailable

MAX_CONSECUTIVE_NONFINITE = 10
# No env of this project produces a state or action component near this (positions and
# velocities are O(10-1000), actions in [-1, 1]); finite values past it (1e30 written by a
# hostile client) made every update non-finite, so they are quarantined like NaN.
MAX_ABS_VALUE = 1e6

TRAIN, OWED, DONE = "train", "owed", "done"   # LoopState.phase


def nonfinite_rows(data) -> np.ndarray:
    """[N] bool: segments whose float fields hold NaN/Inf or a value beyond +-MAX_ABS_VALUE."""
    bad = None
    for v in data.values():
        if np.issubdtype(v.dtype, np.floating):
            flat = v.reshape(v.shape[0], -1)
            b = ~(np.abs(flat) <= MAX_ABS_VALUE).all(axis=1)   # NaN compares False
            bad = b if bad is None else bad | b
    return bad if bad is not None else np.zeros(0, bool)


@dataclasses.dataclass(frozen=True)
class LoopSettings:
    segments_per_call: int
    minibatches_per_call: int
    publish_every: int            # at least this many settled calls between params versions
    checkpoint_every: int         # settled calls between checkpoints
    total_env_steps: int          # the budget
    prefill_steps: int            # replay.min_size_steps: no SGD step is owed for these
    utd: float
    env_steps_per_item: int       # new env steps one replay item brings (the unroll length)
    poll_period_s: float = 1.0    # how often replay's insert count is read (train phase)
    sample_timeout_s: float = 1.0
    publish_stop_timeout_s: float = 10.0

    @classmethod
    def from_config(cls, cfg) -> "LoopSettings":
        lc = cfg.learner
        return cls(lc.segments_per_call, lc.minibatches_per_call, lc.publish_every,
                   lc.checkpoint_every, lc.total_env_steps, cfg.replay.min_size_steps,
                   cfg.replay.utd, cfg.unroll_length,
                   publish_stop_timeout_s=cfg.service.rpc_timeout_s)


@dataclasses.dataclass
class LoopState:
    # Checkpointed with the TrainState (COUNTERS):
    params_version: int = 0       # the newest version assigned (offered or published)
    update_calls: int = 0         # settled (finite) update calls
    env_steps: int = 0            # env steps replay had received at the last poll
    # The loop's own:
    sgd_steps: int = 0            # of the newest settled state
    offered_calls: int = 0        # update_calls when a version was last assigned
    dirty: bool = False           # the newest settled state has no version yet
    bad_in_a_row: int = 0         # consecutive non-finite calls
    exit_code: int = 0            # 1: training diverges
    phase: str = TRAIN            # TRAIN, then OWED at the budget, DONE when the owed are done
    owed_calls: int = 0           # update calls still owed (phase OWED)
    checkpoint_due: bool = False
    pending: List[Tuple[Any, float]] = dataclasses.field(default_factory=list)
    # [(UpdateResult, mean params version of its batch)]: dispatched, not settled, oldest first

    COUNTERS = ("params_version", "update_calls", "env_steps")

    def counters(self) -> dict:
        return {k: getattr(self, k) for k in self.COUNTERS}

    @property
    def reached_budget(self) -> bool:
        return self.phase != TRAIN


class LearnerLoop:
    def __init__(self, settings: LoopSettings, updater, make_sampler: Callable[[], Any],
                 publisher, checkpointer, *, log, stop: Optional[threading.Event] = None,
                 replay_inserts: Callable[[], Optional[int]] = lambda: None,
                 replay_inserts_now: Optional[Callable[[], Optional[int]]] = None,
                 delete_items: Callable[[Any], None] = lambda keys: None,
                 device=None, tb=None, clock: Callable[[], float] = time.monotonic,
                 inject_nan: Callable[[], bool] = lambda: False,
                 marker_path: Optional[str] = None, state: Optional[LoopState] = None):
        """device: where batches are copied before the update (None: the updater places them,
        e.g. pmap). tb: a crl.tensorboard.ScalarWriter or None. inject_nan: test-only fault
        hook (learner/role.py). marker_path: where finish() writes the finished marker (None:
        nowhere)."""
        self.settings, self.updater, self.make_sampler = settings, updater, make_sampler
        self.publisher, self.checkpointer, self.log = publisher, checkpointer, log
        self.stop = stop or threading.Event()
        self.replay_inserts = replay_inserts
        self.replay_inserts_now = replay_inserts_now or replay_inserts
        self.delete_items, self.device, self.tb, self.clock = delete_items, device, tb, clock
        self.inject_nan, self.marker_path = inject_nan, marker_path
        self.state = state or LoopState(sgd_steps=updater.sgd_steps)
        self.state.offered_calls = self.state.update_calls
        self._sampler = None
        self._backoff = Backoff()
        self._last_poll = -float("inf")
        self._curves = (self.clock(), self.state.sgd_steps)   # last TensorBoard write
        self._sgd_counter = M.HighWater(M.SGD_STEPS)
        self._env_counter = M.HighWater(M.ENV_STEPS)
        self._sgd_counter.advance(self.state.sgd_steps)
        self._env_counter.advance(self.state.env_steps)

    # -- publish and checkpoint ----------------------------------------------------------------

    def tagged(self, params, finished: bool = False):
        """params with this version's place on the paper's axes (crl.learning.progress_of)."""
        s = self.state
        return {**params, PROGRESS_KEY: progress_of(s.env_steps, s.sgd_steps, finished)}

    def publish_current(self, finished: bool = False) -> bool:
        """Publishes the current state now, under the current version (the start's)."""
        return self.publisher.publish_now(
            self.state.params_version, self.tagged(params_of(self.updater.host_state()), finished))

    def offer(self, params) -> None:
        s = self.state
        s.params_version += 1
        self.publisher.offer(s.params_version, self.tagged(params))
        s.offered_calls = s.update_calls
        s.dirty = False

    def offer_newest(self) -> None:
        """While idle: offers the newest settled state if it has no version yet (so it reaches
        the actors without waiting for more updates)."""
        s = self.state
        if (not s.pending and s.dirty
                and s.update_calls - s.offered_calls >= self.settings.publish_every):
            self.offer(self.updater.params_snapshot())

    def checkpoint(self, wait: bool = True) -> bool:
        """wait=False (the periodic ones): the loop waits only for the copy to the host; the
        files are written in the background. A failed save (disk full, volume gone; a background
        one surfaces at the next save) is logged and counted and training goes on: the older
        checkpoints stay, and the next interval tries again."""
        s = self.state
        t0 = time.perf_counter()
        try:
            self.checkpointer.save(s.update_calls, self.updater.host_state(), s.counters(),
                                   wait=wait)
        except Exception as e:   # noqa: BLE001 - orbax raises many types for I/O errors
            M.CHECKPOINT_ERRORS.inc()
            self.log.error("checkpoint at update call %d failed (%s: %s); the newest on disk is "
                           "step %s; retrying at the next one", s.update_calls,
                           type(e).__name__, str(e)[:300], self.checkpointer.latest_step())
            return False
        M.CHECKPOINT_SECONDS.set(time.perf_counter() - t0)
        return True

    def checkpoint_if_due(self) -> None:
        s = self.state
        if s.checkpoint_due:
            if self.drain():   # checkpoint a settled state only
                self.checkpoint(wait=False)
            s.checkpoint_due = False

    # -- dispatch, settle, rollback ------------------------------------------------------------

    def usable(self, batch) -> bool:
        """False (and its items deleted from replay) if the batch holds non-finite rows."""
        bad = nonfinite_rows(batch.data)
        if not bad.any():
            return True
        keys = batch.info["key"][bad]
        M.NONFINITE_SEGMENTS.inc(int(bad.sum()))
        self.log.error("sampled batch holds %d segment(s) with NaN/Inf or |x| > %.0e (replay keys "
                       "%s): batch not used, items deleted from replay", int(bad.sum()),
                       MAX_ABS_VALUE, [int(k) for k in keys[:8]])
        self.delete_items(keys)
        return False

    def dispatch(self, batch) -> None:
        """Copies the batch to the device and dispatches one update call (not waiting for it).
        The new params are snapshotted only when the publisher would take them at once, none is
        pending already and the spacing of versions allows one."""
        s = self.state
        data = {k: batch.data[k] for k in ("state", "action", "episode_id")}
        if self.inject_nan():
            self.log.warning("TEST FAULT INJECTION: running this update on NaN states")
            data = dict(data, state=np.full_like(data["state"], np.nan))
        data_version = float(np.mean(batch.data["params_version"]))
        t0 = time.perf_counter()
        if self.device is not None:
            data = jax.device_put(data, self.device)
        snapshot = (self.publisher.wants() and not any(r.params is not None for r, _ in s.pending)
                    and s.update_calls + len(s.pending) + 1 - s.offered_calls
                    >= self.settings.publish_every)
        s.pending.append((self.updater.update_async(data, snapshot=snapshot), data_version))
        M.COMPUTE_SECONDS.inc(time.perf_counter() - t0)

    def settle(self) -> bool:
        """Reads the oldest pending call (waiting for it); False if it was non-finite."""
        s, cfg = self.state, self.settings
        r, data_version = s.pending.pop(0)
        t0 = time.perf_counter()
        finite = bool(r.finite)
        metrics = {k: float(v) for k, v in r.metrics.items()}
        M.COMPUTE_SECONDS.inc(time.perf_counter() - t0)
        if not finite:
            self.rollback(metrics)
            return False
        s.bad_in_a_row = 0
        s.update_calls += 1
        s.sgd_steps = int(r.steps)
        s.dirty = True
        M.CALLS.inc()
        M.SAMPLES.inc(cfg.segments_per_call)
        self._sgd_counter.advance(s.sgd_steps)
        for k, v in metrics.items():
            M.update_metric(k).set(v)
        self._write_curves(metrics, data_version)
        M.LAG.set(s.params_version - data_version)
        if r.params is not None and s.update_calls - s.offered_calls >= cfg.publish_every:
            self.offer(r.params)
        if s.update_calls % cfg.checkpoint_every == 0:
            s.checkpoint_due = True
        if s.phase == OWED:
            s.owed_calls -= 1
        if s.update_calls % 50 == 0:
            self.log.info("calls=%d sgd_steps=%d env_steps=%d version=%d critic_loss=%.3f "
                          "acc=%.3f", s.update_calls, s.sgd_steps, s.env_steps, s.params_version,
                          metrics.get("critic_loss", float("nan")),
                          metrics.get("categorical_accuracy", float("nan")))
        return True

    def _write_curves(self, metrics, data_version: float) -> None:
        """TensorBoard: every scalar once a second, against env steps."""
        now, (t_last, sgd_last) = self.clock(), self._curves
        if self.tb is None or now - t_last < 1.0:
            return
        s = self.state
        self.tb.write(s.env_steps, {
            **metrics, "sgd_steps": s.sgd_steps,
            "sgd_steps_per_s": (s.sgd_steps - sgd_last) / (now - t_last),
            "utd": measured_utd(s.sgd_steps, s.env_steps, self.settings.prefill_steps) or 0.0,
            "policy_lag_versions": s.params_version - data_version,
            "params_version": s.params_version}, "learner/")
        self._curves = (now, s.sgd_steps)

    def rollback(self, metrics) -> None:
        """A non-finite call: back to the newest checkpoint, dropping the calls on top of it."""
        s = self.state
        M.NONFINITE.inc()
        s.bad_in_a_row += 1
        s.pending.clear()
        self.log.error("non-finite update (losses %s): not published; rolling back to checkpoint "
                       "%s (%d in a row)",
                       {k: v for k, v in metrics.items() if not np.isfinite(v)}
                       or "finite, params not", self.checkpointer.latest_step(), s.bad_in_a_row)
        state = self.checkpointer.restore(self.updater.host_state())[0]
        self.updater.load_state(state)
        s.sgd_steps = int(state.steps)
        s.dirty = True
        if s.bad_in_a_row >= MAX_CONSECUTIVE_NONFINITE:
            self.log.error("%d non-finite updates in a row: training diverges (lower the learning "
                           "rates?); exiting", s.bad_in_a_row)
            s.exit_code = 1

    def drain(self) -> bool:
        """Settles every pending call; False if one was non-finite (rolled back)."""
        ok = True
        while self.state.pending:
            ok = self.settle() and ok
        return ok

    # -- the budget ----------------------------------------------------------------------------

    def see_env_steps(self, inserts: Optional[int], at_least: bool = False) -> None:
        """Replay's insert count -> env steps (one item brings env_steps_per_item new ones)."""
        s = self.state
        if inserts is None:
            return
        seen = inserts * self.settings.env_steps_per_item
        s.env_steps = max(s.env_steps, seen) if at_least else seen
        self._env_counter.advance(s.env_steps)
        utd = measured_utd(s.sgd_steps, s.env_steps, self.settings.prefill_steps)
        if utd is not None:
            M.UTD.set(utd)

    def start_owed(self) -> None:
        """At the budget: the update calls still owed for the data received so far, done before
        the final publish."""
        s, cfg = self.state, self.settings
        self.see_env_steps(self.replay_inserts_now(), at_least=True)
        s.owed_calls = update_calls_owed(s.env_steps, s.sgd_steps, prefill_steps=cfg.prefill_steps,
                                         utd=cfg.utd, minibatches_per_call=cfg.minibatches_per_call)
        s.phase = OWED
        self.log.info("budget reached: %d env steps; %d update call(s) owed for the last data",
                      s.env_steps, s.owed_calls)

    # -- the loop ------------------------------------------------------------------------------

    def step(self) -> bool:
        """One turn of the loop: poll replay (train phase), sample, dispatch, settle. False when
        the loop is over (stop set, budget done, or diverged)."""
        s, cfg = self.state, self.settings
        if self.stop.is_set() or s.exit_code:
            return False
        now = self.clock()
        if s.phase == TRAIN and now - self._last_poll > cfg.poll_period_s:
            self._last_poll = now
            self.see_env_steps(self.replay_inserts())
            if s.env_steps >= cfg.total_env_steps:
                if not self.drain():
                    return True   # rolled back (or diverged): the owed count starts from there
                self.start_owed()
        if s.phase == OWED and s.owed_calls - len(s.pending) <= 0:
            if self.drain() and s.owed_calls <= 0:
                s.phase = DONE
                return False
            return True
        while s.pending and s.pending[0][0].finite.is_ready():
            self.settle()   # already done: read it now (its params reach the publisher sooner)
        if s.exit_code:
            return False
        t0 = time.perf_counter()
        try:
            if self._sampler is None:
                self._sampler = self.make_sampler()
            batch = self._sampler.sample(timeout_s=cfg.sample_timeout_s)
            self._backoff.reset()
        except ReplayTimeout:
            M.WAIT_SECONDS.inc(time.perf_counter() - t0)
            self.drain()
            self.checkpoint_if_due()
            self.offer_newest()
            if s.phase == OWED and not s.exit_code:
                self.log.warning("the rate limiter holds the %d update call(s) still owed; "
                                 "stopping without them", s.owed_calls)
                s.phase = DONE
                return False
            return True   # rate limiter: actors have not inserted enough yet
        except (ReplayUnavailable, ConnectionError, OSError) as e:
            delay = self._backoff.next()
            self.log.warning("replay unavailable (%s); retrying in %.1fs", e, delay)
            self.close_sampler()
            self.stop.wait(delay)
            return True
        M.WAIT_SECONDS.inc(time.perf_counter() - t0)
        if not self.usable(batch):
            return True
        self.dispatch(batch)
        while len(s.pending) > 1 and not s.exit_code:
            self.settle()
        if s.pending and (s.update_calls + 1) % cfg.checkpoint_every == 0:
            self.drain()   # the call in flight is due for a checkpoint
        self.checkpoint_if_due()
        return True

    def run(self) -> None:
        """Until stop is set, the budget's owed calls are done, or training diverges."""
        while self.step():
            pass

    def close_sampler(self, timeout_s: Optional[float] = None) -> None:
        if self._sampler is not None:
            if timeout_s is None:
                self._sampler.close()
            else:
                self._sampler.close(timeout_s=timeout_s)   # it may sit in a rate-limited sample
            self._sampler = None

    def finish(self) -> bool:
        """Ends the loop: settles what is in flight (or drops it after divergence), stops the
        publisher, checkpoints the final state and then publishes it (a version published is
        always covered by a checkpoint). At the budget that version is a new one carrying
        finished=1 and the marker is written. True if the run finished."""
        s = self.state
        if s.exit_code:
            s.pending.clear()
        else:
            self.drain()   # a non-finite last call rolls back as in the loop
        self.close_sampler(timeout_s=1.0)
        leftover = self.publisher.stop(timeout_s=self.settings.publish_stop_timeout_s)
        if leftover is not None:
            self.log.info("final: version %d was offered but not published yet", leftover[0])
        finished = s.reached_budget and not s.exit_code
        if not self.state_finite():   # never publish or checkpoint a bad state
            return False
        if s.dirty or finished:
            s.params_version += 1   # not offered yet, or offered without finished=1
        self.checkpoint()
        if self.publisher.published_version < s.params_version:
            finished = self.publish_current(finished) and finished
        self.log.info("final checkpoint at update call %d (sgd_steps=%d), params version %d "
                      "published", s.update_calls, s.sgd_steps, self.publisher.published_version)
        if finished:
            self.mark_finished()
        return finished

    def mark_finished(self) -> None:
        """The run is over: crl_learner_finished = 1, then the marker (atomic): whoever sees the
        marker (the launcher, a test) also sees the gauge."""
        s = self.state
        M.FINISHED.set(1)
        if self.marker_path:
            write_marker(self.marker_path, {
                "env_steps": s.env_steps, "sgd_steps": s.sgd_steps,
                "budget_env_steps": self.settings.total_env_steps,
                "params_version": self.publisher.published_version, "time": time.time()})
        self.log.info("run finished at %d env steps (budget %d): params version %d carries "
                      "finished=1", s.env_steps, self.settings.total_env_steps,
                      self.publisher.published_version)

    def state_finite(self) -> bool:
        st = self.updater.host_state()
        return bool(all_finite((st.actor_params, st.critic_params, st.log_alpha)))

    def summary(self) -> dict:
        """learner_final.json: the counters, SGD steps, UTD and why the loop stopped."""
        s, cfg = self.state, self.settings
        return {**s.counters(), "sgd_steps": s.sgd_steps,
                "utd": measured_utd(s.sgd_steps, s.env_steps, cfg.prefill_steps),
                "utd_target": cfg.utd, "stopped_by": "budget" if s.reached_budget else "signal",
                "exit_code": s.exit_code}
