"""Registry: the workers the coordinator may use.

zeroconf adverts of ``_herd-worker._tcp.local.`` (and static ``--worker`` targets) are only
candidates: a worker enters the registry after it answers Describe over mutual TLS, dialled as
the worker id its advert claims (``<id>.worker.herd``, herd/rpc/pki.py), and answers with that id.
A process without a certificate of this cluster never completes the handshake, and one that
claims another worker's id fails it (its certificate names another id), so neither gets work nor
displaces the worker it imitates. A revoked worker id is refused, and dropped when revoked while
admitted. A refused candidate is tried again later and later (up to MAX_RETRY_S), one admitted
before that stopped answering every RETURN_RETRY_S (a Mac plugged back in, or woken up, is used
again within seconds); retries run off the health loop, so only they wait out a deadline.
Liveness is authenticated too: ``max_failures`` failed Health calls in a row remove a worker
(``on_lost(worker_id, reason, unreachable=True)``: it may come back; False: revoked, or its host
refused the connection: its agent is down, its ranks died with it), and a vanished record (an
mDNS goodbye, which anyone on the LAN can send for any name) only prompts a Health call at once;
the worker leaves if that fails.

An advert is verified again whenever zeroconf reports it updated, which happens for reasons not
the worker's (another cluster's same-named worker on the LAN, a stale record coming back). One
that answers again at its address keeps its client; one at a new address (restarted on another
port) gets a new client, the old one closed only when the calls using it end (``retire``): a
PrepareRank streaming a model, or a StartRank, must never end as "Channel closed!". Unless the
old address still answers as that id: then two agents hold one certificate (a cloned Mac), and
the newcomer is refused as a twin until the first is gone (``_twin``).
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Container

from coordinator.domain import WorkerRecord
from coordinator.worker_client import WorkerClient
from herd import PROTOCOL_VERSION, log
from herd.errors import AuthError, HerdError, NotFoundError, PeerLostError
from herd.rpc import discovery, pki

logger = log.get(__name__)
MAX_RETRY_S = 30.0  # the longest wait before a refused candidate is tried again
RETURN_RETRY_S = 1.0  # how often a lost worker (admitted before, now unreachable) is tried again
# Retries dialled at once: a flood of adverts (anyone on the LAN may send them) costs a bounded
# pool, not a thread each (an outside run: 1800 threads); the adverts themselves are bounded and
# resolved on a pool too (herd/rpc/discovery.py MAX_ADVERTS, RESOLVERS).
VERIFIERS = 8


@dataclass(frozen=True)
class Refusal:
    """Why an advert (or static target) is not in the registry, for ``herd workers``."""

    target: str
    kind: str     # "auth" | "unreachable" | "version" | "duplicate" | "other"
    reason: str


def _refusal(target: str, err: HerdError) -> Refusal:
    kind = ("auth" if isinstance(err, AuthError) else
            "unreachable" if isinstance(err, PeerLostError) else "other")
    return Refusal(target, kind, err.message)


class Registry:
    def __init__(self, identity: pki.Identity, on_lost: Callable[..., None] = lambda *_: None,
                 static_targets: list[str] = (), health_interval_s: float = 1.0,
                 max_failures: int = 2, revoked: Container[str] = frozenset()):
        self._identity, self._revoked = identity, revoked
        self._on_lost = on_lost
        self._lock = threading.Lock()
        self._workers: dict[str, WorkerRecord] = {}
        self._clients: dict[str, WorkerClient] = {}
        self._source: dict[str, str] = {}      # worker_id -> advert name or static target
        self._failures: dict[str, int] = {}
        self.refused: dict[str, Refusal] = {}  # candidate -> why it was not admitted
        # candidate (advert name or static target) -> its addresses, each tried in turn
        self._candidates: dict[str, list[str]] = {t: [t] for t in static_targets}
        self._claims: dict[str, str] = {}     # candidate -> the worker id its advert claims
        self._retry: dict[str, tuple[float, float]] = {}  # refused -> (next try, back-off s)
        self._admitted_sources: set[str] = set()  # candidates that were admitted once
        # Adverts withdrawn while their worker still answered (a goodbye sent as it shut down):
        # once it is removed, its advert is gone too, not retried and listed as refused forever.
        self._withdrawn: set[str] = set()
        self._verifying: set[str] = set()  # candidates whose retry is queued or running now
        self._pool = ThreadPoolExecutor(VERIFIERS, thread_name_prefix="verify")
        self.health_interval_s, self.max_failures = health_interval_s, max_failures
        self._stop = threading.Event()
        self._browser: discovery.Browser | None = None

    # --- candidates ------------------------------------------------------------------------

    def browse(self, zc) -> None:
        self._browser = discovery.Browser(zc, discovery.WORKER_TYPE, self._advert_added,
                                          self._advert_removed)

    def _advert_added(self, advert: discovery.Advert) -> None:
        with self._lock:
            self._withdrawn.discard(advert.name)
            self._candidates[advert.name] = advert.targets
            if advert.txt.get("id"):
                self._claims[advert.name] = advert.txt["id"]
            else:
                self._claims.pop(advert.name, None)
        self._verify(advert.name, advert.targets)

    def _advert_removed(self, name: str) -> None:
        """On zeroconf's own thread: the health checks of the workers the advert named run on
        the pool (a goodbye for an unreachable worker, which anyone on the LAN can send, held
        that thread for the check's deadline, every other advert waiting behind it)."""
        with self._lock:
            named = [wid for wid, src in self._source.items() if src == name]
            if not named:
                self._candidates.pop(name, None)
                self.refused.pop(name, None)  # gone: no longer worth listing as refused
                self._retry.pop(name, None)
        for wid in named:
            try:
                self._pool.submit(self._goodbye, name, wid)
            except RuntimeError:  # closed
                return

    def _goodbye(self, name: str, wid: str) -> None:
        with self._lock:
            client = self._clients.get(wid)
        if client is None:  # removed meanwhile, by the health loop (this raised on zeroconf's
            return  # thread, and its browser ended there, seeing no advert after: a review)
        try:
            client.health()
        except HerdError as e:
            with self._lock:
                if self._clients.get(wid) is not client:
                    return  # replaced meanwhile: the new client was just verified
                self._candidates.pop(name, None)
            self._remove(wid, f"its zeroconf record vanished and it does not answer: {e.message}")
        else:
            with self._lock:
                self._withdrawn.add(name)
            logger.info("worker_goodbye_ignored", worker_id=wid, advert=name,
                        reason="it still answers an authenticated health check")

    def _describe_one(self, target: str, claimed: str | None
                      ) -> tuple[WorkerClient, WorkerRecord]:
        """Describe over TLS to the worker id the advert claims (a static target claims none:
        it is asked who it is, then dialled again as that id). Raises HerdError."""
        client = WorkerClient(target, self._identity, claimed)
        try:
            record = client.describe()
            if claimed is None:  # bind the channel to the id it answered with
                client.close()
                client = WorkerClient(target, self._identity, record.worker_id)
                record = client.describe()
            if claimed is not None and record.worker_id != claimed:
                raise AuthError(f"{target} answers as worker {record.worker_id!r}, its advert "
                                f"claims {claimed!r}")
            if f"worker/{record.worker_id}" in self._revoked:
                raise AuthError(f"worker {record.worker_id} was revoked")
        except BaseException:
            client.close()
            raise
        return client, record

    def _describe(self, source: str, targets: list[str]
                  ) -> tuple[WorkerClient | None, WorkerRecord | Refusal]:
        """The first address that answers Describe, as the worker its advert claims, with this
        protocol version."""
        with self._lock:
            claimed = self._claims.get(source)
        refusal = Refusal(",".join(targets), "unreachable", "no address")
        for target in targets:
            try:
                client, record = self._describe_one(target, claimed)
            except HerdError as e:
                refusal = _refusal(target, e)
                continue
            if record.protocol_version != PROTOCOL_VERSION:
                client.close()
                return None, Refusal(target, "version", (
                    f"speaks herd protocol {record.protocol_version}, this coordinator "
                    f"{PROTOCOL_VERSION}: install the same herd version on both"))
            return client, record
        return None, refusal

    def _verify(self, source: str, targets: list[str]) -> WorkerRecord | None:
        client, record = self._describe(source, targets)
        if client is not None and (twin := self._twin(source, client, record)):
            client.close()
            client, record = None, twin
        if client is None:
            with self._lock:
                old = self.refused.get(source)  # (logged per kind: gRPC's text varies each try)
                first = old is None or (old.kind, old.target) != (record.kind, record.target)
                self.refused[source] = record
                # Tried again later, less and less often: a stranger's advert costs a handshake
                # now and then, not one per tick forever; an admitted worker is expected back.
                if source in self._admitted_sources and record.kind == "unreachable":
                    delay = RETURN_RETRY_S
                else:
                    delay = min(MAX_RETRY_S, 2 * self._retry.get(source, (0.0, 0.5))[1])
                self._retry[source] = (time.monotonic() + delay, delay)
            if first:
                logger.warning("worker_not_admitted", source=source, target=record.target,
                               kind=record.kind, error=record.reason)
            return None
        record.last_seen_ms = int(time.time() * 1000)
        target = client.target
        with self._lock:
            if self._stop.is_set():  # closed while a retry dialled: close() missed this one
                client.close()
                return None
            self.refused.pop(source, None)
            self._retry.pop(source, None)
            self._admitted_sources.add(source)
            old = self._clients.get(record.worker_id)
            if old is not None and old.target == target:
                # The same worker at the same address (zeroconf reports an update for reasons
                # that are not the worker's): keep the channel its calls are using.
                old, client = client, old
            self._workers[record.worker_id] = record
            self._clients[record.worker_id] = client
            self._source[record.worker_id] = source
            self._failures[record.worker_id] = 0
        if old is None:
            logger.info("worker_admitted", worker_id=record.worker_id, target=target,
                        memory_bytes=record.memory_bytes, chip=record.chip)
        elif old.target == client.target:
            old.close()  # the spare just dialled for Describe: nothing else has used it
        else:
            logger.info("worker_moved", worker_id=record.worker_id, old=old.target, new=target)
            old.retire()  # closed when the calls in flight on it end
        return record

    def _remove(self, worker_id: str, reason: str, unreachable: bool = True) -> None:
        with self._lock:
            record = self._workers.pop(worker_id, None)
            client = self._clients.pop(worker_id, None)
            source = self._source.pop(worker_id, None)
            if source in self._withdrawn:  # (a stopped worker stayed "refused: unreachable")
                self._withdrawn.discard(source)
                for table in (self._candidates, self.refused, self._retry):
                    table.pop(source, None)
        if client:
            client.retire()
        if record:
            logger.info("worker_removed", worker_id=worker_id, reason=reason)
            self._on_lost(worker_id, reason, unreachable)

    # --- queries ---------------------------------------------------------------------------

    def workers(self) -> list[WorkerRecord]:
        with self._lock:
            return sorted(self._workers.values(), key=lambda w: w.worker_id)

    def refusals(self) -> dict[str, Refusal]:
        """Candidates not admitted (and not admitted under another name since), and why."""
        with self._lock:
            admitted = set(self._source.values())
            return {s: r for s, r in self.refused.items() if s not in admitted}

    def client(self, worker_id: str) -> WorkerClient:
        with self._lock:
            client = self._clients.get(worker_id)
        if client is None:
            raise NotFoundError(f"worker {worker_id} is not in the registry")
        return client

    # --- health loop -----------------------------------------------------------------------

    def _check(self) -> None:
        with self._lock:
            clients = dict(self._clients)
            known = set(self._source.values())
            pending = {n: t for n, t in self._candidates.items() if n not in known}
        for wid, client in clients.items():
            if f"worker/{wid}" in self._revoked:
                self._remove(wid, "its certificate was revoked", unreachable=False)  # not back
                continue
            try:
                reply = client.health()
            except HerdError as e:
                with self._lock:
                    if self._clients.get(wid) is not client:
                        continue  # replaced meanwhile: its failure is not the worker's
                    self._failures[wid] = self._failures.get(wid, 0) + 1
                    n = self._failures[wid]
                if n >= self.max_failures:
                    self._remove(wid, f"health failed {n} times: {e.message}",
                                 unreachable="onnection refused" not in e.message)
                continue
            with self._lock:
                self._failures[wid] = 0
                if wid in self._workers:
                    self._workers[wid].running_job_id = reply.worker.running_job_id
                    self._workers[wid].running_attempt = (reply.ranks[0].attempt if reply.ranks
                                                          else 0)
                    self._workers[wid].free_memory_bytes = reply.worker.free_memory_bytes
                    self._workers[wid].last_seen_ms = int(time.time() * 1000)
        # Candidates that were refused or unreachable get another chance (a certificate may be
        # fixed), after their back-off.
        now = time.monotonic()
        for name, targets in pending.items():
            if self._retry.get(name, (0.0, 0.0))[0] <= now:
                self._verify_aside(name, targets)

    def _twin(self, source: str, client: WorkerClient, record: WorkerRecord) -> Refusal | None:
        """A second agent answering as an admitted worker's id from another advert (its
        certificate copied: a cloned Mac, a copied ~/.herd), while the first still answers as
        that id: refused, not taken (the id flipped between the two each second, and jobs ran
        on either: an outside run). One whose first address no longer answers has moved."""
        with self._lock:
            held, held_by = self._clients.get(record.worker_id), self._source.get(record.worker_id)
        if held is None or held_by == source or held.target == client.target:
            return None
        try:
            first = held.describe()
        except HerdError:
            return None
        if first.worker_id != record.worker_id or (first.host, first.port) == (
                record.host, record.port):
            return None  # (one agent reached two ways: a --worker name and its advert)
        return Refusal(client.target, "duplicate", (
            f"answers as worker {record.worker_id}, which {held.target} already serves: two "
            "agents hold one certificate; give this machine its own (`herd join TOKEN --id "
            "NAME` with its own HERD_HOME), or stop one"))

    def _verify_aside(self, name: str, targets: list[str]) -> None:
        """``_verify`` on the pool (one at a time per candidate): an unreachable address waits
        out its Describe deadline, and the health checks of the admitted workers must not wait
        with it."""
        with self._lock:
            if name in self._verifying:
                return
            self._verifying.add(name)

        def verify() -> None:
            try:
                self._verify(name, targets)
            except Exception:  # the next tick tries again; the error is logged in full
                logger.exception("registry_verify_failed", source=name)
            finally:
                with self._lock:
                    self._verifying.discard(name)

        try:
            self._pool.submit(verify)
        except RuntimeError:  # closed
            with self._lock:
                self._verifying.discard(name)

    def run(self) -> None:
        while not self._stop.wait(self.health_interval_s):
            try:
                self._check()
            except Exception:  # keep checking the others; the error is logged in full
                logger.exception("registry_check_failed")

    def start(self) -> threading.Thread:
        for name, targets in list(self._candidates.items()):
            self._verify(name, targets)
        (t := threading.Thread(target=self.run, daemon=True, name="registry")).start()
        return t

    def close(self) -> None:
        self._stop.set()
        if self._browser:
            self._browser.close()
        self._pool.shutdown(wait=False, cancel_futures=True)
        with self._lock:
            clients = list(self._clients.values())
        for c in clients:
            c.close()
