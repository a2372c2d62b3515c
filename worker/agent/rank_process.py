"""One job's rank on this worker: its folder, its child process, and stopping it.

The rank is ``python -m worker.rank`` started per the rank contract (MLX_RANK, MLX_HOSTFILE,
MLX_WORLD_SIZE, HERD_EXCHANGE_PEERS, HERD_SECRET) in its own process group, so a stop kills the
whole tree. Its relay thread (worker/agent/relay.py) tails what it reports.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Callable

from herd import jaccl, log
from herd.config import config_to_yaml
from herd.errors import PlacementError
from herd.rpc.auth import SECRET_ENV
from herd.rpc.files import check_name, check_sha
from worker.agent.coordinator_client import CoordinatorClient
from worker.agent.domain import RankSpec
from worker.agent.relay import Relay
from worker.pipeline.topology import Topology, check_same_cut

logger = log.get(__name__)
# The rank's own command (worker/rank/__main__.py): the agent starts it, never imports it.
RANK_MODULE = "worker.rank"


class RankProcess:
    """A running rank: started by ``start``, watched by its relay thread, killed by ``stop``."""

    def __init__(self, spec: RankSpec, worker_id: str, state_dir: Path, secret: str,
                 on_exit: Callable[[RankProcess], None] | None = None):
        self.spec = spec
        self.worker_id = worker_id
        self.secret = secret
        self.dir = state_dir / "jobs" / spec.job_id / f"attempt-{spec.attempt}"
        self._blobs = state_dir / "blobs"
        self._client = CoordinatorClient(spec.coordinator, secret)
        self._on_exit = on_exit
        self._stopping = threading.Event()
        self.proc: subprocess.Popen | None = None
        self._relay_thread: threading.Thread | None = None
        self.log = logger.bind(job_id=spec.job_id, rank=spec.rank, attempt=spec.attempt)

    # --- setting up -----------------------------------------------------------------------

    def _materialize(self) -> Path:
        """Job folder: data/ (from the content-addressed cache), config.yaml, hostfile.json."""
        data = self.dir / "data"
        data.mkdir(parents=True, exist_ok=True)
        self._blobs.mkdir(parents=True, exist_ok=True)
        for f in self.spec.dataset:
            cached = self._blobs / check_sha(f.sha256)
            if not cached.exists():
                self._client.fetch_blob(f.sha256, cached)
            target = data / check_name(f.name)
            target.unlink(missing_ok=True)
            os.link(cached, target)
        cfg = self.spec.config
        if cfg.model.startswith(("/", "./", "~")) and not Path(cfg.model).expanduser().exists():
            raise PlacementError(
                f"model path {cfg.model} does not exist on worker {self.worker_id}",
                hint="copy the model folder to the same path on every worker",
            )
        local = cfg.model_copy(update={"data": str(data), "train": True,
                                       "adapter_path": str(self.dir / "adapters")})
        (self.dir / "config.yaml").write_text(config_to_yaml(local))
        if self.spec.ring_hosts:
            (self.dir / "hostfile.json").write_text(json.dumps(self.spec.ring_hosts))
        if self.spec.data_path == "jaccl":
            (self.dir / "ibv_devices.json").write_text(self.spec.ibv_devices_json)
        return self.dir / "config.yaml"

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
        env = dict(os.environ)
        env.update({
            "MLX_RANK": str(self.spec.rank),
            "MLX_WORLD_SIZE": str(self.spec.world_size),
            "MLX_HOSTFILE": str(self.dir / "hostfile.json"),
            "HERD_EXCHANGE_PEERS": ",".join(self.spec.exchange_peers),
            SECRET_ENV: self.secret,
            "HERD_JOB_ID": self.spec.job_id,
        })
        if not self.spec.ring_hosts:  # the gRPC exchange, or JACCL: no ring hostfile
            env.pop("MLX_HOSTFILE")
        if self.spec.data_path == "jaccl":  # as `mlx.launch --backend jaccl` does (herd/jaccl.py)
            env.update(jaccl.env(self.spec.rank, str(self.dir / "ibv_devices.json"),
                                 self.spec.jaccl_coordinator))
        if self.spec.world_size == 1:
            for key in ("MLX_RANK", "MLX_WORLD_SIZE", "MLX_HOSTFILE", "HERD_EXCHANGE_PEERS"):
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
        stderr = open(self.dir / "rank.log", "ab")
        self.proc = subprocess.Popen(cmd, cwd=self.dir, env=self._env(), stdout=stderr,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     start_new_session=True)
        stderr.close()
        self.log.info("rank_started", pid=self.proc.pid, world_size=self.spec.world_size)
        relay = Relay(self.spec, self.worker_id, self.dir, self._client, self._stopping,
                      self.stop, self.log)
        self._relay_thread = threading.Thread(target=self._relay, args=(relay, metrics),
                                              daemon=True, name=f"relay-{self.spec.job_id}")
        self._relay_thread.start()
        return self.proc.pid

    def _relay(self, relay: Relay, metrics: Path) -> None:
        relay.run(self.proc, metrics)
        self._client.close()
        if self._on_exit:
            self._on_exit(self)

    # --- running --------------------------------------------------------------------------

    def stop(self, grace_s: float = 3.0) -> bool:
        """Kills the rank's process group: SIGTERM, then SIGKILL after ``grace_s``."""
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

    def running(self) -> bool:
        """The process runs, or its relay is still uploading and reporting after it ended."""
        if self.proc is None:
            return False
        return self.proc.poll() is None or (self._relay_thread is not None
                                            and self._relay_thread.is_alive())
