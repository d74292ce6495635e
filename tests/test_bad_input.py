"""Bad input: every bad ParameterService request gets a gRPC error status with a message and the
server keeps serving everyone else; a bounded random-bytes fuzz leaves it answering a good client;
the replay writer refuses segments that do not match the table signature.

Elsewhere: bad configs (>= 20, each with its message) in tests/test_config.py; the writer against a
live server (mismatched shapes/dtypes/fields refused, server dims checked) in
tests/test_replay.py::test_writer_refuses_mismatched_segments.
"""
from __future__ import annotations

import random
import threading
import time

import grpc
import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from params import PROTOCOL_VERSION, ParameterClient, ParameterServer, signature_hash
from protos import params_pb2

TIMEOUT_S = 5.0
FUZZ_REQUESTS = 600
FUZZ_SECONDS = 20.0
TOKEN = "fuzz-token-123"
METHOD = "/crl.params.ParameterService/GetParams"
HEALTH = "/crl.params.ParameterService/Health"
# Statuses a handled bad request may get. UNKNOWN would mean an exception escaped the servicer.
HANDLED = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION,
           grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAUTHENTICATED,
           grpc.StatusCode.INTERNAL}   # INTERNAL: gRPC could not deserialise the bytes at all


def params(scale=1.0):
    return {"actor": {"w": np.full((64, 32), scale, np.float32), "b": np.zeros(32, np.float32)},
            "critic": {"w": np.ones((32, 16), np.float32)}}


@pytest.fixture
def server():
    s = ParameterServer("127.0.0.1:0", max_message_mb=1, token=TOKEN,
                        registry=CollectorRegistry()).start()
    s.publish(params(), 1)
    try:
        yield s
    finally:
        s.stop(None)


def raw_call(address, payload: bytes, method=METHOD, token=TOKEN, timeout=TIMEOUT_S):
    """Sends raw bytes as the request; returns (status code, details)."""
    with grpc.insecure_channel(address) as ch:
        md = (("authorization", f"Bearer {token}"),) if token else ()
        try:
            if method == HEALTH:
                ch.unary_unary(method)(payload, timeout=timeout, metadata=md)
            else:
                for _ in ch.unary_stream(method)(payload, timeout=timeout, metadata=md):
                    pass
            return grpc.StatusCode.OK, ""
        except grpc.RpcError as e:
            return e.code(), e.details() or ""


def req(**kw) -> bytes:
    return params_pb2.GetParamsRequest(**kw).SerializeToString()


@pytest.mark.parametrize("kind, payload, code, message", [
    ("malformed: not a protobuf", b"\xff\xff\xff\x07", grpc.StatusCode.INTERNAL, "deserializ"),
    ("malformed: subset path", req(subset=["actor/w"]), grpc.StatusCode.INVALID_ARGUMENT,
     "malformed subset key"),
    ("malformed: repeated key", req(subset=["actor", "actor"]), grpc.StatusCode.INVALID_ARGUMENT,
     "repeats"),
    ("malformed: unknown subset", req(subset=["nope"]), grpc.StatusCode.INVALID_ARGUMENT,
     "unknown params subset 'nope'"),
    ("malformed: signature not hex", req(expected_signature_sha256="zz"),
     grpc.StatusCode.INVALID_ARGUMENT, "64 lowercase hex"),
    ("malformed: tiny chunk", req(max_chunk_bytes=10), grpc.StatusCode.INVALID_ARGUMENT,
     "max_chunk_bytes = 10"),
    ("malformed: leaf spec", req(expected_leaves=[params_pb2.LeafSpec(name="", shape=[1])]),
     grpc.StatusCode.INVALID_ARGUMENT, "malformed expected leaf"),
    ("oversized: 2 MB request, 1 MiB limit",
     req(expected_leaves=[params_pb2.LeafSpec(name="x" * 1000, shape=[1], dtype="f")] * 2000),
     grpc.StatusCode.RESOURCE_EXHAUSTED, ""),
    ("oversized: too many subset keys", req(subset=[f"k{i}" for i in range(100)]),
     grpc.StatusCode.INVALID_ARGUMENT, "at most 64 allowed"),
    ("wrong version: protocol", req(protocol_version=PROTOCOL_VERSION + 7),
     grpc.StatusCode.FAILED_PRECONDITION, f"protocol version {PROTOCOL_VERSION + 7}"),
    ("wrong version: min_version", req(min_version=-2), grpc.StatusCode.INVALID_ARGUMENT,
     "min_version = -2"),
    ("wrong shape: leaf", req(subset=["actor"], expected_leaves=[
        params_pb2.LeafSpec(name="actor/w", shape=[64, 33], dtype="float32"),
        params_pb2.LeafSpec(name="actor/b", shape=[32], dtype="float32")]),
     grpc.StatusCode.FAILED_PRECONDITION, "at leaf 'actor/w': server has shape (64, 32)"),
    ("wrong shape: signature", req(subset=["actor"], expected_signature_sha256=signature_hash(
        [("actor/w", (1,), "float32")])), grpc.StatusCode.FAILED_PRECONDITION,
     "signature mismatch"),
])
def test_bad_request_gets_status_and_message_and_server_keeps_serving(server, kind, payload,
                                                                      code, message):
    got, details = raw_call(server.address, payload)
    assert got == code, (kind, got, details)
    assert details and message in details, (kind, details)
    with ParameterClient(server.address, TIMEOUT_S, token=TOKEN) as c:   # everyone else: fine
        assert c.get(subset="actor")[0] == 1


def test_client_side_wrong_shape_is_a_clear_error(server):
    from params import ParamsMismatchError
    template = {"actor": {"w": np.zeros((64, 31), np.float32), "b": np.zeros(32, np.float32)}}
    with ParameterClient(server.address, TIMEOUT_S, token=TOKEN, template=template) as c:
        with pytest.raises(ParamsMismatchError) as e:
            c.get(subset="actor")
    assert e.value.leaf == "actor/w" and e.value.server_shape == (64, 32)
    assert e.value.expected_shape == (64, 31)


def _mutations(rng: random.Random):
    """Random bytes, and valid requests with random bytes flipped, cut or appended."""
    valid = [req(subset=["actor"]), req(min_version=0, subset=["critic"],
                                        max_chunk_bytes=1 << 16),
             req(expected_leaves=[params_pb2.LeafSpec(name="actor/w", shape=[64, 32],
                                                      dtype="float32")])]
    def text():
        pool = ["", "all", "actor", "critic", "a/b", " ", "\u00e9\u4e2d\U0001F600", "x" * 300,
                "\x00", "\n"]
        return rng.choice(pool) if rng.random() < 0.6 else "".join(
            chr(rng.choice([rng.randint(32, 126), rng.randint(0, 0xD7FF)]))
            for _ in range(rng.randint(0, 20)))

    def number(bits, signed):
        lo, hi = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)
        return rng.choice([lo, hi, 0, 1, -1 if signed else 2, rng.randint(lo, hi)])

    while True:
        kind = rng.random()
        if kind < 0.3:
            yield bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 300)))
        elif kind < 0.7:   # well-formed protobuf, random field values
            r = params_pb2.GetParamsRequest(
                min_version=number(64, True), subset=[text() for _ in range(rng.randint(0, 4))],
                expected_signature_sha256=rng.choice(["", text(), "0" * 64, "f" * 64]),
                max_chunk_bytes=number(32, False), protocol_version=rng.choice(
                    [0, 1, 2, number(32, False)]))
            for _ in range(rng.choice([0, 0, 1, 3])):
                r.expected_leaves.add(name=text(), dtype=text(), nbytes=number(64, False),
                                      shape=[number(64, True) for _ in range(rng.randint(0, 3))])
            yield r.SerializeToString()
        else:
            b = bytearray(rng.choice(valid))
            for _ in range(rng.randint(1, 6)):
                op = rng.random()
                if op < 0.5 and b:
                    b[rng.randrange(len(b))] = rng.getrandbits(8)
                elif op < 0.75 and b:
                    del b[rng.randrange(len(b)):]
                else:
                    b += bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 40)))
            yield bytes(b)


def test_fuzz_random_bytes_bounded_then_good_client_works(server):
    rng = random.Random(1234)
    good_results, stop = [], threading.Event()

    def good_client():   # keeps fetching while the fuzz runs: the server serves everyone else
        with ParameterClient(server.address, TIMEOUT_S, token=TOKEN) as c:
            while not stop.wait(0.05):
                try:
                    good_results.append(c.get(subset="actor")[0] == 1)
                except Exception as e:   # recorded as a failure
                    good_results.append(repr(e))
    t = threading.Thread(target=good_client, daemon=True)
    t.start()
    codes = {}
    unhandled = []
    deadline = time.monotonic() + FUZZ_SECONDS
    sent = 0
    with grpc.insecure_channel(server.address) as ch:
        get = ch.unary_stream(METHOD)
        health = ch.unary_unary(HEALTH)
        md = (("authorization", f"Bearer {TOKEN}"),)
        for payload in _mutations(rng):
            if sent >= FUZZ_REQUESTS or time.monotonic() > deadline:
                break
            sent += 1
            try:
                if sent % 10 == 0:
                    health(payload, timeout=TIMEOUT_S)
                else:
                    for _ in get(payload, timeout=TIMEOUT_S, metadata=md if sent % 7 else ()):
                        pass
                code = grpc.StatusCode.OK
            except grpc.RpcError as e:
                code = e.code()
                if code not in HANDLED or not e.details():
                    unhandled.append((payload[:60], code, e.details()))
            codes[code.name] = codes.get(code.name, 0) + 1
    stop.set()
    t.join(10)
    print(f"fuzz: {sent} requests, statuses {codes}")
    assert sent >= 100
    assert not unhandled, unhandled[:5]
    assert good_results and all(r is True for r in good_results), good_results[:5]
    with ParameterClient(server.address, TIMEOUT_S, token=TOKEN) as c:
        assert c.get(subset="actor")[0] == 1 and c.health()["serving"]


def test_replay_writer_refuses_segments_that_do_not_match_the_signature():
    """Validation happens in the writer before anything is sent (no server needed here)."""
    from crl.segments import segment_spec
    from replay.writer import SegmentWriter
    spec = segment_spec(4, 2, 10)
    w = SegmentWriter("127.0.0.1:1", spec, 1.0)   # lazy client: nothing is contacted
    good = {k: np.zeros((3,) + s, d) for k, (s, d) in spec.items()}
    w.validate(good)
    bad_shape = dict(good, state=np.zeros((3, 10, 5), np.float32))
    bad_dtype = dict(good, action=np.zeros((3, 10, 2), np.float64))
    missing = {k: v for k, v in good.items() if k != "truncation"}
    ragged = dict(good, episode_id=np.zeros((2, 10), np.int32))
    for bad, message in ((bad_shape, "segment field 'state': expected [N, 10, 4] float32"),
                         (bad_dtype, "segment field 'action': expected [N, 10, 2] float32, got "
                                     "[3, 10, 2] float64"),
                         (missing, "missing ['truncation']"),
                         (ragged, "batch size 2 differs")):
        with pytest.raises(ValueError) as e:
            w.write(bad)
        assert message in str(e.value)
    w.close()
