"""zeroconf helpers shared by both planes: advertise a service, browse a service type.

An advert is a hint, never trust: whoever browses must verify a peer with an authenticated call
before using it. TXT records carry no secrets.

``HERD_ZEROCONF_INTERFACES`` (comma-separated addresses, e.g. ``127.0.0.1``) limits mDNS to those
interfaces; local clusters and tests use loopback, a real cluster every interface, over IPv4 and
IPv6 both. An advert's mDNS host name is unique to it (a random suffix): two machines with the
same host name would otherwise publish conflicting address records for one name, and a browser
would mix their addresses.
"""

from __future__ import annotations

import os
import secrets
import socket
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable

from zeroconf import (
    InterfaceChoice,
    IPVersion,
    NotRunningException,
    ServiceBrowser,
    ServiceInfo,
    ServiceStateChange,
    Zeroconf,
)

from herd import log
from herd.netif import family, hostport

# Adverts resolved (and handed to on_add) at once, and kept at most: anyone on the LAN may send
# adverts, without any credential (an outside run's 3000 fake ones each got a thread, and the
# coordinator went from 29 to 1800 threads and +140 MB). Past MAX_ADVERTS new names are ignored,
# said once; their records expire, or the adverts already known are withdrawn, to make room.
RESOLVERS = 8
MAX_ADVERTS = 512
WORKER_TYPE = "_herd-worker._tcp.local."
COORDINATOR_TYPE = "_herd._tcp.local."
INTERFACES_ENV = "HERD_ZEROCONF_INTERFACES"

logger = log.get(__name__)


def make_zeroconf(interfaces: list[str] | None = None) -> Zeroconf:
    if interfaces is None and (env := os.environ.get(INTERFACES_ENV)):
        interfaces = [i.strip() for i in env.split(",") if i.strip()]
    if interfaces:
        v6 = [":" in i for i in interfaces]
        version = IPVersion.V6Only if all(v6) else IPVersion.All if any(v6) else IPVersion.V4Only
        return Zeroconf(interfaces=interfaces, ip_version=version)
    return Zeroconf(interfaces=InterfaceChoice.All, ip_version=IPVersion.All)


@dataclass(frozen=True)
class Advert:
    """One service record as seen on the network."""

    name: str
    host: str                       # the first address (IPv4 before IPv6)
    port: int
    txt: dict[str, str] = field(default_factory=dict)
    hosts: tuple[str, ...] = ()     # every address the record resolved to

    @property
    def target(self) -> str:
        return hostport(self.host, self.port)

    @property
    def targets(self) -> list[str]:
        """Every address as ``host:port``: a caller tries them all (one may be stale or, on a
        multi-homed machine, unreachable from here)."""
        return [hostport(h, self.port) for h in (self.hosts or (self.host,))]


class Advertiser:
    """Registers one service record and withdraws it on close."""

    def __init__(self, zc: Zeroconf, service_type: str, name: str, host: str, port: int,
                 txt: dict[str, str]):
        self._zc = zc
        safe = name.replace(".", "-")[:56]
        host = host.strip("[]")
        self.info = ServiceInfo(
            service_type,
            f"{safe}.{service_type}",
            addresses=[socket.inet_pton(family(host), host)],
            port=port,
            properties={k: str(v) for k, v in txt.items()},
            server=f"{safe}-{secrets.token_hex(3)}.local.",
        )
        zc.register_service(self.info, allow_name_change=True)
        logger.info("zeroconf_advertised", service=self.info.name, host=host, port=port)

    def close(self) -> None:
        try:
            self._zc.unregister_service(self.info)
        except Exception as e:  # closing a dying Zeroconf: nothing left to withdraw
            logger.warning("zeroconf_unregister_failed", service=self.info.name, error=str(e))


def _advert(info: ServiceInfo) -> Advert | None:
    addrs = info.parsed_addresses(IPVersion.V4Only) + [
        a for a in info.parsed_addresses(IPVersion.V6Only) if not a.lower().startswith("fe80")]
    if not addrs or not info.port:
        return None
    txt = {k.decode(): (v or b"").decode() for k, v in (info.properties or {}).items()}
    return Advert(name=info.name, host=addrs[0], port=int(info.port), txt=txt,
                  hosts=tuple(addrs))


def _handled(handler: Callable, arg) -> None:
    """A handler's error logged, never raised: on zeroconf's thread it would end the browser
    (its loop has no guard), every later advert unseen."""
    try:
        handler(arg)
    except Exception:
        logger.exception("zeroconf_handler_failed", handler=getattr(handler, "__name__", "?"))


class Browser:
    """Keeps the current set of adverts of one service type; calls back on add and remove."""

    def __init__(self, zc: Zeroconf, service_type: str,
                 on_add: Callable[[Advert], None] | None = None,
                 on_remove: Callable[[str], None] | None = None):
        self._zc = zc
        self._on_add, self._on_remove = on_add, on_remove
        self._lock = threading.Lock()
        self.adverts: dict[str, Advert] = {}
        self._pending: set[str] = set()  # names queued or resolving now
        self.ignored = 0  # names past MAX_ADVERTS
        # ...kept (the newest MAX_ADVERTS) and resolved as room frees: zeroconf says a name once,
        # and a real worker's advert ignored in a flood would stay unseen after it.
        self._waiting: dict[str, str] = {}  # name -> service type
        self._pool = ThreadPoolExecutor(RESOLVERS, thread_name_prefix="zeroconf-resolve")
        self._browser = ServiceBrowser(zc, service_type, handlers=[self._changed])

    def _changed(self, zeroconf: Zeroconf, service_type: str, name: str,
                 state_change: ServiceStateChange) -> None:
        # Called on zeroconf's thread: resolved on the pool so its loop is never blocked.
        if state_change is ServiceStateChange.Removed:
            with self._lock:
                self.adverts.pop(name, None)
                self._waiting.pop(name, None)
                freed = next(iter(self._waiting.items()), None)
            if self._on_remove:
                _handled(self._on_remove, name)
            if freed is not None:  # room for one that waited (its record may be gone: no harm)
                with self._lock:
                    self._waiting.pop(freed[0], None)
                self._changed(zeroconf, freed[1], freed[0], ServiceStateChange.Added)
            return
        with self._lock:
            if name in self._pending:
                return  # (its resolution, queued, reads the newest record)
            if name not in self.adverts and len(self.adverts) + len(self._pending) >= MAX_ADVERTS:
                self.ignored += 1
                self._waiting[name] = service_type
                while len(self._waiting) > MAX_ADVERTS:
                    self._waiting.pop(next(iter(self._waiting)))
                if self.ignored == 1:
                    logger.warning("zeroconf_adverts_ignored", service=service_type,
                                   kept=MAX_ADVERTS, reason="more adverts than any cluster has: "
                                   "a flood? name machines with --worker/--coordinator")
                return
            self._pending.add(name)
        try:
            self._pool.submit(self._resolve, service_type, name)
        except RuntimeError:  # closed
            pass

    def _resolve(self, service_type: str, name: str) -> None:
        try:
            self._resolve_one(service_type, name)
        finally:
            with self._lock:
                self._pending.discard(name)

    def _resolve_one(self, service_type: str, name: str) -> None:
        try:
            info = self._zc.get_service_info(service_type, name, timeout=3000)
        except NotRunningException:  # closed while resolving: whoever browsed is done
            return
        except AssertionError:
            # (the same, when the close lands between zeroconf's own checks: it asserts that
            # its loop runs; seen as a stray thread exception in CI)
            if self._zc.done:
                return
            raise
        advert = _advert(info) if info else None
        if advert is None:
            logger.debug("zeroconf_unresolved", service=name)
            return
        with self._lock:
            self.adverts[name] = advert
        if self._on_add:
            _handled(self._on_add, advert)

    def snapshot(self) -> list[Advert]:
        with self._lock:
            return list(self.adverts.values())

    def close(self) -> None:
        self._browser.cancel()
        self._pool.shutdown(wait=False, cancel_futures=True)


def interfaces_host() -> str | None:
    """The first address of $HERD_ZEROCONF_INTERFACES, when set: the address a daemon serves and
    advertises on when --host is not given (so one variable keeps a trial cluster on loopback);
    None when unset (the daemon chooses its LAN address)."""
    env = [i.strip() for i in os.environ.get(INTERFACES_ENV, "").split(",") if i.strip()]
    return env[0] if env else None


def local_ip() -> str:
    """The address herd serves on when --host is not given (herd/netif.py ``choose_control``:
    Ethernet before Wi-Fi, loopback only as a last resort, with a warning its callers print)."""
    from herd.netif import choose_control

    return choose_control().address
