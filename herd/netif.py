"""This machine's network interfaces, as both planes need them.

herd has two planes of addresses. The **control** address is where a process serves gRPC and what
its zeroconf advert carries (``--host``); the **data** addresses are where a worker's ranks run the
MLX ring or the gRPC exchange. A worker reports every interface with its kind (Thunderbolt,
Ethernet with its link speed, Wi-Fi, loopback), its addresses with their prefixes (the subnet) and,
on macOS, its RDMA device; the coordinator's planner picks the path (coordinator/planner/network).

Addresses come from ``ifaddr`` (zeroconf's own dependency; Linux and macOS alike). The kind comes
from /sys/class/net on Linux (tested here), and from ``networksetup``, ``ifconfig`` and
``ibv_devices`` on macOS (written to their documented output, guarded, untested: no Mac here).
"""

from __future__ import annotations

import ipaddress
import platform
import re
import socket
import subprocess
from dataclasses import dataclass, field, replace
from pathlib import Path

import ifaddr

KINDS = ("thunderbolt", "ethernet", "wifi", "loopback", "other")


@dataclass(frozen=True)
class Interface:
    name: str
    kind: str                       # one of KINDS
    addresses: tuple[str, ...]      # CIDR: "198.19.0.11/24", "fd19::11/64"
    speed_mbps: int = 0             # link speed when the OS says it (0: unknown)
    rdma_device: str = ""           # macOS RDMA over Thunderbolt: "rdma_en5"
    data: bool = True               # a candidate for gradients (--data names them)

    def networks(self) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
        return [ipaddress.ip_interface(a).network for a in self.addresses]

    def describe(self) -> str:
        speed = f" {self.speed_mbps / 1000:g} Gbit/s" if self.speed_mbps else ""
        return f"{self.name} ({self.kind}{speed})"


# --- host:port with IPv6 -----------------------------------------------------------------------

def hostport(host: str, port: int) -> str:
    """``host:port``, with brackets around an IPv6 address (gRPC targets, bind addresses)."""
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


def split_hostport(target: str) -> tuple[str, int]:
    host, _, port = target.rpartition(":")
    return host.strip("[]"), int(port)


def family(host: str) -> int:
    return socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET


# --- probing -----------------------------------------------------------------------------------

def _run(cmd: list[str], timeout: float = 5.0) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                              check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


def _linux_kind(name: str) -> tuple[str, int]:
    sys_ = Path("/sys/class/net") / name
    if name == "lo" or (sys_ / "type").exists() and (sys_ / "type").read_text().strip() == "772":
        return "loopback", 0
    if (sys_ / "wireless").exists() or (sys_ / "phy80211").exists():
        return "wifi", 0
    try:
        driver = (sys_ / "device" / "driver").resolve().name
    except OSError:
        driver = ""
    speed = 0
    try:
        speed = max(0, int((sys_ / "speed").read_text().strip()))
    except (OSError, ValueError):
        pass  # down, virtual without a speed, or not Ethernet
    if driver == "thunderbolt-net" or name.startswith("thunderbolt"):
        return "thunderbolt", speed
    if (sys_ / "bridge").exists() or not (sys_ / "address").exists():
        return "other", speed
    return "ethernet", speed


def _mac_ports() -> dict[str, str]:
    """``networksetup -listallhardwareports``: device -> hardware port name."""
    out = _run(["networksetup", "-listallhardwareports"])
    return dict((dev, port) for port, dev in
                re.findall(r"Hardware Port:\s*(.+)\n\s*Device:\s*(\S+)", out))


def _mac_kind(name: str, ports: dict[str, str]) -> tuple[str, int]:
    if name.startswith("lo"):
        return "loopback", 0
    port = ports.get(name, "")
    if "Wi-Fi" in port or "AirPort" in port:
        return "wifi", 0
    media = re.search(r"media:.*?\((\d+)(G|M)base", _run(["ifconfig", name]))
    speed = int(media.group(1)) * (1000 if media.group(2) == "G" else 1) if media else 0
    if "Thunderbolt" in port or name.startswith("bridge"):
        return "thunderbolt", speed
    if "Ethernet" in port or "GbE" in port or "LAN" in port:
        return "ethernet", speed
    return "other", speed


def _mac_rdma() -> dict[str, str]:
    """``ibv_devices`` (macOS 26.2+ with RDMA over Thunderbolt 5 enabled in recovery): device
    ``rdma_en5`` belongs to interface ``en5``, as mlx.distributed_config names them."""
    devs = re.findall(r"^\s*(rdma_(\S+))\s", _run(["ibv_devices"]), flags=re.M)
    return {iface: dev for dev, iface in devs}


def probe_interfaces() -> list[Interface]:
    """Every interface that is up with an address (IPv6 link-local left out: a ring cannot use
    it without a scope), loopback included."""
    mac = platform.system() == "Darwin"
    ports = _mac_ports() if mac else {}
    rdma = _mac_rdma() if mac else {}
    found = []
    for adapter in ifaddr.get_adapters():
        addrs = []
        for ip in adapter.ips:
            if isinstance(ip.ip, tuple):      # IPv6: (address, flowinfo, scope_id)
                if ip.ip[0].lower().startswith("fe80"):
                    continue
                addrs.append(f"{ip.ip[0]}/{ip.network_prefix}")
            else:
                addrs.append(f"{ip.ip}/{ip.network_prefix}")
        if not addrs:
            continue
        kind, speed = _mac_kind(adapter.name, ports) if mac else _linux_kind(adapter.name)
        found.append(Interface(adapter.name, kind, tuple(addrs), speed,
                               rdma.get(adapter.name, "")))
    return found


def _own_interfaces() -> list[ipaddress.IPv4Interface | ipaddress.IPv6Interface]:
    found = []
    for adapter in ifaddr.get_adapters():
        for ip in adapter.ips:
            addr = ip.ip[0] if isinstance(ip.ip, tuple) else ip.ip
            found.append(ipaddress.ip_interface(f"{addr.split('%')[0]}/{ip.network_prefix}"))
    return found


def local_network(address: str):
    """The subnet of this machine's interface that holds ``address``, or None."""
    ip = ipaddress.ip_address(address.strip("[]"))
    return next((i.network for i in _own_interfaces() if i.ip == ip), None)


def address_on_link(host: str) -> str | None:
    """This machine's address on a subnet that holds ``host`` (a peer it reaches directly), or
    None."""
    ip = ipaddress.ip_address(host.strip("[]"))
    return next((str(i.ip) for i in _own_interfaces()
                 if i.version == ip.version and ip in i.network and i.ip != ip), None)


# --- choosing ----------------------------------------------------------------------------------

def parse_data_spec(spec: str) -> tuple[str, str | None]:
    """``--data`` values: ``IFACE`` or ``ADDRESS``, optionally ``=KIND`` to state what the OS
    cannot tell (a USB Ethernet adapter, or a test link posing as Wi-Fi)."""
    name, _, kind = spec.partition("=")
    if kind and kind not in KINDS:
        raise ValueError(f"--data {spec}: kind {kind!r} is not one of {', '.join(KINDS)}")
    return name.strip(), kind or None


def select_data(interfaces: list[Interface], specs: list[str]) -> list[Interface]:
    """Marks the interfaces ``specs`` name as the data interfaces (all others stay listed, not
    used for gradients); no specs: every interface is a candidate. ValueError names an unknown
    one and what exists."""
    if not specs:
        return interfaces
    chosen: dict[str, str | None] = {}
    for spec in specs:
        name, kind = parse_data_spec(spec)
        hit = [i for i in interfaces if i.name == name
               or any(a.split("/")[0] == name for a in i.addresses)]
        if not hit:
            have = ", ".join(f"{i.name} {' '.join(i.addresses)}" for i in interfaces)
            raise ValueError(f"--data {spec}: no interface or address {name!r} here (have: {have})")
        chosen[hit[0].name] = kind
    out = []
    for i in interfaces:
        kind = chosen.get(i.name) or i.kind
        # A stated kind overrides what the OS said, its link speed included.
        out.append(replace(i, data=i.name in chosen, kind=kind,
                           speed_mbps=i.speed_mbps if kind == i.kind else 0))
    return out


def _route_address(fam: int) -> str | None:
    """The address the kernel would send from towards a non-local network (no packet sent)."""
    probe = "10.255.255.255" if fam == socket.AF_INET else "2001:db8::1"
    s = socket.socket(fam, socket.SOCK_DGRAM)
    try:
        s.connect((probe, 1))
        return s.getsockname()[0]
    except OSError:
        return None
    finally:
        s.close()


_CONTROL_ORDER = {"ethernet": 0, "other": 1, "wifi": 2, "thunderbolt": 3, "loopback": 9}


@dataclass
class ControlChoice:
    address: str
    interface: Interface | None
    warning: str = ""
    candidates: list[str] = field(default_factory=list)


def choose_control(interfaces: list[Interface] | None = None) -> ControlChoice:
    """The address to serve and advertise on when ``--host`` is not given: the default route's
    (the LAN the other machines and a laptop reach; an address with no route is a data link, such
    as a 10GbE ring subnet, that the coordinator may not be on), then an Ethernet (or other wired)
    LAN address, then Wi-Fi, then Thunderbolt (usually a point-to-point data link), IPv4 before
    IPv6. Loopback only when nothing else is up, and then with a warning, as for Wi-Fi."""
    interfaces = probe_interfaces() if interfaces is None else interfaces
    routed = {_route_address(socket.AF_INET), _route_address(socket.AF_INET6)}
    options = []
    for i in interfaces:
        for a in i.addresses:
            addr = a.split("/")[0]
            options.append(((addr not in routed, _CONTROL_ORDER.get(i.kind, 5), ":" in addr),
                            addr, i))
    if not options:
        return ControlChoice("127.0.0.1", None, "no network interface with an address is up: "
                             "serving on 127.0.0.1 (this machine only); pass --host ADDRESS")
    options.sort(key=lambda o: o[0])
    _, addr, iface = options[0]
    warning = ""
    if iface.kind == "loopback":
        warning = (f"no LAN address found: serving on {addr} (loopback), which no other machine "
                   "can reach; pass --host ADDRESS")
    elif iface.kind == "wifi":
        wired = [f"{o[2].name} {o[1]}" for o in options if o[2].kind in ("ethernet", "other")]
        warning = (f"serving on {addr}, a Wi-Fi interface ({iface.name})"
                   + (f", the default route's ({', '.join(wired)} has none: a data link?)"
                      if wired else "")
                   + "; gradients never go over Wi-Fi unless a job sets cluster.allow_wifi; "
                   "pass --host to choose")
    return ControlChoice(addr, iface, warning, [o[1] for o in options])
