"""The laptop's connection to the coordinator: finding it, calling it, moving files.

The coordinator is ``--coordinator HOST[:PORT]``, else $HERD_COORDINATOR, else found by zeroconf.
A target without a port means the coordinator's default port, never gRPC's own default (443).
Every connection is mutual TLS to the name only the cluster's coordinator certificate holds
(``coordinator.herd``), so an advert alone is never trusted: a server that cannot prove it is this
cluster's coordinator fails the handshake, and gets no call, no file and no credential from the
CLI. The files ``herd pull`` writes are checked by name and kept inside ``-o``.
"""

from __future__ import annotations

import os
import sys
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Callable, Iterator

from herd import log
from herd.errors import AuthError, ConfigError, HerdError, PeerLostError
from herd.netif import hostport
from herd.rpc import discovery, pki
from herd.rpc.channel import (
    TRANSFER_DEADLINE_S,
    UNARY_DEADLINE_S,
    secure_channel,
    transfer_deadline_s,
)
from herd.rpc.files import read_chunks, receive_checkpoint_files, transient
from herd.rpc.ports import DEFAULT_COORDINATOR_PORT
from herd.rpc.status import rpc_errors
from protos.v1 import common_pb2, coordinator_pb2, coordinator_pb2_grpc

logger = log.get(__name__)
COORDINATOR_ENV = "HERD_COORDINATOR"
# An upload gives up when no try has added a byte for this long (a coordinator restarting under
# its supervisor is back within seconds; a laptop's Wi-Fi may take longer to come back).
UPLOAD_PATIENCE_S = 120.0


class CoordinatorConnection:
    """A TLS channel to this cluster's coordinator at ``target``; every call has a deadline. A
    context manager: the channel closes on the way out."""

    def __init__(self, target: str, identity: pki.Identity):
        self.target = target
        self.found_by = "--coordinator"
        self.channel = secure_channel(target, identity, pki.dns_name("coordinator"))
        self.stub = coordinator_pb2_grpc.CoordinatorServiceStub(self.channel)

    def call(self, method: str, request, timeout: float = UNARY_DEADLINE_S):
        with rpc_errors(self.target):
            return getattr(self.stub, method)(request, timeout=timeout)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> CoordinatorConnection:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- files -----------------------------------------------------------------------------

    def missing(self, shas: list[str]) -> dict[str, int]:
        """The blobs the coordinator lacks, each with the bytes it keeps of a broken upload."""
        reply = self.call("MissingBlobs", coordinator_pb2.MissingBlobsRequest(sha256=shas))
        held = [*reply.held, *[0] * (len(reply.sha256) - len(reply.held))]  # (an older one: none)
        return dict(zip(reply.sha256, held))

    def put_blob(self, path: Path, sha: str, on_bytes: Callable[[int], None] | None = None,
                 held: int = 0, patience_s: float = UPLOAD_PATIENCE_S,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        """Uploads the file at ``path`` from byte ``held`` (what the coordinator kept of a broken
        upload: ``missing``). A connection that breaks, or a coordinator that restarts, costs the
        bytes it had not kept, no more: the upload asks where to resume and goes on, for as long
        as some try made progress within ``patience_s`` (a 40 GB model from a laptop on Wi-Fi
        started over on every cut: an outside run)."""
        size = path.stat().st_size
        offset, tries, last = held, 0, time.monotonic()
        while True:
            sent = [0]
            try:
                self._put_from(path, sha, offset, size, sent, on_bytes)
                return
            except HerdError as e:
                if sent[0]:
                    last = time.monotonic()  # (bytes went out: a try of ten minutes cut at last)
                if not transient(e) or time.monotonic() - last > patience_s:
                    raise
                if not tries:  # (silent for 80 s of a cut link, without a terminal: outside run)
                    print(f"herd: the upload of {path.name} was cut ({_first_line(e)}); "
                          f"resuming for up to {patience_s:.0f}s without progress",
                          file=sys.stderr, flush=True)
                tries += 1
                sleep(min(0.2 * 2 ** min(tries, 5), 5.0))
                try:
                    now = self.missing([sha])
                except HerdError as again:
                    if not transient(again):
                        raise
                    now = {sha: offset}  # (still away: the same bytes again, next try)
            if sha not in now:
                return  # (another upload of the same bytes ended it)
            if on_bytes is not None:  # the bar shows what the coordinator holds
                on_bytes(now[sha] - offset - sent[0])
            if now[sha] > offset:
                last, tries = time.monotonic(), 0
            offset = now[sha]

    def _put_from(self, path: Path, sha: str, offset: int, size: int, sent: list[int],
                  on_bytes: Callable[[int], None] | None) -> None:
        def parts() -> Iterator[coordinator_pb2.PutBlobRequest]:
            yield coordinator_pb2.PutBlobRequest(sha256=sha, offset=offset, size=size)
            for block in read_chunks(path, offset):
                yield coordinator_pb2.PutBlobRequest(data=block)
                sent[0] += len(block)
                if on_bytes is not None:
                    on_bytes(len(block))

        with rpc_errors(self.target):
            self.stub.PutBlob(parts(), timeout=transfer_deadline_s(size - offset))

    def pull(self, job_id: str, step: int, out: Path,
             force: bool = False) -> common_pb2.CheckpointInfo:
        """Writes the checkpoint's files into ``out``, each sha256-checked, each replaced
        atomically; a file already there only with ``force``."""
        with rpc_errors(self.target):
            stream = self.stub.GetAdapter(
                coordinator_pb2.GetAdapterRequest(job_id=job_id, step=step),
                timeout=TRANSFER_DEADLINE_S)
            return receive_checkpoint_files(stream, out, "checkpoint", hint="pull again",
                                            force=force)


def with_port(target: str) -> str:
    """``HOST`` -> ``HOST:7450`` (the coordinator's default port); ``HOST:PORT`` unchanged; a
    bare IPv6 address gets its brackets."""
    host, sep, port = target.rpartition(":")
    if sep and port.isdigit() and (":" not in host or host.startswith("[")):  # HOST:PORT
        if not 0 < int(port) < 65536:  # (gRPC would dial it modulo 65536: another port)
            raise ConfigError(f"coordinator {target}: port {port} is not a port (1-65535)",
                              hint=f"the coordinator's gRPC port is {DEFAULT_COORDINATOR_PORT} "
                              "unless `herd coordinator --port` says otherwise")
        return target
    return hostport(target.strip("[]"), DEFAULT_COORDINATOR_PORT)


def _refusal(target: str, identity: pki.Identity) -> HerdError | None:
    """None when the server at ``target`` proves it is this cluster's coordinator and accepts
    this machine's certificate, else why not."""
    with CoordinatorConnection(target, identity) as c:
        try:
            c.call("ListWorkers", coordinator_pb2.ListWorkersRequest(), timeout=DIAL_S)
            return None
        except HerdError as e:
            logger.debug("coordinator_candidate_refused", target=target, error=e.message)
            return e


RETRY_S = 1.0  # a target that did not accept is tried again after this (it may be starting)
DIAL_S = 2.0  # one candidate's deadline to prove it is this cluster's coordinator
DIALS = 16  # candidates dialled at once: a dozen rogue or stale adverts cost one 2 s wait, not 24


def _answered(done, dialling: dict, tried: dict, refused: dict) -> str | None:
    """The target of the first finished dial that found this cluster's coordinator; the
    refusals of the others recorded."""
    for future in done:
        target = dialling.pop(future)
        if (why := future.result()) is None:
            return target
        tried[target] = time.monotonic()
        refused[target] = why
    return None


OTHERS_S = 0.3  # how long, after one answered, the dials to other adverts may still answer


def _said_others(found: str, adverts, dialling: dict) -> str:
    """``found``; first a warning on stderr when another advert's coordinator also proves it is
    this cluster's, among the dials already under way (waited for OTHERS_S at most): two
    coordinators of one cluster CA split a team's commands between them, a job submitted to one
    unknown to the other, silently (an outside run)."""
    mine = next((a.name for a in adverts if found in a.targets), None)
    # (another advert of the same address: this coordinator's own older record, restarted)
    theirs = {t: a.name for a in adverts if a.name != mine for t in a.targets if t != found}
    others = {f: t for f, t in dialling.items() if t in theirs}
    done, _ = wait(others, timeout=OTHERS_S) if others else ((), ())
    answered = sorted({theirs[others[f]]: others[f] for f in done
                       if f.result() is None}.values())
    if answered:
        print(f"herd: warning: more than one coordinator of this cluster answers ({found}, "
              f"{', '.join(answered)}); using {found}: a job one holds is unknown to the "
              f"other. Pass --coordinator HOST[:PORT] (or set {COORDINATOR_ENV}), or stop one",
              file=sys.stderr)
    return found


def _memo(identity: pki.Identity) -> Path:
    """Where the last coordinator of this cluster (by its CA) that proved itself is kept."""
    import hashlib

    return pki.default_home() / "found" / hashlib.sha256(identity.ca_pem).hexdigest()[:16]


def _recall(identity: pki.Identity) -> str | None:
    try:
        target = _memo(identity).read_text().strip()
        return with_port(target) if target else None
    except (OSError, ConfigError):
        return None


def _remember(identity: pki.Identity, target: str) -> None:
    if _recall(identity) != target:
        try:
            _memo(identity).parent.mkdir(parents=True, exist_ok=True)
            _memo(identity).write_text(target + "\n")
        except OSError:  # (a read-only home: discovery works without it)
            pass


# When the adverts dialled for this long gave none of ours, the last one found is taken (with
# no advert at all, once wait_s is over).
LAST_WAIT_S = 1.0


def find_coordinator(explicit: str | None, identity: pki.Identity, wait_s: float = 4.0) -> str:
    """The first advertised coordinator that proves it is this cluster's (TLS) and accepts this
    machine's certificate; others (another cluster, a stale record, an impostor) are skipped.
    Every address of every advert is tried, DIALS at once, and tried again after RETRY_S until
    ``wait_s`` is over: a record may carry a stale or unreachable address next to the good one,
    and zeroconf expires stale records on its own. None accepting: AuthError (exit 6) when one
    seen refused this machine's certificate (the likely fix is joining the cluster, even beside
    a stale advert that does not answer), else PeerLostError (exit 5).

    The coordinator found last time (kept per cluster CA in $HERD_HOME/found) is dialled too,
    advertised or not: a LAN flooded with rogue adverts (hundreds, each a 2 s dial) made every
    command wait them out, or fail (an outside run). It proves itself as any advert must, and is
    taken when the adverts dialled for LAST_WAIT_S gave none of ours (its advert lost in the
    flood), or none was seen by ``wait_s``; otherwise the adverts decide as before, and a second
    coordinator is still said."""
    if explicit or (explicit := os.environ.get(COORDINATOR_ENV)):
        return with_port(explicit)
    zc = discovery.make_zeroconf()
    tried: dict[str, float] = {}  # target -> when it last refused
    refused: dict[str, HerdError] = {}
    dialling: dict[Future, str] = {}
    pool = ThreadPoolExecutor(DIALS, thread_name_prefix="herd-dial")
    found, last_ok, first = None, False, 0.0  # first: when the first advert was dialled
    try:
        last = _recall(identity)
        recalled = pool.submit(_refusal, last, identity) if last else None
        browser = discovery.Browser(zc, discovery.COORDINATOR_TYPE)
        deadline = time.monotonic() + wait_s
        while found is None and time.monotonic() < deadline:
            adverts = browser.snapshot()
            for advert in adverts:
                for target in advert.targets:
                    if target in dialling.values() or \
                            time.monotonic() - tried.get(target, -RETRY_S) < RETRY_S:
                        continue
                    dialling[pool.submit(_refusal, target, identity)] = target
                    first = first or time.monotonic()
            if recalled is not None and recalled.done():
                if (why := recalled.result()) is None:
                    last_ok = True
                else:  # (an advert of that address is dialled again after RETRY_S)
                    tried[last], refused[last], recalled = time.monotonic(), why, None
            if last_ok and first and time.monotonic() - first >= LAST_WAIT_S:
                found = last  # (adverts dialled for a while, none of them ours: a flood)
            elif dialling:
                done, _ = wait(dialling, timeout=0.05, return_when=FIRST_COMPLETED)
                found = _answered(done, dialling, tried, refused)
            else:
                time.sleep(0.02)
        browser.close()
        if found is None:
            # The dials under way when wait_s ended still count (herd plan's wait is a dial's
            # own 2 s deadline): waited for, not dropped; none is started after it.
            done, _ = wait(dialling, timeout=DIAL_S + 1.0)
            found = _answered(done, dialling, tried, refused) or (last if last_ok else None)
        if found is not None:
            _remember(identity, found)
            if recalled is not None and found != last:  # (it may be a second coordinator)
                dialling[recalled] = last
            return _said_others(found, browser.snapshot(), dialling)
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
        zc.close()
    seen = ", ".join(sorted(refused))
    if auth := [(t, e) for t, e in sorted(refused.items()) if isinstance(e, AuthError)]:
        # Each one's own reason: "revoked" is not "another cluster's coordinator".
        raise AuthError(
            "no coordinator found by zeroconf is this cluster's and accepts this machine's "
            f"certificate ({'; '.join(f'{t}: {e.message}' for t, e in auth)})",
            hint="is this cluster's `herd coordinator` running? Else join the cluster you mean "
            "(`herd token --role client` on its coordinator's machine, then `herd join TOKEN` "
            "here), or pass --coordinator HOST[:PORT]")
    if refused and all(isinstance(e, PeerLostError) for e in refused.values()):
        # (every one seen was unreachable: "proves it is this cluster's" and "start a
        # coordinator" sent a user whose link was down after certificates: an outside run)
        raise PeerLostError(
            "no coordinator found by zeroconf (or last time) answered: " + "; ".join(
                (_first_line(e) if t in e.message else f"{t}: {_first_line(e)}")
                + (" (the one found last time)" if t == last else "")
                for t, e in sorted(refused.items())),
            hint="is it running, and is this machine's network to it up? (--coordinator "
            "HOST[:PORT] names another)")
    raise PeerLostError(
        "no coordinator found by zeroconf"
        + (f" that proves it is this cluster's (saw {seen})" if refused else ""),
        hint="start `herd coordinator` (or `herd up`), or pass --coordinator HOST[:PORT] "
        f"(or set {COORDINATOR_ENV})",
    )


def _first_line(e: HerdError) -> str:
    return e.message.strip().splitlines()[0][:200] if e.message.strip() else type(e).__name__


def connect(explicit: str | None, identity: pki.Identity,
            wait_s: float = 4.0) -> CoordinatorConnection:
    """The coordinator ``explicit`` names, or the one discovery finds; ``found_by`` says which."""
    found_by = ("--coordinator" if explicit else f"${COORDINATOR_ENV}"
                if os.environ.get(COORDINATOR_ENV) else "zeroconf")
    conn = CoordinatorConnection(find_coordinator(explicit, identity, wait_s), identity)
    conn.found_by = found_by
    return conn


def add_connection_args(p) -> None:
    """The options every command that talks to a coordinator takes."""
    p.add_argument("--coordinator", metavar="HOST[:PORT]", default=None,
                   help=f"the coordinator (default: ${COORDINATOR_ENV}, else found by zeroconf; "
                   f"port {DEFAULT_COORDINATOR_PORT} when none is given)")
    p.add_argument("--tls-dir", type=Path, default=None,
                   help="this machine's client certificate and the cluster CA (default: "
                   "$HERD_HOME/tls; `herd join` writes them)")


def client_identity(args) -> pki.Identity:
    """This machine's client certificate (made on the CA's own machine when missing)."""
    return pki.load_or_issue(args.tls_dir or pki.default_dir(), "client")


def connect_from_args(args) -> CoordinatorConnection:
    return connect(args.coordinator, client_identity(args))
