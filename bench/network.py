"""Ring bus bandwidth on the path herd chooses vs the wrong one, in network namespaces (root).

    .venv/bin/python bench/network.py              # 1 vs 10 Gbit/s, then 100 Mbit/s vs 1
    .venv/bin/python bench/network.py --rates 1gbit:10gbit --mb 64 --reps 3

Two hosts (namespaces w1, w2) joined by two bridges: "lan" (198.18.0.0/24, the control network)
rate-limited to the slow rate and "fast" (198.19.0.0/24) to the fast one, with tbf on both
directions of every link (tests/netns.py). For each rate pair:

1. the fast and the slow link's measured limit: a 2 s TCP stream each way at once
   (worker/exchange/probe.py, the probe ranks run before a ring forms, held longer);
2. herd's choice: each host's real interfaces (herd/netif.py, probed inside its namespace) go
   through the coordinator's planner (coordinator/planner/network.py);
3. MLX ring all_sum of --mb MB between the two hosts on herd's choice and on the other subnet
   (fresh rank processes per run, started with MLX_RANK + MLX_HOSTFILE), median of --reps.

Bus bandwidth = 2(N-1)/N x bytes / time = bytes / time for N = 2. Goal (issue 16): herd's choice
reaches >= 0.9 of the fast link's measured limit. Writes bench/results/network-<date>.md.

``--cable-ring``: three hosts cabled in a triangle (each cable its own /30 bridge, at the fast
rate) beside the slow LAN, as three Macs joined by Thunderbolt cables without a switch: herd's
choice (the ring over the cables) vs the LAN, 3 ranks, bus bandwidth 4/3 x bytes / time; the
fast limit is the slowest cable's.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from coordinator.domain import WorkerRecord  # noqa: E402 (after the path)
from coordinator.planner.network import choose_path  # noqa: E402
from herd.netif import Interface, select_data  # noqa: E402
from tests.netns import Topology  # noqa: E402

RANK = r"""
import json, os, statistics, sys, time
import mlx.core as mx
g = mx.distributed.init(strict=True, backend="ring")
n, reps = int(sys.argv[1]) * 2**20 // 4, int(sys.argv[2])
x = mx.ones((n,), dtype=mx.float32)
mx.eval(mx.distributed.all_sum(mx.ones((16,)), group=g))  # line the ranks up
mx.eval(mx.distributed.all_sum(x, group=g))                # warm-up
times = []
for _ in range(reps):
    t0 = time.perf_counter()
    y = mx.distributed.all_sum(x, group=g)
    mx.eval(y)
    times.append(time.perf_counter() - t0)
assert y[0].item() == g.size()
if g.rank() == 0:
    print(json.dumps({"seconds": statistics.median(times), "bytes": n * 4}))
"""

PROBE = r"""
import json, sys
from worker.exchange.probe import probe_next
r = probe_next(int(sys.argv[1]), sys.argv[2].split(","), seconds=float(sys.argv[3]))
print(json.dumps({"bps": r.bits_per_second}))
"""

INTERFACES = r"""
import dataclasses, json
from herd.netif import probe_interfaces
print(json.dumps([dataclasses.asdict(i) for i in probe_interfaces()]))
"""


def run_pair(hosts, script: str, args_for) -> list[str]:
    env = {"PYTHONPATH": str(ROOT), "OPENBLAS_NUM_THREADS": "1"}
    procs = [h.python("-c", script, *args_for(r), env=env, stdout=-1, stderr=-1, text=True)
             for r, h in enumerate(hosts)]
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=600)
        if p.returncode != 0:
            raise RuntimeError(err[-2000:])
        outs.append(out)
    return outs


def link_limit(hosts, addrs: list[str], port: int) -> float:
    peers = ",".join(f"{a}:{port}" for a in addrs)
    outs = run_pair(hosts, PROBE, lambda r: (str(r), peers, "2.0"))
    return min(json.loads(o)["bps"] for o in outs)


def ring(hosts, addrs: list[str], port: int, mb: int, reps: int, tmp: Path) -> float:
    hostfile = tmp / f"hosts-{addrs[0]}-{port}.json"
    hostfile.write_text(json.dumps([f"{a}:{port}" for a in addrs]))
    env = {"PYTHONPATH": str(ROOT), "MLX_HOSTFILE": str(hostfile),
           "MLX_WORLD_SIZE": str(len(hosts)), "OPENBLAS_NUM_THREADS": "1"}
    procs = [h.python("-c", RANK, str(mb), str(reps), env={**env, "MLX_RANK": str(r)},
                      stdout=-1, stderr=-1, text=True) for r, h in enumerate(hosts)]
    outs = [p.communicate(timeout=900) for p in procs]
    for p, (_, err) in zip(procs, outs):
        if p.returncode != 0:
            raise RuntimeError(err[-2000:])
    res = json.loads(outs[0][0])
    n = len(hosts)
    return 2 * (n - 1) / n * res["bytes"] * 8 / res["seconds"]  # bus bandwidth, bit/s


def one_pair(slow: str, fast: str, mb: int, reps: int, tmp: Path) -> dict:
    with Topology() as net:
        net.bridge("lan")
        net.bridge("fast")
        hosts = [net.host("w1"), net.host("w2")]
        for i, h in enumerate(hosts, 1):
            net.link(h, "lan", f"198.18.0.{i}/24")
            net.link(h, "fast", f"198.19.0.{i}/24")
            net.limit(h, slow, "eth0")
            net.limit(h, fast, "eth1")
        path = choose_path(_records(hosts), exchange="mlx")
        chosen = path.addresses
        wrong = [h.address("eth0") if a.startswith("198.19.") else h.address("eth1")
                 for a, h in zip(chosen, hosts)]
        limits = {"lan": link_limit(hosts, [h.address("eth0") for h in hosts], 7600),
                  "fast": link_limit(hosts, [h.address("eth1") for h in hosts], 7601)}
        got = ring(hosts, chosen, 7610, mb, reps, tmp)
        bad = ring(hosts, wrong, 7611, mb, reps, tmp)
    return {"slow": slow, "fast": fast, "choice": path.describe(), "chosen": chosen,
            "limit_lan": limits["lan"], "limit_fast": limits["fast"], "ring_chosen": got,
            "ring_wrong": bad}


def _records(hosts, data: list[str] = ()) -> list[WorkerRecord]:
    """Each host's interfaces as its worker reports them (``data``: its --data flags)."""
    records = []
    for h in hosts:
        found = json.loads(h.run_python("-c", INTERFACES, env={"PYTHONPATH": str(ROOT)}).stdout)
        ifaces = [Interface(**{**i, "addresses": tuple(i["addresses"])}) for i in found]
        records.append(WorkerRecord(h.name, h.address("eth0"), 0, 0, 0, 0,
                                    interfaces=select_data(ifaces, list(data))))
    return records


def one_cable_ring(slow: str, fast: str, mb: int, reps: int, tmp: Path) -> dict:
    with Topology() as net:
        net.bridge("lan")
        hosts = [net.host(f"w{i}") for i in (1, 2, 3)]
        for i, h in enumerate(hosts, 1):
            net.link(h, "lan", f"198.18.0.{i}/24")
            net.limit(h, slow, "eth0")
        cables = []
        for k, (a, b) in enumerate(((0, 1), (1, 2), (2, 0)), start=1):
            net.bridge(f"cable{k}")
            ends = []
            for h, last in ((hosts[a], 1), (hosts[b], 2)):
                link = net.link(h, f"cable{k}", f"198.19.{k}.{last}/30")
                net.limit(h, fast, link.ifname)
                ends.append(f"198.19.{k}.{last}")
            cables.append(((hosts[a], hosts[b]), ends))
        # (every veth says 10 Gbit/s: the cables are named Thunderbolt, as `herd worker --data
        # eth1=thunderbolt` would on a Mac whose cable ports macOS did not name)
        path = choose_path(_records(hosts, ["eth0", "eth1=thunderbolt", "eth2=thunderbolt"]),
                           exchange="mlx")
        assert path.neighbors_only, path.describe()
        order = [hosts[i] for i in path.order]
        lan = [h.address("eth0") for h in order]
        limits = {"lan": link_limit(hosts, [h.address("eth0") for h in hosts], 7600)}
        limits["fast"] = min(link_limit(list(pair), ends, 7601 + k)
                             for k, (pair, ends) in enumerate(cables))
        got = ring(order, path.addresses, 7610, mb, reps, tmp)
        bad = ring(order, lan, 7611, mb, reps, tmp)
    return {"slow": slow, "fast": fast, "choice": path.describe(), "chosen": path.addresses,
            "limit_lan": limits["lan"], "limit_fast": limits["fast"], "ring_chosen": got,
            "ring_wrong": bad}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rates", default="1gbit:10gbit,100mbit:1gbit",
                   help="slow:fast tbf rates, comma-separated pairs")
    p.add_argument("--mb", type=int, default=64, help="all_sum size")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--cable-ring", action="store_true",
                   help="three hosts cabled in a triangle (the module docstring)")
    args = p.parse_args()
    tmp = Path(os.environ.get("TMPDIR", "/tmp"))
    rows = []
    for pair in args.rates.split(","):
        slow, fast = pair.split(":")
        r = (one_cable_ring if args.cable_ring else one_pair)(slow, fast, args.mb, args.reps,
                                                              tmp)
        print(json.dumps(r), flush=True)
        rows.append(r)
    g = lambda bps: f"{bps / 1e9:.2f}"  # noqa: E731
    lines = [
        f"# Ring bus bandwidth: herd's data path vs the wrong one ({datetime.date.today()})", "",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"Linux {platform.release()}, load average {os.getloadavg()[0]:.1f} at the end (other "
        f"jobs share the machine); two network namespaces, tbf on both directions of each "
        f"link; MLX ring all_sum of {args.mb} MB, median of {args.reps}, "
        + ("3 ranks (one per namespace) cabled in a triangle, each cable at the fast rate beside "
           "the slow LAN; the fast limit is the slowest cable's" if args.cable_ring else
           "2 ranks (one per namespace)")
        + ". Link limit = a 2 s TCP stream both ways at once (herd's link probe, held longer). "
        "Bus bandwidth, Gbit/s.", "",
        "| tbf slow / fast | link limit slow | link limit fast | herd's choice | ring on it "
        "| ring on the other | chosen / wrong | chosen / fast limit |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['slow']} / {r['fast']} | {g(r['limit_lan'])} | {g(r['limit_fast'])} | "
            f"{r['choice'].removeprefix('data path: ')} | {g(r['ring_chosen'])} | "
            f"{g(r['ring_wrong'])} | {r['ring_chosen'] / r['ring_wrong']:.2f} | "
            f"{r['ring_chosen'] / r['limit_fast']:.2f} |")
    name = "network-cable-ring" if args.cable_ring else "network"
    out = args.out or ROOT / "bench" / "results" / f"{name}-{datetime.date.today()}.md"
    out.write_text("\n".join(lines) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
