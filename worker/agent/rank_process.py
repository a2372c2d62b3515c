"""One job's rank on this worker: its folder, its child process, and what it reports.

The rank is ``python -m herd train`` started per the rank contract (MLX_RANK, MLX_HOSTFILE,
MLX_WORLD_SIZE, HERD_EXCHANGE_PEERS, HERD_SECRET) in its own process group, so a stop kills the
whole tree. A relay thread tails its --metrics-file, forwards progress to the coordinator,
uploads each completed checkpoint (rank 0), and reports the exit last, after every upload,
so a job is never marked done before its final adapter is stored.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import yaml

from herd import log
from herd.digest import file_digest
from herd.errors import ConfigError, HerdError, PlacementError
from herd.rpc.auth import SECRET_ENV
from herd.rpc.channel import TRANSFER_DEADLINE_S, UNARY_DEADLINE_S, signed_channel
from herd.rpc.files import (
    check_name,
    check_sha,
    receive_checkpoint_files,
    receive_file,
    send_files,
)
from herd.rpc.status import rpc_errors
from protos.v1 import common_pb2, coordinator_pb2, coordinator_pb2_grpc

logger = log.get(__name__)


@dataclass(frozen=True)
class RankSpec:
    """A StartRank request in domain terms."""

    job_id: str
    attempt: int
    rank: int
    world_size: int
    config_yaml: str
    dataset: list[tuple[str, str, int]]  # (name, sha256, bytes)
    coordinator: str
    ring_hosts: list[str]
    exchange_peers: list[str]
    resume_step: int = 0  # > 0: resume from this checkpoint, fetched from the coordinator
    stage_layers: tuple[tuple[int, int], ...] = ()  # pipelines: blocks per stage; () = whole model
    data_parallel: int = 1  # pipelines in the ring when stage_layers is set

    @property
    def pipelined(self) -> bool:
        return len(self.stage_layers) > 1


class CoordinatorClient:
    """The agent's calls to the coordinator; each has a deadline."""

    def __init__(self, target: str, secret: str):
        self.target = target
        self._secret = secret
        self._channel = signed_channel(target, secret)
        self._stub = coordinator_pb2_grpc.CoordinatorServiceStub(self._channel)

    def fetch_blob(self, sha: str, dest: Path) -> None:
        with rpc_errors(self.target):
            stream = self._stub.GetBlob(coordinator_pb2.GetBlobRequest(sha256=sha),
                                        timeout=TRANSFER_DEADLINE_S)
            receive_file((chunk.data for chunk in stream), sha, dest, f"blob {sha[:12]}",
                         hint="the next attempt fetches it again")

    def pull_checkpoint(self, job_id: str, step: int, folder: Path) -> None:
        with rpc_errors(self.target):
            stream = self._stub.GetAdapter(
                coordinator_pb2.GetAdapterRequest(job_id=job_id, step=step),
                timeout=TRANSFER_DEADLINE_S)
            receive_checkpoint_files(stream, folder, f"checkpoint {step}",
                                     hint="the agent fetches it again on the next attempt")

    def report(self, req: coordinator_pb2.ReportRankRequest) -> bool:
        """Sends one report; True when the coordinator says the rank must stop."""
        with rpc_errors(self.target):
            return self._stub.ReportRank(req, timeout=UNARY_DEADLINE_S).stop

    def pull_stage_piece(self, job_id: str, step: int, stage: int, folder: Path
                         ) -> common_pb2.StagePiece:
        from worker.pipeline.pieces import pull_stage_piece

        return pull_stage_piece(self._stub, self.target, job_id, step, stage, folder)

    def put_checkpoint(self, job_id: str, attempt: int, step: int, folder: Path,
                       stage: common_pb2.StagePiece | None = None) -> None:
        manifest = json.loads((folder / "manifest.json").read_text())
        names = sorted(manifest["files"]) + ["manifest.json"]
        files = [file_digest(folder / check_name(name)) for name in names]

        def parts() -> Iterator[coordinator_pb2.PutCheckpointRequest]:
            header = coordinator_pb2.CheckpointHeader(
                job_id=job_id, attempt=attempt, step=step, stage=stage,
                files=[common_pb2.FileDigest(name=f.name, sha256=f.sha256, bytes=f.bytes)
                       for f in files])
            yield coordinator_pb2.PutCheckpointRequest(header=header)
            for name, block in send_files(folder, files):
                yield coordinator_pb2.PutCheckpointRequest(
                    chunk=common_pb2.FileChunk(name=name, data=block))

        with rpc_errors(self.target):
            self._stub.PutCheckpoint(parts(), timeout=TRANSFER_DEADLINE_S)

    def close(self) -> None:
        self._channel.close()


class RankProcess:
    """A running rank: started by ``start``, watched by its relay thread, killed by ``stop``."""

    def __init__(self, spec: RankSpec, worker_id: str, state_dir: Path, secret: str,
                 on_exit=None):
        self.spec = spec
        self.worker_id = worker_id
        self.secret = secret
        self.dir = state_dir / "jobs" / spec.job_id / f"attempt-{spec.attempt}"
        self._blobs = state_dir / "blobs"
        self._client = CoordinatorClient(spec.coordinator, secret)
        self._on_exit = on_exit
        self._stopping = threading.Event()
        self.proc: subprocess.Popen | None = None
        self._error = ""  # the rank's own error event, the best reason to report
        self._relay_thread: threading.Thread | None = None
        self.log = logger.bind(job_id=spec.job_id, rank=spec.rank, attempt=spec.attempt)

    # --- setting up -----------------------------------------------------------------------

    def _materialize(self) -> Path:
        """Job folder: data/ (from the content-addressed cache), config.yaml, hostfile.json."""
        data = self.dir / "data"
        data.mkdir(parents=True, exist_ok=True)
        self._blobs.mkdir(parents=True, exist_ok=True)
        for name, sha, _size in self.spec.dataset:
            cached = self._blobs / check_sha(sha)
            if not cached.exists():
                self._client.fetch_blob(sha, cached)
            target = data / check_name(name)
            target.unlink(missing_ok=True)
            os.link(cached, target)
        raw = yaml.safe_load(self.spec.config_yaml) or {}
        if not isinstance(raw, dict):
            raise ConfigError("job config is not a mapping")
        model = str(raw.get("model", ""))
        if model.startswith(("/", "./", "~")) and not Path(model).expanduser().exists():
            raise PlacementError(
                f"model path {model} does not exist on worker {self.worker_id}",
                hint="copy the model folder to the same path on every worker",
            )
        raw["data"] = str(data)
        raw["adapter_path"] = str(self.dir / "adapters")
        raw["train"] = True
        (self.dir / "config.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
        (self.dir / "hostfile.json").write_text(json.dumps(self.spec.ring_hosts))
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
        from worker.pipeline.link import Topology
        from worker.pipeline.pieces import check_same_cut

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
        if self.spec.world_size == 1:
            for key in ("MLX_RANK", "MLX_WORLD_SIZE", "MLX_HOSTFILE", "HERD_EXCHANGE_PEERS"):
                env.pop(key)
        return env

    def start(self) -> int:
        config = self._materialize()
        metrics = self.dir / "metrics.jsonl"
        metrics.unlink(missing_ok=True)
        cmd = [sys.executable, "-m", "herd", "train", str(config),
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
        self._relay_thread = threading.Thread(target=self._relay, args=(metrics,), daemon=True,
                                              name=f"relay-{self.spec.job_id}")
        self._relay_thread.start()
        return self.proc.pid

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

    def _request(self, **kw) -> coordinator_pb2.ReportRankRequest:
        return coordinator_pb2.ReportRankRequest(job_id=self.spec.job_id, attempt=self.spec.attempt,
                                                 rank=self.spec.rank, worker_id=self.worker_id, **kw)

    def _send(self, req: coordinator_pb2.ReportRankRequest) -> None:
        try:
            if self._client.report(req) and not self._stopping.is_set():
                self.log.info("rank_stop_requested_by_coordinator")
                threading.Thread(target=self.stop, daemon=True).start()
        except HerdError as e:
            # The coordinator may be restarting; progress is best effort, the exit is retried.
            self.log.warning("report_failed", error=str(e))

    def _handle(self, event: dict, progress: common_pb2.RankProgress) -> None:
        kind = event.get("event")
        if kind == "train":
            progress.iteration = int(event.get("iteration", 0))
            progress.train_loss = float(event.get("train_loss", 0.0))
            progress.learning_rate = float(event.get("learning_rate", 0.0))
            progress.tokens_per_second = float(event.get("tokens_per_second", 0.0))
            progress.trained_tokens = int(event.get("trained_tokens", 0))
            progress.peak_memory_gb = float(event.get("peak_memory_gb", 0.0))
            progress.exchange = str(event.get("exchange", ""))
            progress.world_size = int(event.get("world_size", 0))
            self._send(self._request(progress=progress))
        elif kind == "val":
            progress.val_loss = float(event.get("val_loss", 0.0))
            progress.iteration = max(progress.iteration, int(event.get("iteration", 0)))
            self._send(self._request(progress=progress))
        elif kind == "checkpoint" and self.spec.pipelined:
            from worker.pipeline.pieces import stage_piece

            spec = self.spec
            piece = stage_piece(spec.rank, spec.world_size, spec.data_parallel, spec.stage_layers)
            if piece is not None:  # replica 0's stages each upload their own piece
                self._upload(int(event["step"]), event.get("path"), piece)
        elif kind == "checkpoint" and self.spec.rank == 0:
            self._upload(int(event["step"]), event.get("path"))
        elif kind == "error":
            self._error = str(event.get("message", ""))
            self._send(self._request(log=f"rank {self.spec.rank}: {event.get('message', '')}"))

    def _upload(self, step: int, path: str | None,
                piece: common_pb2.StagePiece | None = None) -> None:
        folder = Path(path) if path else None
        if folder is None or not (folder / "manifest.json").exists():
            folder = self.dir / "adapters" / "checkpoints" / f"{step:07d}"
        if not (folder / "manifest.json").exists():
            self._send(self._request(log=f"checkpoint {step} has no manifest.json; not uploaded"))
            return
        t0 = time.monotonic()
        for attempt in range(3):
            try:
                self._client.put_checkpoint(self.spec.job_id, self.spec.attempt, step, folder,
                                            piece)
                self.log.info("checkpoint_uploaded", step=step,
                              seconds=round(time.monotonic() - t0, 2),
                              stage=piece.index if piece is not None else None)
                return
            except HerdError as e:
                self.log.warning("checkpoint_upload_failed", step=step, try_=attempt, error=str(e))
                time.sleep(1.0 + attempt)
        self._send(self._request(log=f"checkpoint {step} could not be uploaded"))

    def _relay(self, metrics: Path) -> None:
        progress = common_pb2.RankProgress(rank=self.spec.rank, worker_id=self.worker_id)
        offset, buf = 0, b""
        while True:
            exited = self.proc.poll() is not None
            if metrics.exists():
                with open(metrics, "rb") as f:
                    f.seek(offset)
                    data = f.read()
                offset += len(data)
                buf += data
                *lines, buf = buf.split(b"\n")
                for line in lines:
                    try:
                        event = json.loads(line)
                    except json.JSONDecodeError:
                        self.log.warning("bad_metrics_line", line=line[:200])
                        continue
                    self._handle(event, progress)
            if exited:
                break
            time.sleep(0.2)
        self._report_exit()

    def _last_error(self) -> str:
        """The rank's last plain stderr line (its structured log lines are not an error)."""
        try:
            lines = (self.dir / "rank.log").read_text(errors="replace").strip().splitlines()
        except OSError:
            return ""
        plain = [ln for ln in lines if ln.strip() and not ln.lstrip().startswith("{")]
        errs = [ln for ln in plain if "Error" in ln or "error" in ln]
        return (errs[-1] if errs else (plain[-1] if plain else ""))[-500:]

    def _report_exit(self) -> None:
        code = self.proc.returncode
        error = "" if code == 0 else (self._error or self._last_error())
        if code < 0 and not self._error:
            error = f"killed by {signal.Signals(-code).name}"
        if self._stopping.is_set() and code != 0:
            error = "stopped by the agent"
        self.log.info("rank_exited", exit_code=code, error=error)
        req = self._request(exit=coordinator_pb2.RankExit(exit_code=code, error=error))
        for attempt in range(5):
            try:
                self._client.report(req)
                break
            except HerdError as e:
                self.log.warning("exit_report_failed", try_=attempt, error=str(e))
                time.sleep(1.0)
        self._client.close()
        if self._on_exit:
            self._on_exit(self)
