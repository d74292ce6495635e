"""params.follower.PolicyFollower and params.client.describe_error against real ParameterServers
on 127.0.0.1 (in this process). Polls are driven by hand (follower.poll()) where the test needs
to know what one poll did; the background thread is checked for taking a new version by itself
and for stopping."""
from __future__ import annotations

import logging
import socket
import threading
import time

import grpc
import jax
import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from crl.learning import PROGRESS_KEY, progress_of, progress_template
from helpers import free_port, wait_for
from params import ParameterClient, ParameterServer, PolicyFollower, describe_error
from test_security import TOKEN, make_cert

TIMEOUT_S = 5.0


def policy(v: int, env_steps: int = 0, finished: bool = False):
    """What the learner publishes: actor params (their values tell the version) and progress."""
    return {"actor": {"w": np.full((2, 3), v, np.float32)}, "critic": {"w": np.ones(4, np.float32)},
            PROGRESS_KEY: progress_of(env_steps, 10 * v, finished)}


TEMPLATE = {"actor": {"w": jax.ShapeDtypeStruct((2, 3), np.float32)}, **progress_template()}


class Lines(logging.Handler):
    def __init__(self):
        super().__init__()
        self.lines = []

    def emit(self, record):
        self.lines.append((record.levelname, record.getMessage()))


@pytest.fixture
def server():
    s = ParameterServer("127.0.0.1:0", registry=CollectorRegistry()).start()
    try:
        yield s
    finally:
        s.stop(None)


def follower_of(address: str, template=TEMPLATE, **kw):
    log = logging.getLogger(f"test-follower-{time.monotonic_ns()}")
    log.setLevel(logging.INFO)
    log.addHandler(Lines())
    return PolicyFollower(ParameterClient(address, TIMEOUT_S, template=template), 0.05, log=log,
                          **kw)


def lines(follower):
    return follower.log.handlers[0].lines


def test_follower_holds_the_newest_version_its_params_and_progress(server):
    server.publish(policy(0), 0)
    updates = []
    f = follower_of(server.address, on_update=updates.append)
    try:
        assert f.latest() is None
        assert f.wait_first(threading.Event(), timeout_s=TIMEOUT_S)
        p = f.latest()
        assert p.version == 0 and not p.finished
        assert p.progress == {"env_steps": 0, "sgd_steps": 0, "finished": 0}
        for v in (1, 2, 3):          # published faster than one poll: the newest is taken
            server.publish(policy(v, 100 * v), v)
        wait_for(lambda: f.version == 3, TIMEOUT_S, "the follower's thread to take version 3")
        p = f.latest()
        np.testing.assert_array_equal(np.asarray(p.params["w"]), np.full((2, 3), 3.0))
        assert set(p.params) == {"w"}                     # the actor only, not the critic
        assert p.progress == {"env_steps": 300, "sgd_steps": 30, "finished": 0}
        assert [u.version for u in updates] == sorted({u.version for u in updates})
        assert updates[-1].version == 3
        assert not f.poll() and f.version == 3            # nothing newer: the policy stays
    finally:
        f.close()
    assert not f._thread.is_alive()                       # stopped within close()
    with pytest.raises(ValueError):                       # ... and the client is closed
        f.client.get()


def test_the_final_version_is_held_as_finished(server):
    server.publish(policy(0), 0)
    with follower_of(server.address) as f:
        assert f.poll()
        server.publish(policy(1, 5000, finished=True), 1)
        assert f.poll()
        assert f.latest().finished and f.latest().progress["env_steps"] == 5000


def test_wanted_fetches_actor_params_only_for_wanted_versions_and_always_the_final(server):
    """The evaluator's schedule: a poll reads the progress; the actor params only if wanted."""
    f = follower_of(server.address, wanted=lambda progress: progress["env_steps"] % 1000 == 0)
    with f:
        server.publish(policy(0, 500), 0)
        assert not f.poll()
        assert f.latest() is None and f.newest_version == 0     # progress read, params not
        server.publish(policy(1, 1000), 1)
        assert f.poll() and f.version == 1
        server.publish(policy(2, 1500), 2)
        assert not f.poll() and f.version == 1 and f.newest_version == 2
        server.publish(policy(3, 1700, finished=True), 3)     # not wanted, but the last
        assert f.poll() and f.latest().finished and f.version == 3


def test_a_failed_poll_keeps_the_policy_and_is_reported_once_per_cause():
    port = free_port()
    address = f"127.0.0.1:{port}"
    first = ParameterServer(address, registry=CollectorRegistry()).start()
    errors = []
    f = follower_of(address, on_error=errors.append)
    try:
        first.publish(policy(0), 0)
        assert f.poll()
        first.stop(None)
        for _ in range(3):
            assert not f.poll()
        assert f.version == 0 and f.latest().params is not None   # kept
        assert len(errors) == 3 and f.failures == 3
        warnings = [m for level, m in lines(f) if level == "WARNING"]
        assert len(warnings) == 1, warnings                       # one cause, logged once
        assert "UNAVAILABLE" in warnings[0] and address in warnings[0]
        assert "keeping version 0" in warnings[0]
        again = ParameterServer(address, registry=CollectorRegistry()).start()   # restarted
        try:
            again.publish(policy(5), 5)
            # gRPC waits out its reconnect backoff (about 1 s) before dialling again.
            wait_for(f.poll, 10, "the follower to reach the restarted server")
            assert f.version == 5 and f.failures == 0
            (recovered,) = [m for _, m in lines(f) if "flow again" in m]
            assert int(recovered.split("after ")[1].split()[0]) >= 3, recovered
        finally:
            again.stop(None)
    finally:
        f.close()


def test_a_payload_that_does_not_fit_the_template_is_described_with_the_leaf(server):
    server.publish(policy(0), 0)
    wrong = {"actor": {"w": jax.ShapeDtypeStruct((3, 3), np.float32)}, **progress_template()}
    with follower_of(server.address, template=wrong) as f:
        assert not f.poll() and f.latest() is None
        (warning,) = [m for level, m in lines(f) if level == "WARNING"]
        assert "ParamsMismatchError" in warning and "actor/w" in warning, warning


def test_a_client_without_the_policy_template_is_refused(server):
    with pytest.raises(ValueError, match="policy_template"):
        PolicyFollower(ParameterClient(server.address, TIMEOUT_S), 1.0)
    with pytest.raises(ValueError, match="period_s"):
        PolicyFollower(ParameterClient(server.address, TIMEOUT_S, template=TEMPLATE), 0)


def test_wait_first_ends_on_stop_without_params():
    f = follower_of(f"127.0.0.1:{free_port()}")       # nothing listens
    stop = threading.Event()
    threading.Timer(0.3, stop.set).start()
    with f:
        assert not f.wait_first(stop, timeout_s=60)
        assert any("waiting for the first params" in m for _, m in lines(f))


# -- describe_error: one line, the code's name and its cause --------------------------------------

def _error(client: ParameterClient) -> str:
    with client:
        with pytest.raises(grpc.RpcError) as e:
            client.get()
        return client.describe(e.value)


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory):
    d = tmp_path_factory.mktemp("certs")
    (cert, key), (other, _) = make_cert(d), make_cert(d, names=("learner",), ips=(), stem="other")
    s = ParameterServer("127.0.0.1:0", token=TOKEN, registry=CollectorRegistry(),
                        tls_cert=cert.read_bytes(), tls_key=key.read_bytes()).start()
    s.publish(policy(0), 0)
    try:
        yield s, cert.read_bytes(), other.read_bytes()
    finally:
        s.stop(None)


def test_tls_failures_name_the_certificate_problem(tls_server):
    s, ca, other_ca = tls_server
    addr = f"127.0.0.1:{s.port}"
    why = _error(ParameterClient(addr, TIMEOUT_S, token=TOKEN, tls_ca=other_ca))
    assert why.startswith("UNAVAILABLE: ") and addr in why
    assert "certificate failed verification" in why and "service.tls_ca" in why
    why = _error(ParameterClient(addr, TIMEOUT_S, token=TOKEN, tls_ca=ca,
                                 tls_server_name="elsewhere"))
    assert "does not hold the name" in why and "service.tls_server_name" in why
    why = _error(ParameterClient(addr, TIMEOUT_S, token=TOKEN))           # plaintext client
    assert why.startswith("UNAVAILABLE: ") and "set service.tls_ca" in why
    why = _error(ParameterClient(addr, TIMEOUT_S, tls_ca=ca))             # no token
    assert why.startswith("UNAUTHENTICATED: ") and "token" in why and TOKEN not in why


def test_a_tls_client_of_a_plaintext_server_is_told_it_does_not_speak_tls(server, tls_server):
    _, ca, _ = tls_server
    why = _error(ParameterClient(server.address, TIMEOUT_S, tls_ca=ca))
    assert why.startswith("UNAVAILABLE: ") and "does not speak TLS" in why


def test_unreachable_and_silent_servers_name_the_address():
    addr = f"127.0.0.1:{free_port()}"
    why = _error(ParameterClient(addr, 1.0))
    assert why == f"UNAVAILABLE: params server at {addr} unreachable: nothing listens there " \
                  "(learner down or restarting)"
    with socket.socket() as sink:        # accepts TCP, never speaks HTTP/2: the deadline fires
        sink.bind(("127.0.0.1", 0))
        sink.listen(8)
        addr = f"127.0.0.1:{sink.getsockname()[1]}"
        why = _error(ParameterClient(addr, 1.0))
    assert addr in why
    assert why.startswith(("DEADLINE_EXCEEDED: no answer from the params server at "
                           f"{addr} within 1 s", "UNAVAILABLE: "))
    assert describe_error(RuntimeError("boom"), addr) == f"RuntimeError: boom (params server at " \
                                                         f"{addr})"
