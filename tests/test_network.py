"""The data plane's pure parts: the planner's choice of path (coordinator/planner/network.py),
the JACCL hostfile and environment checked against the installed mlx's own parser and launcher
(herd/jaccl.py), and the interface helpers (herd/netif.py). Real namespaces: test_network_e2e.py."""

from __future__ import annotations

import argparse
import json
import socket
from dataclasses import replace

import pytest

from coordinator.domain import WorkerRecord
from coordinator.planner.network import choose_path
from herd import jaccl, netif
from herd.errors import ConfigError, PlacementError
from herd.netif import Interface


def worker(wid: str, host: str, *ifaces: Interface) -> WorkerRecord:
    return WorkerRecord(wid, host, 7451, 7460, 7461, 64 << 30, interfaces=list(ifaces))


def eth(name: str, *addrs: str, speed: int = 10000, kind: str = "ethernet", rdma: str = "",
        data: bool = True) -> Interface:
    return Interface(name, kind, addrs, speed, rdma, data)


LO = eth("lo", "127.0.0.1/8", "::1/128", speed=0, kind="loopback")


def lan_and_fast(n: int = 2, fast_kind: str = "ethernet", fast_speed: int = 10000):
    return [worker(f"w{i}", f"198.18.0.{10 + i}", LO,
                   eth("en0", f"198.18.0.{10 + i}/24", speed=1000),
                   eth("en5", f"198.19.0.{10 + i}/24", kind=fast_kind, speed=fast_speed))
            for i in range(1, n + 1)]


def test_the_ring_runs_on_the_fastest_subnet_every_worker_shares():
    path = choose_path(lan_and_fast(3))
    assert (path.kind, path.network) == ("ring", "198.19.0.0/24")
    assert path.addresses == ["198.19.0.11", "198.19.0.12", "198.19.0.13"]
    assert "en5 (ethernet 10 Gbit/s)" in path.describe()
    # Thunderbolt beats Ethernet of the same reported speed; a subnet one worker lacks is no path.
    tb = lan_and_fast(2, fast_kind="thunderbolt", fast_speed=0)
    assert choose_path(tb).network == "198.19.0.0/24"
    partial = lan_and_fast(2)
    partial[1].interfaces.pop()  # w2 has no en5
    assert choose_path(partial).network == "198.18.0.0/24"
    # At equal speed, a dedicated data subnet before the control one.
    same = [worker(f"w{i}", f"198.18.0.{i}", eth("en0", f"198.18.0.{i}/24"),
                   eth("en5", f"198.19.0.{i}/24")) for i in (1, 2)]
    assert choose_path(same).network == "198.19.0.0/24"
    # The grpc exchange rides the same subnet.
    assert choose_path(lan_and_fast(2), exchange="grpc").kind == "grpc"
    assert choose_path(lan_and_fast(2), exchange="grpc").network == "198.19.0.0/24"


def test_data_interfaces_named_by_the_worker_are_the_only_candidates():
    ws = lan_and_fast(2)
    ws[0].interfaces[2] = eth("en5", "198.19.0.11/24", data=False)
    assert choose_path(ws).network == "198.18.0.0/24"


def test_wifi_carries_gradients_only_when_the_job_allows_it():
    ws = [worker(f"w{i}", f"198.18.0.{i}", LO, eth("en1", f"198.18.0.{i}/24", kind="wifi",
                                                      speed=0)) for i in (1, 2)]
    with pytest.raises(PlacementError) as e:
        choose_path(ws[::-1])  # the workers named in a stable order, whatever the rank order
    assert "only network w1, w2 share for gradients is Wi-Fi: en1 (wifi) on 198.18.0.0/24" \
        in e.value.message and "cluster.allow_wifi" in e.value.hint
    allowed = choose_path(ws, allow_wifi=True)
    assert (allowed.kind, allowed.network) == ("ring", "198.18.0.0/24")
    assert "Wi-Fi" in allowed.describe()
    # Wi-Fi beside Ethernet: the Ethernet, whatever Wi-Fi's speed.
    ws[0].interfaces.append(eth("en0", "198.19.0.1/24", speed=100))
    ws[1].interfaces.append(eth("en0", "198.19.0.2/24", speed=100))
    assert choose_path(ws).network == "198.19.0.0/24"


def test_no_shared_subnet_falls_back_to_the_control_network():
    ws = [worker("w1", "198.18.1.1", eth("en0", "198.18.1.1/24")),
          worker("w2", "198.18.2.1", eth("en0", "198.18.2.1/24"))]
    path = choose_path(ws)
    assert (path.kind, path.addresses, path.network) == ("grpc", ["198.18.1.1", "198.18.2.1"],
                                                         "control network")
    assert choose_path(ws, exchange="mlx").kind == "ring"  # asked for: the ring, routed
    assert choose_path(ws, pipeline=True).kind == "ring"   # activations need the MLX ring


def test_ipv6_only_paths_carry_the_grpc_exchange():
    ws = [worker(f"w{i}", f"fd18::{i}", eth("eth0", f"fd18::{i}/64")) for i in (1, 2)]
    path = choose_path(ws)
    assert (path.kind, path.addresses, path.network) == ("grpc", ["fd18::1", "fd18::2"],
                                                         "fd18::/64")
    with pytest.raises(PlacementError, match="MLX's ring opens IPv4 sockets only"):
        choose_path(ws, exchange="mlx")
    # Dual stack: the ring takes the IPv4 subnet.
    for i, w in enumerate(ws, 1):
        w.interfaces.append(eth("eth1", f"198.19.0.{i}/24", speed=1000))
    assert choose_path(ws, exchange="mlx").network == "198.19.0.0/24"


def test_loopback_is_a_path_only_for_one_machine():
    local = [worker(f"w{i}", "127.0.0.1", LO, eth("eth0", "192.0.2.2/24")) for i in (1, 2)]
    assert choose_path(local).network == "127.0.0.0/8"
    remote = lan_and_fast(2)
    assert all(not a.startswith("127.") for a in choose_path(remote).addresses)


def test_workers_without_interfaces_keep_their_control_addresses():
    ws = [worker("w1", "10.1.0.1"), worker("w2", "10.1.0.2")]
    path = choose_path(ws)
    assert (path.kind, path.addresses) == ("ring", ["10.1.0.1", "10.1.0.2"])


# --- JACCL --------------------------------------------------------------------------------------

def four_macs() -> list[WorkerRecord]:
    """4 Macs fully meshed by Thunderbolt 5, one point-to-point subnet per cable (as
    mlx.distributed_config sets them up), RDMA device rdma_<iface> on each end."""
    cables = {(0, 1): ("en2", "en2"), (0, 2): ("en3", "en2"), (0, 3): ("en4", "en2"),
              (1, 2): ("en3", "en3"), (1, 3): ("en4", "en3"), (2, 3): ("en4", "en4")}
    ifaces: list[list[Interface]] = [[eth("en0", f"198.18.0.{i + 1}/24", speed=10000)]
                                     for i in range(4)]
    for n, ((a, b), (ia, ib)) in enumerate(sorted(cables.items())):
        ifaces[a].append(eth(ia, f"198.19.{n}.1/30", kind="thunderbolt", rdma=f"rdma_{ia}"))
        ifaces[b].append(eth(ib, f"198.19.{n}.2/30", kind="thunderbolt", rdma=f"rdma_{ib}"))
    return [worker(f"mac{i + 1}", f"198.18.0.{i + 1}", *ifaces[i]) for i in range(4)]


WANT_RDMA = [[None, "rdma_en2", "rdma_en3", "rdma_en4"],
             ["rdma_en2", None, "rdma_en3", "rdma_en4"],
             ["rdma_en2", "rdma_en3", None, "rdma_en4"],
             ["rdma_en2", "rdma_en3", "rdma_en4", None]]


def test_jaccl_when_every_pair_has_rdma_else_the_ring():
    macs = four_macs()
    path = choose_path(macs)
    assert path.kind == "jaccl" and path.rdma == WANT_RDMA
    assert path.addresses == [w.host for w in macs]
    assert "untested on hardware" in path.describe()
    # One cable missing (mac1-mac4): no JACCL over every pair, but the RDMA cables still close
    # a cycle, mac1 mac2 mac4 mac3: a JACCL ring in that order.
    macs[3].interfaces = [i for i in macs[3].interfaces if i.name != "en2"]
    path = choose_path(macs)
    assert (path.kind, path.order, path.network) == ("jaccl", (0, 1, 3, 2),
                                                     "Thunderbolt RDMA ring")
    assert path.rdma[0] == [None, "rdma_en2", None, "rdma_en3"]  # towards mac2 and mac3
    # Without RDMA (before macOS 26.2): MLX's TCP ring over the same cables, in that order.
    for m in macs:
        m.interfaces = [replace(i, rdma_device="") for i in m.interfaces]
    path = choose_path(macs)
    assert (path.kind, path.order, path.neighbors_only) == ("ring", (0, 1, 3, 2), True)
    # each rank at its end of the cable from the rank before it: mac3-mac1, mac1-mac2, ...
    assert path.addresses == ["198.19.1.1", "198.19.0.2", "198.19.4.2", "198.19.5.1"]
    assert path.network == "cable ring 198.19.0.0/30 198.19.4.0/30 198.19.5.0/30 198.19.1.0/30"
    # A pipeline keeps its stage order, which the cables do not follow: the 10GbE LAN.
    path = choose_path(macs, pipeline=True)
    assert (path.kind, path.network, path.order) == ("ring", "198.18.0.0/24", ())
    assert choose_path(four_macs(), exchange="grpc").kind == "grpc"


def cabled(n: int, cables: list[tuple[int, int]], lan_speed: int = 1000,
           kind: str = "thunderbolt") -> list[WorkerRecord]:
    """n Macs on one LAN, with a point-to-point subnet per cable (mlx.distributed_config's way)."""
    ifaces = [[eth("en0", f"198.18.0.{i + 1}/24", speed=lan_speed)] for i in range(n)]
    for k, (a, b) in enumerate(cables):
        ifaces[a].append(eth(f"en{k + 2}", f"198.19.{k}.1/30", kind=kind, speed=40000))
        ifaces[b].append(eth(f"en{k + 2}", f"198.19.{k}.2/30", kind=kind, speed=40000))
    return [worker(f"mac{i + 1}", f"198.18.0.{i + 1}", *ifaces[i]) for i in range(n)]


def test_three_macs_cabled_in_a_triangle_ring_over_the_cables_not_the_lan():
    """The common Mac Studio setup without a Thunderbolt switch: three cables, no subnet all
    share but the 1 GbE LAN. A ring rank talks only to its two neighbours, so the cables carry
    it: each rank listed at its address on the cable from the rank before it, where MLX's ring
    has it accept (mlx.distributed_config writes the same for a Thunderbolt ring)."""
    macs = cabled(3, [(0, 1), (1, 2), (2, 0)])
    path = choose_path(macs)
    assert (path.kind, path.order, path.neighbors_only) == ("ring", (0, 1, 2), True)
    assert path.addresses == ["198.19.2.2", "198.19.0.2", "198.19.1.2"]
    assert path.describe() == ("data path: MLX ring on cable ring 198.19.0.0/30 198.19.1.0/30 "
                               "198.19.2.0/30 via 3 cables (thunderbolt 40 Gbit/s) (ranks in "
                               "cable order)")
    assert choose_path(macs, exchange="grpc").kind == "grpc"  # the gRPC ring follows them too
    assert choose_path(macs, pipeline=True).order == (0, 1, 2)  # already in stage order
    # A failed attempt on the cables: the next one takes the LAN.
    assert choose_path(macs, avoid=frozenset({path.network})).network == "198.18.0.0/24"
    # A LAN as fast as the cables: the subnet every worker shares wins (one hop, no reorder).
    assert choose_path(cabled(3, [(0, 1), (1, 2), (2, 0)], lan_speed=40000,
                              kind="ethernet")).network == "198.18.0.0/24"
    # Cables that do not close a cycle (a chain): the LAN.
    assert choose_path(cabled(3, [(0, 1), (1, 2)])).network == "198.18.0.0/24"
    # Two workers: a cable between them is a subnet they share (the ring as before).
    two = choose_path(cabled(2, [(0, 1)]))
    assert (two.network, two.neighbors_only) == ("198.19.0.0/30", False)


def test_a_data_parallel_placement_follows_the_cables():
    """Four Macs cabled in a square whose cycle is not the memory order: the ranks (and the
    planner's per-rank caps) are reordered to follow the cables; rank 0 keeps its worker."""
    from coordinator.placement import Placement, with_path

    macs = cabled(4, [(0, 1), (1, 3), (3, 2), (2, 0)])
    path = choose_path(macs)
    assert path.order == (0, 1, 3, 2)
    placed = with_path(Placement([w.worker_id for w in macs], 1, max_shares=(4, 3, 2, 1)), path)
    assert placed.worker_ids == ["mac1", "mac2", "mac4", "mac3"]
    assert placed.max_shares == (4, 3, 1, 2)
    # each rank listed on the cable from the one before it: mac3-mac1, mac1-mac2, mac2-mac4, ...
    assert path.addresses == ["198.19.3.2", "198.19.0.2", "198.19.1.2", "198.19.2.2"]


def test_jaccl_hostfile_and_env_match_what_mlx_launch_produces(tmp_path, monkeypatch):
    """The hostfile herd writes parses with mlx's own Hostfile, and mlx's own launch_jaccl,
    given it, produces exactly the environment herd gives each rank."""
    from mlx._distributed_utils import common, launch

    macs = four_macs()
    path = choose_path(macs)
    names, ips = [w.worker_id for w in macs], [w.host for w in macs]
    hf = tmp_path / "hostfile.json"
    hf.write_text(json.dumps(jaccl.hostfile(names, ips, path.rdma)))
    parsed = common.Hostfile.from_file(hf)
    assert parsed.backend == "jaccl"
    assert [(h.ssh_hostname, h.ips, h.rdma) for h in parsed.hosts] == list(
        zip(names, [[ip] for ip in ips], WANT_RDMA))

    captured = []
    monkeypatch.setattr(launch, "_launch_with_io", lambda cls, arguments, verbose:
                        captured.extend(a for a, _ in arguments))
    args = argparse.Namespace(backend="jaccl", env=[], cwd=None, verbose=False, python=None,
                              starting_port=32323)

    class Parser:
        def error(self, msg):
            raise AssertionError(f"mlx's launcher refused herd's hostfile: {msg}")

    launch.launch_jaccl(Parser(), parsed.hosts, args, ["train.py"])
    assert len(captured) == 4
    for rank, (r, host, _python, _cwd, files, env, _cmd) in enumerate(captured):
        herd_env = jaccl.env(rank, "<file>", f"{ips[0]}:32323")
        assert (r, host) == (rank, names[rank])
        assert env == [f"MLX_JACCL_COORDINATOR={herd_env['MLX_JACCL_COORDINATOR']}"]
        assert files == {"MLX_IBV_DEVICES": jaccl.devices_json(path.rdma)}
    # The scheduler hands ranks the same device file content and a coordinator on rank 0.
    from coordinator.domain import Job
    from coordinator.placement import Placement
    from coordinator.scheduler import launches
    from herd.config import JobConfig

    job = Job("j", "j", JobConfig(), [], 4, 10)
    plan = launches(job, Placement(names, 1, path=path), {w.worker_id: w for w in macs})
    assert {lr.ibv_devices_json for lr in plan} == {files["MLX_IBV_DEVICES"]}
    assert {lr.jaccl_coordinator for lr in plan} == {"198.18.0.1:7460"}
    assert all(lr.ring_hosts == [] and lr.data_path == "jaccl" for lr in plan)


def test_a_jaccl_ring_where_rdma_cables_close_a_cycle_but_not_every_pair(tmp_path, monkeypatch):
    """Five Macs with RDMA, cabled in a pentagon (in an order that is not the memory order):
    mlx's jaccl-ring backend, devices towards neighbours only, ranks in cable order; the hostfile
    parses with mlx's own Hostfile and mlx's own launcher gives each rank herd's environment."""
    from mlx._distributed_utils import common, launch

    cycle = [0, 2, 4, 1, 3]
    cables = [(cycle[k], cycle[(k + 1) % 5]) for k in range(5)]
    macs = cabled(5, cables)
    for k, (a, b) in enumerate(cables):  # each cable's ends get an RDMA device
        for m in (a, b):
            macs[m].interfaces = [replace(i, rdma_device=f"rdma_{i.name}")
                                  if i.name == f"en{k + 2}" else i for i in macs[m].interfaces]
    path = choose_path(macs)
    assert (path.kind, path.network, path.order) == ("jaccl", "Thunderbolt RDMA ring",
                                                     tuple(cycle))
    assert path.rdma[0] == [None, "rdma_en2", None, None, "rdma_en6"]
    assert jaccl.is_ring(path.rdma)
    names = [macs[k].worker_id for k in cycle]
    hf = tmp_path / "hostfile.json"
    hf.write_text(json.dumps(jaccl.hostfile(names, path.addresses, path.rdma)))
    parsed = common.Hostfile.from_file(hf)
    assert parsed.backend == "jaccl-ring"
    captured = []
    monkeypatch.setattr(launch, "_launch_with_io", lambda cls, arguments, verbose:
                        captured.extend(a for a, _ in arguments))

    class Parser:
        def error(self, msg):
            raise AssertionError(f"mlx's launcher refused herd's hostfile: {msg}")

    args = argparse.Namespace(backend="jaccl-ring", env=[], cwd=None, verbose=False,
                              python=None, starting_port=32323)
    launch.launch_jaccl(Parser(), parsed.hosts, args, ["train.py"])
    for rank, (_r, _host, _python, _cwd, files, env, _cmd) in enumerate(captured):
        ours = jaccl.env(rank, "<file>", f"{path.addresses[0]}:32323", ring=True)
        assert sorted(env) == sorted(f"{k}={v}" for k, v in ours.items()
                                     if k in ("MLX_JACCL_COORDINATOR", "MLX_JACCL_RING"))
        assert files == {"MLX_IBV_DEVICES": jaccl.devices_json(path.rdma)}
    # One RDMA cable missing: no cycle of RDMA, so the TCP ring over the same cables.
    macs[cycle[1]].interfaces = [replace(i, rdma_device="") for i in macs[cycle[1]].interfaces]
    assert choose_path(macs).kind == "ring"


def test_jaccl_refuses_a_matrix_mlx_would_refuse():
    with pytest.raises(ConfigError, match="towards itself must be null"):
        jaccl.devices_json([["rdma_en2", "rdma_en3"], ["rdma_en2", None]])
    with pytest.raises(ConfigError, match="no RDMA device towards rank 1"):
        jaccl.devices_json([[None, None], ["rdma_en2", None]])


# --- interfaces and addresses ------------------------------------------------------------------

def test_hostport_brackets_ipv6_only():
    assert netif.hostport("fd18::1", 7450) == "[fd18::1]:7450"
    assert netif.hostport("[fd18::1]", 7450) == "[fd18::1]:7450"
    assert netif.hostport("198.18.0.1", 7450) == "198.18.0.1:7450"
    assert netif.split_hostport("[fd18::1]:7450") == ("fd18::1", 7450)


def test_a_coordinator_address_gets_its_default_port_and_a_port_out_of_range_is_refused():
    """gRPC dials port 99999 as 34463 (modulo 65536): refused by name instead (an outside run)."""
    from herd.cli.connection import with_port
    from herd.errors import ConfigError

    assert with_port("10.0.0.1") == "10.0.0.1:7450"
    assert with_port("10.0.0.1:7999") == "10.0.0.1:7999"
    assert with_port("fd00::1") == "[fd00::1]:7450"
    assert with_port("[fd00::1]:7999") == "[fd00::1]:7999"
    for bad in ("10.0.0.1:99999", "10.0.0.1:0", "[fd00::1]:70000"):
        with pytest.raises(ConfigError, match="is not a port"):
            with_port(bad)


def test_herd_token_on_an_ipv6_only_host_names_a_join_address_that_dials(tmp_path, monkeypatch,
                                                                          capsys):
    """`herd token` on an IPv6-only coordinator host: the token's join address is bracketed, as
    the one `herd coordinator` prints (an outside review's laptop could not join with it)."""
    from herd.cli import trust
    from herd.rpc import discovery, pki
    from herd.rpc.join import JoinToken

    pki.Authority.create(tmp_path / "tls")
    monkeypatch.setattr(discovery, "local_ip", lambda: "fd18::1")  # the host's only address
    assert trust.main(["token", "--role", "client", "--tls-dir", str(tmp_path / "tls")]) == 0
    token = JoinToken.decode(capsys.readouterr().out.strip())
    assert token.address == "[fd18::1]:7452"
    assert netif.split_hostport(token.address) == ("fd18::1", 7452)


def test_data_spec_marks_interfaces_and_names_what_exists():
    found = [LO, eth("eth0", "198.18.0.1/24"), eth("eth1", "198.19.0.1/24")]
    chosen = netif.select_data(found, ["eth1=wifi"])
    assert [(i.name, i.kind, i.data) for i in chosen] == [
        ("lo", "loopback", False), ("eth0", "ethernet", False), ("eth1", "wifi", True)]
    by_address = netif.select_data(found, ["198.18.0.1"])
    assert [i.name for i in by_address if i.data] == ["eth0"]
    with pytest.raises(ValueError, match="no interface or address 'en9' here .*eth1 198.19"):
        netif.select_data(found, ["en9"])
    with pytest.raises(ValueError, match="kind 'fast' is not one of"):
        netif.select_data(found, ["eth1=fast"])


def test_control_address_prefers_wired_and_warns_on_loopback_and_wifi():
    wired = netif.choose_control([LO, eth("en1", "198.18.0.5/24", kind="wifi"),
                                  eth("bridge0", "198.19.0.1/30", kind="thunderbolt"),
                                  eth("en0", "198.18.1.5/24")])
    assert (wired.address, wired.warning) == ("198.18.1.5", "")
    wifi = netif.choose_control([LO, eth("en1", "198.18.0.5/24", kind="wifi")])
    assert wifi.address == "198.18.0.5" and "Wi-Fi" in wifi.warning
    alone = netif.choose_control([LO])
    assert alone.address == "127.0.0.1" and "loopback" in alone.warning
    v6 = netif.choose_control([LO, eth("eth0", "fd18::5/64")])
    assert (v6.address, v6.warning) == ("fd18::5", "")


def test_control_address_is_the_default_routes_over_an_unrouted_ethernet_data_link(
        monkeypatch):
    """deploy/README's 10GbE recipe: en0 on its own ring subnet (no route), the LAN and default
    route on Wi-Fi. The control address is the routed one, which others reach, with a warning
    naming both (an outside run saw the ring address advertised, unreachable, without a word)."""
    ifs = [LO, eth("en0", "10.10.0.11/24"), eth("en1", "192.168.1.20/24", kind="wifi")]
    monkeypatch.setattr(netif, "_route_address",
                        lambda fam: "192.168.1.20" if fam == socket.AF_INET else None)
    got = netif.choose_control(ifs)
    assert got.address == "192.168.1.20"
    assert "Wi-Fi" in got.warning and "en0 10.10.0.11 has none" in got.warning
    monkeypatch.setattr(netif, "_route_address",
                        lambda fam: "10.10.0.11" if fam == socket.AF_INET else None)
    assert netif.choose_control(ifs).address == "10.10.0.11"  # routed Ethernet: as before


def test_the_link_probe_works_where_the_kernel_would_pick_another_source_address():
    """Two ranks known by 127.0.0.2 and 127.0.0.3 (one loopback, as Ray nodes on one machine; or
    a Mac with two addresses): a connection's source is picked by route (127.0.0.1 here), and the
    next rank's sink refuses a host it does not expect. Each rank sends from its own address, so
    both directions are measured (before: both failed after the 20 s deadline, at every start)."""
    import threading

    from herd.rpc.ports import free_ports
    from worker.exchange.probe import probe_next

    peers = [f"127.0.0.2:{free_ports(1, '127.0.0.2')[0]}",
             f"127.0.0.3:{free_ports(1, '127.0.0.3')[0]}"]
    got: dict[int, object] = {}

    def probe(rank: int) -> None:
        try:
            got[rank] = probe_next(rank, peers)
        except OSError as e:
            got[rank] = e

    threads = [threading.Thread(target=probe, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for rank in (0, 1):
        rate = got[rank]
        assert not isinstance(rate, OSError), f"rank {rank}'s probe failed: {rate!r}"
        assert rate.peer == 1 - rank and rate.address == peers[1 - rank] and rate.bytes > 0


def test_an_agents_rank_ports_are_outside_the_ephemeral_range():
    """An agent keeps its rank ports for every rank it runs; between two ranks nothing holds
    them, so one from the ephemeral range could be taken by any outgoing connection (a rank then
    failed with "[ring] Couldn't bind socket (error: 98)")."""
    import socket

    from herd.rpc.ports import _ephemeral, kept_ports

    for host, fam in (("", socket.AF_INET), ("127.0.0.1", socket.AF_INET),
                      ("::1", socket.AF_INET6)):
        ports = kept_ports(2, host)
        assert len(set(ports)) == 2, ports  # ring and exchange: never the same one
        for port in ports:
            assert port not in _ephemeral(), (host, port)
            with socket.socket(fam) as s:  # and it is free
                s.bind((host, port))
