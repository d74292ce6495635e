"""ParameterService security: TLS and the shared token, from the config (files or env var, as a
Kubernetes Secret mounts them); clients without the token or without TLS are refused; the token
never appears in a message or a repr. Real gRPC servers on 127.0.0.1, certificates generated here.

Reverb (replay) has no TLS or auth of its own: the k8s NetworkPolicies are what protect it
(tests/test_k8s_manifests.py::test_network_policies checks they admit only actors and learner).
The roles' logs of a whole `crl local` run with TLS and a token are checked for the token in
tests/test_faults_local.py::test_token_never_appears_in_logs_or_files.
"""
from __future__ import annotations

import datetime
import ipaddress
import subprocess
import sys
from pathlib import Path

import grpc
import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from crl import config as C
from params import (ParameterClient, ParameterServer, Security, check_token,
                                client_from_config, security_from_config, server_from_config)
from helpers import REPO

TOKEN = "s3cret-" + "x" * 24
TIMEOUT_S = 5.0


def make_cert(directory: Path, names=("localhost",), ips=("127.0.0.1",), stem="tls"):
    """A self-signed EC certificate (and key) for `names` / `ips`, as PEM files."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])])
    now = datetime.datetime.now(datetime.timezone.utc)
    san = [x509.DNSName(n) for n in names] + [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(san), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = directory / f"{stem}.crt", directory / f"{stem}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    key_path.chmod(0o600)
    return cert_path, key_path


def params():
    return {"actor": {"w": np.arange(6, dtype=np.float32).reshape(2, 3)},
            "critic": {"w": np.ones((3,), np.float32)}}


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    d = tmp_path_factory.mktemp("certs")
    return make_cert(d), make_cert(d, names=("learner",), ips=(), stem="other")


def service_cfg(**kw):
    return C.load(overrides={f"service.{k}": v for k, v in kw.items()}).service


def test_tls_and_token_only_the_right_client_gets_params(certs):
    (cert, key), (other_cert, _) = certs
    server = ParameterServer("127.0.0.1:0", token=TOKEN, registry=CollectorRegistry(),
                             tls_cert=cert.read_bytes(), tls_key=key.read_bytes()).start()
    try:
        assert server.tls
        server.publish(params(), 3)
        addr = f"127.0.0.1:{server.port}"
        with ParameterClient(addr, TIMEOUT_S, token=TOKEN, tls_ca=cert.read_bytes()) as ok:
            version, got = ok.get(subset="all")
            assert version == 3
            np.testing.assert_array_equal(got["actor"]["w"], params()["actor"]["w"])
        for token in (None, "wrong-token"):                     # TLS but no / wrong token
            with ParameterClient(addr, TIMEOUT_S, token=token, tls_ca=cert.read_bytes()) as c:
                with pytest.raises(grpc.RpcError) as e:
                    c.get()
                assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
                assert TOKEN not in e.value.details() and "token" in e.value.details()
                assert c.health()["serving"]                     # probes need no token
        with ParameterClient(addr, 2.0, token=TOKEN) as plain:  # plaintext to a TLS port
            with pytest.raises(grpc.RpcError) as e:
                plain.get()
            assert e.value.code() in (grpc.StatusCode.UNAVAILABLE,
                                      grpc.StatusCode.DEADLINE_EXCEEDED)
        with ParameterClient(addr, 2.0, token=TOKEN, tls_ca=other_cert.read_bytes()) as wrong_ca:
            with pytest.raises(grpc.RpcError) as e:              # untrusted certificate
                wrong_ca.get()
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE
        # A name override: the certificate names "localhost", we dial the IP.
        with ParameterClient(addr, TIMEOUT_S, token=TOKEN, tls_ca=cert.read_bytes(),
                             tls_server_name="localhost") as named:
            assert named.get()[0] == 3
    finally:
        server.stop(None)


def test_security_from_config_files_and_env(certs, tmp_path):
    (cert, key), _ = certs
    tok = tmp_path / "token"
    tok.write_text(TOKEN + "\n")                                 # Secrets often end in a newline
    s = security_from_config(service_cfg(token_file=str(tok), tls_cert=str(cert), tls_key=str(key)),
                             server=True, environ={})
    assert s.token == TOKEN and s.tls_cert == cert.read_bytes() and s.tls_key == key.read_bytes()
    assert TOKEN not in repr(s) and TOKEN not in str(s) and "token=set" in repr(s)
    c = security_from_config(service_cfg(token_file=str(tok), tls_cert=str(cert), tls_key=str(key)),
                             environ={})
    assert c.tls_ca == cert.read_bytes() and c.tls_key is None   # clients never read the key
    e = security_from_config(service_cfg(), environ={"CRL_PARAMS_TOKEN": TOKEN})
    assert e.token == TOKEN and not e.tls
    assert security_from_config(service_cfg(), environ={}).token is None   # auth off
    assert security_from_config(service_cfg(token_env=""), environ={"CRL_PARAMS_TOKEN": TOKEN}).token is None


def test_a_client_reads_only_the_ca_and_the_token(certs, tmp_path):
    """The k8s layout: actors and the evaluator mount only ca.crt and the token. The config
    names the learner's tls_cert and tls_key too (one config for every role), which do not exist
    in their pods: a client never opens them; the learner never needs tls_ca."""
    (cert, key), _ = certs
    (tmp_path / "ca.crt").write_bytes(cert.read_bytes())
    (tmp_path / "token").write_text(TOKEN)
    fields = dict(tls_cert=str(tmp_path / "absent" / "tls.crt"),
                  tls_key=str(tmp_path / "absent" / "tls.key"), tls_ca=str(tmp_path / "ca.crt"),
                  token_file=str(tmp_path / "token"), require_token=True)
    c = security_from_config(service_cfg(**fields), environ={})
    assert c.tls_ca == cert.read_bytes() and c.tls_key is None and c.tls_cert is None
    assert c.token == TOKEN
    with pytest.raises(C.ConfigError, match="service.tls_cert = .*absent.*cannot read"):
        security_from_config(service_cfg(**fields), server=True, environ={})   # the learner does
    s = security_from_config(service_cfg(**dict(fields, tls_cert=str(cert), tls_key=str(key),
                                                tls_ca=str(tmp_path / "absent" / "ca.crt"))),
                             server=True, environ={})
    assert s.tls_cert == cert.read_bytes() and s.tls_ca is None


@pytest.mark.parametrize("fields, env, message", [
    ({"require_token": True}, {}, "service.require_token = true but no params token"),
    ({"token_file": "/nonexistent/token"}, {}, "service.token_file = '/nonexistent/token': cannot read"),
    ({"token_file": "EMPTY"}, {}, "the file is empty"),
    ({"token_file": "SPACES"}, {}, "printable ASCII without spaces"),
    ({}, {"CRL_PARAMS_TOKEN": "has space"}, "env var CRL_PARAMS_TOKEN (service.token_env)"),
    ({"tls_cert": "NOTPEM", "tls_key": "KEY"}, {}, "service.tls_cert = "),
    ({"tls_cert": "CERT", "tls_key": "CERT"}, {}, "service.tls_key = "),
    # Once a hang, a crash, or an error only at bind time (issue 16):
    ({"token_file": "/dev/zero"}, {}, "service.token_file = '/dev/zero': not a regular file"),
    ({"tls_cert": "FIFO", "tls_key": "KEY"}, {}, "not a regular file (a directory, device or FIFO)"),
    ({"tls_cert": "CERT", "tls_key": "OTHER_KEY"}, {}, "is not the private key of the certificate"),
])
def test_bad_security_config_names_the_field(certs, tmp_path, fields, env, message):
    import os
    (cert, key), (_, other_key) = certs
    files = {"EMPTY": "\n", "SPACES": "two words", "NOTPEM": "hello"}
    for k, v in list(fields.items()):
        if v in files:
            p = tmp_path / v
            p.write_text(files[v])
            fields[k] = str(p)
        elif v == "FIFO":   # nobody writes to it: opening it would block for ever
            os.mkfifo(tmp_path / "fifo")
            fields[k] = str(tmp_path / "fifo")
        elif v in ("CERT", "KEY", "OTHER_KEY"):
            fields[k] = str({"CERT": cert, "KEY": key, "OTHER_KEY": other_key}[v])
    with pytest.raises(C.ConfigError) as e:
        security_from_config(service_cfg(**fields), server=True, environ=env)
    assert message in str(e.value)
    assert "two words" not in str(e.value) and "has space" not in str(e.value)


def test_check_token_messages_never_hold_the_token():
    for bad in ("", "a b", "é" * 3, "x" * 5000):
        with pytest.raises(ValueError) as e:
            check_token(bad, "where")
        assert (bad not in str(e.value)) or not bad
    assert check_token(TOKEN, "where") == TOKEN


def test_server_and_client_from_config(certs, tmp_path):
    (cert, key), _ = certs
    tok = tmp_path / "token"
    tok.write_text(TOKEN)
    cfg = C.load(overrides={"service.tls_cert": str(cert), "service.tls_key": str(key),
                            "service.token_file": str(tok), "service.require_token": True,
                            "service.params_address": "127.0.0.1:1"})
    server = server_from_config(cfg, "127.0.0.1:0", registry=CollectorRegistry()).start()
    try:
        server.publish(params(), 1)
        cfg = C.override(cfg, {"service.params_address": f"127.0.0.1:{server.port}"})
        with client_from_config(cfg) as c:
            assert c.tls and c.get()[0] == 1
    finally:
        server.stop(None)


def test_launcher_refuses_a_missing_secret_before_starting_anything(tmp_path):
    run_dir = tmp_path / "run"
    out = subprocess.run(
        [sys.executable, "-m", "app.cli", "local", "--run.run_dir", str(run_dir),
         "--service.tls_cert", str(tmp_path / "missing.crt"),
         "--service.tls_key", str(tmp_path / "missing.key")],
        cwd=REPO, capture_output=True, text=True, timeout=120,
        env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    assert out.returncode == 2, out.stdout + out.stderr
    assert "service.tls_cert" in out.stdout and "cannot read" in out.stdout
    assert not (run_dir / "logs").exists()                       # no child was started


def test_security_object_hides_everything():
    s = Security(token=TOKEN, tls_cert=b"-----BEGIN CERTIFICATE-----", tls_key=b"KEYDATA")
    assert TOKEN not in repr(s) and b"KEYDATA".decode() not in repr(s)
    assert s.describe() == "TLS on, token required"
