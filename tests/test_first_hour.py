"""A newcomer's first hour, through the real `herd` CLI against a real cluster on loopback:
`herd up --detach` (a coordinator and four worker agents, each its own process), two agents
started by hand beside it, real zeroconf, real training ranks. Every test checks what a user
reads: the exit code and the message.

One cluster for the module; tests run in file order (the last one stops it with `herd down`).
The logging level is left at its default (conftest sets HERD_LOG_LEVEL for the rest of the
suite), because what a normal run prints is part of what is checked."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import free_ports, pids_of, up_worker_ids, write_job

pytestmark = pytest.mark.slow
HOST = "127.0.0.1"
WORKERS = 4


class Cluster:
    def __init__(self, root: Path):
        self.root, self.home, self.state = root, root / "home", root / "up"
        self.port = free_ports(1)[0]
        self.address = f"{HOST}:{self.port}"
        self.env = {k: v for k, v in os.environ.items()
                    if k not in ("HERD_SECRET", "HERD_COORDINATOR", "HERD_LOG_LEVEL", "COLUMNS",
                                 "LINES")}
        self.env.update({"HERD_HOME": str(self.home), "HERD_ZEROCONF_INTERFACES": HOST,
                         "HF_HUB_OFFLINE": "1", "HF_HOME": str(root / "hf")})
        self.agents: list[subprocess.Popen] = []

    def herd(self, *args, env: dict | None = None, cwd=None, timeout: float = 240,
             coordinator: bool = True) -> subprocess.CompletedProcess:
        argv = [sys.executable, "-m", "herd", *map(str, args)]
        if coordinator and args[0] in ("status", "jobs", "workers", "submit", "watch", "logs",
                                       "cancel", "pull", "rm"):
            argv += ["--coordinator", self.address]
        return subprocess.run(argv, env={**self.env, **(env or {})}, capture_output=True,
                              text=True, timeout=timeout, cwd=cwd)

    def ok(self, *args, **kw) -> subprocess.CompletedProcess:
        proc = self.herd(*args, **kw)
        assert proc.returncode == 0, f"herd {args} -> {proc.returncode}\n{proc.stderr[-3000:]}"
        return proc

    def agent(self, *args) -> subprocess.Popen:
        """A `herd worker` started by hand; its first stdout line says who and where."""
        proc = subprocess.Popen([sys.executable, "-m", "herd", "worker", *args], env=self.env,
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        self.agents.append(proc)
        return proc

    def job(self, name: str) -> dict:
        jobs = json.loads(self.ok("jobs", "--json").stdout)
        return next(j for j in jobs if j["job_id"] == name)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = Cluster(tmp_path_factory.mktemp("first-hour"))
    c.ok("init")
    # Another cluster's CA and client certificate: what a laptop of the wrong cluster holds.
    c.foreign = c.root / "foreign-tls"
    c.ok("init", "--tls-dir", c.foreign)
    # Two agents of the same cluster started by hand first: `herd up` must not adopt them.
    c.hand = [c.agent(), c.agent()]
    c.hand_lines = [p.stdout.readline().strip() for p in c.hand]
    # (its own dashboard port: the default one may be another test's coordinator's)
    up = c.herd("up", "--workers", WORKERS, "--detach", "--port", c.port, "--state-dir", c.state,
                "--keep-checkpoints", 2, "--keep-attempts", 1, "--http-port", 0, timeout=300)
    c.up_output = up
    yield c
    c.herd("down", "--state-dir", c.state, timeout=90)
    for p in c.agents:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in c.agents:
        try:
            p.wait(timeout=20)
        except subprocess.TimeoutExpired:
            p.kill()


@pytest.fixture(scope="module")
def job_yaml(tmp_path_factory, tiny_model, tiny_chat_data):
    d = tmp_path_factory.mktemp("first-hour-jobs")

    def make(name: str, model=tiny_model, **kw) -> Path:
        base = dict(iters=8, save_every=2, steps_per_report=2, steps_per_eval=4, val_batches=2,
                    batch_size=4)
        return write_job(d / f"{name}.yaml", model, tiny_chat_data, **{**base, **kw})
    return make


def test_up_detach_uses_only_the_workers_it_started(cluster):
    up = cluster.up_output
    assert up.returncode == 0, up.stderr[-3000:]
    assert f"coordinator at {cluster.address}, {WORKERS} workers, in the background" in up.stdout
    assert "herd down" in up.stdout
    workers = json.loads(cluster.ok("workers", "--json").stdout)
    assert sorted(w["worker_id"] for w in workers) == up_worker_ids(cluster.home, 4)
    # A second `herd up` on the same state folder is refused, naming who holds it.
    again = cluster.herd("up", "--detach", "--port", free_ports(1)[0], "--state-dir",
                         cluster.state)
    assert again.returncode == 1 and "in use by herd up (pid" in again.stderr, again.stderr
    # Another `herd up` on this one's coordinator port: refused before it starts anything (it
    # used to report success, counting this cluster's workers, and stop itself unseen).
    other = cluster.herd("up", "--detach", "--port", cluster.port, "--state-dir",
                         cluster.root / "other-up")
    assert other.returncode == 1 and f":{cluster.port} is in use" in other.stderr, other.stderr
    assert not (cluster.root / "other-up" / "coordinator").exists()
    # Its folders are its user's alone: the coordinator's log holds the join token it printed,
    # the folders hold jobs' configs, data and adapters (an outside review read them as another
    # user).
    for folder in (cluster.state, cluster.state / "coordinator", cluster.state / "worker-1"):
        assert folder.stat().st_mode & 0o077 == 0, (folder, oct(folder.stat().st_mode))


def test_herd_ups_workers_advertise_nothing_another_coordinator_could_adopt(cluster,
                                                                            monkeypatch):
    """A Quickstart coordinator (same cluster CA, discovery on) took `herd up`'s workers and ran
    its jobs there (an outside run): they are not advertised. (A probe advert from another
    process shows the browse sees what other processes advertise.)"""
    from herd.rpc import discovery

    monkeypatch.setenv(discovery.INTERFACES_ENV, "127.0.0.1")
    probe = subprocess.Popen([sys.executable, "-c", PROBE_ADVERT, str(free_ports(1)[0])],
                             env={**os.environ, discovery.INTERFACES_ENV: "127.0.0.1"})
    zc = discovery.make_zeroconf()
    browser = discovery.Browser(zc, discovery.WORKER_TYPE)
    try:
        deadline = time.monotonic() + 30
        while not any("probe-worker" in a.name for a in browser.snapshot()):
            assert time.monotonic() < deadline, "the probe advert was never seen"
            time.sleep(0.2)
        time.sleep(2)  # (every advert on the machine answered the browse by now)
        seen = " ".join(a.name + json.dumps(a.txt) for a in browser.snapshot())
        assert not [w for w in up_worker_ids(cluster.home, WORKERS) if w in seen], seen
    finally:
        browser.close()
        probe.kill()
        probe.wait()
        zc.close()


PROBE_ADVERT = """
import sys, time
from herd.rpc import discovery
zc = discovery.make_zeroconf()
discovery.Advertiser(zc, discovery.WORKER_TYPE, "probe-worker", "127.0.0.1", int(sys.argv[1]),
                     {"id": "probe-worker"})
time.sleep(120)
"""


def test_agents_on_one_machine_get_their_own_folder_and_id_and_a_taken_folder_is_refused(
        cluster):
    (id1, dir1), (id2, dir2) = (re.match(r"herd worker (\S+) listening on \S+, state in (\S+)",
                                         line).groups() for line in cluster.hand_lines)
    assert {dir1, dir2} == {str(cluster.home / "worker"), str(cluster.home / "worker-2")}
    assert id1 != id2
    # Each id is kept in its folder: a restarted agent is the same worker.
    assert (Path(dir1) / "worker-id").read_text().strip() == id1
    taken = subprocess.run([sys.executable, "-m", "herd", "worker", "--state-dir", dir1],
                           env=cluster.env, capture_output=True, text=True, timeout=60)
    pid = cluster.hand[[dir1, dir2].index(dir1)].pid
    assert taken.returncode == 1
    assert f"{dir1} is in use by a herd worker (pid {pid})" in taken.stderr, taken.stderr
    # ...and so is its port: a coordinator told `--worker HOST:PORT` (no zeroconf) finds the
    # restarted agent where it was (it came back on a new random port, refused for good).
    first = cluster.hand[0]
    first.send_signal(signal.SIGTERM)
    first.wait(timeout=30)
    again = cluster.agent("--state-dir", dir1).stdout.readline().strip()
    assert again.split(" listening on ")[1] == cluster.hand_lines[0].split(" listening on ")[1]


def test_help_is_enough_without_the_readme(cluster):
    from herd.cli.main import COMMANDS

    top = cluster.ok("--help").stdout
    for needle in ("HERD_HOME", "HERD_COORDINATOR", "HERD_ZEROCONF_INTERFACES", "exit codes",
                   "  6  authentication failed", "A first session"):
        assert needle in top
    for name in COMMANDS:
        assert f"\n  {name} " in top
    # Every command's own help, through the same entry point (in this process: one Python
    # start per command would cost more than the rest of the check).
    from herd.cli.main import main as herd_main

    for name in COMMANDS:
        if name in ("generate", "down"):
            continue  # generate hands --help on to mlx_lm.generate; down is checked below
        text = _help_of(herd_main, name)
        usage_end = text.index("\n\n")
        assert len(text[usage_end:].split("\n\n")[1]) > 60, f"{name}: no description"
        # (check and train: every option overrides the config, which has the defaults)
        assert "(default:" in text or name in ("check", "train"), f"herd {name}: no defaults"
        assert "``" not in text and "(tests)" not in text
    submit = _help_of(herd_main, "submit")
    assert "--placement-timeout" in submit and "600 s" in submit
    assert "Stop a `herd up` cluster" in _help_of(herd_main, "down")


def _help_of(herd_main, name: str) -> str:
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as done:
        herd_main([name, "--help"])
    assert done.value.code == 0
    return out.getvalue()


def _pty_watch(cluster: Cluster, job_id: str, columns: int = 80) -> str:
    """`herd watch` on a terminal of ``columns`` columns; everything it drew, escapes removed."""
    import fcntl
    import pty
    import struct
    import termios

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, columns, 0, 0))
    proc = subprocess.Popen(
        [sys.executable, "-m", "herd", "watch", job_id, "--coordinator", cluster.address],
        env={**cluster.env, "TERM": "xterm-256color"}, stdin=slave, stdout=slave, stderr=slave)
    os.close(slave)
    out = b""
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:  # the terminal closed: watch exited
            break
        if not data:
            break
        out += data
    proc.wait(timeout=60)
    os.close(master)
    assert proc.returncode == 0, out[-2000:]
    return re.sub(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b[()][A-Z0-9]", "", out.decode(errors="replace"))


def test_a_four_worker_job_through_the_cli(cluster, job_yaml, tmp_path):
    cfg = job_yaml("four", cluster={"workers": WORKERS})
    sub = cluster.ok("submit", cfg)
    job_id = sub.stdout.strip()
    # stdout is the id alone; stderr says what to run next, and nothing else: no third-party
    # notice, no structured log line at the default level.
    assert re.fullmatch(r"four-[0-9a-f]{6}", job_id), sub.stdout
    assert f"herd watch {job_id}" in sub.stderr and f"herd pull {job_id}" in sub.stderr
    assert "PyTorch" not in sub.stderr and "{" not in sub.stderr, sub.stderr
    follow = subprocess.Popen(
        [sys.executable, "-m", "herd", "logs", job_id, "-f", "--coordinator", cluster.address],
        env=cluster.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    # The terminal display: every line within 80 columns, with 4 workers.
    drawn = _pty_watch(cluster, job_id)
    lines = [seg for line in drawn.split("\n") for seg in line.split("\r") if seg.strip()]
    wide = [ln for ln in lines if len(ln.rstrip()) > 80]
    assert not wide, wide
    assert any("8/8" in ln for ln in lines) and any("4 workers" in ln for ln in lines), lines
    assert any("state succeeded" in ln for ln in lines)

    # Plain lines: validation labelled with the iteration it ran at, with its own figure only.
    plain = cluster.ok("watch", job_id, "--plain").stdout.splitlines()
    val = [ln for ln in plain if "val_loss" in ln]
    assert [int(re.search(r"iter (\d+)/8", ln).group(1)) for ln in val] == [1, 4, 8], plain
    assert all("tok/s" not in ln and " loss " not in ln for ln in val), val
    assert sum("rank 0 (worker-" in ln and ": loss " in ln for ln in plain) == 4  # 2, 4, 6, 8

    # `herd logs -f` followed rank 0 to the end; rank 3's log is there too; rank 9 is not.
    out, err = follow.communicate(timeout=120)
    assert follow.returncode == 0, err
    assert re.search(r"iter +8/8 +loss", out) and "saved" in out, out[-2000:]
    assert cluster.herd("logs", job_id, "--rank", "3").returncode == 0
    nine = cluster.herd("logs", job_id, "--rank", "9")
    assert nine.returncode == 7 and "no rank 9 in attempt 1 (ranks 0-3)" in nine.stderr
    later = cluster.herd("logs", job_id, "--attempt", "5")
    assert later.returncode == 7 and "has no attempt 5" in later.stderr, later.stderr

    # Listings for scripts; retention kept the 2 newest of checkpoints 2, 4, 6, 8.
    job = cluster.job(job_id)
    assert job["state"] == "succeeded" and job["iteration"] == 8 and job["checkpoints"] == [6, 8]
    assert job["val_loss"] is not None and job["train_loss"] is not None
    stored = sorted(p.name for p in (cluster.state / "coordinator" / "adapters" / job_id)
                    .iterdir())
    assert stored == ["0000006", "0000008"]
    status = json.loads(cluster.ok("status", "--json").stdout)
    assert status["coordinator"] == cluster.address and len(status["workers"]) == WORKERS
    assert status["job_counts"]["succeeded"] >= 1
    text = cluster.ok("status").stdout
    assert f"coordinator  {cluster.address} (from --coordinator)" in text
    assert f"{WORKERS} verified" in text

    # The pulled adapter describes itself and names no worker path.
    out_dir = tmp_path / "adapters"
    pulled = cluster.ok("pull", job_id, "-o", out_dir)
    assert "pulled step 8" in pulled.stdout and "note:" not in pulled.stderr
    card_text = (out_dir / "adapter_config.json").read_text()
    card = json.loads(card_text)
    assert str(cluster.state) not in card_text and "data" not in card and "adapter_path" not in card
    base = str(Path(yaml.safe_load(cfg.read_text())["model"]).resolve())
    assert card["base_model"] == {"model": base, "revision": None, "quantization": None,
                                  "quantized_on_load": False}

    # `herd rm`: gone from the listing and from disk; a second time it is not found. Each id is
    # handled on its own: one it cannot remove is reported, the rest are removed.
    rm = cluster.herd("rm", "nosuch-000000", job_id)
    assert rm.returncode == 7 and "no job 'nosuch-000000'" in rm.stderr, rm.stderr
    assert f"{job_id}: removed" in rm.stdout
    assert job_id not in [j["job_id"] for j in json.loads(cluster.ok("jobs", "--json").stdout)]
    assert not (cluster.state / "coordinator" / "adapters" / job_id).exists()
    # ...and from the dashboard and /metrics (they kept it, with links that 404, until the
    # coordinator restarted: an outside run)
    import httpx

    url = (cluster.state / "coordinator" / "http.url").read_text().strip()  # (on loopback: open)
    with httpx.Client(base_url=url, timeout=10) as http:
        assert job_id not in [j["id"] for j in http.get("/api/cluster").json()["jobs"]]
        assert http.get(f"/api/jobs/{job_id}").status_code == 404
        assert job_id not in http.get("/metrics").text
    again = cluster.herd("rm", job_id)
    assert again.returncode == 7 and f"no job '{job_id}'" in again.stderr


def test_a_qlora_adapter_records_its_quantization_and_a_full_precision_base_warns(
        cluster, job_yaml, tiny_quantized, tiny_model_16, tmp_path):
    cfg = job_yaml("qlora", iters=4, cluster={"workers": 1},
                   quantize={"bits": 4, "group_size": 64})
    job_id = cluster.ok("submit", cfg).stdout.strip()
    assert cluster.herd("watch", job_id, "--plain").returncode == 0
    out_dir = tmp_path / "qlora"
    pulled = cluster.ok("pull", job_id, "-o", out_dir)
    assert "4-bit quantization" in pulled.stderr and "mlx_lm.convert" in pulled.stderr
    card = json.loads((out_dir / "adapter_config.json").read_text())["base_model"]
    assert card["quantization"] == {"bits": 4, "group_size": 64} and card["quantized_on_load"]

    gen = ["generate", "--adapter-path", out_dir, "--prompt", "hi", "--max-tokens", "1"]
    on_full = cluster.herd(*gen)  # --model defaults to the recorded base: full precision
    assert on_full.returncode == 0, on_full.stderr[-2000:]
    assert f"base model {card['model']} (from the adapter)" in on_full.stderr
    assert "warning: this adapter was trained on a 4-bit (group size 64) base" in on_full.stderr
    assert "mlx_lm.convert --hf-path" in on_full.stderr
    on_4bit = cluster.herd(*gen, "--model", tiny_quantized)
    assert on_4bit.returncode == 0 and "warning" not in on_4bit.stderr, on_4bit.stderr[-2000:]
    # Another model's shape: said (mlx-lm loaded it silently, or failed with a traceback: an
    # outside run); a folder with no adapter: said, not a hub traceback.
    other = cluster.herd(*gen, "--model", tiny_model_16)
    assert f"has another shape (num_hidden_layers 16 vs {card_layers(card)})" in other.stderr
    assert "Traceback" not in other.stderr, other.stderr[-2000:]
    missing = cluster.herd("generate", "--adapter-path", tmp_path / "nope", "--prompt", "hi")
    assert missing.returncode == 7 and "no adapters.safetensors there" in missing.stderr
    assert "Traceback" not in missing.stderr, missing.stderr[-2000:]


def card_layers(card: dict) -> int:
    return json.loads((Path(card["model"]) / "config.json").read_text())["num_hidden_layers"]


def test_a_job_the_cluster_cannot_place_warns_at_submit(cluster, job_yaml):
    cfg = job_yaml("five", batch_size=WORKERS + 1, cluster={"workers": WORKERS + 1})
    sub = cluster.herd("submit", cfg, "--no-check")
    assert sub.returncode == 0
    job_id = sub.stdout.strip()
    assert (f"warning: {job_id} needs {WORKERS + 1} workers and {WORKERS} are verified for "
            "cluster.backend zeroconf: it waits for more for up to 600 s (herd coordinator "
            "--placement-timeout)") in sub.stderr
    assert cluster.ok("cancel", job_id).stdout.strip() == f"{job_id}: cancelled"
    again = cluster.ok("cancel", job_id).stdout.strip()
    assert again == f"{job_id}: already cancelled; nothing to cancel"


def test_plan_says_which_workers_it_planned_for(cluster, job_yaml, tiny_model):
    cfg = job_yaml("plan", model="nonexistent/model", cluster={"workers": 2})
    live = cluster.ok("plan", cfg, "--model", tiny_model, "--coordinator", cluster.address)
    assert (f"planned for the cluster at {cluster.address} (found by --coordinator): "
            f"{WORKERS} worker(s)") in live.stdout
    assert "(the job asks for cluster.workers: 2)" in live.stdout
    given = cluster.ok("plan", cfg, "--model", tiny_model, "--workers", "64,64")
    assert given.stdout.startswith("planned for --workers: 2 worker(s) of 64.0, 64.0 GiB")
    # No coordinator of this machine's cluster answers: this machine alone, and it says so.
    alone = cluster.ok("plan", cfg, "--model", tiny_model, "--tls-dir", cluster.foreign)
    assert alone.stdout.startswith("planned for this machine alone: no coordinator answered")
    # The config's own model, a hub id: not in the (empty) cache, and offline.
    hub = cluster.herd("plan", cfg, "--workers", "64")
    assert hub.returncode == 2
    assert ("nonexistent/model: no config.json for this hub id in the local Hugging Face cache"
            in hub.stderr and "hf download nonexistent/model config.json" in hub.stderr)


def test_plan_reads_a_hub_id_from_the_local_cache(cluster, job_yaml, tiny_model):
    sha = "0123456789abcdef0123456789abcdef01234567"
    repo = cluster.root / "hf" / "hub" / "models--someorg--tiny"
    (repo / "snapshots" / sha).mkdir(parents=True)
    (repo / "snapshots" / sha / "config.json").write_text((tiny_model / "config.json")
                                                          .read_text())
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(sha)
    cfg = job_yaml("hub", model="someorg/tiny")
    plan = cluster.ok("plan", cfg, "--workers", "8")
    assert "layout: 1 x 1 (data x pipeline)" in plan.stdout


def test_the_coordinator_is_found_with_its_default_port_and_another_clusters_is_never_used(
        cluster):
    # A laptop of another cluster: the coordinator fails the TLS handshake both ways (neither
    # proves itself to the other), so it is never used, and the message names what was seen.
    wrong = cluster.herd("jobs", "--tls-dir", cluster.foreign, coordinator=False)
    assert wrong.returncode in (5, 6), wrong.stderr
    assert "no coordinator found by zeroconf" in wrong.stderr
    assert cluster.address in wrong.stderr
    # A host without a port means port 7450 (never gRPC's 443). Whatever answers there (nothing,
    # or another cluster's coordinator), the message names that address.
    bare = cluster.herd("jobs", "--coordinator", HOST, coordinator=False)
    assert bare.returncode in (5, 6) and f"{HOST}:7450" in bare.stderr, bare.stderr


def test_herd_up_starts_a_process_that_died_again(cluster):
    """A coordinator or a worker of `herd up` killed (SIGKILL): started again on its own state
    folder, the cluster whole again (it used to stop every process when its coordinator died)."""
    def pid_of(marker: str) -> int:
        found = pids_of(marker, " -m herd ")
        assert found, f"no process with {marker}"
        return found[0]

    for marker in (f"--state-dir {cluster.state / 'coordinator'} ",
                   f"--state-dir {cluster.state / 'worker-2'} "):
        old = pid_of(marker)
        os.kill(old, signal.SIGKILL)
        deadline = time.monotonic() + 120
        while True:  # the same process name, a new pid, and every worker verified again
            listed = cluster.herd("workers", "--json", timeout=30)
            ids = sorted(w["worker_id"] for w in json.loads(listed.stdout or "[]")
                         ) if listed.returncode == 0 else []
            # (the killed worker may still be listed before `herd up` has started it again:
            # no process with its marker yet is "not yet", not a failure)
            now = pids_of(marker, " -m herd ")
            if ids == up_worker_ids(cluster.home, WORKERS) and now and now[0] != old:
                break
            assert time.monotonic() < deadline, (listed.stdout, listed.stderr)
            time.sleep(1)
    log = (cluster.state / "up.log").read_text()
    assert "herd up: coordinator exited (-9); starting it again" in log, log[-2000:]
    assert "herd up: worker-2 exited (-9); starting it again" in log, log[-2000:]


def test_workers_keep_only_their_newest_attempt_and_herd_down_stops_the_cluster(cluster,
                                                                                job_yaml):
    """`herd down` stops the cluster and names the jobs it leaves unfinished (here one that waits
    for a fifth worker), which go on when it starts again."""
    for w in range(1, WORKERS + 1):
        attempts = list((cluster.state / f"worker-{w}" / "jobs").glob("*/attempt-*"))
        assert len(attempts) <= 1, attempts  # --keep-attempts 1
    cfg = job_yaml("left", batch_size=WORKERS + 1, cluster={"workers": WORKERS + 1})
    waiting = cluster.ok("submit", cfg, "--no-check").stdout.strip()
    down = cluster.ok("down", "--state-dir", cluster.state, timeout=120)
    assert "stopped the cluster" in down.stdout
    assert (f"1 unfinished job(s) stopped with it: {waiting} (queued); they go on" in
            down.stderr), down.stderr
    gone = cluster.herd("jobs", timeout=60)
    assert gone.returncode == 5 and "unreachable" in gone.stderr
    again = cluster.herd("down", "--state-dir", cluster.state)
    assert again.returncode == 7 and "no `herd up` runs on" in again.stderr


def test_help_piped_into_head_ends_without_a_traceback():
    """`herd --help | head` ended in a BrokenPipeError traceback (an outside run)."""
    proc = subprocess.run(f"{sys.executable} -m herd --help | head -1", shell=True,
                          capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).resolve().parents[1])
    assert proc.stdout.startswith("herd:") and "Traceback" not in proc.stderr, proc.stderr
