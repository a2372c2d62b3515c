"""zeroconf helpers on loopback: an advert is seen, its TXT carries no secret, and a withdrawn
advert disappears."""

from __future__ import annotations

import time

from herd.rpc import discovery

HOST = "127.0.0.1"


def wait(pred, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.05)
    return False


def test_advert_is_seen_and_withdrawn(monkeypatch):
    monkeypatch.setenv(discovery.INTERFACES_ENV, HOST)
    from protos.v1 import common_pb2
    from worker.agent.service import advert_txt

    info = common_pb2.WorkerInfo(worker_id="mac-1", port=7451, protocol_version=1,
                                 memory_bytes=192 * 2**30, chip="Apple M2 Ultra",
                                 mlx_version="0.32")
    txt = advert_txt(info)
    assert set(txt) == {"id", "port", "protocol", "memory", "chip", "mlx"}
    server, client = discovery.make_zeroconf(), discovery.make_zeroconf()
    removed: list[str] = []
    try:
        browser = discovery.Browser(client, discovery.WORKER_TYPE, on_remove=removed.append)
        advert = discovery.Advertiser(server, discovery.WORKER_TYPE, "mac-1", HOST, 7451, txt)
        assert wait(lambda: any(a.txt.get("id") == "mac-1" for a in browser.snapshot()))
        seen = next(a for a in browser.snapshot() if a.txt.get("id") == "mac-1")
        assert (seen.host, seen.port, seen.txt["chip"]) == (HOST, 7451, "Apple M2 Ultra")
        advert.close()
        assert wait(lambda: advert.info.name in removed)
        assert all(a.txt.get("id") != "mac-1" for a in browser.snapshot())
        browser.close()
    finally:
        server.close()
        client.close()


def _flood(count: int, prefix: str, address: str, port: int) -> None:
    """Raw mDNS answers for ``count`` fake worker adverts, as anyone on the LAN may send them."""
    import socket

    from zeroconf import DNSAddress, DNSOutgoing, DNSPointer, DNSService, DNSText, const

    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton(HOST))
    sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_LOOP, 1)
    kind, unique = discovery.WORKER_TYPE, const._CLASS_IN | const._CLASS_UNIQUE
    for start in range(0, count, 10):
        out = DNSOutgoing(const._FLAGS_QR_RESPONSE | const._FLAGS_AA)
        for i in range(start, min(count, start + 10)):
            name, host = f"{prefix}{i}.{kind}", f"{prefix}{i}-h.local."
            out.add_answer_at_time(DNSPointer(kind, const._TYPE_PTR, const._CLASS_IN, 120, name), 0)
            out.add_answer_at_time(DNSService(name, const._TYPE_SRV, unique, 120, 0, 0, port, host),
                                   0)
            txt = f"id={prefix}{i}".encode()
            out.add_answer_at_time(DNSText(name, const._TYPE_TXT, unique, 120,
                                           bytes([len(txt)]) + txt), 0)
            out.add_answer_at_time(DNSAddress(host, const._TYPE_A, unique, 120,
                                              socket.inet_aton(address)), 0)
        for packet in out.packets():
            sock.sendto(packet, ("224.0.0.251", 5353))
        time.sleep(0.005)
    sock.close()


def test_a_flood_of_fake_worker_adverts_costs_bounded_threads_and_candidates(monkeypatch):
    """Anyone on the LAN may send adverts, without any credential: 3000 fake ones each got a
    resolver thread and a verifying thread (29 -> 1800 threads, +140 MB: an outside run). Now
    a bounded pool resolves and verifies them, and past MAX_ADVERTS new names are ignored."""
    import tempfile
    import threading
    from pathlib import Path

    from coordinator.registry import VERIFIERS, Registry
    from herd.rpc import pki

    monkeypatch.setenv(discovery.INTERFACES_ENV, HOST)
    monkeypatch.setattr(discovery, "MAX_ADVERTS", 60)
    with tempfile.TemporaryDirectory() as tmp:
        ca = pki.Authority.create(Path(tmp))
        zc = discovery.make_zeroconf()
        registry = Registry(ca.issue("coordinator", "c"), health_interval_s=0.2)
        before = threading.active_count()
        try:
            registry.browse(zc)
            registry.start()
            # 192.0.2.1 (TEST-NET-1) never answers: each Describe waits out its deadline.
            _flood(400, "flood", "192.0.2.1", 7451)
            peak = before
            deadline = time.monotonic() + 8
            while time.monotonic() < deadline:
                peak = max(peak, threading.active_count())
                time.sleep(0.05)
            bound = discovery.RESOLVERS + VERIFIERS + 2  # + the registry loop, the browser's
            assert peak - before <= bound, (before, peak)
            assert registry._browser.ignored > 0
            assert len(registry._browser.adverts) <= 60
            with registry._lock:
                assert len(registry._candidates) <= 60
            refused = registry.refusals()
            assert refused and all(r.kind == "unreachable" for r in refused.values())
        finally:
            registry.close()
            zc.close()


def test_an_advert_ignored_in_a_flood_is_resolved_once_there_is_room(monkeypatch):
    """zeroconf reports a name once: a real worker's advert that arrived while the browser was
    full of fake ones would stay unseen after the flood. It waits, and is resolved when a name
    leaves."""
    from zeroconf import ServiceStateChange

    monkeypatch.setenv(discovery.INTERFACES_ENV, HOST)
    monkeypatch.setattr(discovery, "MAX_ADVERTS", 2)
    zc = discovery.make_zeroconf()
    try:
        browser = discovery.Browser(zc, "_herd-test-flood._tcp.local.")
        resolved: list[str] = []

        def resolve_one(service_type: str, name: str) -> None:
            resolved.append(name)
            with browser._lock:
                browser.adverts[name] = discovery.Advert(name, HOST, 1)

        monkeypatch.setattr(browser, "_resolve_one", resolve_one)
        kind, added = "_herd-test-flood._tcp.local.", ServiceStateChange.Added
        for name in ("fake-1", "fake-2", "real"):
            browser._changed(zc, kind, name, added)
        assert wait(lambda: sorted(resolved) == ["fake-1", "fake-2"])
        assert browser.ignored == 1 and "real" not in browser.adverts
        browser._changed(zc, kind, "fake-1", ServiceStateChange.Removed)  # its record expired
        assert wait(lambda: "real" in resolved) and "real" in browser.adverts
        browser.close()
    finally:
        zc.close()
