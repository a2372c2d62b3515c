"""The one-machine commands a newcomer tries first (`herd train`, `herd check`), through the real
CLI: where paths resolve, where a resumed run writes, how validation lines are labelled, and
that a normal run prints no third-party notice."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import yaml

from tests.conftest import herd, write_job

# What a user's shell has: the default logging level (conftest quiets it for the suite). Offline:
# a `data` that is no local folder is tried as a hub dataset id, as mlx-lm does.
DEFAULT_LOG = {"HERD_LOG_LEVEL": "", "HF_HUB_OFFLINE": "1"}


def test_resume_writes_on_into_the_resumed_folder_and_val_lines_carry_their_iteration(
        tmp_path, tiny_model, tiny_data):
    cfg = write_job(tmp_path / "job.yaml", tiny_model, tiny_data, iters=4, save_every=2,
                    steps_per_report=2, steps_per_eval=2)
    doc = yaml.safe_load(cfg.read_text())
    del doc["adapter_path"]  # mlx-lm's default, ./adapters: what a resumed run must not use
    cfg.write_text(yaml.safe_dump(doc))
    first = herd("train", cfg, "--adapter-path", "out", cwd=tmp_path, env=DEFAULT_LOG)
    # Validation runs at the start of iterations 1, 2 and 4 (mlx-lm's schedule) and is labelled
    # so, as mlx-lm prints it: the same numbers as the train lines it sits between.
    val = [int(m) for m in re.findall(r"iter +(\d+)/4  val loss", first.stdout)]
    assert val == [1, 2, 4], first.stdout
    assert re.findall(r"iter +(\d+)/4  loss", first.stdout) == ["2", "4"]
    assert "PyTorch" not in first.stderr

    second = herd("train", cfg, "--resume", "out", "--iters", "8", cwd=tmp_path, env=DEFAULT_LOG)
    assert "iter      8/8" in second.stdout, second.stdout
    saved = sorted(p.name for p in (tmp_path / "out" / "checkpoints").iterdir())
    assert saved == ["0000002", "0000004", "0000006", "0000008", "latest"]
    assert (tmp_path / "out" / "checkpoints" / "latest").read_text().strip() == "0000008"
    assert not (tmp_path / "adapters").exists()


def test_a_checkpoint_between_two_reports_counts_every_token_trained_before_it(
        tmp_path, tiny_model, tiny_data):
    """save_every 3, steps_per_report 4: checkpoint 3 holds the tokens of iterations 1-3 (what a
    run of 3 iterations counts), so a run resumed from it counts on from the right figure."""
    import json

    def tokens_at_3(name: str, iters: int) -> int:
        cfg = write_job(tmp_path / f"{name}.yaml", tiny_model, tiny_data, iters=iters,
                        save_every=3, steps_per_report=4, adapter_path=str(tmp_path / name))
        herd("train", cfg, "--quiet", cwd=tmp_path)
        state = tmp_path / name / "checkpoints" / "0000003" / "trainer_state.json"
        return json.loads(state.read_text())["trained_tokens"]

    assert tokens_at_3("long", 8) == tokens_at_3("short", 3) > 0


def test_paths_in_a_config_resolve_from_the_current_folder_as_in_mlx_lm(
        tmp_path, tiny_model, tiny_data):
    job_dir = tmp_path / "job"
    shutil.copytree(tiny_data, job_dir / "data")
    cfg = write_job(job_dir / "job.yaml", tiny_model, Path("data"))  # data: data (relative)
    elsewhere = herd("check", cfg, cwd=tmp_path, check=False, env=DEFAULT_LOG)
    assert elsewhere.returncode == 3
    assert (f"dataset data is not a local folder (looked for {tmp_path / 'data'}), nor a "
            "loadable Hugging Face dataset" in elsewhere.stderr), elsewhere.stderr
    assert "relative paths resolve from the current folder" in elsewhere.stderr
    here = herd("check", "job.yaml", cwd=job_dir, env=DEFAULT_LOG)
    assert here.stdout.strip().endswith("ok")
    # A normal run prints its own lines only: no third-party notice, no structured log line.
    assert here.stderr == "", here.stderr


def test_output_into_a_closed_pipe_ends_quietly(tiny_model, tmp_path):
    """`herd plan job.yaml | head -2`: the reader goes away while herd still writes. No
    traceback (exit 1, as Python's own recipe for a broken pipe)."""
    import os
    import subprocess
    import sys

    from tests.conftest import REPO

    config = tmp_path / "job.yaml"  # the 70B config on the tiny model: all of its blocks
    config.write_text((REPO / "configs/llama-3.1-70b-qlora.yaml").read_text().replace(
        "num_layers: 16", "num_layers: -1"))
    read, write = os.pipe()
    os.close(read)
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "herd", "plan", str(config),
             "--workers", "192,192", "--model", str(tiny_model)],
            cwd=REPO, stdout=write, stderr=subprocess.PIPE, text=True, timeout=120)
    finally:
        os.close(write)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]


def test_a_token_names_the_join_port_the_running_coordinator_serves(tmp_path):
    """`herd up` serves joins on a free port: `herd token` made tokens for port 7452, which
    nothing served (an outside run). It takes the address that coordinator wrote; else the
    default."""
    import subprocess
    import sys

    from herd.rpc.join import JoinToken
    from tests.conftest import REPO

    env = {**__import__("os").environ, "HERD_HOME": str(tmp_path / "home")}

    def token_address() -> str:
        out = subprocess.run([sys.executable, "-m", "herd", "token", "--role", "client"],
                             cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        return JoinToken.decode(out.stdout.strip()).address

    assert subprocess.run([sys.executable, "-m", "herd", "init"], cwd=REPO, env=env,
                          capture_output=True, timeout=60).returncode == 0
    assert token_address().endswith(":7452")
    running = tmp_path / "home" / "local" / "coordinator"  # `herd up`'s, by default
    running.mkdir(parents=True)
    (running / "join.address").write_text("127.0.0.1:38511\n")
    assert token_address() == "127.0.0.1:38511"


def test_a_worker_whose_port_is_taken_says_so_before_taking_a_name(tmp_path):
    """`herd worker --port P` with P held: refused before a state folder is claimed or a
    certificate issued (each failed start used up a worker name for good: an outside run)."""
    import json
    import socket

    env = {"HERD_HOME": str(tmp_path / "home"), "HERD_ZEROCONF_INTERFACES": "127.0.0.1"}
    herd("init", env=env)
    held = socket.socket()
    held.bind(("127.0.0.1", 0))
    held.listen()
    try:
        port = held.getsockname()[1]
        out = herd("worker", "--port", port, env=env, check=False)
    finally:
        held.close()
    assert out.returncode == 1 and f"port {port} is in use on 127.0.0.1" in out.stderr
    issued = json.loads((tmp_path / "home" / "tls" / "issued.json").read_text())
    assert not [n for n in issued if n.startswith("worker/")], issued
    assert not (tmp_path / "home" / "worker" / "worker-id").exists()


def test_numbers_and_ports_out_of_range_are_refused_before_anything_starts(tmp_path):
    """An outside run: `herd up --detach --workers 0` said it had started while its background
    process died (ZeroDivisionError); `--port 99999` served on a random port; a --join-port equal
    to --port printed a join token no one could use; negative counts passed silently."""
    import socket

    env = {"HERD_HOME": str(tmp_path / "home"), "HERD_ZEROCONF_INTERFACES": "127.0.0.1"}
    herd("init", env=env)
    state = ["--state-dir", str(tmp_path / "state")]
    for args, said in [
            (["up", "--detach", "--workers", "0"], "argument --workers: 0 is below 1"),
            (["up", "--workers", "-1"], "argument --workers: -1 is below 1"),
            (["coordinator", "--port", "99999"], "argument --port: 99999 is not a port"),
            (["coordinator", "--port", "8481", "--join-port", "8481"],
             "--join-port 8481 is --port"),
            (["coordinator", "--keep-checkpoints", "-1"], "-1 is below 0"),
            (["coordinator", "--placement-timeout", "-5"], "-5 is below 0"),
            (["coordinator", "--placement-timeout", "nan"], "nan is not a finite number"),
            (["coordinator", "--http-port", "70000"], "70000 is not a port"),
            (["worker", "--ring-port", "65536"], "65536 is not a port"),
            (["worker", "--keep-attempts", "-2"], "-2 is below 0")]:
        out = herd(*args, *state, env=env, check=False)
        assert out.returncode == 2 and said in out.stderr, (args, out.stderr)
    assert not (tmp_path / "state").exists()  # nothing was started
    held = socket.socket()
    held.bind(("127.0.0.1", 0))
    held.listen()
    taken = held.getsockname()[1]
    try:  # a join port asked for and taken: refused, not only a warning in the log
        out = herd("coordinator", *state, "--no-discovery", "--host", "127.0.0.1", "--port", "0",
                   "--http-port", "-1", "--join-port", taken, env=env, check=False)
    finally:
        held.close()
    assert out.returncode == 1, out.stdout + out.stderr
    assert f"the join port cannot listen on 127.0.0.1:{taken}" in out.stdout
