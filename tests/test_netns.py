"""The namespace fixture itself (tests/netns.py), proved with real processes: a coordinator in
one namespace, two workers in two others and the CLI in a fourth find each other by real
zeroconf across the bridge and run a 2-worker job over a real MLX ring between the hosts; and the
fault helpers (block, cut) do what they say."""

from __future__ import annotations

import json
import re
import time

import pytest

from tests.conftest import write_job
from tests.netherd import HerdNet
from tests.netns import lan  # noqa: F401 (a fixture)

pytestmark = pytest.mark.slow


def test_block_and_cut_act_on_the_named_links_only(lan):  # noqa: F811
    w1, w2, c = lan.hosts["w1"], lan.hosts["w2"], lan.hosts["c"]
    assert w1.reaches(w2.address()) and w1.reaches(c.address())
    lan.block(w1, w2)
    try:
        assert not w1.reaches(w2.address(), timeout_s=1)
        assert w1.reaches(c.address()) and w2.reaches(c.address())
        assert lan.blocked_packets() > 0
    finally:
        lan.unblock(w1, w2)
    assert w1.reaches(w2.address())
    lan.cut(w2)
    try:
        assert not w1.reaches(w2.address(), timeout_s=1)
        assert not w2.reaches(c.address(), timeout_s=1)
    finally:
        lan.restore(w2)
    assert w1.reaches(w2.address(), timeout_s=10)


def test_a_two_worker_job_runs_across_namespaces(lan, tmp_path, tiny_model, tiny_data):  # noqa: F811
    c, w1, w2, cli = (lan.hosts[h] for h in ("c", "w1", "w2", "cli"))
    herd = HerdNet(lan, tmp_path)
    herd.coordinator(c)
    herd.worker(w1)
    herd.worker(w2, join=True)  # its certificate by `herd join`, across the bridge
    # The CLI finds the coordinator, and the coordinator both workers, by zeroconf alone.
    rows = herd.wait_workers(cli, 2)
    assert sorted((r[0], r[1].rsplit(":", 1)[0]) for r in rows) == [
        ("w1", w1.address()), ("w2", w2.address())]
    before = {h.name: h.counters("eth0")["tx_bytes"] for h in (w1, w2)}
    cfg = write_job(tmp_path / "job.yaml", tiny_model, tiny_data, iters=8, save_every=4,
                    cluster={"workers": 2, "exchange": "mlx"})
    job_id = herd.herd(cli, "submit", str(cfg)).stdout.strip().splitlines()[-1]
    watch = herd.herd(cli, "watch", job_id, "--plain", check=False)
    assert f"{job_id}: state succeeded" in watch.stdout, (
        watch.stdout[-3000:] + watch.stderr[-2000:] + herd.log(c, "coordinator")[-3000:])
    assert any(ln.endswith("[mlx x2]") for ln in watch.stdout.splitlines())
    # herd watch shows the data path the coordinator chose and the rate each rank measured.
    lines = watch.stdout.splitlines()
    assert f"{job_id}: data path: MLX ring on 198.18.0.0/24 via eth0 (ethernet 10 Gbit/s)" in lines
    probes = [ln for ln in lines if "link probe:" in ln]
    print("\n".join(probes))
    # (either worker may hold rank 0: the placing line lists them in rank order)
    placed = next(ln for ln in lines if ": state placing: starting 2 ranks on " in ln)
    first, second = ({"w1": w1, "w2": w2}[n] for n in placed.split(" on ", 1)[1].split(", "))
    assert any(f"rank 0 ({first.name}) -> rank 1 at {second.address()}:" in ln
               and re.search(r" [MG]bit/s over ", ln) for ln in probes), probes
    # The ring ran between the two hosts' own addresses, over the bridge.
    hostfiles = list((tmp_path / "w1" / "worker").rglob("hostfile*.json"))
    assert hostfiles, "no MLX hostfile under w1's state dir"
    ring = json.loads(hostfiles[0].read_text())
    assert [a.rsplit(":", 1)[0] for a in ring] == [first.address(), second.address()]
    sent = {h.name: h.counters("eth0")["tx_bytes"] - before[h.name] for h in (w1, w2)}
    assert min(sent.values()) > 100_000, f"bytes sent over the bridge: {sent}"
    herd.herd(cli, "pull", job_id, "-o", str(tmp_path / "adapter"))
    assert (tmp_path / "adapter" / "adapters.safetensors").is_file()


def test_a_worker_whose_address_leaves_the_machine_stops_saying_why(lan, tmp_path):  # noqa: F811
    """A renumbered Mac (a new DHCP lease) kept serving and advertising its old address, refused
    there until restarted by hand, its own log silent (an outside run). Its server is bound to
    that address, so the agent stops, saying why, with the exit code of a lost peer, for
    launchd or systemd to start it again on the new one."""
    from herd.errors import PeerLostError
    from herd.rpc import pki

    w1 = lan.hosts["w1"]
    w1.run(["ip", "addr", "add", "198.18.0.51/24", "dev", "eth0"])
    herd = HerdNet(lan, tmp_path)
    herd.ca = pki.Authority.create(tmp_path / "ca")  # (no coordinator: the worker serves alone)
    agent = herd.worker(w1, address="198.18.0.51", worker_id="renumbered")
    log = tmp_path / "w1" / "worker.log"
    deadline = time.monotonic() + 120
    while "listening on 198.18.0.51" not in (log.read_text() if log.exists() else ""):
        assert agent.poll() is None and time.monotonic() < deadline, herd.log(w1, "worker")
        time.sleep(0.2)
    w1.run(["ip", "addr", "del", "198.18.0.51/24", "dev", "eth0"])  # the lease moved on
    try:
        code = agent.wait(timeout=60)
    finally:
        if agent.poll() is None:
            agent.kill()
    out = herd.log(w1, "worker")
    assert code == PeerLostError.exit_code, out[-2000:]
    assert "no longer has the address 198.18.0.51 it serves" in out, out[-2000:]
