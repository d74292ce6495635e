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

from params import (ParameterClient, ParameterServer, ParamsMismatchError,
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
    assert registry.get_sample_value("crl_params_publish_duration_seconds_count") == 1
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


def test_a_stream_after_the_server_stopped_fails_within_the_deadline(registry):
    """A learner that stopped serving (or died) after a client's fetch: the next GetParams
    fails within its deadline. With gRPC's default channel thread it hung for good (grpcio
    1.62), ignoring the deadline and cancel(): the client reads streams on its own thread."""
    address = f"127.0.0.1:{_free_port()}"
    s = ParameterServer(address, registry=registry).start()
    s.publish(small_params(), 1)
    with ParameterClient(address, timeout_s=1.0) as c:
        assert c.get()[0] == 1
        s.stop(None)
        for _ in range(2):
            t0 = time.monotonic()
            with pytest.raises(grpc.RpcError) as e:
                c.get()
            assert time.monotonic() - t0 < 3.0
            assert e.value.code() in (grpc.StatusCode.UNAVAILABLE,
                                      grpc.StatusCode.DEADLINE_EXCEEDED)
        with ParameterClient(address, timeout_s=1.0) as fresh:   # a new channel alike
            with pytest.raises(grpc.RpcError):
                fresh.get()


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
    from params import PROTOCOL_VERSION
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


# ---------------------------------------------------------------------------------------------
# Fast path: pre-serialised data messages, in-place reads, incremental sha256, bf16 wire, host
# cache, server threads.

def _big_params(n: int = 700_000):
    """About 2.8 MB of actor params: 3 chunks at max_message_mb=1."""
    rng = np.random.default_rng(1)
    return {"actor": {"w": rng.standard_normal((n,), dtype=np.float32),
                      "steps": np.arange(5, dtype=np.int32),
                      "b": rng.standard_normal((3, 7)).astype(np.float32)},
            "critic": {"w": np.ones((4, 4), np.float32)}}


def test_data_messages_are_byte_for_byte_what_protobuf_writes(server):
    from params.wire import _chunk_data, _encode_data
    for n in (0, 1, 127, 128, 300, 16384, 2_000_000):
        data = bytes(range(256)) * (n // 256) + bytes(n % 256)
        raw = _encode_data(memoryview(data))
        assert raw == params_pb2.ParamsChunk(data=data).SerializeToString()
        assert bytes(_chunk_data(raw)) == data
    # A stock protobuf stub reads the pre-serialised stream.
    params = _big_params()
    server.publish(params, 1)
    channel = grpc.insecure_channel(server.address)
    try:
        msgs = list(params_pb2_grpc.ParameterServiceStub(channel).GetParams(
            params_pb2.GetParamsRequest(subset=["actor"]), timeout=TIMEOUT_S))
    finally:
        channel.close()
    h = msgs[0].header
    assert h.num_chunks == len(msgs) - 1 == 3 and h.wire_dtype == ""
    payload = b"".join(m.data for m in msgs[1:])
    assert len(payload) == h.total_bytes
    import hashlib
    assert hashlib.sha256(payload).digest() == h.sha256


def test_chunk_data_reads_any_valid_encoding_and_refuses_others():
    from params.wire import ParamsIntegrityError, _chunk_data
    # Not the server's layout but valid protobuf: an unknown field after the data, or the data
    # field twice (the last wins).
    unknown = params_pb2.ParamsChunk(data=b"abc").SerializeToString() + b"\x78\x01"
    assert bytes(_chunk_data(unknown)) == b"abc"
    twice = (params_pb2.ParamsChunk(data=b"x").SerializeToString()
             + params_pb2.ParamsChunk(data=b"yz").SerializeToString())
    assert bytes(_chunk_data(twice)) == b"yz"
    header = params_pb2.ParamsChunk(header=params_pb2.ParamsHeader(version=1))
    with pytest.raises(ParamsIntegrityError, match="second header"):
        _chunk_data(header.SerializeToString())
    for bad in (b"\x12\x05ab", b"\x12\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01", b"\xff"):
        with pytest.raises(ParamsIntegrityError):
            _chunk_data(bad)


@pytest.mark.parametrize("damage", ["flip", "drop", "swap"])
def test_damaged_chunk_is_refused_by_the_incremental_hash(server, monkeypatch, damage):
    import params.wire as ps
    from params import ParamsIntegrityError
    real = ps._View.messages

    def damaged(self, chunk_bytes, memo):
        msgs = list(real(self, chunk_bytes, memo=False))
        if damage == "flip":
            raw = bytearray(msgs[1][0])
            raw[len(raw) // 2] ^= 0x01
            msgs[1] = (bytes(raw), msgs[1][1])
        elif damage == "drop":
            del msgs[1]
        else:
            msgs[0], msgs[1] = msgs[1], msgs[0]
        return iter(msgs)

    monkeypatch.setattr(ps._View, "messages", damaged)
    server.publish(_big_params(), 1)
    with ParameterClient(server.address, TIMEOUT_S, max_message_mb=1) as c:
        with pytest.raises(ParamsIntegrityError, match="sha256 mismatch|ended at"):
            c.get(subset="actor")
    monkeypatch.setattr(ps._View, "messages", real)
    with ParameterClient(server.address, TIMEOUT_S, max_message_mb=1) as c:
        assert c.get(subset="actor")[0] == 1


def test_bf16_wire_round_trip_within_bf16_precision(server, registry):
    import ml_dtypes
    params = _big_params()
    template = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), params)
    server.publish(params, 1)
    sent = lambda: registry.get_sample_value("crl_params_sent_bytes_total") or 0  # noqa: E731
    with ParameterClient(server.address, TIMEOUT_S, template=template, max_message_mb=1,
                         wire_dtype="bfloat16") as c:
        before = sent()
        version, got = c.get(subset="actor")
        wire_bytes = sent() - before
    assert version == 1 and set(got) == {"actor"}
    a, p = got["actor"], params["actor"]
    assert a["w"].dtype == ml_dtypes.bfloat16 and a["b"].dtype == ml_dtypes.bfloat16
    assert a["steps"].dtype == np.int32 and np.array_equal(a["steps"], p["steps"])
    for k in ("w", "b"):
        assert a[k].shape == p[k].shape
        # Exactly numpy's round-to-nearest-even, so within half a bf16 ulp (2^-9 relative).
        assert np.array_equal(a[k].view(np.uint16),
                              p[k].astype(ml_dtypes.bfloat16).view(np.uint16))
        np.testing.assert_allclose(a[k].astype(np.float32), p[k], rtol=2.0 ** -8, atol=0)
    assert wire_bytes == (p["w"].nbytes + p["b"].nbytes) // 2 + p["steps"].nbytes
    # The template is still checked in the published dtypes: a wrong shape names the leaf, and a
    # template that already says bfloat16 does not match float32 params.
    wrong = dict(template, actor=dict(template["actor"],
                                      b=jax.ShapeDtypeStruct((3, 8), np.float32)))
    bf16_template = dict(template, actor=dict(template["actor"],
                                              b=jax.ShapeDtypeStruct((3, 7), ml_dtypes.bfloat16)))
    for t, leaf in ((wrong, "actor/b"), (bf16_template, "actor/b")):
        with ParameterClient(server.address, TIMEOUT_S, template=t, max_message_mb=1,
                             wire_dtype="bfloat16") as c:
            with pytest.raises(ParamsMismatchError) as e:
                c.get(subset="actor")
            assert e.value.leaf == leaf
    # float32 clients of the same version still get it bit-exact.
    with ParameterClient(server.address, TIMEOUT_S, template=template, max_message_mb=1) as c:
        _, exact = c.get(subset="actor")
    _assert_tree_equal(exact["actor"], params["actor"])
    with pytest.raises(ValueError, match="wire_dtype"):
        ParameterClient(server.address, TIMEOUT_S, wire_dtype="float16")
    channel = grpc.insecure_channel(server.address)
    try:
        with pytest.raises(grpc.RpcError) as e:
            list(params_pb2_grpc.ParameterServiceStub(channel).GetParams(
                params_pb2.GetParamsRequest(wire_dtype="fp8"), timeout=TIMEOUT_S))
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "wire_dtype" in e.value.details()
    finally:
        channel.close()


def test_host_cache_fetches_once_per_host_and_version(server, registry, tmp_path):
    cache = str(tmp_path / "cache")
    params = _big_params()
    template = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), params)
    sent = lambda: registry.get_sample_value("crl_params_sent_bytes_total") or 0  # noqa: E731
    actor_bytes = sum(a.nbytes for a in params["actor"].values())
    clients = [ParameterClient(server.address, TIMEOUT_S, template=template, max_message_mb=1,
                               host_cache=cache) for _ in range(4)]
    try:
        assert all(c.get(subset="actor") is None for c in clients)    # nothing published
        server.publish(params, 1)
        results = [None] * len(clients)

        def fetch(i):
            results[i] = clients[i].get(subset="actor")

        threads = [threading.Thread(target=fetch, args=(i,)) for i in range(len(clients))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert sent() == actor_bytes                          # one stream for four clients
        for version, got in results:
            assert version == 1
            _assert_tree_equal(got["actor"], params["actor"])
        results[0][1]["actor"]["w"][:3] = 7.0                  # writable, and private:
        for _, got in results[1:] + [clients[0].get(subset="actor")]:
            assert np.array_equal(got["actor"]["w"][:3], params["actor"]["w"][:3])
        assert sent() == actor_bytes
        assert all(c.get(min_version=1, subset="actor") is None for c in clients)
        params["actor"]["b"] = params["actor"]["b"] + 1
        server.publish(params, 2)
        for c in clients:
            version, got = c.get(min_version=1, subset="actor")
            assert version == 2 and np.array_equal(got["actor"]["b"], params["actor"]["b"])
            assert got["actor"]["w"][0] == params["actor"]["w"][0]
        assert sent() == 2 * actor_bytes
        # A damaged entry (here: cut short) is never served: the next fetch goes to the server.
        (entry,) = [p for p in (tmp_path / "cache").iterdir() if p.suffix == ".params"]
        entry.write_bytes(entry.read_bytes()[:-10])
        version, got = clients[0].get(min_version=1, subset="actor")
        assert version == 2 and np.array_equal(got["actor"]["w"], params["actor"]["w"])
        assert sent() == 3 * actor_bytes
        # Other subsets and wire dtypes are separate entries.
        _, got = clients[1].get(subset="all")
        assert set(got) == {"actor", "critic"}
    finally:
        for c in clients:
            c.close()
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o777)
    shared.chmod(0o777)
    with pytest.raises(ValueError, match="not writable by group or others"):
        ParameterClient(server.address, TIMEOUT_S, host_cache=str(shared))


def test_server_threads_and_service_config_fields(registry):
    import dataclasses
    from crl import config as C
    from params import client_from_config, server_from_config
    with pytest.raises(ValueError, match="max_workers"):
        ParameterServer("127.0.0.1:0", max_workers=0, registry=registry)
    cfg = C.Config()
    for kw, field_name in ((dict(params_max_workers=0), "params_max_workers"),
                           (dict(params_host_cache="rel/dir"), "params_host_cache"),
                           (dict(params_wire_dtype="float16"), "params_wire_dtype")):
        with pytest.raises((C.ConfigError, ValueError), match=field_name):
            if field_name == "params_wire_dtype":
                C.override(cfg, {"service.params_wire_dtype": "float16"})
            else:
                C.validate(dataclasses.replace(cfg, service=dataclasses.replace(cfg.service, **kw)))
    cfg = C.override(cfg, {"service.params_max_workers": 3,
                           "service.params_wire_dtype": "bfloat16"})
    server = server_from_config(cfg, "127.0.0.1:0", registry=registry)
    assert server._max_workers == 3
    client = client_from_config(cfg)
    assert client.wire_dtype == "bfloat16" and client._cache is None
    client.close()


def test_unread_streams_cannot_starve_health_or_other_clients(registry):
    """Clients that open GetParams streams and never read them (each holds an RPC thread until
    its last chunk is out) get at most streams_per_client per connection and max_workers - 4 in
    all; Health and other clients keep being answered; the held streams are cancelled at the
    send deadline."""
    server = ParameterServer("127.0.0.1:0", registry=registry, max_workers=8, max_message_mb=1,
                             streams_per_client=2, stream_deadline_s=4.0).start()
    server.publish({"actor": {"w": np.ones((4_000_000,), np.float32)}}, 1)   # 16 MB
    hogs, calls = [], []
    try:
        for _ in range(4):                       # 4 connections x 5 streams, none read
            ch = grpc.insecure_channel(server.address)
            stub = params_pb2_grpc.ParameterServiceStub(ch)
            hogs.append(ch)
            for _ in range(5):
                calls.append(stub.GetParams(params_pb2.GetParamsRequest(min_version=-1),
                                            timeout=60))
        time.sleep(1.0)                          # the admitted ones block on flow control
        refused = 0
        for c in calls:                          # the first message of each: header or refusal
            try:
                next(c)
            except grpc.RpcError as e:
                assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, e
                assert "too many params streams" in e.details()
                refused += 1
        assert refused >= 20 - 4                  # at most max_workers - 4 held
        with ParameterClient(server.address, timeout_s=2.0) as good:
            t0 = time.monotonic()
            assert good.health()["version"] == 1 and time.monotonic() - t0 < 2.0
            assert good.get(min_version=1) is None           # "not modified" still answered
        time.sleep(4.5)                           # past the send deadline: the hogs are cut
        assert registry.get_sample_value("crl_params_expired_streams_total") >= 1
        with ParameterClient(server.address, timeout_s=10.0) as good:
            version, tree = good.get(subset="actor")
            assert version == 1 and tree["actor"]["w"].shape == (4_000_000,)
        assert registry.get_sample_value("crl_params_refused_streams_total") == refused
    finally:
        for c in calls:
            c.cancel()
        for ch in hogs:
            ch.close()
        server.stop(None)
