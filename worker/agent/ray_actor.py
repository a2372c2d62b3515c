"""One rank of a ``cluster.backend: ray`` job, inside a Ray actor: the agent's Worker without its
gRPC server.

The coordinator (a Ray driver) creates one actor per rank, in that rank's bundle of the job's
placement group. The actor reserves the rank's MLX ring and gRPC exchange ports on its node, then
runs the rank exactly as an agent does: RankProcess starts ``python -m worker.rank``, and its Relay
reports progress, checkpoints and the exit to the coordinator over authenticated gRPC. What crosses
Ray is the agent's own contract, serialized: Describe's WorkerInfo and a StartRankRequest.

Its credentials come from the coordinator with the actor: a worker certificate for this actor's
worker id (enough to report and upload for the jobs placed on it) and, with each StartRankRequest,
the rank's own job-attempt certificate. The node owner's policy (model roots, remote code) comes
from the environment `herd worker --ray` gave `ray start` (worker/agent/policy.py). No
cluster-wide key is on the node or crosses Ray (whose
own transport is not authenticated: a Ray cluster belongs on a network its owner trusts).
Ranks are started from one long-lived thread with ``die_with_parent``, so a rank dies with its
actor; and the actor ends itself, with its rank, when its node's raylet dies (measured
with Ray 2.60: an actor whose raylet was SIGKILLed lives on, orphaned, and its rank trains on).
The actor and its rank run at their node's priority, not at Ray's worker niceness (15 by default:
on a busy machine it slowed ranks by ~10%, bench/results/ray-vs-zeroconf-*.md, and starved the
actor's relay and raylet watch for seconds).
This module imports no Ray: the coordinator wraps the class with ``ray.remote``.
"""

from __future__ import annotations

import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from herd import PROTOCOL_VERSION
from herd.parent_death import die_with_parent
from herd.rpc import pki
from herd.rpc.ports import kept_ports
from worker.agent import convert
from worker.agent.machine import Machine
from worker.agent.policy import Policy
from worker.agent.service import Worker


class RankActor:
    def __init__(self, worker_id: str, host: str, memory_bytes: int, ca_pem: bytes,
                 cert_pem: bytes, key_pem: bytes):
        ring_port, exchange_port = kept_ports(2, host)
        machine = Machine(chip="", memory_bytes=memory_bytes, gpu_cores=0, os="", mlx_version="")
        identity = pki.Identity("worker", worker_id, ca_pem, cert_pem, key_pem)
        self.worker = Worker(worker_id, host, 0, ring_port, exchange_port, machine,
                             pki.default_home() / "ray-worker" / worker_id, identity,
                             policy=Policy.from_env(), rank_preexec=self._rank_preexec)
        # Linux signals a rank when the *thread* that forked it exits: one thread starts them all.
        self._starter = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rank-starter")
        self._raylet = os.getppid()  # Ray starts actors from the node's raylet
        self._nice = os.getpriority(os.PRIO_PROCESS, self._raylet)
        _renice_threads(self._nice)  # threads started from here on inherit it
        threading.Thread(target=self._end_with_raylet, daemon=True, name="raylet-watch").start()

    def _rank_preexec(self) -> None:
        """In the rank's child, before exec: die with this actor, and run at the raylet's
        priority (lowering niceness needs CAP_SYS_NICE or a raised RLIMIT_NICE; without them the
        rank keeps Ray's worker niceness, which only matters when the machine is shared)."""
        die_with_parent()  # (SIGKILL: a rank never outlives a Ray actor killed with its node)
        try:
            os.setpriority(os.PRIO_PROCESS, 0, self._nice)  # the child has one thread here
        except OSError:
            pass

    def _end_with_raylet(self, poll_s: float = 1.0, grace_s: float = 15.0) -> None:
        """A hand-written parent watch (Ray has none for this case): once the raylet is gone,
        Ray no longer manages this process, so stop the rank (its relay reports the exit, which
        restarts the job) and leave."""
        while os.getppid() == self._raylet:
            time.sleep(poll_s)
        self.worker.stop_all()
        deadline = time.monotonic() + grace_s
        while self.worker.rank and self.worker.rank.running() and time.monotonic() < deadline:
            time.sleep(0.2)
        os._exit(1)

    def describe(self) -> bytes:
        """WorkerInfo (serialized): where this rank's ring and exchange listen."""
        w = self.worker
        return convert.worker_info(w.worker_id, w.host, 0, w.ring_port, w.exchange_port,
                                   w.machine, w.machine.memory_bytes, PROTOCOL_VERSION,
                                   "").SerializeToString()

    def prepare_rank(self, request: bytes, poll_s: float = 1.0) -> tuple[bytes, bool]:
        """StartRankRequest (serialized) -> (the model's FetchProgress, serialized; whether it
        is ready), after waiting up to ``poll_s`` for it: the agent's PrepareRank stream, polled
        (the coordinator reports progress between calls). Raises what the preparation raised."""
        prep = self.worker.prepare(convert.spec_from_bytes(request))
        done = prep.wait(poll_s)
        if done:
            prep.result()
        return convert.fetch_to_pb(prep.status()).SerializeToString(), done

    def start_rank(self, request: bytes) -> int:
        """StartRankRequest (serialized) -> the rank's pid. Raises what the agent raises."""
        spec = convert.spec_from_bytes(request)
        return self._starter.submit(self.worker.start_rank, spec).result()

    def stop_job(self, job_id: str) -> bool:
        return self.worker.stop_job(job_id)

    def wait(self, poll_s: float = 0.5) -> int | None:
        """Blocks until the rank has exited and its relay has reported (and uploaded) all;
        returns its exit code (None if none was started)."""
        rank = self.worker.rank
        while rank is not None and rank.running():
            time.sleep(poll_s)
        return rank.proc.returncode if rank is not None and rank.proc else None


def _renice_threads(nice: int) -> None:
    """This process at niceness ``nice``: every thread on Linux, where niceness is per thread.
    Lowering it needs CAP_SYS_NICE or RLIMIT_NICE; without them things stay as Ray set them."""
    task = "/proc/self/task"
    for tid in os.listdir(task) if os.path.isdir(task) else [0]:
        try:
            os.setpriority(os.PRIO_PROCESS, int(tid), nice)
        except OSError:
            pass
