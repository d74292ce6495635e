"""The learner's Prometheus metrics (names: docs/monitoring.md; counters end in `_total`, durations
in `_duration_seconds`). Defined once per process; the loop (learner/loop.py) and the role
(learner/role.py) update them."""
from __future__ import annotations

from typing import Dict

import prometheus_client as prom

SGD_STEPS = prom.Counter("crl_learner_sgd_steps_total",
                         "SGD steps taken (minibatches); after a restart it starts from the "
                         "checkpoint's count, and steps redone after a rollback are not counted twice")
ENV_STEPS = prom.Counter("crl_learner_env_steps_total",
                         "Env steps replay has received, as the learner last saw them (never goes "
                         "backwards: a replay restored from an older checkpoint holds it still)")
CALLS = prom.Counter("crl_learner_update_calls_total", "Compiled update calls")
SAMPLES = prom.Counter("crl_learner_segments_sampled_total", "Segments sampled from replay")
WAIT_SECONDS = prom.Counter("crl_learner_wait_seconds_total", "Time waiting for replay samples")
COMPUTE_SECONDS = prom.Counter("crl_learner_compute_seconds_total",
                               "Time the update loop spends dispatching updates and waiting for them")
UTD = prom.Gauge("crl_learner_utd", "Measured gradient steps per env step after the prefill")
UTD_TARGET = prom.Gauge("crl_learner_utd_target", "Configured gradient steps per env step")
VERSION = prom.Gauge("crl_learner_params_version", "Newest published params version")
LAG = prom.Gauge("crl_learner_policy_lag", "Params version minus the mean version of the sampled data")
PUBLISH_SECONDS = prom.Histogram("crl_learner_publish_duration_seconds",
                                 "Time to publish params (on the publisher thread)",
                                 buckets=(0.001, 0.01, 0.05, 0.1, 0.5, 1, 2, 5))
CHECKPOINT_SECONDS = prom.Gauge("crl_learner_checkpoint_duration_seconds",
                                "Time the loop spent on the last checkpoint (periodic ones are "
                                "written in the background after that)")
CHECKPOINT_ERRORS = prom.Counter("crl_learner_checkpoint_errors_total",
                                 "Checkpoint saves that failed (disk full, volume gone)")
NONFINITE = prom.Counter("crl_learner_nonfinite_updates_total",
                         "Updates whose loss or params were NaN/Inf (dropped, state rolled back)")
REPLAY_UP = prom.Gauge("crl_learner_replay_up", "1 if replay answered the last poll (every 1 s)")
NONFINITE_SEGMENTS = prom.Counter("crl_learner_nonfinite_segments_total",
                                  "Sampled segments holding NaN/Inf (batch dropped, items deleted)")
NONFINITE_PUBLISH = prom.Counter("crl_learner_nonfinite_publish_refused_total",
                                 "Params snapshots the publisher refused because they held NaN/Inf")
FINISHED = prom.Gauge("crl_learner_finished",
                      "1 once the run reached its env-step budget and the final params (finished=1) "
                      "are published")
BUDGET = prom.Gauge("crl_learner_budget_env_steps", "The run's env-step budget "
                    "(learner.total_env_steps)")

_UPDATE_GAUGES: Dict[str, prom.Gauge] = {}


def update_metric(name: str) -> prom.Gauge:
    """The Gauge crl_learner_<name> of one metric of the update (critic_loss, alpha, ...), made
    the first time that metric is seen."""
    gauge = _UPDATE_GAUGES.get(name)
    if gauge is None:
        gauge = _UPDATE_GAUGES[name] = prom.Gauge(f"crl_learner_{name}",
                                                  f"{name} of the last update call (mean over "
                                                  "its SGD steps)")
    return gauge


class HighWater:
    """Feeds a Counter from a value that may go backwards (SGD steps after a rollback, env steps
    of a replay restored from an older checkpoint): it counts the positive deltas past the
    highest value seen, so the counter never goes backwards and never counts a step twice."""

    def __init__(self, counter: prom.Counter):
        self.counter, self.seen = counter, 0

    def advance(self, value: int) -> None:
        if value > self.seen:
            self.counter.inc(value - self.seen)
            self.seen = value
