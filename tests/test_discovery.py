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
