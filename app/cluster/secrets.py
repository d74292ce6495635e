"""`crl cluster create-secrets`: the ParameterService's TLS certificate and token as Secrets
(never printed, never in a manifest)."""
from __future__ import annotations

import base64
import sys
from typing import Any, Dict, Iterable, List, Tuple

from app.cluster.common import ApiError, Cluster, ClusterError, namespace_of

# The ParameterService's Secrets (created by `create-secrets`, mounted by the manifests; never in
# a manifest). TLS: type kubernetes.io/tls with tls.crt, tls.key and ca.crt (the roots actors and
# the evaluator trust: the certificate itself when self-signed). Token: key "token".
TLS_SECRET = "crl-params-tls"


TOKEN_SECRET = "crl-params-token"


TOKEN_KEY = "token"


SECRET_KEYS = {TLS_SECRET: ("tls.crt", "tls.key", "ca.crt"), TOKEN_SECRET: (TOKEN_KEY,)}


# The Services clients dial for params (service.params_address = params:18001) and the learner's
# own name: every generated certificate names each, in every in-cluster DNS form.
PARAMS_HOSTS = ("params", "learner")


def add_parser(sub, common) -> None:
    p = sub.add_parser("create-secrets", parents=[common],
                       help="create (or replace) the Secrets of the ParameterService: TLS "
                            f"({TLS_SECRET}) and the shared token ({TOKEN_SECRET})")
    p.add_argument("--cert", default=None, metavar="FILE",
                   help="PEM certificate (chain) of the learner (default: a new self-signed EC "
                        "certificate naming params and learner in every DNS form of the "
                        "namespace)")
    p.add_argument("--key", default=None, metavar="FILE", help="PEM private key of --cert")
    p.add_argument("--ca", default=None, metavar="FILE",
                   help="PEM roots the actors and the evaluator trust (default: --cert, right "
                        "for a self-signed certificate)")
    p.add_argument("--token-file", default=None, metavar="FILE",
                   help="file holding the token (default: a new random one); never printed")
    p.add_argument("--server-name", default="params", metavar="NAME",
                   help="the name clients check in the certificate (default: params, the host "
                        "of service.params_address; another one needs service.tls_server_name)")
    p.add_argument("--dns-name", action="append", default=[], metavar="NAME",
                   help="one more name for the generated certificate (repeatable)")
    p.add_argument("--days", type=int, default=365,
                   help="validity of the generated certificate (default: 365)")
    p.add_argument("--cluster-domain", default="cluster.local",
                   help="the cluster's DNS domain (default: cluster.local)")
    p.add_argument("--if-missing", action="store_true",
                   help="keep Secrets that exist; create only the missing ones")
    p.add_argument("--create-namespace", action="store_true",
                   help="create the namespace if it does not exist (the manifests would)")


def create_secrets(args) -> int:
    """Creates (or replaces) Secret crl-params-tls (type kubernetes.io/tls: tls.crt, tls.key,
    ca.crt) and Secret crl-params-token (key token) in the namespace. Neither the token nor the
    key is ever printed."""
    namespace = namespace_of(args)
    tls, tls_note = _tls_material(args, namespace)          # checked before any cluster call
    token, token_note = _token_material(args)
    cl = Cluster.connect(args.kubeconfig, args.context, namespace, check_namespace=False)
    _ensure_namespace(cl, args.create_namespace)
    labels = {"app.kubernetes.io/name": "crl", "app.kubernetes.io/part-of": "crl",
              "app.kubernetes.io/managed-by": "crl-cluster"}
    secrets = [
        (TLS_SECRET, "kubernetes.io/tls", dict(zip(SECRET_KEYS[TLS_SECRET], tls)), tls_note),
        (TOKEN_SECRET, "Opaque", dict(zip(SECRET_KEYS[TOKEN_SECRET], (token,))), token_note),
    ]
    replaced = []
    for name, kind, data, note in secrets:
        body = {"apiVersion": "v1", "kind": "Secret", "type": kind,
                "metadata": {"name": name, "namespace": namespace, "labels": labels},
                "data": {k: base64.b64encode(v).decode("ascii") for k, v in data.items()}}
        state = _put_secret(cl, name, kind, body, keep=args.if_missing)
        if state == "replaced":
            replaced.append(name)
        detail = (f"{kind}: {', '.join(data)}; {note}" if state != "kept" else
                  "it exists; --if-missing leaves it as it is")
        print(f"secret/{name} -n {namespace} {state} ({detail})", flush=True)
    if replaced:
        print(f"crl cluster create-secrets: running pods keep the old {' and '.join(replaced)} "
              "until they restart; restart the learner, actors and evaluator together: "
              f"kubectl delete pod -n {namespace} -l 'app.kubernetes.io/name=crl,"
              "app.kubernetes.io/component in (learner,actor,evaluator)' (their Jobs start new "
              "ones)", file=sys.stderr)
    return 0


def _ensure_namespace(cl: "Cluster", create: bool) -> None:
    try:
        cl.call(cl.core.read_namespace, cl.namespace, what="read namespace")
        return
    except ApiError as e:
        if e.status in (401, 403):        # may not read namespaces: the Secret calls will tell
            return
        if e.status != 404:
            raise
    if not create:
        raise ClusterError(
            f"namespace {cl.namespace!r} does not exist on {cl.host}: pass --create-namespace, "
            f"or create it first (`kubectl create namespace {cl.namespace}`), or pass --namespace "
            "(--name RUN for a run made by `crl cluster apply --name RUN`)")
    # Labelled as k8s/base/namespace.yaml: the restricted Pod Security Standard from the start.
    cl.call(cl.core.create_namespace, {
        "apiVersion": "v1", "kind": "Namespace",
        "metadata": {"name": cl.namespace, "labels": {
            "app.kubernetes.io/part-of": "crl",
            "pod-security.kubernetes.io/enforce": "restricted",
            "pod-security.kubernetes.io/warn": "restricted"}}}, what="create namespace")
    print(f"namespace/{cl.namespace} created", flush=True)


def _put_secret(cl: "Cluster", name: str, kind: str, body: Dict[str, Any], keep: bool) -> str:
    """created / replaced / kept. A Secret of another type is deleted first (type is
    immutable)."""
    try:
        old = cl.call(cl.core.read_namespaced_secret, name, cl.namespace,
                      what=f"read secret/{name}")
    except ApiError as e:
        if e.status != 404:
            raise
        old = None
    if old is not None and keep:
        return "kept"
    if old is not None and old.type == kind:
        cl.call(cl.core.replace_namespaced_secret, name, cl.namespace, body,
                what=f"replace secret/{name}")
        return "replaced"
    if old is not None:
        cl.call(cl.core.delete_namespaced_secret, name, cl.namespace,
                what=f"delete secret/{name} (type {old.type}, not {kind})")
    cl.call(cl.core.create_namespaced_secret, cl.namespace, body, what=f"create secret/{name}")
    return "created" if old is None else "replaced"


def _crypto():
    try:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID
    except ImportError:
        raise ClusterError("create-secrets needs the Python package 'cryptography' (a dependency "
                           "of the kubernetes client; pip install cryptography), or create the "
                           "Secrets with openssl and kubectl (docs/deploy.md)") from None
    return x509, hashes, serialization, ec, NameOID


def certificate_names(namespace: str, cluster_domain: str = "cluster.local",
                      extra: Iterable[str] = ()) -> List[str]:
    """The DNS names of a generated certificate: params and learner as `NAME`, `NAME.NS`,
    `NAME.NS.svc` and `NAME.NS.svc.DOMAIN`, then `extra`."""
    names = []
    for host in PARAMS_HOSTS:
        names += [host, f"{host}.{namespace}", f"{host}.{namespace}.svc",
                  f"{host}.{namespace}.svc.{cluster_domain}"]
    for n in extra:
        if n not in names:
            names.append(n)
    return names


def self_signed_certificate(names: List[str], days: int = 365) -> Tuple[bytes, bytes]:
    """(certificate PEM, PKCS#8 key PEM): a self-signed EC P-256 certificate for `names`."""
    import datetime
    x509, hashes, serialization, ec, NameOID = _crypto()
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in names]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True,
                                         content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False,
                                         crl_sign=False, encipher_only=False,
                                         decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]),
                           critical=False)
            .sign(key, hashes.SHA256()))
    return (cert.public_bytes(serialization.Encoding.PEM),
            key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                              serialization.NoEncryption()))


def _read_user_file(option: str, path: str) -> bytes:
    from params import read_secret_file
    return read_secret_file(f"{option} {path!r}", path, ClusterError)


def _load_certs(option: str, path: str, data: bytes):
    x509 = _crypto()[0]
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError:
        raise ClusterError(f"{option} {path!r}: not a PEM certificate (no valid '-----BEGIN "
                           "CERTIFICATE-----' block)") from None
    return certs


def _dns_names(cert) -> List[str]:
    x509 = _crypto()[0]
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return san.get_values_for_type(x509.DNSName)


def _tls_material(args, namespace: str) -> Tuple[Tuple[bytes, bytes, bytes], str]:
    """((tls.crt, tls.key, ca.crt), description), generated or from --cert/--key/--ca, checked."""
    import datetime
    if bool(args.cert) != bool(args.key):
        raise ClusterError("--cert and --key go together (the certificate and its private key)")
    if args.ca and not args.cert:
        raise ClusterError("--ca needs --cert and --key (a generated certificate is its own CA)")
    if not args.server_name or any(c.isspace() for c in args.server_name):
        raise ClusterError(f"--server-name {args.server_name!r}: must be a DNS name")
    if not args.cert:
        if not 0 < args.days <= 3650:
            raise ClusterError(f"--days {args.days}: must be in 1..3650")
        names = certificate_names(namespace, args.cluster_domain,
                                  [args.server_name] + list(args.dns_name))
        cert, key = self_signed_certificate(names, args.days)
        return (cert, key, cert), (f"new self-signed EC P-256 certificate for "
                                   f"{', '.join(names)}; valid {args.days} days")
    x509, hashes, serialization, ec, NameOID = _crypto()
    cert_pem = _read_user_file("--cert", args.cert)
    key_pem = _read_user_file("--key", args.key)
    chain = _load_certs("--cert", args.cert, cert_pem)
    leaf = chain[0]
    try:
        serialization.load_pem_private_key(key_pem, password=None)   # each parse error named
    except TypeError:
        raise ClusterError(f"--key {args.key!r}: the key is encrypted; give an unencrypted PEM "
                           "key (openssl pkey -in KEY -out PLAIN_KEY)") from None
    except Exception as e:                   # noqa: BLE001 - any parse failure: not a key
        raise ClusterError(f"--key {args.key!r}: not a PEM private key ({type(e).__name__})") \
            from None
    from params.security import key_matches_certificate
    if not key_matches_certificate(cert_pem, key_pem):
        raise ClusterError(f"--key {args.key!r} is not the private key of the certificate in "
                           f"--cert {args.cert!r}")
    now = datetime.datetime.now(datetime.timezone.utc)
    if leaf.not_valid_after_utc <= now:
        raise ClusterError(f"--cert {args.cert!r} expired on {leaf.not_valid_after_utc:%Y-%m-%d}")
    names = _dns_names(leaf)
    if args.server_name not in names:
        raise ClusterError(
            f"--cert {args.cert!r} names {', '.join(names) or 'no DNS name'}, not "
            f"{args.server_name!r}, the name the actors check (the host of "
            "service.params_address): add it to the certificate's subject alternative names, or "
            "set service.tls_server_name in the overlay's crl.yaml and pass --server-name")
    if args.ca:
        ca_pem = _read_user_file("--ca", args.ca)
        _load_certs("--ca", args.ca, ca_pem)
    else:
        try:
            leaf.verify_directly_issued_by(leaf)
        except Exception:                     # noqa: BLE001 - not self-signed
            raise ClusterError(f"--cert {args.cert!r} is not self-signed: pass --ca with the "
                               "certificate of the CA that signed it (the roots the actors "
                               "trust)") from None
        ca_pem = cert_pem
    return (cert_pem, key_pem, ca_pem), (f"certificate of {args.cert} for {', '.join(names)}, "
                                         f"valid until {leaf.not_valid_after_utc:%Y-%m-%d}")


def _token_material(args) -> Tuple[bytes, str]:
    """(token bytes, description): from --token-file (trailing newline dropped, checked as the
    roles check it) or a new random one. The description never holds the token."""
    if not args.token_file:
        import secrets
        return secrets.token_urlsafe(32).encode("ascii"), \
            "a new random token (its value is not shown)"
    raw = _read_user_file("--token-file", args.token_file)
    from params import check_token
    try:
        token = check_token(raw.decode("ascii", errors="replace").strip(),
                            f"--token-file {args.token_file!r}")
    except ValueError as e:
        raise ClusterError(str(e)) from None
    return token.encode("ascii"), f"the token of {args.token_file} (its value is not shown)"

