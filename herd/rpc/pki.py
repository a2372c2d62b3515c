"""The cluster's certificate authority and its members' certificates (mutual TLS on every channel).

``herd init`` makes the CA (``ca.pem``, ``ca.key``) on the coordinator's machine, with a
certificate for the coordinator and one for the CLI there. Another machine gets its own key and
a certificate signed by the CA with ``herd join TOKEN`` (herd/rpc/join.py); its key never leaves
it. A rank gets a certificate for its job and attempt only, made by the coordinator at launch.

Who a certificate names is in its DNS subject-alternative names under the ``herd`` pseudo-domain:
``<role>.herd`` and ``<name>.<role>.herd``. A client dials a peer with gRPC's
``ssl_target_name_override`` set to the name it expects (``coordinator.herd``,
``w1.worker.herd``), so TLS itself checks the peer's CA, role and name; a server reads them from
the verified client certificate (herd/rpc/auth.py ``peer_of``).

Revocation is by name: ``herd revoke worker/w1`` lists ``worker/w1`` in ``revoked.json`` beside the
CA; the coordinator refuses that name's calls and never admits it again (a client cannot see a
server's serial number through grpcio, but it does verify the name). Rejoin under a new name.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import hashlib
import hmac
import json
import os
import re
import socket
import threading
from dataclasses import dataclass
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from herd.errors import AuthError, NotFoundError

DOMAIN = "herd"
ROLES = ("coordinator", "worker", "client", "rank")
CA_DAYS, MEMBER_DAYS, RANK_DAYS = 3650, 730, 30  # how long each certificate lives
_CLAIMS = threading.Lock()  # two joins at once must not both take one name
# A DNS label: what a name must be to sit inside a certificate's DNS name.
_LABEL = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$")


def default_home() -> Path:
    return Path(os.environ.get("HERD_HOME", Path.home() / ".herd"))


def default_dir() -> Path:
    """Where this machine's CA copy, certificates and keys live: $HERD_HOME/tls."""
    return default_home() / "tls"


def dns_name(role: str, name: str | None = None) -> str:
    """The DNS name a peer of ``role`` (and ``name``) must hold; what a client dials it as."""
    return f"{name}.{role}.{DOMAIN}" if name else f"{role}.{DOMAIN}"


def check_label(name: str, what: str = "name") -> str:
    if not _LABEL.match(name or ""):
        raise AuthError(f"{what} {name!r} cannot name a cluster member",
                        hint="use 1-63 lowercase letters, digits and '-', not starting or ending "
                        "with '-' (it becomes part of a certificate's DNS name)")
    return name


def host_label() -> str:
    """This machine's host name as a member name (Mac-Studio.local -> mac-studio)."""
    raw = socket.gethostname().split(".")[0].lower()
    label = re.sub(r"[^a-z0-9-]+", "-", raw).strip("-")[:56].strip("-")
    return label or "host"


def rank_scope(job_id: str, attempt: int) -> str:
    """The name every rank certificate of one job attempt holds (``<scope>.rank.herd``): a hash,
    because a job id need not be a DNS label."""
    return "a" + hashlib.sha256(f"{job_id}/{attempt}".encode()).hexdigest()[:24]


def names_of(sans: list[str]) -> tuple[str, str] | None:
    """(role, name) from a certificate's DNS names, or None when it names no member."""
    for san in sans:
        parts = san.lower().split(".")
        if len(parts) == 3 and parts[2] == DOMAIN and parts[1] in ROLES and _LABEL.match(parts[0]):
            return parts[1], parts[0]
    return None


# --- keys and certificates -------------------------------------------------------------------

def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def key_pem(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def fingerprint(pem: bytes) -> str:
    """sha256 of a certificate's DER bytes, hex."""
    der = x509.load_pem_x509_certificate(pem).public_bytes(serialization.Encoding.DER)
    return hashlib.sha256(der).hexdigest()


def csr_for(key, role: str, name: str) -> bytes:
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{role}/{name}")]))
           .sign(key, hashes.SHA256()))
    return csr.public_bytes(serialization.Encoding.PEM)


def _write(path: Path, data: bytes, mode: int) -> None:
    """Written beside and renamed into place, created with ``mode`` (keys: 0600). The temporary
    name is this writer's own: two processes writing one file (two `herd worker`s started at once
    on the CA's machine) must not share it."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


@dataclass(frozen=True)
class Identity:
    """What one process presents and trusts: the cluster CA, its certificate and its key."""

    role: str
    name: str
    ca_pem: bytes
    cert_pem: bytes
    key_pem: bytes

    @property
    def dns(self) -> str:
        return dns_name(self.role, self.name)

    @property
    def label(self) -> str:
        return f"{self.role}/{self.name}"

    def channel_credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(self.ca_pem, self.key_pem, self.cert_pem)

    def server_credentials(self) -> grpc.ServerCredentials:
        return grpc.ssl_server_credentials([(self.key_pem, self.cert_pem)],
                                           root_certificates=self.ca_pem,
                                           require_client_auth=True)

    def save(self, folder: Path, stem: str | None = None) -> None:
        """``<stem>.pem``, ``<stem>.key`` (0600) and ``ca.pem`` in ``folder`` (0700)."""
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        stem = stem or self.role
        _write(folder / "ca.pem", self.ca_pem, 0o644)
        _write(folder / f"{stem}.key", self.key_pem, 0o600)
        _write(folder / f"{stem}.pem", self.cert_pem, 0o644)

    @classmethod
    def load(cls, folder: Path, role: str, stem: str | None = None) -> Identity:
        stem = stem or role
        try:
            ca, cert, key = ((folder / n).read_bytes()
                             for n in ("ca.pem", f"{stem}.pem", f"{stem}.key"))
        except FileNotFoundError as e:
            raise AuthError(
                f"no {role} certificate in {folder} ({Path(e.filename).name} is missing)",
                hint="run `herd init` on the coordinator's machine, `herd join TOKEN` on every "
                "other: " + ("`herd token --role client` there makes a laptop's token" if role
                             == "client" else "`herd coordinator` prints the token")) from None
        if (folder / f"{stem}.key").stat().st_mode & 0o077:
            raise AuthError(f"{folder / f'{stem}.key'} can be read by other users",
                            hint=f"chmod 600 {folder / f'{stem}.key'}")
        found = names_of(_sans(x509.load_pem_x509_certificate(cert)))
        if found is None or found[0] != role:
            raise AuthError(f"{folder / f'{stem}.pem'} is not a {role} certificate of this "
                            "cluster", hint="join again with a token for that role")
        return cls(role, found[1], ca, cert, key)


def _sans(cert: x509.Certificate) -> list[str]:
    try:
        ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return []
    return ext.value.get_values_for_type(x509.DNSName)


class Authority:
    """The cluster CA: signs members' certificates, keeps who holds which name, and the revoked
    names. Lives in one folder on the coordinator's machine (``ca.key`` mode 0600)."""

    def __init__(self, folder: Path, cert: x509.Certificate, key):
        self.folder, self.cert, self.key = folder, cert, key
        self.ca_pem = cert_pem(cert)

    @staticmethod
    def exists(folder: Path) -> bool:
        return (folder / "ca.key").exists()

    @classmethod
    def create(cls, folder: Path) -> Authority:
        key = new_key()
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "herd cluster CA"),
                          x509.NameAttribute(NameOID.SERIAL_NUMBER, os.urandom(8).hex())])
        now = _now()
        cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
                .public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(minutes=5))
                .not_valid_after(now + datetime.timedelta(days=CA_DAYS))
                .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                .add_extension(x509.KeyUsage(
                    digital_signature=True, key_cert_sign=True, crl_sign=True,
                    content_commitment=False, key_encipherment=False, data_encipherment=False,
                    key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
                .sign(key, hashes.SHA256()))
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        _write(folder / "ca.key", key_pem(key), 0o600)
        _write(folder / "ca.pem", cert_pem(cert), 0o644)
        return cls(folder, cert, key)

    @classmethod
    def load(cls, folder: Path) -> Authority:
        try:
            key = serialization.load_pem_private_key((folder / "ca.key").read_bytes(), None)
            cert = x509.load_pem_x509_certificate((folder / "ca.pem").read_bytes())
        except FileNotFoundError:
            raise AuthError(f"no cluster CA in {folder}",
                            hint="run `herd init` on the coordinator's machine") from None
        return cls(folder, cert, key)

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.ca_pem)

    def join_key(self) -> bytes:
        """The key join tokens are derived from: tied to the CA key, so a new CA voids every
        token made before it."""
        return hmac.new(key_pem(self.key), b"herd join tokens v1", hashlib.sha256).digest()

    def api_secret(self) -> str:
        """What the HTTP API's bearer token is derived from (herd/rpc/api_token.py): tied to the
        CA key like the join key, one-way, so the token never yields the key."""
        return hmac.new(key_pem(self.key), b"herd http api v1", hashlib.sha256).hexdigest()

    # --- signing ---------------------------------------------------------------------------

    def sign(self, public_key, role: str, name: str, days: int = MEMBER_DAYS) -> bytes:
        if role not in ROLES:
            raise AuthError(f"unknown role {role!r}", hint=f"one of {', '.join(ROLES)}")
        check_label(name, f"{role} name")
        now = _now()
        cert = (x509.CertificateBuilder()
                .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME,
                                                            f"{role}/{name}")]))
                .issuer_name(self.cert.subject).public_key(public_key)
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(minutes=5))
                .not_valid_after(now + datetime.timedelta(days=days))
                .add_extension(x509.SubjectAlternativeName(
                    [x509.DNSName(dns_name(role, name)), x509.DNSName(dns_name(role))]),
                    critical=False)
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                      ExtendedKeyUsageOID.CLIENT_AUTH]),
                               critical=False)
                .sign(self.key, hashes.SHA256()))
        return cert_pem(cert)

    def issue(self, role: str, name: str, days: int = MEMBER_DAYS) -> Identity:
        """A new key and certificate, made here (a machine of the CA's owner, or a rank's)."""
        if role != "rank":
            self.claim(role, name, replace=True)
        key = new_key()
        return Identity(role, name, self.ca_pem, self.sign(key.public_key(), role, name, days),
                        key_pem(key))

    def sign_csr(self, csr_pem: bytes, role: str, name: str) -> bytes:
        """A joining machine's request, signed for ``role``/``name`` (never what it asks for
        itself); the name must not be held or revoked."""
        try:
            csr = x509.load_pem_x509_csr(csr_pem)
        except ValueError:
            raise AuthError("the certificate request is not a PEM CSR") from None
        if not csr.is_signature_valid:
            raise AuthError("the certificate request's signature is invalid")
        if not isinstance(csr.public_key(), ec.EllipticCurvePublicKey):
            raise AuthError("the certificate request must carry an EC key")
        self.claim(role, name, replace=False)
        return self.sign(csr.public_key(), role, name)

    # --- names held and revoked ------------------------------------------------------------

    def _read(self, file: str) -> list[str]:
        try:
            return list(json.loads((self.folder / file).read_text()))
        except FileNotFoundError:
            return []

    def claim(self, role: str, name: str, replace: bool) -> None:
        """Records that ``role/name`` holds a certificate. A revoked name is never issued again;
        a held one only to the CA's owner (``replace``), never through a join token."""
        label = f"{role}/{check_label(name, f'{role} name')}"
        if label in self.revoked():
            raise AuthError(f"{label} was revoked", hint="join under another name (--id)")
        with self._claims_locked():
            held = self._read("issued.json")
            if label in held:
                if not replace:
                    raise AuthError(f"{label} already holds a certificate of this cluster",
                                    hint="join under another name (--id), or "
                                    f"`herd revoke {label}` first")
                return
            _write(self.folder / "issued.json", json.dumps(sorted(held + [label])).encode(),
                   0o600)

    @contextlib.contextmanager
    def _claims_locked(self):
        """The names held are read, changed and written by one process at a time: several
        processes of the CA's machine (workers started together, `herd join` served while
        `herd worker` starts) issue certificates from one folder."""
        with _CLAIMS, open(self.folder / ".issued.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield

    def revoked(self) -> set[str]:
        return set(self._read("revoked.json"))

    def revoke(self, label: str, unissued: bool = False) -> bool:
        """Revokes ``role/name``; False when it already was. A name never issued is refused (a
        typo would pass for a revocation) unless ``unissued``: shut out before it joins."""
        role, _, name = label.partition("/")
        if role not in ROLES or not name:
            raise AuthError(f"cannot revoke {label!r}", hint="name it as ROLE/NAME, e.g. worker/w1")
        check_label(name)
        with self._claims_locked():
            revoked = self.revoked()
            if label in revoked:
                return False
            held = self._read("issued.json")
            if label not in held and not unissued:  # (--unissued: before it joins)
                raise NotFoundError(f"{label} was never issued by the CA in {self.folder}",
                                    hint=f"issued: {', '.join(held) or 'none'}")
            _write(self.folder / "revoked.json", json.dumps(sorted(revoked | {label})).encode(),
                   0o644)
        return True


def check_rank_credential(ca_pem: bytes, cert: bytes, key: bytes, scope: str) -> None:
    """A rank credential a worker is handed: signed by the cluster CA, for exactly the job
    attempt ``scope`` names, and the key its certificate is for (AuthError otherwise)."""
    try:
        c = x509.load_pem_x509_certificate(cert)
        c.verify_directly_issued_by(x509.load_pem_x509_certificate(ca_pem))
        k = serialization.load_pem_private_key(key, None)
    except (ValueError, TypeError, InvalidSignature) as e:
        raise AuthError(f"the rank credential is not one of this cluster's: {e}") from None
    if names_of(_sans(c)) != ("rank", scope):
        raise AuthError("the rank credential is for another job attempt")
    if c.public_key().public_numbers() != k.public_key().public_numbers():
        raise AuthError("the rank credential's key does not match its certificate")
    if not c.not_valid_before_utc <= _now() <= c.not_valid_after_utc:
        raise AuthError("the rank credential has expired")


def load_or_issue(folder: Path, role: str, name: str | None = None,
                  default_name: str | None = None) -> Identity:
    """This machine's ``role`` identity from ``folder`` (``<role>.pem``; for an explicit ``name``,
    ``<role>-<name>.pem`` first, so several workers of one machine each keep their own). On the
    CA's own machine one is made when missing: the owner needs no token to run a worker beside
    the coordinator. Elsewhere a missing one is an AuthError saying how to join."""
    stems = [f"{role}-{name}", role] if name else [role]
    for stem in stems:
        try:
            ident = Identity.load(folder, role, stem)
        except AuthError:
            continue
        if name is None or ident.name == name:
            return ident
    if not Authority.exists(folder):
        if name and (folder / f"{role}.pem").exists():
            raise AuthError(f"the {role} certificate in {folder} is not for {name!r}",
                            hint=f"drop the name to use it, or join again as {name!r}")
        Identity.load(folder, role)  # raises, saying what is missing and how to join
    ident = Authority.load(folder).issue(role, name or default_name or host_label())
    ident.save(folder, f"{role}-{name}" if name else role)
    return ident
