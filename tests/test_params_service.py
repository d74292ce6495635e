"""ParameterService: real gRPC servers on 127.0.0.1 (free ports), real clients."""
from __future__ import annotations

import socket
import threading
import time

import grpc
import jax
import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from crl.params_service import (ParameterClient, ParameterServer, ParamsMismatchError,
                                signature_hash, specs_of)
from protos import params_pb2, params_pb2_grpc

TIMEOUT_S = 5.0


def small_params(scale: float = 1.0):
    return {
        "actor": {"trunk": {"kernel": np.full((3, 4), scale, np.float32),
                            "bias": np.arange(4, dtype=np.float32)},
                  "head": {"kernel": np.ones((4, 2), np.float32)}},
        "critic": {"sa": {"kernel": np.zeros((5, 6), np.float32)},
                   "g": {"kernel": np.full((2, 6), scale, np.float32)}},
        "alpha": np.float32(0.25),
    }


@pytest.fixture
def registry():
    return CollectorRegistry()


@pytest.fixture
def server(registry):
    s = ParameterServer("127.0.0.1:0", max_message_mb=1, registry=registry).start()
    try:
        yield s
    finally:
        s.stop(None)


@pytest.fixture
def client(server):
    c = ParameterClient(server.address, TIMEOUT_S, max_message_mb=1)
    try:
        yield c
    finally:
        c.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _assert_tree_equal(a, b):
    la, ta = jax.tree_util.tree_flatten(a)
    lb, tb = jax.tree_util.tree_flatten(b)
    assert ta == tb
    for x, y in zip(la, lb):
        x, y = np.asarray(x), np.asarray(y)
        assert x.shape == y.shape and x.dtype == y.dtype
        assert np.array_equal(x, y)


def test_round_trip_50m_params_bit_exact(registry):
    rng = np.random.default_rng(0)
    n_total = 50_000_000
    params = {
        "actor": {"blocks": {"kernel": rng.standard_normal((256, 1024), dtype=np.float32)},
                  "steps": np.arange(7, dtype=np.int32)},
        "critic": {f"layer_{i}": {"kernel": rng.standard_normal((n_total // 4,),
                                                                dtype=np.float32)}
                   for i in range(4)},
        "alpha": np.float32(-0.5),
    }
    # NaN payloads and signed zeros must come back bit-for-bit.
    params["critic"]["layer_0"]["kernel"][:3] = [np.nan, -0.0, np.inf]
    n_params = sum(np.size(x) for x in jax.tree_util.tree_leaves(params))
    assert n_params >= 50_000_000
    with ParameterServer("127.0.0.1:0", max_message_mb=4, registry=registry) as server:
        t0 = time.perf_counter()
        server.publish(params, 1)
        t_publish = time.perf_counter() - t0
        with ParameterClient(server.address, 60.0, template=params) as client:
            t0 = time.perf_counter()
            version, got = client.get(subset="all")
            t_get = time.perf_counter() - t0
    assert version == 1
    for x, y in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(got)):
        x, y = np.asarray(x), np.asarray(y)
        assert x.shape == y.shape and x.dtype == y.dtype
        assert x.tobytes() == y.tobytes()            # bit-exact, NaN payloads included
    sent = registry.get_sample_value("crl_params_sent_bytes_total")
    assert sent == n_params * 4   # every leaf here is 4 bytes wide; streamed in >= 48 chunks
    print(f"\n50M-param round trip: {n_params / 1e6:.1f}M params, {sent / 1e6:.0f} MB, "
          f"publish {t_publish:.2f} s, get {t_get:.2f} s")


def test_newer_than_v_and_monotonic_versions(server, client):
    assert client.get(min_version=-1) is None          # nothing published yet
    server.publish(small_params(1.0), 3)
    version, got = client.get(min_version=-1)
    assert version == 3
    assert client.get(min_version=3) is None           # exclusive
    assert client.get(min_version=10) is None
    server.publish(small_params(2.0), 4)
    version, got = client.get(min_version=3)
    assert version == 4
    assert np.all(got["actor"]["trunk"]["kernel"] == 2.0)
    for bad in (4, 2):
        with pytest.raises(ValueError, match="strictly increase"):
            server.publish(small_params(), bad)
    with pytest.raises(ValueError, match="must be an int"):
        server.publish(small_params(), True)
    assert server.version == 4


def test_actor_subset_returns_only_actor(server, client):
    params = small_params()
    server.publish(params, 1)
    version, got = client.get(subset="actor")
    assert version == 1 and set(got) == {"actor"}
    _assert_tree_equal(got["actor"], params["actor"])
    _, got = client.get(subset=["actor", "alpha"])
    assert set(got) == {"actor", "alpha"} and got["alpha"].shape == ()
    _, got = client.get(subset="all")
    _assert_tree_equal(got, jax.tree_util.tree_map(np.asarray, params))


def test_template_mismatch_names_leaf_and_shapes(server):
    params = small_params()
    server.publish(params, 1)
    wrong = small_params()
    wrong["actor"]["trunk"]["kernel"] = np.zeros((3, 8), np.float32)
    with ParameterClient(server.address, TIMEOUT_S, template=wrong) as c:
        with pytest.raises(ParamsMismatchError) as e:
            c.get(subset="actor")
    assert e.value.leaf == "actor/trunk/kernel"
    assert e.value.server_shape == (3, 4) and e.value.expected_shape == (3, 8)
    assert "actor/trunk/kernel" in str(e.value) and "(3, 4)" in str(e.value) \
        and "(3, 8)" in str(e.value)

    missing = small_params()
    del missing["actor"]["head"]
    with ParameterClient(server.address, TIMEOUT_S, template=missing) as c:
        with pytest.raises(ParamsMismatchError, match="actor/head/kernel"):
            c.get(subset="actor")

    dtype = small_params()
    dtype["actor"]["head"]["kernel"] = np.ones((4, 2), np.float64)
    with ParameterClient(server.address, TIMEOUT_S, template=dtype) as c:
        with pytest.raises(ParamsMismatchError, match="float64"):
            c.get(subset="actor")

    # A matching template (ShapeDtypeStructs, full tree while asking for the actor) works and
    # the result has the template's structure.
    template = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(np.shape(x),
                                                                     np.asarray(x).dtype), params)
    with ParameterClient(server.address, TIMEOUT_S, template=template) as c:
        version, got = c.get(subset="actor")
    assert version == 1 and set(got) == {"actor"}
    _assert_tree_equal(got["actor"], params["actor"])


def test_bad_requests_get_clear_errors_and_server_keeps_serving(server, client):
    server.publish(small_params(), 1)
    with pytest.raises(grpc.RpcError) as e:
        client.get(subset="nope")
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "nope" in e.value.details() and "actor" in e.value.details()

    channel = grpc.insecure_channel(server.address)
    stub = params_pb2_grpc.ParameterServiceStub(channel)

    def call(**kw):
        with pytest.raises(grpc.RpcError) as e:
            list(stub.GetParams(params_pb2.GetParamsRequest(**kw), timeout=TIMEOUT_S))
        return e.value

    err = call(subset=["actor/trunk"])
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "malformed" in err.details()
    err = call(subset=["actor", "actor"])
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "repeats" in err.details()
    err = call(subset=["actor"], expected_signature_sha256="zz")
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "hex" in err.details()
    err = call(subset=["actor"], expected_signature_sha256=signature_hash([("x", (1,), "f")]))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION and "mismatch" in err.details()
    err = call(subset=["actor"], expected_leaves=[
        params_pb2.LeafSpec(name="actor/head/kernel", shape=[9, 9], dtype="float32")])
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "actor/head/kernel" in err.details() and "(9, 9)" in err.details()
    err = call(min_version=-1, expected_leaves=[               # ~2 MB request > 1 MiB limit
        params_pb2.LeafSpec(name="x" * 1000, shape=[1], dtype="float32")] * 2000)
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    with pytest.raises(grpc.RpcError) as e:                    # not a GetParamsRequest at all
        channel.unary_stream("/crl.params.ParameterService/GetParams")(
            b"\xff\xff\xff", timeout=TIMEOUT_S).next()
    assert e.value.code() == grpc.StatusCode.INTERNAL and "deserializ" in e.value.details()
    channel.close()
    with pytest.raises(ValueError):                            # client-side validation
        client.get(subset="")

    version, got = client.get(subset="actor")                  # still serving
    assert version == 1 and set(got) == {"actor"}
    assert client.health()["serving"]


def test_health_reports_serving_and_version(server, client):
    h = client.health()
    assert h["serving"] and not h["ready"] and h["version"] == -1
    server.publish(small_params(), 7)
    h = client.health()
    assert h["serving"] and h["ready"] and h["version"] == 7
    assert h["keys"] == ["actor", "alpha", "critic"] and h["num_leaves"] == 6
    assert h["payload_bytes"] == (12 + 4 + 8 + 30 + 12 + 1) * 4


def test_metrics(server, client, registry):
    assert registry.get_sample_value("crl_params_version") == -1
    server.publish(small_params(), 5)
    assert registry.get_sample_value("crl_params_version") == 5
    assert registry.get_sample_value("crl_params_payload_bytes") == 67 * 4
    assert registry.get_sample_value("crl_params_publish_latency_seconds_count") == 1
    client.get(min_version=-1)
    client.get(min_version=5)
    with pytest.raises(grpc.RpcError):
        client.get(subset="nope")
    count = lambda r: registry.get_sample_value(  # noqa: E731
        "crl_params_requests_total", {"method": "GetParams", "result": r})
    assert count("ok") == 1 and count("not_modified") == 1 and count("invalid_argument") == 1


def test_token_auth(registry):
    with ParameterServer("127.0.0.1:0", token="s3cret", registry=registry) as server:
        server.publish(small_params(), 1)
        for token in (None, "wrong"):
            with ParameterClient(server.address, TIMEOUT_S, token=token) as c:
                with pytest.raises(grpc.RpcError) as e:
                    c.get()
                assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
                assert "token" in e.value.details()
                assert c.health()["serving"]                   # probes need no token
        with ParameterClient(server.address, TIMEOUT_S, token="s3cret") as c:
            version, got = c.get()
            assert version == 1 and set(got) == {"actor"}


def test_dead_address_fails_within_timeout():
    # Nothing listening: refused at once (UNAVAILABLE) or at the deadline, never a hang.
    with ParameterClient(f"127.0.0.1:{_free_port()}", timeout_s=1.0) as c:
        t0 = time.monotonic()
        with pytest.raises(grpc.RpcError) as e:
            c.get()
        assert time.monotonic() - t0 < 3.0
        assert e.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
        with pytest.raises(grpc.RpcError):
            c.health()
    # A socket that accepts TCP but never speaks HTTP/2: the deadline must fire.
    with socket.socket() as sink:
        sink.bind(("127.0.0.1", 0))
        sink.listen(8)
        with ParameterClient(f"127.0.0.1:{sink.getsockname()[1]}", timeout_s=1.0) as c:
            t0 = time.monotonic()
            with pytest.raises(grpc.RpcError) as e:
                c.get()
            assert time.monotonic() - t0 < 3.0
            assert e.value.code() in (grpc.StatusCode.DEADLINE_EXCEEDED,
                                      grpc.StatusCode.UNAVAILABLE)


def test_wait_for_version(server, client):
    with pytest.raises(TimeoutError, match="version 0"):
        t0 = time.monotonic()
        client.wait_for_version(0, deadline_s=0.5)
    assert time.monotonic() - t0 < 2.0
    timer = threading.Timer(0.3, server.publish, args=(small_params(), 1))
    timer.start()
    version, got = client.wait_for_version(0, deadline_s=TIMEOUT_S)
    timer.join()
    assert version == 1 and set(got) == {"actor"}


def test_readers_see_whole_versions_while_publishing(server):
    """Concurrent publishes never expose a half-written or mixed version."""
    def params(v):
        p = small_params(float(v))
        p["critic"]["g"]["kernel"] = np.full((640, 1024), v, np.float32)   # 2.5 MiB: 3 chunks
        return p

    server.publish(params(0), 0)
    stop = threading.Event()

    def publisher():
        for v in range(1, 30):
            server.publish(params(v), v)
            time.sleep(0.01)
        stop.set()

    errors, seen = [], set()

    def reader():
        with ParameterClient(server.address, TIMEOUT_S, max_message_mb=1) as c:
            while not stop.is_set():
                version, got = c.get(subset="all")
                seen.add(version)
                for leaf in (got["actor"]["trunk"]["kernel"], got["critic"]["g"]["kernel"]):
                    if not np.all(leaf == version):
                        errors.append(version)

    threads = [threading.Thread(target=reader) for _ in range(2)]
    for t in threads:
        t.start()
    publisher()
    for t in threads:
        t.join(TIMEOUT_S)
    assert not errors and seen


def test_publish_validation(server):
    with pytest.raises(ValueError, match="'/'"):
        server.publish({"actor": {"a/b": np.zeros(2)}}, 1)
    with pytest.raises(ValueError, match="reserved"):
        server.publish({"all": np.zeros(2)}, 1)
    with pytest.raises(ValueError, match="bare array"):
        server.publish(np.zeros(3), 1)
    with pytest.raises(ValueError, match=">= 0"):
        server.publish(small_params(), -2)
    with pytest.raises(ValueError, match="numeric"):
        server.publish({"actor": np.array(["a"])}, 1)
    assert server.version == -1
    # jax arrays and bfloat16 leaves are fine
    p = {"actor": {"w": jax.numpy.arange(6, dtype=jax.numpy.bfloat16).reshape(2, 3)}}
    server.publish(p, 1)
    with ParameterClient(server.address, TIMEOUT_S, template=p) as c:
        _, got = c.get()
    assert got["actor"]["w"].dtype == np.asarray(p["actor"]["w"]).dtype
    assert np.array_equal(np.asarray(got["actor"]["w"]), np.asarray(p["actor"]["w"]))
    assert specs_of(got) == specs_of(p)


def test_taken_port_fails_to_bind(server, registry):
    with pytest.raises(RuntimeError, match="bind"):
        ParameterServer(server.address, registry=registry).start()


def test_unknown_subset_is_an_error_even_when_not_newer(server, client):
    server.publish(small_params(), 2)
    with pytest.raises(grpc.RpcError) as e:
        client.get(min_version=2, subset=["critic", "pi"])
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "'pi'" in e.value.details()
    _, got = client.get(subset=["critic", "actor"])            # any order: payload order
    assert sorted(got) == ["actor", "critic"]


def test_wrong_protocol_version_and_min_version_are_refused_with_a_message(server, client):
    from crl.params_service import PROTOCOL_VERSION
    server.publish(small_params(), 2)
    channel = grpc.insecure_channel(server.address)
    stub = params_pb2_grpc.ParameterServiceStub(channel)
    try:
        with pytest.raises(grpc.RpcError) as e:
            list(stub.GetParams(params_pb2.GetParamsRequest(
                protocol_version=PROTOCOL_VERSION + 1, subset=["actor"]), timeout=TIMEOUT_S))
        assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert f"protocol version {PROTOCOL_VERSION + 1}" in e.value.details()
        assert f"server speaks {PROTOCOL_VERSION}" in e.value.details()
        with pytest.raises(grpc.RpcError) as e:
            list(stub.GetParams(params_pb2.GetParamsRequest(min_version=-5), timeout=TIMEOUT_S))
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "min_version = -5" in e.value.details()
        # An old client (field unset = 0) is served as version 1.
        chunks = list(stub.GetParams(params_pb2.GetParamsRequest(subset=["actor"]),
                                     timeout=TIMEOUT_S))
        assert chunks[0].header.version == 2
        assert stub.Health(params_pb2.HealthRequest(), timeout=TIMEOUT_S).protocol_version == \
            PROTOCOL_VERSION
    finally:
        channel.close()
    assert client.get(subset="actor")[0] == 2                 # still serving
