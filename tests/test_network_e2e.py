"""Real networks, simulated with network namespaces (tests/netns.py) and real processes: the data
plane on the fast subnet, Wi-Fi refused for gradients, IPv6 only, two coordinators with one host
name, refused workers shown by `herd workers`, and workers named with --worker where multicast is
blocked (issue 16's "done when" 1-4; 5 is in
tests/test_network.py against mlx's own launcher)."""

from __future__ import annotations

import json
import re
import subprocess
import time

import pytest

from tests.conftest import write_job
from tests.netherd import HerdNet
from tests.netns import netns  # noqa: F401 (a fixture)

pytestmark = pytest.mark.slow


def _job_id(out: subprocess.CompletedProcess) -> str:
    return out.stdout.strip().splitlines()[-1]


def _wait_message(herd: HerdNet, host, job_id: str, text: str, timeout_s: float = 120) -> str:
    deadline = time.monotonic() + timeout_s
    jobs = ""
    while time.monotonic() < deadline:
        jobs = herd.herd(host, "jobs", check=False).stdout
        if text in jobs:
            return jobs
        time.sleep(0.5)
    raise AssertionError(f"{job_id}: never showed {text!r}; last `herd jobs`:\n{jobs}")


def _hostfiles(herd: HerdNet, *hosts) -> list[list[str]]:
    return [json.loads(next((herd.root / h.name / "worker").rglob("hostfile.json")).read_text())
            for h in hosts]


def test_the_ring_runs_on_the_fast_subnet_the_coordinator_cannot_reach(
        netns, tmp_path, tiny_model, tiny_data):  # noqa: F811
    """Coordinator on the LAN only; workers on the LAN and on a "fast" subnet: the MLX ring runs
    on the fast links (hostfile and traffic counters), the control traffic on the LAN. A worker
    that advertises its fast address is refused, and `herd workers` says why."""
    net = netns()
    net.bridge("lan")
    net.bridge("fast")
    c, w1, w2, w3, cli = (net.host(n) for n in ("c", "w1", "w2", "w3", "cli"))
    for h, last in ((c, 1), (w1, 11), (w2, 12), (w3, 13), (cli, 100)):
        net.link(h, "lan", f"198.18.0.{last}/24")
    for h, last in ((w1, 11), (w2, 12), (w3, 13)):
        net.link(h, "fast", f"198.19.0.{last}/24")
    # No link probe here: the fast links must carry the ring's bytes and nothing else.
    herd = HerdNet(net, tmp_path, {"HERD_LINK_PROBE": "0"})
    herd.coordinator(c)
    herd.worker(w1, "--data", "eth1")      # the fast link named; w2 left to the planner
    herd.worker(w2)
    herd.worker(w3, address=w3.address("eth1"))  # the review's 6A: --host = the fast address
    rows = herd.wait_workers(cli, 2)
    assert [r[0] for r in rows] == ["w1", "w2"]
    assert rows[0][-2] == "eth1:ethernet" and rows[1][-2] == "eth0:ethernet,eth1:ethernet"
    listed = herd.herd(cli, "workers")
    assert "w3" in listed.stderr and "198.19.0.13" in listed.stderr
    assert "unreachable address" in listed.stderr, listed.stderr

    before = {(h.name, i): h.counters(i)["tx_bytes"] for h in (w1, w2) for i in ("eth0", "eth1")}
    cfg = write_job(tmp_path / "job.yaml", tiny_model, tiny_data, iters=8, save_every=4,
                    cluster={"workers": 2, "exchange": "mlx"})
    job_id = _job_id(herd.herd(cli, "submit", str(cfg)))
    watch = herd.herd(cli, "watch", job_id, "--plain", check=False)
    assert f"{job_id}: state succeeded" in watch.stdout, watch.stdout[-3000:]
    assert f"{job_id}: data path: MLX ring on 198.19.0.0/24 via eth1 (ethernet 10 Gbit/s)" \
        in watch.stdout.splitlines()
    # Both ranks hold the same hostfile, of the fast addresses; which worker is rank 0 follows
    # their free memory at placement (one machine's, read at two moments): either order.
    hostfiles = _hostfiles(herd, w1, w2)
    assert hostfiles[0] == hostfiles[1], hostfiles
    assert sorted(a.rsplit(":", 1)[0] for a in hostfiles[0]) == ["198.19.0.11", "198.19.0.12"]
    sent = {k: h_tx - before[k] for k, h_tx in
            ((k, net.hosts[k[0]].counters(k[1])["tx_bytes"]) for k in before)}
    herd.herd(cli, "pull", job_id, "-o", str(tmp_path / "adapter"))
    grad_bytes = (tmp_path / "adapter" / "adapters.safetensors").stat().st_size
    print(f"bytes sent: {sent}; adapter {grad_bytes} B")
    # A 2-rank ring all_sum sends about the whole gradient per step from each rank.
    for w in ("w1", "w2"):
        assert sent[(w, "eth1")] >= 0.8 * 8 * grad_bytes, sent
        assert sent[(w, "eth0")] > 0, sent  # reports and checkpoints: the control plane


def test_a_wifi_only_path_is_refused_for_gradients_unless_the_job_allows_it(
        netns, tmp_path, tiny_model, tiny_data):  # noqa: F811
    net = netns()
    net.bridge("lan")
    c, w1, w2, cli = (net.host(n) for n in ("c", "w1", "w2", "cli"))
    for h, last in ((c, 1), (w1, 11), (w2, 12), (cli, 100)):
        net.link(h, "lan", f"198.18.0.{last}/24")
    herd = HerdNet(net, tmp_path, {"HERD_LINK_PROBE": "0"})
    herd.coordinator(c)
    # No worker yet: `herd workers` says none is usable and exits 4.
    deadline = time.monotonic() + 60
    while (none := herd.herd(cli, "workers", check=False)).returncode == 5:
        assert time.monotonic() < deadline, none.stderr  # the coordinator is still starting
        time.sleep(0.5)
    assert none.returncode == 4 and "no usable worker" in none.stderr, none.stderr
    assert "with `--worker HOST:P`" in none.stderr, none.stderr  # (when multicast is blocked)
    for w in (w1, w2):
        herd.worker(w, "--data", "eth0=wifi")  # the only link, posing as Wi-Fi
    herd.wait_workers(cli, 2)
    cfg = write_job(tmp_path / "job.yaml", tiny_model, tiny_data, iters=4, save_every=4,
                    cluster={"workers": 2})
    job_id = _job_id(herd.herd(cli, "submit", str(cfg)))
    jobs = _wait_message(herd, cli, job_id, "is Wi-Fi")
    assert "the only network w1, w2 share for gradients is Wi-Fi: eth0 (wifi) on " \
           "198.18.0.0/24" in jobs, jobs
    assert herd.herd(cli, "cancel", job_id).stdout.strip() == f"{job_id}: cancelled"
    allowed = write_job(tmp_path / "wifi.yaml", tiny_model, tiny_data, iters=4, save_every=4,
                        cluster={"workers": 2, "allow_wifi": True})
    job_id = _job_id(herd.herd(cli, "submit", str(allowed)))
    watch = herd.herd(cli, "watch", job_id, "--plain", check=False)
    assert f"{job_id}: state succeeded" in watch.stdout, watch.stdout[-3000:]
    assert (f"{job_id}: data path: MLX ring on 198.18.0.0/24 via eth0 (wifi) (over Wi-Fi, as "
            "cluster.allow_wifi allows)") in watch.stdout.splitlines()


def test_an_ipv6_only_network_runs_a_two_worker_job(netns, tmp_path, tiny_model,  # noqa: F811
                                                    tiny_data):
    """No IPv4 but loopback, no --host anywhere: every process picks its IPv6 address, zeroconf
    finds the coordinator and the workers over IPv6, and the job runs on the gRPC exchange (MLX's
    ring is IPv4-only)."""
    net = netns()
    net.bridge("lan6")
    c, w1, w2, cli = (net.host(n) for n in ("c", "w1", "w2", "cli"))
    for h, last in ((c, 1), (w1, 11), (w2, 12), (cli, 100)):
        net.link(h, "lan6", f"fd18::{last}/64")
    herd = HerdNet(net, tmp_path)
    herd.coordinator(c, address="")          # "" = no --host: the automatic choice
    for w in (w1, w2):
        herd.worker(w, address="")
    rows = herd.wait_workers(cli, 2)
    assert sorted(r[1].rsplit(":", 1)[0] for r in rows) == ["[fd18::11]", "[fd18::12]"]
    cfg = write_job(tmp_path / "job.yaml", tiny_model, tiny_data, iters=4, save_every=4,
                    cluster={"workers": 2})
    job_id = _job_id(herd.herd(cli, "submit", str(cfg)))
    watch = herd.herd(cli, "watch", job_id, "--plain", check=False)
    assert f"{job_id}: state succeeded" in watch.stdout, (
        watch.stdout[-3000:] + herd.log(c, "coordinator")[-2000:])
    assert f"{job_id}: data path: gRPC exchange on fd18::/64 via eth0 (ethernet 10 Gbit/s) " \
           "(IPv6: MLX's ring is IPv4-only)" in watch.stdout.splitlines()
    assert any(ln.endswith("[grpc x2]") for ln in watch.stdout.splitlines())
    assert any("link probe: rank 0 (w" in ln and "[fd18::1" in ln for ln in
               watch.stdout.splitlines())
    herd.herd(cli, "pull", job_id, "-o", str(tmp_path / "adapter"))
    assert (tmp_path / "adapter" / "adapters.safetensors").is_file()


LOOKUPS = """
import sys
from herd.cli.connection import find_coordinator
from herd.rpc import pki
me = pki.Identity.load(pki.default_dir(), "client")
found = [find_coordinator(None, me) for _ in range(int(sys.argv[1]))]
print("\\n".join(found))
"""


def test_cli_discovery_with_two_coordinators_of_one_host_name(netns, tmp_path):  # noqa: F811
    """Two coordinators on machines with the same host name (and port), one of another cluster:
    the CLI finds its own 20 times out of 20."""
    net = netns()
    net.bridge("lan")
    c1, c2 = net.host("c1", hostname="host-c"), net.host("c2", hostname="host-c")
    cli = net.host("cli")
    for h, last in ((c1, 1), (c2, 2), (cli, 100)):
        net.link(h, "lan", f"198.18.0.{last}/24")
    ours, theirs = HerdNet(net, tmp_path / "ours"), HerdNet(net, tmp_path / "theirs")
    ours.coordinator(c1)
    theirs.coordinator(c2)
    ours.wait_workers(cli, 0, args=("--coordinator", "198.18.0.1:7450"), ok_codes=(4,))
    theirs.wait_workers(cli, 0, args=("--coordinator", "198.18.0.2:7450"), ok_codes=(4,))
    out = cli.run_python("-c", LOOKUPS, "20", env=ours.env(cli), timeout=300)
    assert out.stdout.split() == ["198.18.0.1:7450"] * 20, out.stdout + out.stderr[-2000:]


def test_three_workers_cabled_in_a_triangle_train_over_the_cables(
        netns, tmp_path, tiny_model, tiny_data):  # noqa: F811
    """Three Macs cabled pairwise (Thunderbolt without a switch: each cable its own /30, no
    subnet all three share but a slower LAN): the ring follows the cables, MLX's and the gRPC
    exchange's alike, each rank listed at its end of the cable from the rank before it; the
    link probe measures every cable, and the cables carry the gradients."""
    net = netns()
    net.bridge("lan")
    c, w1, w2, w3, cli = (net.host(n) for n in ("c", "w1", "w2", "w3", "cli"))
    for h, last in ((c, 1), (w1, 11), (w2, 12), (w3, 13), (cli, 100)):
        net.link(h, "lan", f"198.18.0.{last}/24")
    ends = {}  # worker -> its cable addresses
    for k, (a, b) in enumerate(((w1, w2), (w2, w3), (w3, w1)), start=1):
        net.bridge(f"cable{k}")  # a bridge with two ends: one cable
        for h, last in ((a, 1), (b, 2)):
            net.link(h, f"cable{k}", f"198.19.{k}.{last}/30")
            ends.setdefault(h.name, []).append(f"198.19.{k}.{last}")
    herd = HerdNet(net, tmp_path)
    herd.coordinator(c)
    for w in (w1, w2, w3):  # the LAN a data candidate too: the cables must beat it
        herd.worker(w, "--data", "eth0", "--data", "eth1=thunderbolt",
                    "--data", "eth2=thunderbolt")
    herd.wait_workers(cli, 3)
    before = {(h.name, i): h.counters(i)["tx_bytes"] for h in (w1, w2, w3)
              for i in ("eth0", "eth1", "eth2")}
    cfg = write_job(tmp_path / "job.yaml", tiny_model, tiny_data, iters=6, save_every=6,
                    batch_size=6, cluster={"workers": 3, "exchange": "mlx"})
    job_id = _job_id(herd.herd(cli, "submit", str(cfg)))
    watch = herd.herd(cli, "watch", job_id, "--plain", check=False)
    assert f"{job_id}: state succeeded" in watch.stdout, watch.stdout[-3000:]
    assert "attempt 1 failed" not in watch.stdout, watch.stdout[-3000:]
    assert (f"{job_id}: data path: MLX ring on cable ring " in watch.stdout
            and "via 3 cables (thunderbolt)" in watch.stdout), watch.stdout[-3000:]
    probes = [line for line in watch.stdout.splitlines() if "link probe:" in line]
    assert len(probes) == 3 and not any("failed" in p for p in probes), probes
    # One hostfile for all, of cable addresses: each rank's end of the cable from the one
    # before it, so consecutive ranks (and the last and the first) share a cable.
    hostfiles = _hostfiles(herd, w1, w2, w3)
    assert hostfiles[0] == hostfiles[1] == hostfiles[2], hostfiles
    ring = [a.rsplit(":", 1)[0] for a in hostfiles[0]]
    assert all(a.startswith("198.19.") for a in ring), ring
    cable_of = {a: a.rsplit(".", 1)[0] for addrs in ends.values() for a in addrs}
    owner = {a: w for w, addrs in ends.items() for a in addrs}
    assert sorted(owner[a] for a in ring) == ["w1", "w2", "w3"]
    for i, a in enumerate(ring):  # rank i-1's other end of this cable is one of its own
        assert any(cable_of[b] == cable_of[a] for b in ends[owner[ring[i - 1]]]), ring
    sent = {k: net.hosts[k[0]].counters(k[1])["tx_bytes"] - v for k, v in before.items()}
    herd.herd(cli, "pull", job_id, "-o", str(tmp_path / "adapter"))
    grad_bytes = (tmp_path / "adapter" / "adapters.safetensors").stat().st_size
    for w in ("w1", "w2", "w3"):  # a 3-rank ring sends 2/3 of the gradient per step per rank
        assert sent[(w, "eth1")] + sent[(w, "eth2")] >= 0.8 * 6 * 2 / 3 * grad_bytes, sent
    # herd's gRPC ring over the same cables: each rank dials only its two neighbours.
    cfg = write_job(tmp_path / "grpc.yaml", tiny_model, tiny_data, iters=4, save_every=4,
                    batch_size=6, cluster={"workers": 3, "exchange": "grpc"})
    job_id = _job_id(herd.herd(cli, "submit", str(cfg)))
    watch = herd.herd(cli, "watch", job_id, "--plain", check=False)
    assert f"{job_id}: state succeeded" in watch.stdout, watch.stdout[-3000:]
    assert f"{job_id}: data path: gRPC exchange on cable ring " in watch.stdout
    assert "attempt 1 failed" not in watch.stdout, watch.stdout[-3000:]  # (not on the LAN)


NO_MDNS = """table inet nomdns {
  chain in { type filter hook input priority 0; policy accept; udp dport 5353 counter drop; }
  chain out { type filter hook output priority 0; policy accept; udp dport 5353 counter drop; }
}
"""


def test_workers_multicast_cannot_reach_are_used_when_named_with_worker(netns, tmp_path):  # noqa: F811
    """A LAN that drops multicast (some switches, VLANs, guest Wi-Fi): zeroconf finds no worker,
    and `herd workers` says how to name them; a worker given to the coordinator with --worker
    HOST:PORT is verified and listed, one not named stays unseen."""
    net = netns()
    net.bridge("lan")
    c, w1, w2, cli = (net.host(n) for n in ("c", "w1", "w2", "cli"))
    for h, last in ((c, 1), (w1, 11), (w2, 12), (cli, 100)):
        net.link(h, "lan", f"198.18.0.{last}/24")
    for w in (w1, w2):
        w.run(["nft", "-f", "-"], input=NO_MDNS)
    herd = HerdNet(net, tmp_path, {"HERD_LINK_PROBE": "0"})
    herd.coordinator(c, "--worker", f"{w1.address()}:7460")
    for w in (w1, w2):
        herd.worker(w, "--port", "7460")
    rows = herd.wait_workers(cli, 1)
    assert rows[0][0] == "w1", rows
    dropped = w2.run(["nft", "list", "table", "inet", "nomdns"]).stdout
    assert re.search(r"counter packets [1-9]", dropped), dropped  # w2 did advertise
    time.sleep(3)  # (w2's adverts keep being dropped: still one worker)
    again = herd.herd(cli, "workers")
    assert [r.split()[0] for r in again.stdout.strip().splitlines()[1:]] == ["w1"], again.stdout
