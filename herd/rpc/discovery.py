"""zeroconf helpers shared by both planes: advertise a service, browse a service type.

An advert is a hint, never trust: whoever browses must verify a peer with an authenticated call
before using it. TXT records carry no secrets.

``HERD_ZEROCONF_INTERFACES`` (comma-separated addresses, e.g. ``127.0.0.1``) limits mDNS to those
interfaces; local clusters and tests use loopback, a real cluster every interface.
"""

from __future__ import annotations

import os
import socket
import threading
from dataclasses import dataclass, field
from typing import Callable

from zeroconf import (
    InterfaceChoice,
    IPVersion,
    ServiceBrowser,
    ServiceInfo,
    ServiceStateChange,
    Zeroconf,
)

from herd import log

WORKER_TYPE = "_herd-worker._tcp.local."
COORDINATOR_TYPE = "_herd._tcp.local."
INTERFACES_ENV = "HERD_ZEROCONF_INTERFACES"

logger = log.get(__name__)


def make_zeroconf(interfaces: list[str] | None = None) -> Zeroconf:
    if interfaces is None and (env := os.environ.get(INTERFACES_ENV)):
        interfaces = [i.strip() for i in env.split(",") if i.strip()]
    if interfaces:
        return Zeroconf(interfaces=interfaces, ip_version=IPVersion.V4Only)
    return Zeroconf(interfaces=InterfaceChoice.All, ip_version=IPVersion.V4Only)


@dataclass(frozen=True)
class Advert:
    """One service record as seen on the network."""

    name: str
    host: str
    port: int
    txt: dict[str, str] = field(default_factory=dict)

    @property
    def target(self) -> str:
        return f"{self.host}:{self.port}"


class Advertiser:
    """Registers one service record and withdraws it on close."""

    def __init__(self, zc: Zeroconf, service_type: str, name: str, host: str, port: int,
                 txt: dict[str, str]):
        self._zc = zc
        safe = name.replace(".", "-")[:60]
        self.info = ServiceInfo(
            service_type,
            f"{safe}.{service_type}",
            addresses=[socket.inet_aton(host)],
            port=port,
            properties={k: str(v) for k, v in txt.items()},
            server=f"{safe}.local.",
        )
        zc.register_service(self.info, allow_name_change=True)
        logger.info("zeroconf_advertised", service=self.info.name, host=host, port=port)

    def close(self) -> None:
        try:
            self._zc.unregister_service(self.info)
        except Exception as e:  # closing a dying Zeroconf: nothing left to withdraw
            logger.warning("zeroconf_unregister_failed", service=self.info.name, error=str(e))


def _advert(info: ServiceInfo) -> Advert | None:
    addrs = info.parsed_addresses(IPVersion.V4Only)
    if not addrs or not info.port:
        return None
    txt = {k.decode(): (v or b"").decode() for k, v in (info.properties or {}).items()}
    return Advert(name=info.name, host=addrs[0], port=int(info.port), txt=txt)


class Browser:
    """Keeps the current set of adverts of one service type; calls back on add and remove."""

    def __init__(self, zc: Zeroconf, service_type: str,
                 on_add: Callable[[Advert], None] | None = None,
                 on_remove: Callable[[str], None] | None = None):
        self._zc = zc
        self._on_add, self._on_remove = on_add, on_remove
        self._lock = threading.Lock()
        self.adverts: dict[str, Advert] = {}
        self._browser = ServiceBrowser(zc, service_type, handlers=[self._changed])

    def _changed(self, zeroconf: Zeroconf, service_type: str, name: str,
                 state_change: ServiceStateChange) -> None:
        # Called on zeroconf's thread: resolve in a helper thread so its loop is never blocked.
        if state_change is ServiceStateChange.Removed:
            with self._lock:
                self.adverts.pop(name, None)
            if self._on_remove:
                self._on_remove(name)
            return
        threading.Thread(target=self._resolve, args=(service_type, name), daemon=True).start()

    def _resolve(self, service_type: str, name: str) -> None:
        info = self._zc.get_service_info(service_type, name, timeout=3000)
        advert = _advert(info) if info else None
        if advert is None:
            logger.debug("zeroconf_unresolved", service=name)
            return
        with self._lock:
            self.adverts[name] = advert
        if self._on_add:
            self._on_add(advert)

    def snapshot(self) -> list[Advert]:
        with self._lock:
            return list(self.adverts.values())

    def close(self) -> None:
        self._browser.cancel()


def local_ip() -> str:
    """The address other machines reach this one on (no packet is sent)."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        s.connect(("10.255.255.255", 1))
        return s.getsockname()[0]
    except OSError:
        return "127.0.0.1"
    finally:
        s.close()
