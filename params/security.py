"""Security from the config: TLS files and the shared token (a Kubernetes Secret mounts them).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from prometheus_client import REGISTRY, CollectorRegistry

from params.client import ParameterClient
from params.server import ParameterServer
from params.wire import check_token

@dataclass(frozen=True, repr=False)
class Security:
    """What a role needs to talk to (or serve) the ParameterService securely. Never logged: repr
    shows only which parts are on."""
    token: Optional[str] = None
    tls_cert: Optional[bytes] = None       # server side
    tls_key: Optional[bytes] = None        # server side
    tls_ca: Optional[bytes] = None         # client side: roots to trust
    tls_server_name: Optional[str] = None  # client side: name to check in the server certificate

    @property
    def tls(self) -> bool:
        return bool(self.tls_ca or self.tls_cert)

    def __repr__(self) -> str:
        return (f"Security(tls={'on' if self.tls else 'off'}, "
                f"token={'set' if self.token else 'none'})")

    def describe(self) -> str:
        return f"TLS {'on' if self.tls else 'off'}, token {'required' if self.token else 'off'}"


MAX_SECRET_BYTES = 1 << 20   # a certificate chain is a few KiB


def read_secret_file(what: str, path: str, error=None) -> bytes:
    """The bytes of a certificate, key or token file; `error` (default ConfigError) naming
    `what` (e.g. "service.tls_cert = '/p'") if it cannot be read or is empty."""
    from crl.config import FileRefused, read_regular_file
    if error is None:
        from crl.config import ConfigError as error
    try:
        data = read_regular_file(path, MAX_SECRET_BYTES)
    except OSError as e:
        raise error(f"{what}: cannot read it ({e.strerror or e})") from None
    except FileRefused as e:
        raise error(f"{what}: {e}: give the file that holds it (a certificate, key or token "
                    "is a few KiB)") from None
    if not data.strip():
        raise error(f"{what}: the file is empty")
    return data


def _read_file(field_name: str, path: str) -> bytes:
    return read_secret_file(f"{field_name} = {path!r}", path)


def _check_pem(field_name: str, path: str, data: bytes, kind: str) -> bytes:
    from crl.config import ConfigError
    if b"-----BEGIN" not in data or kind.encode() not in data:
        raise ConfigError(f"{field_name} = {path!r}: not a PEM {kind} (no '-----BEGIN ... {kind}' "
                          "block)")
    return data


def key_matches_certificate(cert_pem: bytes, key_pem: bytes) -> bool:
    """True if the private key in key_pem belongs to the (leaf) certificate in cert_pem. Raises
    ValueError if either does not parse, TypeError if the key is encrypted."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    leaf = x509.load_pem_x509_certificates(cert_pem)[0]
    key = serialization.load_pem_private_key(key_pem, password=None)
    pub = serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    return key.public_key().public_bytes(*pub) == leaf.public_key().public_bytes(*pub)


def _check_key_pair(cert_path: str, cert: bytes, key_path: str, key: bytes) -> None:
    """ConfigError unless the key is the certificate's (gRPC would fail only at bind time, with
    a misleading "failed to bind")."""
    from crl.config import ConfigError
    fields = f"service.tls_cert = {cert_path!r} / service.tls_key = {key_path!r}"
    try:
        matches = key_matches_certificate(cert, key)
    except TypeError:
        raise ConfigError(f"service.tls_key = {key_path!r}: the key is encrypted; give an "
                          "unencrypted PEM key (openssl pkey -in KEY -out PLAIN_KEY)") from None
    except ValueError as e:
        raise ConfigError(f"{fields}: cannot be parsed ({e})") from None
    if not matches:
        raise ConfigError(f"service.tls_key = {key_path!r} is not the private key of the "
                          f"certificate service.tls_cert = {cert_path!r}: give the key the "
                          "certificate was issued for")


def security_from_config(service, *, server: bool = False, environ=None) -> Security:
    """Reads the token and TLS material named by `cfg.service` (ServiceConfig).

    server=True: the learner (reads tls_cert and tls_key); else a client (reads tls_ca, or
    tls_cert when tls_ca is empty, which suits a self-signed certificate). Token: the file
    service.token_file if set, else the env var service.token_env if set and non-empty.
    Raises ConfigError naming the field if a file is unreadable or not PEM, the token is
    malformed, or service.require_token is set and no token is found. The token is never part
    of a message.
    """
    import os

    from crl.config import ConfigError
    environ = os.environ if environ is None else environ
    token = None
    if service.token_file:
        raw = _read_file("service.token_file", service.token_file)
        try:
            token = check_token(raw.decode("ascii", errors="replace").strip(),
                                f"service.token_file = {service.token_file!r}")
        except ValueError as e:
            raise ConfigError(str(e)) from None
    elif service.token_env and environ.get(service.token_env, "").strip():
        try:
            token = check_token(environ[service.token_env].strip(),
                                f"env var {service.token_env} (service.token_env)")
        except ValueError as e:
            raise ConfigError(str(e)) from None
    if service.require_token and token is None:
        raise ConfigError(
            "service.require_token = true but no params token was found: service.token_file is "
            f"empty and env var {service.token_env or '(none)'} is unset or empty (mount the "
            "Secret, see docs/reliability.md)")
    cert = key = ca = None
    if server and service.tls_cert:
        cert = _check_pem("service.tls_cert", service.tls_cert,
                          _read_file("service.tls_cert", service.tls_cert), "CERTIFICATE")
        key = _check_pem("service.tls_key", service.tls_key,
                         _read_file("service.tls_key", service.tls_key), "PRIVATE KEY")
        _check_key_pair(service.tls_cert, cert, service.tls_key, key)
    if not server and (service.tls_ca or service.tls_cert):
        name = "service.tls_ca" if service.tls_ca else "service.tls_cert"
        path = service.tls_ca or service.tls_cert
        ca = _check_pem(name, path, _read_file(name, path), "CERTIFICATE")
    return Security(token=token, tls_cert=cert, tls_key=key, tls_ca=ca,
                    tls_server_name=service.tls_server_name or None)


def client_from_config(cfg, template: Any = None, security: Optional[Security] = None,
                       timeout_s: Optional[float] = None) -> ParameterClient:
    """A ParameterClient for cfg.service.params_address with the config's TLS and token."""
    sec = security if security is not None else security_from_config(cfg.service)
    return ParameterClient(cfg.service.params_address,
                           timeout_s=timeout_s or cfg.service.rpc_timeout_s, template=template,
                           token=sec.token, max_message_mb=cfg.service.max_message_mb,
                           tls_ca=sec.tls_ca, tls_server_name=sec.tls_server_name,
                           wire_dtype=cfg.service.params_wire_dtype,
                           host_cache=cfg.service.params_host_cache or None)


def server_from_config(cfg, bind: str, security: Optional[Security] = None,
                       registry: CollectorRegistry = REGISTRY) -> ParameterServer:
    """A (not started) ParameterServer on `bind` with the config's TLS and token."""
    sec = security if security is not None else security_from_config(cfg.service, server=True)
    return ParameterServer(bind, max_message_mb=cfg.service.max_message_mb, token=sec.token,
                           registry=registry, tls_cert=sec.tls_cert, tls_key=sec.tls_key,
                           max_workers=cfg.service.params_max_workers)
