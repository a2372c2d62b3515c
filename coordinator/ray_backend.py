"""``cluster.backend: ray``: herd's jobs on an existing Ray cluster, with Ray's placement and
failure detection; the rank code, the exchange and the checkpoints are the zeroconf backend's.

The coordinator connects to the Ray cluster as a driver when the first ray job is submitted (an
unreachable cluster fails that submit, naming the address tried). Its workers are the Ray nodes
that offer ``herd_worker`` (coordinator/ray_nodes.py). herd's planner chooses the nodes and the
layout, exactly as for agents; Ray then reserves that choice: one bundle per rank in a
STRICT_SPREAD placement group, each bundle pinned to its node (label ``ray.io/node-id``) and
asking for the node's herd slot and the planner's memory. In each bundle a rank actor (the
agent's Worker, worker/agent/ray_actor.py, injected by the CLI) reserves the rank's ring and
exchange ports on its node; the MLX hostfile and exchange peers come from those. Reservation is a
small state machine the scheduler polls each tick (placement group, then actors), so it never
blocks the scheduler.

Failures come from Ray: a rank's pending ``wait`` call fails when its actor dies (its node's
raylet died, or it was killed), and a node Ray marks dead is a lost worker; both feed the
scheduler's restart-from-checkpoint policy. A rank exits with its actor (PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import os
import signal
import threading
import time
from dataclasses import dataclass, field, replace
from typing import Callable

from coordinator import convert, ray_nodes
from coordinator.domain import FetchProgress, Job, RankLaunch, WorkerRecord
from coordinator.placement import Placement
from coordinator.scheduler import Wait
from herd import log
from herd.errors import HerdError, PlacementError
from herd.rpc import pki
from herd.rpc.auth import Revocations

logger = log.get(__name__)
NAMESPACE = "herd"
RESERVE_TIMEOUT_S = 120.0  # a placement group or its actors not ready by then: release, retry
LEASE_S = 15.0  # a reservation the scheduler stopped asking about (job cancelled) is released
STOP_GRACE_S = 10.0


@dataclass
class _Attempt:
    """One attempt's reservation on Ray: its placement group, then one actor per rank."""

    job_id: str
    attempt: int
    worker_ids: list[str]
    pg: object
    ready: object  # the placement group's ready() ref
    created: float
    touched: float
    actors: list = field(default_factory=list)
    described: list = field(default_factory=list)  # describe() refs, in rank order
    started: bool = False
    done: set[int] = field(default_factory=set)  # ranks whose actor returned or died
    stopping: bool = False


class RayBackend:
    def __init__(self, actor_cls: type, coordinator_address: Callable[[], str],
                 on_worker_lost: Callable[[str, str], None],
                 on_rank_lost: Callable[[str, int, int, str, str], None],
                 poll_s: float = 0.5, authority: pki.Authority | None = None):
        self._actor_cls, self._address = actor_cls, coordinator_address
        self._authority = authority  # signs each actor's worker and each rank's credential
        # `herd revoke worker/ray-<node>` ends a node's part (it was chosen, the tick then failed)
        self._revoked = Revocations(authority.folder if authority else None)
        self._on_worker_lost, self._on_rank_lost = on_worker_lost, on_rank_lost
        self._poll_s = poll_s
        self._lock = threading.RLock()
        self.address: str | None = None  # the Ray cluster this coordinator drives, once connected
        self._nodes: dict[str, dict] = {}  # worker id -> ray.nodes() entry, herd workers alive
        self._attempts: dict[tuple[str, int], _Attempt] = {}
        self._waits: dict = {}  # pending wait() ref -> (attempt key, rank)
        self._stop = threading.Event()

    # --- connecting ------------------------------------------------------------------------

    def connect(self, job: Job) -> None:
        self.connect_to(job.config.cluster.ray_address)

    def connect_to(self, asked: str) -> None:
        """Connects as a driver, once; PlacementError naming the address when it cannot."""
        with self._lock:
            if self.address is not None:
                if asked != "auto" and ray_nodes.resolve_address(asked) != self.address:
                    raise PlacementError(
                        f"this coordinator drives the Ray cluster at {self.address}; the job "
                        f"asks for {asked}", hint="a coordinator drives one Ray cluster: set "
                        f"cluster.ray_address: auto (or {self.address}), or use another "
                        "coordinator")
                return
            os.environ["RAY_USAGE_STATS_ENABLED"] = "0"  # before Ray loads; nothing leaves
            address = ray_nodes.resolve_address(asked)
            ray_nodes.check_reachable(address)
            ray_nodes.check_session_writable()
            import ray

            # A Ray driver exits on SIGTERM (Ray's handler: sys.exit) and dumps a crash report
            # on it (absl's): a coordinator stopped by systemd or `herd down` skipped its own
            # stop and exited 134 or 15 (an outside run). Its own handler is kept.
            os.environ.setdefault("RAY_DISABLE_FAILURE_SIGNAL_HANDLER", "1")
            main = threading.current_thread() is threading.main_thread()
            handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)
                        if main}
            try:
                ray.init(address=address, namespace=NAMESPACE, log_to_driver=False,
                         logging_level="warning", ignore_reinit_error=True)
            except Exception as e:  # ConnectionError, RuntimeError...: Ray's reason, verbatim
                raise ray_nodes.connect_refusal(address, e) from None
            finally:
                for sig, handler in handlers.items():
                    if handler is not None:
                        signal.signal(sig, handler)
            self.address = address
            self._refresh_nodes()
        threading.Thread(target=self._monitor, daemon=True, name="ray-monitor").start()
        logger.info("ray_connected", address=address, herd_nodes=len(self._nodes))

    def close(self) -> None:
        self._stop.set()
        if self.address is not None:
            import ray

            with self._lock:
                attempts = list(self._attempts.values())
            for a in attempts:
                self._teardown(a)
            ray.shutdown()

    # --- workers ---------------------------------------------------------------------------

    def workers(self) -> list[WorkerRecord]:
        with self._lock:
            busy = {a.worker_ids[r]: a.job_id for a in self._attempts.values() if a.started
                    for r in range(len(a.worker_ids)) if r not in a.done}
            records = [ray_nodes.node_record(n, busy.get(wid, ""))
                       for wid, n in self._nodes.items() if f"worker/{wid}" not in self._revoked]
        return sorted((r for r in records if r), key=lambda w: w.worker_id)

    def _refresh_nodes(self) -> None:
        import ray

        nodes = {}
        for n in ray.nodes():
            if ray_nodes.node_record(n) is not None:
                nodes[ray_nodes.worker_id(n["NodeID"])] = n
        revoked = {wid for wid in nodes if f"worker/{wid}" in self._revoked}
        with self._lock:
            lost = [wid for wid in self._nodes if wid not in nodes or wid in revoked]
            self._nodes = {wid: n for wid, n in nodes.items() if wid not in revoked}
        for wid in lost:
            why = "its certificate was revoked" if wid in revoked else "Ray marked its node dead"
            logger.warning("ray_node_lost", worker_id=wid, reason=why)
            self._on_worker_lost(wid, why)

    # --- reserving -------------------------------------------------------------------------

    def reserve(self, job: Job, attempt: int, placement: Placement,
                workers: dict[str, WorkerRecord]) -> dict[str, WorkerRecord] | Wait:
        """Polled each tick while the job waits: Wait until the placement group and every
        rank's actor are up, then the chosen workers with their actors' host and ports."""
        from ray.util.placement_group import NODE_ID_LABEL_KEY, placement_group

        now = time.monotonic()
        key = (job.job_id, attempt)
        with self._lock:
            gone = [w for w in placement.worker_ids if w not in self._nodes]
            if gone:  # chosen from a list that was current a moment ago
                return Wait(f"Ray node {gone[0]} was lost")
            a = self._attempts.get(key)
            if a is not None and a.worker_ids != placement.worker_ids:  # the plan changed
                self._teardown_later(a)
                a = None
            if a is None:
                ids = list(placement.worker_ids)
                pg = placement_group(
                    [ray_nodes.bundle(placement.bytes_per_worker)] * len(ids),
                    strategy="STRICT_SPREAD",
                    bundle_label_selector=[{NODE_ID_LABEL_KEY: self._nodes[w]["NodeID"]}
                                           for w in ids])
                a = self._attempts[key] = _Attempt(job.job_id, attempt, ids, pg, pg.ready(),
                                                   now, now)
                logger.info("ray_reserving", job_id=job.job_id, attempt=attempt, nodes=ids)
            a.touched = now
            waited = now - a.created
        lost = [w for w in a.worker_ids if w not in self._nodes]
        if lost or waited > RESERVE_TIMEOUT_S:
            self._teardown_later(a)
            return Wait(f"Ray node {lost[0]} was lost while reserving" if lost else
                        f"Ray did not reserve {len(a.worker_ids)} ranks within "
                        f"{RESERVE_TIMEOUT_S:.0f}s (resources held by other Ray work? "
                        "`ray status`); trying again")
        if not a.actors:
            return self._create_actors(a, workers)
        import ray

        ready, _ = ray.wait(a.described, num_returns=len(a.described), timeout=0)
        if len(ready) < len(a.described):
            return Wait(f"starting {len(a.described)} rank actors on Ray")
        try:
            infos = [convert.worker_from_bytes(b) for b in ray.get(a.described, timeout=10)]
        except ray.exceptions.RayError as e:
            self._teardown_later(a)
            return Wait(f"a rank actor could not start on Ray: {_short(e)}")
        return {wid: replace(workers[wid], host=info.host, ring_port=info.ring_port,
                             exchange_port=info.exchange_port)
                for wid, info in zip(a.worker_ids, infos)}

    def _create_actors(self, a: _Attempt, workers: dict[str, WorkerRecord]) -> Wait:
        import ray
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        ready, _ = ray.wait([a.ready], timeout=0)
        if not ready:
            return Wait(f"reserving {len(a.worker_ids)} ranks on Ray: "
                        + ", ".join(a.worker_ids))
        remote = ray.remote(self._actor_cls)
        try:  # (signed before any actor starts: one that cannot be, a revoked node, waits)
            idents = [self._issue("worker", wid, pki.RANK_DAYS) for wid in a.worker_ids]
        except HerdError as e:
            self._teardown_later(a)
            return Wait(f"cannot start rank actors on Ray: {e.message}")
        for rank, (wid, ident) in enumerate(zip(a.worker_ids, idents)):
            w = workers[wid]
            actor = remote.options(
                num_cpus=0, max_concurrency=4, max_restarts=0,
                scheduling_strategy=PlacementGroupSchedulingStrategy(
                    a.pg, placement_group_bundle_index=rank),
            ).remote(wid, w.host, w.memory_bytes, ident.ca_pem, ident.cert_pem, ident.key_pem)
            a.actors.append(actor)
            a.described.append(actor.describe.remote())
        return Wait(f"starting {len(a.actors)} rank actors on Ray")

    def _issue(self, role: str, name: str, days: int) -> pki.Identity:
        if self._authority is None:
            raise PlacementError("this coordinator has no cluster CA to sign Ray credentials")
        return self._authority.issue(role, name, days=days)

    # --- starting and stopping -------------------------------------------------------------

    def _actor(self, launch: RankLaunch):
        job = launch.job
        with self._lock:
            a = self._attempts.get((job.job_id, job.attempt))
        if a is None or a.stopping:
            raise PlacementError(f"no Ray reservation for rank {launch.rank} of {job.job_id}")
        return a, a.actors[launch.rank]

    def _get(self, launch: RankLaunch, ref, timeout: float):
        """ray.get of an actor call, its failure as the herd error it carries (or a
        PlacementError naming the rank and node)."""
        import ray

        rank, wid = launch.rank, launch.worker.worker_id
        try:
            return ray.get(ref, timeout=timeout)
        except ray.exceptions.RayTaskError as e:
            if isinstance(e.cause, HerdError):
                raise e.cause from None
            raise PlacementError(f"rank {rank}'s actor on {wid} failed: {_short(e)}") from None
        except ray.exceptions.RayError as e:
            raise PlacementError(f"rank {rank}'s actor on {wid} is lost: {_short(e)}") from None

    def _request(self, launch: RankLaunch) -> bytes:
        """The rank's StartRankRequest, with its own credential for its job attempt."""
        job = launch.job
        credential = self._issue("rank", pki.rank_scope(job.job_id, job.attempt), pki.RANK_DAYS)
        return convert.launch_to_bytes(launch, self._address(), credential)

    def prepare_rank(self, launch: RankLaunch,
                     on_progress: Callable[[FetchProgress], bool]) -> None:
        """The rank's model onto its node before any rank starts (coordinator/launching.py),
        its progress polled from the actor; a False from ``on_progress`` stops asking (the
        attempt is over: its stop_job cancels the actor's preparation)."""
        _, actor = self._actor(launch)
        request = self._request(launch)
        while True:
            status, done = self._get(launch, actor.prepare_rank.remote(request), timeout=120)
            if not on_progress(convert.fetch_from_bytes(status)) or done:
                return

    def start_rank(self, launch: RankLaunch) -> None:
        a, actor = self._actor(launch)
        self._get(launch, actor.start_rank.remote(self._request(launch)), timeout=180)
        with self._lock:
            a.started = True
            self._waits[actor.wait.remote()] = ((a.job_id, a.attempt), launch.rank)

    def stop_job(self, worker: WorkerRecord | None, job: Job) -> None:
        """Stops every rank of ``job``'s attempt and earlier ones, and releases their
        reservations (idempotent: the first call for a job does it all)."""
        with self._lock:
            mine = [a for a in self._attempts.values()
                    if a.job_id == job.job_id and a.attempt <= job.attempt]
        for a in mine:
            self._teardown(a)

    def _teardown_later(self, a: _Attempt) -> None:
        threading.Thread(target=self._teardown, args=(a,), daemon=True,
                         name=f"ray-release-{a.job_id}").start()

    def _teardown(self, a: _Attempt) -> None:
        import ray
        from ray.util.placement_group import remove_placement_group

        with self._lock:
            if a.stopping:
                return
            a.stopping = True
        stops = [actor.stop_job.remote(a.job_id) for actor in a.actors]
        if stops:  # the agent's own stop: SIGTERM, then SIGKILL; then the actors go
            ray.wait(stops, num_returns=len(stops), timeout=STOP_GRACE_S)
        for actor in a.actors:
            ray.kill(actor, no_restart=True)
        try:
            remove_placement_group(a.pg)
        except Exception as e:  # already removed, or the cluster is going away
            logger.warning("ray_release_failed", job_id=a.job_id, error=str(e))
        with self._lock:  # only its own entry: a new plan for the same attempt may hold the key
            key = (a.job_id, a.attempt)
            if self._attempts.get(key) is a:
                del self._attempts[key]
                self._waits = {r: v for r, v in self._waits.items() if v[0] != key}
        logger.info("ray_released", job_id=a.job_id, attempt=a.attempt)

    # --- watching --------------------------------------------------------------------------

    def _monitor(self) -> None:
        while not self._stop.is_set():
            try:
                self._watch_once()
            except Exception:  # keep watching; the error is logged in full
                logger.exception("ray_monitor_failed")
                self._stop.wait(self._poll_s)

    def _watch_once(self) -> None:
        import ray

        self._refresh_nodes()
        with self._lock:
            refs = list(self._waits)
        if not refs:
            self._stop.wait(self._poll_s)
            ready = []
        else:
            ready, _ = ray.wait(refs, num_returns=len(refs), timeout=self._poll_s)
        for ref in ready:
            self._finished(ref)
        now = time.monotonic()
        with self._lock:
            idle = [a for a in self._attempts.values() if not a.stopping and (
                (not a.started and now - a.touched > LEASE_S)
                or (a.started and len(a.done) == len(a.worker_ids)))]
        for a in idle:  # a cancelled job's reservation, or an attempt whose ranks all ended
            self._teardown_later(a)

    def _finished(self, ref) -> None:
        """A rank's wait() returned (its rank exited and its relay reported) or failed."""
        import ray

        with self._lock:
            key, rank = self._waits.pop(ref, (None, 0))
            a = self._attempts.get(key) if key else None
        if a is None:
            return
        try:
            ray.get(ref, timeout=5)
        except ray.exceptions.ActorUnavailableError:
            # Unreachable for now: the node may be going down, or a network blip. Ask again;
            # Ray turns it into ActorDiedError once it declares the actor (or node) dead.
            time.sleep(self._poll_s)
            with self._lock:
                if not a.stopping:
                    self._waits[a.actors[rank].wait.remote()] = (key, rank)
            return
        except ray.exceptions.RayError as e:
            with self._lock:
                a.done.add(rank)
                ours = a.stopping
            if not ours:
                wid = a.worker_ids[rank]
                logger.warning("ray_rank_lost", job_id=a.job_id, attempt=a.attempt, rank=rank,
                               worker_id=wid, error=_short(e))
                self._on_rank_lost(a.job_id, a.attempt, rank, wid,
                                   f"its Ray actor died ({_short(e)})")
            return
        with self._lock:
            a.done.add(rank)


def _short(e: Exception) -> str:
    text = " ".join(str(e).split())
    return text if len(text) <= 300 else text[:297] + "..."
