"""Network namespaces as hosts, for multi-host tests on one Linux machine (root only).

A ``Topology`` is a "switch" namespace holding Linux bridges (multicast on, so real zeroconf
crosses them) and one namespace per host, each joined to a bridge by a veth pair. Addresses
exist only inside those namespaces (use the benchmark range 198.18.0.0/15 and ULA fd00::/8),
nothing routes out, and every name carries this process's id and a random tag, so several test
runs on one machine never collide::

    with Topology() as net:                        # or the module fixtures below
        net.bridge("lan")
        c, w1 = net.host("c"), net.host("w1")
        net.link(c, "lan", "198.18.0.1/24")        # eth0 in c <-> a port of bridge lan
        net.link(w1, "lan", "198.18.0.11/24")
        proc = w1.python("-m", "herd", "worker", "--host", w1.address(), env={...})
        net.cut(w1); net.restore(w1)               # the cable pulled at the switch, and back
        net.block(w1, w2); net.unblock(w1, w2)     # only w1<->w2 frames dropped (nftables)
        net.limit(w1, "1gbit"); net.unlimit(w1)    # tbf on both directions of w1's link

On leaving: every process left in a host's namespace is stopped (TERM, then KILL), then every
namespace is deleted (bridges and veths go with them). Namespaces left by a test run that was
killed are swept by the next one (their names hold the dead process's id).

The kernel here has no netem: delay and random loss are not offered; tbf (rate) and nftables'
bridge family (drops between two ports) are.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from functools import lru_cache

import pytest

PREFIX = "hn"                                   # every namespace this module makes: hn<pid>-<tag>-
_OURS = re.compile(rf"^{PREFIX}(\d+)-[0-9a-f]{{4}}-")
# Variables that would pin a process to loopback or to the runner's own coordinator.
_LOCAL_ONLY_ENV = ("HERD_ZEROCONF_INTERFACES", "HERD_COORDINATOR")


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and proc.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {proc.stderr.strip()}")
    return proc


def _in(ns: str, *argv: str, check: bool = True, input: str | None = None):
    proc = subprocess.run(["ip", "netns", "exec", ns, *argv], capture_output=True, text=True,
                          timeout=30, input=input)
    if check and proc.returncode != 0:
        raise RuntimeError(f"[{ns}] {' '.join(argv)}: {proc.stderr.strip()}")
    return proc


@lru_cache(maxsize=1)
def unavailable() -> str | None:
    """Why network namespaces cannot be used here, or None when they can."""
    if sys.platform != "linux":
        return "network namespaces are Linux-only"
    if os.geteuid() != 0:
        return "network namespaces need root (run the suite as root)"
    if not shutil.which("ip"):
        return "`ip` (iproute2) is not installed"
    probe = f"{PREFIX}{os.getpid()}-{secrets.token_hex(2)}-probe"
    made = _ip("netns", "add", probe, check=False)
    if made.returncode != 0:
        return f"`ip netns add` failed: {made.stderr.strip()}"
    _ip("netns", "del", probe, check=False)
    return None


def require() -> None:
    """Skip the calling test (or fixture) when namespaces cannot be used."""
    if reason := unavailable():
        pytest.skip(reason)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def _stop_pids(pids: list[int], grace_s: float = 10.0) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.1)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _ns_pids(ns: str) -> list[int]:
    out = _ip("netns", "pids", ns, check=False).stdout.split()
    return [int(p) for p in out if p.isdigit()]


def _delete_ns(ns: str) -> None:
    _stop_pids(_ns_pids(ns))
    _ip("netns", "del", ns, check=False)


def sweep_stale() -> list[str]:
    """Delete namespaces this module made in test runs whose process is gone (a killed run)."""
    names = [line.split()[0] for line in _ip("netns", "list", check=False).stdout.splitlines()
             if line.strip()]
    stale = [n for n in names if (m := _OURS.match(n)) and not _alive(int(m.group(1)))]
    for ns in stale:
        _delete_ns(ns)
    return stale


def _burst(rate: str) -> str:
    """A tbf bucket of ~200 us at ``rate`` (at least 64 KiB, a GSO frame): small enough that
    the limit holds over milliseconds, large enough for tbf to reach the rate."""
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([kmg]?)bit", rate.lower())
    if not m:
        raise ValueError(f"rate {rate!r}: expected e.g. 100mbit, 1gbit, 10gbit")
    bits = float(m.group(1)) * {"": 1, "k": 1e3, "m": 1e6, "g": 1e9}[m.group(2)]
    return f"{max(64 * 1024, int(bits / 8 * 200e-6))}b"


@dataclass
class Link:
    """One veth pair: ``ifname`` inside the host, ``port`` on ``bridge`` in the switch."""

    host: Host
    bridge: str
    ifname: str
    port: str
    addrs: list[str]

    @property
    def address(self) -> str:
        """The first address, without its prefix length."""
        return self.addrs[0].split("/")[0]


@dataclass
class Host:
    """One namespace. ``python(...)`` runs this venv's python inside it with the caller's
    environment (less the variables that pin herd to loopback); ``hostname`` gives the
    processes their own UTS namespace and host name (default: the machine's, shared)."""

    name: str
    ns: str
    hostname: str | None = None
    links: dict[str, Link] = field(default_factory=dict)
    procs: list[subprocess.Popen] = field(default_factory=list)

    def argv(self, argv: list[str]) -> list[str]:
        prefix = ["ip", "netns", "exec", self.ns]
        if self.hostname:
            prefix += ["unshare", "--uts", "sh", "-c", 'hostname "$0" && exec "$@"',
                       self.hostname]
        return prefix + list(argv)

    def env(self, extra: dict | None = None) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in _LOCAL_ONLY_ENV}
        return {**env, **(extra or {})}

    def run(self, argv: list[str], env: dict | None = None, check: bool = True,
            timeout: float = 240, **kw) -> subprocess.CompletedProcess:
        proc = subprocess.run(self.argv(argv), env=self.env(env), capture_output=True,
                              text=True, timeout=timeout, **kw)
        if check and proc.returncode != 0:
            raise AssertionError(f"[{self.name}] {' '.join(map(str, argv))} -> "
                                 f"{proc.returncode}\n{proc.stdout[-2000:]}\n"
                                 f"{proc.stderr[-4000:]}")
        return proc

    def popen(self, argv: list[str], env: dict | None = None, **kw) -> subprocess.Popen:
        """A process in this host, stopped at teardown if still running (so are its children:
        every process in the namespace is)."""
        kw.setdefault("stdin", subprocess.DEVNULL)
        proc = subprocess.Popen(self.argv(argv), env=self.env(env), **kw)
        self.procs.append(proc)
        return proc

    def python(self, *args: str, env: dict | None = None, **kw) -> subprocess.Popen:
        return self.popen([sys.executable, *args], env=env, **kw)

    def run_python(self, *args: str, env: dict | None = None, **kw):
        return self.run([sys.executable, *args], env=env, **kw)

    def address(self, ifname: str | None = None, family: int | None = None) -> str:
        """An address of this host (on ``ifname``, default its first link; ``family`` 4 or 6
        picks among them)."""
        link = self.links[ifname] if ifname else next(iter(self.links.values()))
        for a in link.addrs:
            if family is None or ipaddress.ip_interface(a).version == family:
                return a.split("/")[0]
        raise LookupError(f"{self.name}/{link.ifname} has no IPv{family} address")

    def reaches(self, address: str, timeout_s: float = 2.0) -> bool:
        """Whether a TCP SYN from this host to ``address`` gets any answer (a refusal counts:
        it proves the path; a drop or an unreachable network does not). No ping needed."""
        code = ("import socket,sys\n"
                "s=socket.socket(socket.AF_INET6 if ':' in sys.argv[1] else socket.AF_INET)\n"
                f"s.settimeout({timeout_s})\n"
                "try: s.connect((sys.argv[1], 9))\n"
                "except ConnectionRefusedError: pass\n"
                "except OSError: sys.exit(1)\n")
        return self.run([sys.executable, "-I", "-S", "-c", code, address], check=False,
                        timeout=timeout_s + 30).returncode == 0

    def counters(self, ifname: str) -> dict[str, int]:
        """Bytes and packets through ``ifname`` so far (``tx_bytes``, ``rx_bytes``, ...)."""
        info = json.loads(_ip("-n", self.ns, "-j", "-s", "link", "show", "dev", ifname).stdout)
        stats = info[0]["stats64"]
        return {f"{d}_{k}": stats[d][k] for d in ("rx", "tx") for k in ("bytes", "packets")}

    def stop(self, proc: subprocess.Popen, grace_s: float = 20.0) -> int:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        return proc.returncode


class Topology:
    """A switch namespace with bridges, and host namespaces linked to them (see the module
    docstring). A context manager; ``close`` is safe to call twice."""

    def __init__(self):
        require()
        sweep_stale()
        self.tag = f"{PREFIX}{os.getpid()}-{secrets.token_hex(2)}"
        self.switch = f"{self.tag}-sw"
        self.hosts: dict[str, Host] = {}
        self.bridges: list[str] = []
        self._blocked: set[tuple[str, str]] = set()
        self._namespaces: list[str] = []
        self._add_ns(self.switch)

    # --- building ------------------------------------------------------------------------

    def _add_ns(self, ns: str) -> None:
        _ip("netns", "add", ns)
        self._namespaces.append(ns)
        _ip("-n", ns, "link", "set", "lo", "up")

    def bridge(self, name: str) -> str:
        """A bridge in the switch. Multicast snooping is off: with no querier on the segment a
        snooping bridge may stop forwarding mDNS (IPv6 ff02::fb above all)."""
        if len(name) > 15:
            raise ValueError(f"bridge name {name!r} is longer than 15 characters")
        _ip("-n", self.switch, "link", "add", name, "type", "bridge", "mcast_snooping", "0")
        _ip("-n", self.switch, "link", "set", name, "multicast", "on", "up")
        self.bridges.append(name)
        return name

    def host(self, name: str, hostname: str | None = None) -> Host:
        if name in self.hosts:
            raise ValueError(f"host {name!r} exists")
        host = Host(name, f"{self.tag}-{name}", hostname)
        self._add_ns(host.ns)
        # Test hosts answer pings and never wait for IPv6 duplicate detection.
        _in(host.ns, "sysctl", "-qw", "net.ipv6.conf.all.accept_dad=0",
            "net.ipv6.conf.default.accept_dad=0")
        self.hosts[name] = host
        return host

    def link(self, host: Host | str, bridge: str, *addrs: str, ifname: str | None = None) -> Link:
        """A veth from ``host`` (``ifname``, default eth0, eth1, ...) to ``bridge``, with the
        given addresses (CIDR, IPv4 or IPv6). Both ends are created in their namespaces,
        never in the machine's own."""
        host = self.hosts[host] if isinstance(host, str) else host
        ifname = ifname or f"eth{len(host.links)}"
        port = f"p{sum(len(h.links) for h in self.hosts.values())}-{host.name}"[:15]
        _ip("link", "add", ifname, "netns", host.ns, "type", "veth", "peer", "name", port,
            "netns", self.switch)
        _ip("-n", self.switch, "link", "set", port, "master", bridge)
        _ip("-n", self.switch, "link", "set", port, "multicast", "on", "up")
        for a in addrs:
            _ip("-n", host.ns, "addr", "add", a, "dev", ifname)
        _ip("-n", host.ns, "link", "set", ifname, "multicast", "on", "up")
        link = Link(host, bridge, ifname, port, list(addrs))
        host.links[ifname] = link
        return link

    # --- faults ----------------------------------------------------------------------------

    def _links(self, host: Host | str, ifname: str | None) -> list[Link]:
        host = self.hosts[host] if isinstance(host, str) else host
        return [host.links[ifname]] if ifname else list(host.links.values())

    def cut(self, host: Host | str, ifname: str | None = None) -> None:
        """Pull the cable at the switch: the host's end shows NO-CARRIER, nothing passes."""
        for link in self._links(host, ifname):
            _ip("-n", self.switch, "link", "set", link.port, "down")

    def restore(self, host: Host | str, ifname: str | None = None) -> None:
        for link in self._links(host, ifname):
            _ip("-n", self.switch, "link", "set", link.port, "up")

    def block(self, a: Host | str, b: Host | str) -> None:
        """Drop every frame between ``a`` and ``b`` (both ways, every shared bridge), in the
        switch: both still reach every other host. nftables' bridge family, so it needs no
        br_netfilter and holds for IPv4, IPv6 and ARP alike."""
        pair = tuple(sorted((getattr(a, "name", a), getattr(b, "name", b))))
        self._blocked.add(pair)
        self._apply_blocks()

    def unblock(self, a: Host | str, b: Host | str) -> None:
        self._blocked.discard(tuple(sorted((getattr(a, "name", a), getattr(b, "name", b)))))
        self._apply_blocks()

    def blocked_packets(self) -> int:
        """Frames the block rules dropped so far (proof that a block took effect)."""
        out = _in(self.switch, "nft", "list", "chain", "bridge", "herd", "cut", check=False)
        return sum(int(n) for n in re.findall(r"counter packets (\d+)", out.stdout))

    def _apply_blocks(self) -> None:
        if not shutil.which("nft"):
            pytest.skip("nftables (`nft`) is not installed; `make setup` installs it")
        rules = []
        for a, b in sorted(self._blocked):
            for la in self.hosts[a].links.values():
                for lb in self.hosts[b].links.values():
                    if la.bridge == lb.bridge:
                        rules.append(f'iifname "{la.port}" oifname "{lb.port}" counter drop')
                        rules.append(f'iifname "{lb.port}" oifname "{la.port}" counter drop')
        body = "\n".join(f"    {r}" for r in rules)
        script = ("table bridge herd {}\ndelete table bridge herd\ntable bridge herd {\n"
                  "  chain cut {\n    type filter hook forward priority 0; policy accept;\n"
                  f"{body}\n  }}\n}}\n")
        _in(self.switch, "nft", "-f", "-", input=script)

    def limit(self, host: Host | str, rate: str, ifname: str | None = None) -> None:
        """Rate-limit the host's link(s) both ways with tbf (host egress and switch egress)."""
        for link in self._links(host, ifname):
            for ns, dev in ((link.host.ns, link.ifname), (self.switch, link.port)):
                _in(ns, "tc", "qdisc", "replace", "dev", dev, "root", "tbf", "rate", rate,
                    "burst", _burst(rate), "latency", "50ms")

    def unlimit(self, host: Host | str, ifname: str | None = None) -> None:
        for link in self._links(host, ifname):
            for ns, dev in ((link.host.ns, link.ifname), (self.switch, link.port)):
                _in(ns, "tc", "qdisc", "del", "dev", dev, "root", check=False)

    # --- teardown --------------------------------------------------------------------------

    def close(self) -> None:
        for host in self.hosts.values():
            for proc in host.procs:
                if proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)
        for host in self.hosts.values():
            for proc in host.procs:
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
            host.procs.clear()
        for ns in reversed(self._namespaces):   # anything the tracked processes left behind too
            _delete_ns(ns)
        self._namespaces.clear()

    def __enter__(self) -> Topology:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def lan_topology(hosts: dict[str, str] | None = None) -> Topology:
    """The review's topology: one bridge ``lan`` and hosts c (198.18.0.1), w1, w2 (.11, .12)
    and cli (.100), /24."""
    hosts = hosts or {"c": "198.18.0.1", "w1": "198.18.0.11", "w2": "198.18.0.12",
                      "cli": "198.18.0.100"}
    net = Topology()
    try:
        net.bridge("lan")
        for name, addr in hosts.items():
            net.link(net.host(name), "lan", f"{addr}/24")
    except BaseException:
        net.close()
        raise
    return net


@pytest.fixture(scope="module")
def lan():
    """A module's ``lan_topology()``, torn down after the module even when tests fail."""
    require()
    net = lan_topology()
    try:
        yield net
    finally:
        net.close()


@pytest.fixture(scope="module")
def netns():
    """A factory of empty Topologies for a module's own layouts; all closed after the module."""
    require()
    made: list[Topology] = []

    def make() -> Topology:
        made.append(Topology())
        return made[-1]

    try:
        yield make
    finally:
        for net in made:
            net.close()

