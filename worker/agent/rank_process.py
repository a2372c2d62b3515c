"""One job's rank on this worker: its folder, its child process, and stopping it.

The rank is ``python -m worker.rank`` started per the rank contract (MLX_RANK, MLX_HOSTFILE,
MLX_WORLD_SIZE, HERD_EXCHANGE_PEERS, HERD_RANK_TLS) in its own process group, so a stop kills the
whole tree. Its relay thread (worker/agent/relay.py) tails what it reports; its watchdog
(worker/agent/watchdog.py) kills it when a collective stalls. It dies with the agent
(worker/rank/lifeline.py: the agent's pid, a pipe only the agent holds open), and its pid is kept
in its folder, so an agent restarted after a crash stops what the old one left
(worker/agent/orphans.py). The rank holds only its own credential, for its job attempt's exchange
(``tls/`` in its folder, named by HERD_RANK_TLS); nothing of the worker's own certificate or key
reaches its environment.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

from herd import jaccl, log
from herd.adapter_card import BASE_MODEL_ENV
from herd.config import config_to_yaml
from herd.digest import FileDigest
from herd.rpc import pki
from herd.rpc.files import check_name, check_sha
from herd.rpc.names import inside
from worker.agent.coordinator_client import CoordinatorClient
from worker.agent.domain import RankSpec
from worker.agent.orphans import PID_FILE
from worker.agent.relay import Relay
from worker.agent.watchdog import Watchdog
from worker.pipeline.topology import Topology, check_same_cut
from worker.rank.heartbeat import HEARTBEAT_ENV
from worker.rank.lifeline import AGENT_PID_ENV, LIFELINE_FD_ENV
from worker.rank.runtime import preload_env

logger = log.get(__name__)
# The rank's own command (worker/rank/__main__.py): the agent starts it, never imports it.
RANK_MODULE = "worker.rank"
# Where a rank finds its credential (read by worker/exchange/grpc GrpcExchange.from_env).
RANK_TLS_ENV = "HERD_RANK_TLS"
# Credentials a worker's environment may carry that a rank (job code) must never see.
_NOT_FOR_RANKS = ("HERD_SECRET",)
HEARTBEAT_FILE = "heartbeat"
# Linux's parent-death signal fires when the *thread* that forked the rank exits, not the
# process: every rank is forked from this one thread, which lives as long as the agent.
_SPAWNER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rank-spawner")


class RankProcess:
    """A running rank: started by ``start``, watched by its relay thread, killed by ``stop``."""

    def __init__(self, spec: RankSpec, worker_id: str, state_dir: Path, identity: pki.Identity,
                 on_exit: Callable[[RankProcess], None] | None = None,
                 model_dir: Path | None = None, preexec: Callable[[], None] | None = None):
        self.spec = spec
        self.preexec = preexec  # run in the child before exec (worker/agent/ray_actor.py)
        self.worker_id = worker_id
        self.dir = spec.folder(state_dir)
        self._ca_pem = identity.ca_pem
        self.model_dir = model_dir  # the prepared model (worker/agent/model_fetch.py)
        self._blobs = state_dir / "blobs"
        self._client = CoordinatorClient(spec.coordinator, identity)
        self._on_exit = on_exit
        self._stopping = threading.Event()
        self._abandoned = threading.Event()  # the coordinator wants no more of its reports
        self.stop_reason = ""  # why the agent stopped it, reported as its exit's error
        self.proc: subprocess.Popen | None = None
        self._relay_thread: threading.Thread | None = None
        self._lifeline: int | None = None  # the pipe's write end: open while the agent lives
        self._watchdog: Watchdog | None = None
        self.log = logger.bind(job_id=spec.job_id, rank=spec.rank, attempt=spec.attempt)

    # --- setting up -----------------------------------------------------------------------

    def _materialize(self) -> Path:
        """Job folder: data/ (from the content-addressed cache), config.yaml (its model: the
        folder PrepareRank made ready), hostfile.json."""
        data = self.dir / "data"
        # Jobs' configs, data, credentials and adapters are the job's: other users of this
        # machine cannot even list them.
        self.dir.parent.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        data.mkdir(parents=True, exist_ok=True)
        self._blobs.mkdir(parents=True, exist_ok=True)
        for f in self.spec.dataset:
            self._link_blob(f, inside(data, check_name(f.name, "dataset")))
        pki.Identity("rank", pki.rank_scope(self.spec.job_id, self.spec.attempt), self._ca_pem,
                     self.spec.rank_cert_pem, self.spec.rank_key_pem).save(self.dir / "tls")
        cfg = self.spec.config
        update = {"train": True, "adapter_path": str(self.dir / "adapters")}
        if self.spec.dataset:  # else the job reads a Hugging Face dataset (hf_dataset)
            update["data"] = str(data)
        if self.model_dir is not None:
            update["model"] = str(self.model_dir)
        if (shipped := self.spec.resume_adapter) is not None:  # loaded in place of the path
            target = inside(self.dir, check_name(shipped.name, "checkpoint"))
            self._link_blob(shipped, target)
            update["resume_adapter_file"] = str(target)
        local = cfg.model_copy(update=update)
        (self.dir / "config.yaml").write_text(config_to_yaml(local))
        if self.spec.ring_hosts:
            (self.dir / "hostfile.json").write_text(json.dumps(self.spec.ring_hosts))
        if self.spec.data_path == "jaccl":
            (self.dir / "ibv_devices.json").write_text(self.spec.ibv_devices_json)
        return self.dir / "config.yaml"

    def _link_blob(self, f: FileDigest, target: Path) -> None:
        """A job file (from the content-addressed cache, fetched once per worker) at ``target``."""
        cached = self._blobs / check_sha(f.sha256)
        if not cached.exists():
            self._client.fetch_blob(f.sha256, cached)
        target.unlink(missing_ok=True)
        os.link(cached, target)

    def _fetch_resume(self) -> Path:
        """The checkpoint to resume from, pulled from the coordinator (sha256-checked). A
        pipeline stage fetches its own stage's piece into resume/<step>/stages/stage-NN/, where
        ``--resume resume/<step>`` finds it; the piece must hold this stage's blocks."""
        step = self.spec.resume_step
        folder = self.dir / "resume" / f"{step:07d}"
        if not self.spec.pipelined:
            self._client.pull_checkpoint(self.spec.job_id, step, folder)
            self.log.info("resume_checkpoint_fetched", step=step)
            return folder
        index = Topology.of(self.spec.rank, self.spec.world_size, self.spec.data_parallel).stage
        piece = self._client.pull_stage_piece(self.spec.job_id, step, index,
                                              folder / "stages" / f"stage-{index:02d}")
        check_same_cut(piece, self.spec.stage_layers, index, step)
        self.log.info("resume_checkpoint_fetched", step=step, stage=index)
        return folder

    def _env(self) -> dict[str, str]:
        # OpenBLAS preloaded here, as the rank would re-exec itself to get it (runtime.py): a
        # rank started with it already skips a whole interpreter start (~1 s of CPU on Linux).
        env = preload_env({k: v for k, v in os.environ.items() if k not in _NOT_FOR_RANKS})
        env.update({
            "MLX_RANK": str(self.spec.rank),
            "MLX_WORLD_SIZE": str(self.spec.world_size),
            "MLX_HOSTFILE": str(self.dir / "hostfile.json"),
            "HERD_EXCHANGE_PEERS": ",".join(self.spec.exchange_peers),
            # a cable ring: the exchange dials only the ranks before and after this one
            "HERD_EXCHANGE_NEIGHBORS_ONLY": "1" if self.spec.neighbors_only else "0",
            RANK_TLS_ENV: str(self.dir / "tls"),
            "HERD_JOB_ID": self.spec.job_id,
            AGENT_PID_ENV: str(os.getpid()),
            HEARTBEAT_ENV: str(self.dir / HEARTBEAT_FILE),
            # The model as the job names it: the adapter records it, not this worker's cache.
            BASE_MODEL_ENV: self.spec.config.model,
        })
        if not self.spec.ring_hosts:  # the gRPC exchange, or JACCL: no ring hostfile
            env.pop("MLX_HOSTFILE")
        if self.spec.data_path == "jaccl":  # as `mlx.launch --backend jaccl` does (herd/jaccl.py)
            env.update(jaccl.env(self.spec.rank, str(self.dir / "ibv_devices.json"),
                                 self.spec.jaccl_coordinator,
                                 ring=jaccl.is_ring(json.loads(self.spec.ibv_devices_json))))
        if self.spec.world_size == 1:  # one process; its one exchange peer says "a group of one"
            for key in ("MLX_RANK", "MLX_WORLD_SIZE", "MLX_HOSTFILE"):
                env.pop(key, None)
        return env

    def start(self) -> int:
        config = self._materialize()
        metrics = self.dir / "metrics.jsonl"
        metrics.unlink(missing_ok=True)
        cmd = [sys.executable, "-m", RANK_MODULE, str(config),
               "--adapter-path", str(self.dir / "adapters"), "--metrics-file", str(metrics)]
        if self.spec.pipelined:
            cmd += ["--stage-layers", ",".join(f"{a}:{b}" for a, b in self.spec.stage_layers)]
        if self.spec.resume_step > 0:
            cmd += ["--resume", str(self._fetch_resume())]
        (self.dir / HEARTBEAT_FILE).unlink(missing_ok=True)
        self.proc = _SPAWNER.submit(self._spawn, cmd).result()
        (self.dir / PID_FILE).write_text(f"{self.proc.pid}\n")
        self.log.info("rank_started", pid=self.proc.pid, world_size=self.spec.world_size)
        relay = Relay(self.spec, self.worker_id, self.dir, self._client, self._stopping,
                      self.stop, self.log, lambda: self.stop_reason, self._abandoned)
        self._watchdog = Watchdog(self.dir / HEARTBEAT_FILE,
                                  self.spec.config.cluster.exchange_timeout_s, self._stalled)
        self._watchdog.start()
        self._relay_thread = threading.Thread(target=self._relay, args=(relay, metrics),
                                              daemon=True, name=f"relay-{self.spec.job_id}")
        self._relay_thread.start()
        return self.proc.pid

    def _spawn(self, cmd: list[str]) -> subprocess.Popen:
        read_end, self._lifeline = os.pipe()  # both close-on-exec; only read_end is passed
        env = {**self._env(), LIFELINE_FD_ENV: str(read_end)}
        try:
            with open(self.dir / "rank.log", "ab") as log_file:
                return subprocess.Popen(cmd, cwd=self.dir, env=env, stdout=log_file,
                                        stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                        start_new_session=True, pass_fds=(read_end,),
                                        preexec_fn=self.preexec)
        finally:
            os.close(read_end)

    def _stalled(self, reason: str) -> None:
        self.log.warning("rank_stalled", reason=reason)
        threading.Thread(target=self.stop, args=(reason,), daemon=True).start()

    def _relay(self, relay: Relay, metrics: Path) -> None:
        try:
            relay.run(self.proc, metrics)
        except Exception:  # a bug must not leave the coordinator waiting for the exit in silence
            self.log.exception("relay_failed")
            relay.report_exit(self.proc.wait())
        self._watchdog.stop()
        (self.dir / PID_FILE).unlink(missing_ok=True)
        if self._lifeline is not None:
            os.close(self._lifeline)
            self._lifeline = None
        self._client.close()
        if self._on_exit:
            self._on_exit(self)

    # --- running --------------------------------------------------------------------------

    def stop(self, reason: str = "", grace_s: float = 3.0) -> bool:
        """Kills the rank's process group: SIGTERM, then SIGKILL after ``grace_s``. ``reason``
        is reported as the exit's error (default: stopped by the agent)."""
        if reason and not self.stop_reason:
            self.stop_reason = reason
        self._stopping.set()
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return False
        for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                proc.wait(timeout=wait)
                break
            except subprocess.TimeoutExpired:
                continue
        self.log.info("rank_stopped", pid=proc.pid, exit_code=proc.returncode)
        return True

    def abandon(self) -> None:
        """The coordinator is done with this rank: its relay stops re-delivering reports."""
        self._abandoned.set()

    def running(self) -> bool:
        """The process runs, or its relay is still uploading and reporting after it ended."""
        if self.proc is None:
            return False
        return self.proc.poll() is None or (self._relay_thread is not None
                                            and self._relay_thread.is_alive())
