"""The data path of a job: where its ranks exchange gradients (and pipeline activations).

Per job, the fastest path every pair of ranks shares, from what each worker reported about its
interfaces (herd/netif.py):

1. **JACCL** (MLX over RDMA, Thunderbolt 5, macOS 26.2+) when every pair of ranks shares a
   subnet on which both ends have an RDMA device (mlx.distributed_config gives each cable its own
   point-to-point subnet, so the subnet tells which device faces which peer); else a **JACCL
   ring** when 4+ workers' RDMA cables close a cycle (devices towards neighbours only, ranks in
   cable order: mlx's ``jaccl-ring`` backend);
2. else the **TCP ring** (MLX's ring, or herd's gRPC ring when the job asks for grpc) on the
   fastest subnet every worker has a data interface on: Thunderbolt, then Ethernet by link speed,
   then others; IPv4 before IPv6 (MLX's ring needs it), and a dedicated data subnet before the
   control one at equal speed;
   or, when it is faster, a **cable ring**: 3+ Macs cabled in a cycle (Thunderbolt without a
   switch: each cable its own point-to-point subnet, no subnet shared by all) carry a ring whose
   ranks follow the cables, since a ring rank talks only to the ranks before and after it. Rank i
   is listed at its address on the cable from rank i-1, which is where MLX's ring has rank i
   accept and rank i-1 dial (mlx/distributed/ring/ring.cpp), and what mlx.distributed_config
   writes for a Thunderbolt ring. Data-parallel ranks are reordered to follow the cables (rank 0
   keeps its worker); a pipeline's stage order is fixed, so it takes the cables only if they
   follow it;
3. else **gRPC over the control network** (the addresses the coordinator reaches the workers on).

Never Wi-Fi for gradients unless the job sets ``cluster.allow_wifi``: a job whose only shared path
is Wi-Fi waits, with a message naming the link. MLX's ring (and JACCL's side channel) open IPv4
sockets only (mlx/distributed/utils.cpp: ``socket(AF_INET, ...)``, the address split at its first
':'), so an IPv6-only path carries the gRPC exchange, and a job that insists on ``mlx`` there is
refused. Loopback is a path only when every worker serves on loopback (one machine).

Pure: WorkerRecords in, a DataPath or a PlacementError out.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field, replace

from coordinator.domain import WorkerRecord
from herd.errors import PlacementError
from herd.netif import Interface

# How fast a kind of link is, before its reported speed breaks ties (lower is better).
_KIND_RANK = {"thunderbolt": 0, "ethernet": 1, "other": 2, "loopback": 3, "wifi": 4}
CONTROL = "control network"  # DataPath.network of the addresses the coordinator reaches them on
WIFI_HINT = ("connect the workers by Ethernet or Thunderbolt (and name that interface with "
             "`herd worker --data IFACE`), or set cluster.allow_wifi: true to train over Wi-Fi")


@dataclass(frozen=True)
class DataPath:
    kind: str                    # "jaccl" | "ring" | "grpc"
    addresses: list[str]         # per rank: the address its peers dial
    network: str                 # "198.19.0.0/24", or "control network"
    link: str = ""               # "eth1 (ethernet 10 Gbit/s)"
    rdma: list[list[str | None]] = field(default_factory=list)  # JACCL: rank -> peer -> device
    note: str = ""
    # A cable ring: each rank reaches only the ranks before and after it, and ``order`` lists the
    # input workers in the rank order that follows the cables (the caller reorders its ranks).
    neighbors_only: bool = False
    order: tuple[int, ...] = ()

    def describe(self) -> str:
        what = {"jaccl": "MLX JACCL over RDMA", "ring": "MLX ring", "grpc": "gRPC exchange"}
        where = f"on {self.network}" + (f" via {self.link}" if self.link else "")
        return f"data path: {what[self.kind]} {where}" + (f" ({self.note})" if self.note else "")


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _control_iface(w: WorkerRecord) -> Interface | None:
    for i in w.interfaces:
        if any(a.split("/")[0] == w.host for a in i.addresses):
            return i
    return None


@dataclass(frozen=True)
class _Shared:
    network: ipaddress.IPv4Network | ipaddress.IPv6Network
    ends: list[tuple[str, Interface]]      # per rank: (address, interface)

    @property
    def worst(self) -> Interface:
        return max((i for _, i in self.ends), key=lambda i: (_KIND_RANK.get(i.kind, 2),
                                                             -i.speed_mbps))

    def describe_link(self) -> str:
        names = sorted({i.describe() for _, i in self.ends})
        return names[0] if len(names) == 1 else " / ".join(names)


def _shared_subnets(workers: list[WorkerRecord], local: bool) -> list[_Shared]:
    """Subnets on which every worker has a data interface (loopback only for a local cluster)."""
    per_worker = []
    for w in workers:
        nets: dict = {}
        for i in w.interfaces:
            if not i.data or (i.kind == "loopback") != local:
                continue
            for a in i.addresses:
                iface = ipaddress.ip_interface(a)
                nets.setdefault(iface.network, (str(iface.ip), i))
        per_worker.append(nets)
    common = set(per_worker[0]).intersection(*per_worker[1:])
    return [_Shared(n, [nets[n] for nets in per_worker]) for n in common]


def _order(s: _Shared, control: set[str]) -> tuple:
    worst = s.worst
    on_control = any(addr in control for addr, _ in s.ends)
    return (_KIND_RANK.get(worst.kind, 2), -worst.speed_mbps, s.network.version, on_control,
            str(s.network))


MAX_CABLE_RING = 8  # Macs in a cable ring searched for (a Mac has at most 6 Thunderbolt ports)


def _pair_links(a: WorkerRecord, b: WorkerRecord, allow_wifi: bool,
                avoid: frozenset[str]) -> tuple[tuple, str, str, str, Interface] | None:
    """The best IPv4 data subnet ``a`` and ``b`` share: (its order key, a's address, b's
    address, the subnet, the slower end's interface), or None."""
    best = None
    theirs = {}
    for i in b.interfaces:
        if i.data and i.kind != "loopback":
            for addr in i.addresses:
                iface = ipaddress.ip_interface(addr)
                if iface.version == 4:
                    theirs.setdefault(iface.network, (str(iface.ip), i))
    for i in a.interfaces:
        if not i.data or i.kind == "loopback":
            continue
        for addr in i.addresses:
            iface = ipaddress.ip_interface(addr)
            if iface.network not in theirs or str(iface.network) in avoid:
                continue
            other, j = theirs[iface.network]
            worst = max((i, j), key=lambda x: (_KIND_RANK.get(x.kind, 2), -x.speed_mbps))
            if worst.kind == "wifi" and not allow_wifi:
                continue
            key = (_KIND_RANK.get(worst.kind, 2), -worst.speed_mbps, str(iface.network))
            if best is None or key < best[0]:
                best = (key, str(iface.ip), other, str(iface.network), worst)
    return best


def _cycle(n: int, links: dict, reorder: bool) -> tuple[tuple, list[int]] | None:
    """The cycle through ``n`` workers whose slowest link is fastest, as (that link's order key,
    the workers in order, the first kept first), or None. ``links[a, b]``: None (no link) or a
    tuple whose first item is the link's order key. ``reorder``: False keeps 0, 1, ..., n-1."""
    best: tuple | None = None

    def visit(path: list[int], worst: tuple) -> None:
        nonlocal best
        if best is not None and worst >= best[0]:
            return  # no better than a cycle already found
        if len(path) == n:
            if (close := links[path[-1], path[0]]) is not None:
                best = min(best or (max(worst, close[0][:2]), path), (max(worst, close[0][:2]),
                                                                       path))
            return
        nexts = range(1, n) if reorder else [len(path)]
        for b in nexts:
            if b not in path and (link := links[path[-1], b]) is not None:
                visit(path + [b], max(worst, link[0][:2]))

    visit([0], (-1, 0))
    return best


def _cable_ring(workers: list[WorkerRecord], allow_wifi: bool, avoid: frozenset[str],
                reorder: bool) -> tuple[tuple, DataPath] | None:
    """The fastest ring over links between pairs (the module docstring), as (its slowest link's
    order key, a path of kind "ring"), or None. ``reorder``: may the ranks be reordered."""
    n = len(workers)
    if not 3 <= n <= MAX_CABLE_RING:
        return None
    links = {(a, b): _pair_links(workers[a], workers[b], allow_wifi, avoid)
             for a in range(n) for b in range(n) if a != b}
    if (found := _cycle(n, links, reorder)) is None:
        return None
    worst, order = found
    hops = [links[order[i - 1], order[i]] for i in range(n)]  # the cable into each rank
    # Rank i is listed at its address on the cable from rank i-1 (MLX's ring has it accept there).
    addresses = [hop[2] for hop in hops]
    slowest = max((h[4] for h in hops), key=lambda i: (_KIND_RANK.get(i.kind, 2), -i.speed_mbps))
    kinds = {h[4].describe().split(" (", 1)[1] for h in hops}  # "thunderbolt 40 Gbit/s)"
    link = (f"{len(hops)} cables ({kinds.pop()}" if len(kinds) == 1 else
            f"{len(hops)} cables, the slowest {slowest.describe()}")
    network = "cable ring " + " ".join(h[3] for h in hops[1:] + hops[:1])
    return worst, DataPath("ring", addresses, network, link,
                           note="ranks in cable order",
                           neighbors_only=True, order=tuple(order))


def _jaccl(workers: list[WorkerRecord]) -> list[list[str | None]] | None:
    """Per rank, the RDMA device facing every other rank (None towards itself), when every pair
    shares a subnet with an RDMA device at both ends; else None."""
    n = len(workers)
    devices: list[list[str | None]] = [[None] * n for _ in range(n)]
    for a in range(n):
        for b in range(n):
            if a == b:
                continue
            nets_b = {net: i for i in workers[b].interfaces if i.rdma_device
                      for net in i.networks()}
            hit = [i for i in workers[a].interfaces if i.rdma_device
                   and any(net in nets_b for net in i.networks())]
            if not hit:
                return None
            devices[a][b] = hit[0].rdma_device
    return devices


def _jaccl_ring(workers: list[WorkerRecord], reorder: bool) -> DataPath | None:
    """A JACCL ring (herd/jaccl.py): a cycle of RDMA cables, devices towards neighbours only."""
    n = len(workers)
    if not 4 <= n <= MAX_CABLE_RING:  # (three: every pair is a neighbour, JACCL proper)
        return None

    def rdma(a: WorkerRecord, b: WorkerRecord) -> tuple | None:
        nets_b = {net for i in b.interfaces if i.rdma_device for net in i.networks()}
        hit = [i for i in a.interfaces if i.rdma_device and set(i.networks()) & nets_b]
        return ((0, 0), hit[0].rdma_device) if hit else None

    links = {(a, b): rdma(workers[a], workers[b]) for a in range(n) for b in range(n) if a != b}
    if (found := _cycle(n, links, reorder)) is None:
        return None
    order = found[1]
    devices: list[list[str | None]] = [[None] * n for _ in range(n)]
    for i in range(n):
        for j in ((i - 1) % n, (i + 1) % n):
            devices[i][j] = links[order[i], order[j]][1]
    return DataPath("jaccl", [workers[k].host for k in order], "Thunderbolt RDMA ring",
                    rdma=devices, order=tuple(order),
                    note="untested on hardware by herd's CI; ranks in cable order")


def choose_path(workers: list[WorkerRecord], exchange: str = "auto", allow_wifi: bool = False,
                pipeline: bool = False, avoid: frozenset[str] = frozenset()) -> DataPath:
    """The data path for ``workers`` in rank order (see the module docstring); never one of the
    subnets in ``avoid`` (the job's attempts failed on them: coordinator/paths.py)."""
    hosts = [w.host for w in workers]
    if len(workers) < 2 or not all(w.interfaces for w in workers):
        # One rank, or workers that reported no interfaces: their control addresses, as before.
        return DataPath("grpc" if exchange == "grpc" else "ring", hosts, CONTROL)
    mlx_only = exchange == "mlx" or pipeline
    if exchange != "grpc" and not pipeline and "Thunderbolt RDMA" not in avoid and (
            rdma := _jaccl(workers)):
        return DataPath("jaccl", hosts, "Thunderbolt RDMA", rdma=rdma,
                        note="untested on hardware by herd's CI")
    if exchange != "grpc" and not pipeline and "Thunderbolt RDMA ring" not in avoid and (
            ring := _jaccl_ring(workers, reorder=True)):
        return ring
    local = all(_is_loopback(h) for h in hosts)
    shared = sorted((s for s in _shared_subnets(workers, local) if str(s.network) not in avoid),
                    key=lambda s: _order(s, set(hosts)))
    ring = None if local else _cable_ring(workers, allow_wifi, avoid, reorder=not pipeline)
    if ring is not None and ring[1].network not in avoid and not (
            shared and _order(shared[0], set(hosts))[:2] <= ring[0]):
        path = ring[1]  # cables faster than any subnet every worker shares
        return replace(path, kind="grpc") if exchange == "grpc" else path
    wifi = [s for s in shared if s.worst.kind == "wifi"]
    usable = [s for s in shared if allow_wifi or s.worst.kind != "wifi"]
    for s in usable:
        if s.network.version == 6 and exchange != "grpc":
            if mlx_only:
                continue  # MLX's ring is IPv4-only; an IPv4 subnet further down may do
            kind = "grpc"
        else:
            kind = "grpc" if exchange == "grpc" else "ring"
        note = "over Wi-Fi, as cluster.allow_wifi allows" if s.worst.kind == "wifi" else ""
        if s.network.version == 6 and kind == "grpc" and exchange == "auto":
            note = "IPv6: MLX's ring is IPv4-only"
        return DataPath(kind, [a for a, _ in s.ends], str(s.network), s.describe_link(),
                        note=note)
    # Sorted: placement orders workers by free memory, which moves; a stable message is one
    # event in `herd watch`, not one per control-loop tick.
    names = ", ".join(sorted(w.worker_id for w in workers))
    if wifi and not allow_wifi:
        s = wifi[0]
        raise PlacementError(
            f"the only network {names} share for gradients is Wi-Fi: {s.describe_link()} on "
            f"{s.network}; herd does not train over Wi-Fi unless the job allows it",
            hint=WIFI_HINT)
    if v6 := [s for s in usable if s.network.version == 6]:
        raise PlacementError(
            f"{names} share only IPv6 networks ({v6[0].network}), and MLX's ring opens IPv4 "
            f"sockets only; cluster.exchange is {exchange}"
            + (" and pipeline stages need the MLX ring" if pipeline else ""),
            hint="use cluster.exchange: grpc (or auto), or give the workers IPv4 addresses")
    # No shared subnet: the control network, if it is not Wi-Fi (or Wi-Fi is allowed).
    for w in workers:
        c = _control_iface(w)
        if c is not None and c.kind == "wifi" and not allow_wifi:
            raise PlacementError(
                f"{names} share no data network, and {w.worker_id}'s control address {w.host} is "
                f"on Wi-Fi ({c.describe()})", hint=WIFI_HINT)
    kind = "ring" if mlx_only else "grpc"
    if kind == "ring" and any(":" in h for h in hosts):
        raise PlacementError(
            f"{names} share no data network, their control addresses are IPv6, and "
            f"cluster.exchange is {exchange} (MLX's ring is IPv4-only)",
            hint="use cluster.exchange: grpc (or auto), or give the workers a shared IPv4 subnet")
    return DataPath(kind, hosts, CONTROL, note="no other data subnet shared by every worker"
                    if avoid else "no data subnet shared by every worker")
