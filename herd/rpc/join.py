"""Join tokens and ``herd join``: a new machine gets a certificate with one short-lived token.

A token (k3s and Nomad style) holds the coordinator's join address, a role, an expiry, a nonce,
the CA's fingerprint and a secret: HMAC(CA-derived join key, role|expiry|nonce), so the
coordinator keeps no table of tokens and a token names its own role and end. The joining machine
makes its own key and sends a certificate request with an HMAC of it under the secret; the
coordinator answers with the CA and the certificate, HMAC'd the same way. Over the plaintext join
port, that gives: a listener learns no secret and cannot get a certificate for a key of its own;
a machine in the middle can neither forge the reply nor hand over another CA (the fingerprint is
pinned by the token); a token past its expiry is refused. The server side is coordinator/join.py.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
from cryptography import x509

from herd.errors import AuthError, PeerLostError
from herd.rpc import pki
from herd.rpc.status import rpc_errors
from protos.v1 import join_pb2, join_pb2_grpc

PREFIX = "herd1-"
JOIN_ROLES = ("worker", "client")
DEFAULT_TTL_S = 15 * 60
MAX_TTL_S = 7 * 24 * 3600
FINGERPRINT_HEX = 32  # 128 bits of the CA's sha256 in the token: enough to pin it
# The join port takes tiny messages only (a CSR is ~400 bytes).
JOIN_MAX_MESSAGE = 16 * 1024


@dataclass(frozen=True)
class JoinToken:
    address: str  # host:port of the coordinator's join port
    role: str
    expires: int
    nonce: str
    fingerprint: str
    secret: bytes

    def encode(self) -> str:
        body = "|".join([self.address, self.role, str(self.expires), self.nonce,
                         self.fingerprint, self.secret.hex()])
        return PREFIX + base64.urlsafe_b64encode(body.encode()).decode().rstrip("=")

    @classmethod
    def decode(cls, text: str) -> JoinToken:
        bad = AuthError("this is not a herd join token",
                        hint="copy the whole token `herd coordinator` or `herd token` printed")
        text = text.strip()
        if not text.startswith(PREFIX):
            raise bad
        raw = text[len(PREFIX):]
        try:
            body = base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4)).decode()
            address, role, expires, nonce, fp, secret = body.split("|")
            return cls(address, role, int(expires), nonce, fp, bytes.fromhex(secret))
        except ValueError:
            raise bad from None


def token_secret(join_key: bytes, role: str, expires: int, nonce: str) -> bytes:
    return hmac.new(join_key, f"{role}|{expires}|{nonce}".encode(), hashlib.sha256).digest()[:16]


def make_token(authority: pki.Authority, address: str, role: str = "worker",
               ttl_s: float = DEFAULT_TTL_S) -> JoinToken:
    if role not in JOIN_ROLES:
        raise AuthError(f"cannot make a join token for role {role!r}",
                        hint=f"one of {', '.join(JOIN_ROLES)}")
    if not 0 < ttl_s <= MAX_TTL_S:
        raise AuthError(f"a join token lives 1 s to {MAX_TTL_S // 86400} days, not {ttl_s:g} s")
    expires = int(time.time() + ttl_s)
    nonce = os.urandom(6).hex()
    return JoinToken(address, role, expires, nonce, authority.fingerprint[:FINGERPRINT_HEX],
                     token_secret(authority.join_key(), role, expires, nonce))


def request_proof(secret: bytes, role: str, name: str, csr_pem: bytes) -> bytes:
    return hmac.new(secret, b"request|" + f"{role}|{name}|".encode() + csr_pem,
                    hashlib.sha256).digest()


def reply_proof(secret: bytes, ca_pem: bytes, cert_pem: bytes) -> bytes:
    return hmac.new(secret, b"reply|" + ca_pem + b"|" + cert_pem, hashlib.sha256).digest()


def join(token: JoinToken, name: str, folder: Path, timeout_s: float = 10.0) -> pki.Identity:
    """Asks the coordinator for a certificate for this machine's new key as ``token.role`` /
    ``name``; checks the reply and saves the identity in ``folder``. Whether the token has
    expired is the coordinator's to say, by its clock: this machine's may be off (an outside
    run: a clock 5 h ahead refused a token made seconds before)."""
    pki.check_label(name, f"{token.role} name")
    ca_file = folder / "ca.pem"
    if ca_file.is_file() and not pki.fingerprint(ca_file.read_bytes()).startswith(
            token.fingerprint):
        # Checked before asking: the coordinator would sign (and claim the name), and this
        # machine's membership of the other cluster would be overwritten without a word.
        raise AuthError(f"this machine is a member of another cluster (its CA is in {folder}); "
                        "joining this one there would replace that membership",
                        hint="join into a folder of its own: herd join TOKEN --tls-dir DIR, and "
                        "give that cluster's commands --tls-dir DIR")
    key = pki.new_key()
    csr = pki.csr_for(key, token.role, name)
    request = join_pb2.JoinRequest(role=token.role, expires=token.expires, nonce=token.nonce,
                                   name=name, csr_pem=csr,
                                   proof=request_proof(token.secret, token.role, name, csr))
    # Plaintext on purpose: this machine has no CA yet. The HMACs and the pinned fingerprint
    # protect the exchange (module docstring).
    channel = grpc.insecure_channel(token.address)
    try:
        with rpc_errors(token.address):
            reply = join_pb2_grpc.JoinServiceStub(channel).Join(request, timeout=timeout_s)
    except PeerLostError as e:  # (rpc_errors' hint is for commands that take --coordinator)
        raise PeerLostError(e.message, hint="is `herd coordinator` running there, with its join "
                            "port? A token names the address it was made for: on the "
                            "coordinator's machine `herd token --join HOST:PORT` makes one for "
                            "another") from None
    finally:
        channel.close()
    if not hmac.compare_digest(reply.proof, reply_proof(token.secret, reply.ca_pem,
                                                        reply.cert_pem)):
        raise AuthError(f"{token.address} does not hold this token's secret: not your "
                        "coordinator", hint="check the address in the token")
    if not pki.fingerprint(reply.ca_pem).startswith(token.fingerprint):
        raise AuthError("the CA the coordinator sent is not the one the token names")
    cert = x509.load_pem_x509_certificate(reply.cert_pem)
    if cert.public_key().public_numbers() != key.public_key().public_numbers():
        raise AuthError("the certificate the coordinator sent is not for this machine's key")
    cert.verify_directly_issued_by(x509.load_pem_x509_certificate(reply.ca_pem))
    ident = pki.Identity(token.role, name, reply.ca_pem, reply.cert_pem, pki.key_pem(key))
    ident.save(folder, member_stem(folder, token.role, name))
    return ident


# Certificates are dated from 5 minutes before they are signed (herd/rpc/pki.py), so a clock up
# to that far behind still accepts them.
BACKDATED_S = 300


def clock_skew_s(ident: pki.Identity, now: float | None = None) -> float:
    """How far this machine's clock is from the coordinator's that just signed ``ident``'s
    certificate (negative: behind), to the second or so a join takes."""
    signed = x509.load_pem_x509_certificate(ident.cert_pem).not_valid_before_utc.timestamp()
    return (time.time() if now is None else now) - (signed + BACKDATED_S)


def skew_warning(skew_s: float) -> str | None:
    """What to say about a clock ``skew_s`` away from the coordinator's ("" when close): behind
    by more than the backdating, no certificate of this cluster is valid here yet, and every
    connection fails as if unreachable (an outside run)."""
    if abs(skew_s) < 60:
        return None
    hours = abs(skew_s) / 3600
    far = f"{hours:.1f} h" if hours >= 1 else f"{abs(skew_s) / 60:.0f} min"
    behind = skew_s < -BACKDATED_S + 5
    return (f"this machine's clock is {far} {'behind' if skew_s < 0 else 'ahead of'} the "
            "coordinator's" + (": the cluster's certificates are not valid here yet, so every "
                               "connection will fail" if behind else "")
            + "; set it right (macOS: System Settings > General > Date & Time, automatic; "
            "Linux: timedatectl set-ntp true)")


def member_stem(folder: Path, role: str, name: str) -> str:
    """Where a new ``role`` identity named ``name`` is kept: ``<role>.pem``, unless that holds
    another member of this machine (a second worker: ``herd join --id NAME``), which is kept;
    the new one goes to ``<role>-<name>.pem``, which ``herd worker --id NAME`` loads."""
    try:
        current = pki.Identity.load(folder, role)
    except AuthError:
        return role
    return role if current.name == name else f"{role}-{name}"
