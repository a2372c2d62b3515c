"""The HTTP side against an outside review's attacks: a web page that points its own name at the
loopback dashboard (DNS rebinding), slowloris connections, oversized and many-file uploads, and
the temporary files they leave. A real server on a free port, real HTTP requests."""

from __future__ import annotations

import errno
import os
import socket
import time

import httpx
import pytest
from structlog.testing import capture_logs

from coordinator.artifacts import AdapterStore, BlobStore
from coordinator.scheduler import Scheduler
from coordinator.store import JobStore
from coordinator.web import openai_api
from coordinator.web.auth import Access, WebAuth
from coordinator.web.hub import MetricsHub
from coordinator.web.limits import AcceptErrors, Admission
from coordinator.web.server import WebContext, WebServer
from tests.test_web_units import SECRET, TOKEN, WORKER, NoLauncher, feed_job

JSONL = b'{"text": "a"}\n'


@pytest.fixture
def make_server(tmp_path):
    """``make_server(anonymous_read, admission)``: the HTTP side bound to 127.0.0.1."""
    store = JobStore(tmp_path / "herd.db")
    feed_job(store)
    scheduler = Scheduler(store, lambda: [WORKER], NoLauncher())
    hub = MetricsHub(store, scheduler.wait_for_events)
    hub.poll()
    started = []

    def make(anonymous_read: bool = True, admission: Admission | None = None) -> WebServer:
        ctx = WebContext(store, scheduler, hub, lambda: [WORKER], BlobStore(tmp_path / "blobs"),
                         AdapterStore(tmp_path / "adapters"),
                         WebAuth(SECRET, anonymous_read, bind_host="127.0.0.1"))
        web = WebServer(ctx, "127.0.0.1", 0, admission)
        web.start()
        started.append(web)
        return web

    yield make
    for web in started:
        web.stop()
    store.close()


# --- DNS rebinding --------------------------------------------------------------------------------

def test_a_page_that_points_its_name_at_the_loopback_dashboard_reads_nothing(make_server):
    web = make_server(anonymous_read=True)
    port = web.port
    with httpx.Client(base_url=web.url, timeout=10) as http:
        for path in ("/api/cluster", "/api/jobs/demo-1", "/metrics", "/api/stream",
                     "/api/jobs/demo-1/checkpoints/4/adapter.tar.gz"):
            r = http.get(path, headers={"Host": f"attacker.example:{port}"})
            assert r.status_code == 401, path
            assert "'attacker.example:" in r.json()["error"]["message"]
        assert http.get("/", headers={"Host": "attacker.example"}).status_code == 200  # no data
        for host in (f"127.0.0.1:{port}", f"localhost:{port}", "LOCALHOST.", f"[::1]:{port}",
                     "dash.localhost", "127.0.0.2", "127.0.0.1"):
            assert http.get("/api/cluster", headers={"Host": host}).status_code == 200, host
        # The token, or the session cookie it buys, works whatever name the client used (an SSH
        # tunnel, an alias): a rebinding page has neither.
        bearer = {"Host": "coordinator.lab.example", "Authorization": f"Bearer {TOKEN}"}
        assert http.get("/api/cluster", headers=bearer).status_code == 200
        assert http.get("/v1/fine_tuning/jobs", headers=bearer).status_code == 200
        alias = {"Host": "coordinator.lab.example"}
        assert http.post("/login", data={"token": TOKEN}, headers=alias).status_code == 200
        assert http.get("/metrics", headers=alias).status_code == 200


def test_which_host_names_read_anonymously():
    loopback = WebAuth(SECRET, True, bind_host="127.0.0.1")
    assert loopback.access(None, None, "localhost:7480") is Access.READ
    assert loopback.access(None, None, "evil.example") is Access.NONE
    assert loopback.access(None, None, "192.168.1.5:7480") is Access.NONE  # not what we bound
    assert loopback.access(f"Bearer {TOKEN}", None, "evil.example") is Access.FULL
    # A LAN bind with --dashboard-open: its addresses and the machine's name, not a page's name.
    lan = WebAuth(SECRET, True, bind_host="192.168.1.5")
    me = socket.gethostname().split(".")[0]
    for host in ("192.168.1.5:7480", "10.1.2.3", "[fe80::1]:7480", f"{me}.local:7480", me):
        assert lan.access(None, None, host) is Access.READ, host
    assert lan.access(None, None, "evil.example:7480") is Access.NONE
    # Without --dashboard-open nothing is anonymous, whatever the name.
    assert WebAuth(SECRET, False).access(None, None, "localhost") is Access.NONE


# --- connections --------------------------------------------------------------------------------

def _closed_by_server(sock: socket.socket) -> bool:
    """Waits (up to the socket's timeout) for the server to close the connection."""
    try:
        return sock.recv(1024) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def test_a_request_head_dripped_slowly_is_cut_off_and_others_are_still_served(make_server):
    web = make_server(admission=Admission(head_timeout_s=2.0))
    slow = socket.create_connection(("127.0.0.1", web.port), timeout=8)
    slow.sendall(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\n")
    for _ in range(15):  # one header line at a time, never the blank line that ends the head
        time.sleep(0.2)
        try:
            slow.sendall(b"X-a: b\r\n")
        except OSError:
            break
    assert _closed_by_server(slow)
    slow.close()
    # A head split across reads still counts as complete.
    quick = socket.create_connection(("127.0.0.1", web.port), timeout=8)
    quick.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r")
    time.sleep(0.05)
    quick.sendall(b"\n")
    assert quick.recv(12) == b"HTTP/1.1 200"
    quick.close()


def test_a_login_body_dripped_slowly_is_cut_off(make_server, monkeypatch):
    """POST /login is the one body read before any credential: a body dripped a byte every few
    seconds held every HTTP slot for ever (an outside run, 8 source addresses x 64)."""
    from coordinator.web import server

    monkeypatch.setattr(server, "LOGIN_BODY_S", 1.5)
    web = make_server()
    slow = socket.create_connection(("127.0.0.1", web.port), timeout=8)
    slow.sendall(b"POST /login HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: "
                 b"application/x-www-form-urlencoded\r\nContent-Length: 400\r\n\r\ntoken=")
    for _ in range(20):
        time.sleep(0.25)
        try:
            slow.sendall(b"a")
        except OSError:
            break
    reply = b""
    while b"\r\n" not in reply and (chunk := slow.recv(4096)):
        reply += chunk
    assert reply.startswith(b"HTTP/1.1 408"), reply[:200]
    slow.close()
    with httpx.Client(base_url=web.url, timeout=8) as http:
        big = http.post("/login", content=b"token=" + b"a" * 5000,
                        headers={"Content-Type": "application/x-www-form-urlencoded"})
        assert big.status_code == 413, big.text
        assert http.post("/login", data={"token": TOKEN}).status_code == 200


def test_one_source_holds_a_bounded_number_of_connections(make_server):
    web = make_server(admission=Admission(max_per_peer=3, head_timeout_s=60))
    held = [socket.create_connection(("127.0.0.1", web.port), timeout=8) for _ in range(3)]
    extra = socket.create_connection(("127.0.0.1", web.port), timeout=8)
    assert _closed_by_server(extra)
    extra.close()
    # Another source is still served while the first is at its bound.
    other = socket.create_connection(("127.0.0.1", web.port), timeout=8,
                                     source_address=("127.0.0.2", 0))
    other.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
    assert other.recv(12) == b"HTTP/1.1 200"
    other.close()
    for sock in held:
        sock.close()
    deadline = time.monotonic() + 8
    while web.admission.open.get("127.0.0.1") and time.monotonic() < deadline:
        time.sleep(0.02)  # the server sees the closes
    assert httpx.get(web.url, timeout=8).status_code == 200


def test_running_out_of_descriptors_is_logged_once_then_counted():
    """asyncio's accept loop reports every failed accept(): 42,363 tracebacks a minute in the
    outside run. Here the first is said, then a count at most once a minute."""
    import asyncio

    now = [0.0]
    loop = asyncio.new_event_loop()
    loop.set_exception_handler(AcceptErrors(every_s=60, clock=lambda: now[0]))
    emfile = {"message": "socket.accept() out of system resource",
              "exception": OSError(errno.EMFILE, os.strerror(errno.EMFILE))}
    with capture_logs() as logs:
        for _ in range(1000):
            loop.call_exception_handler(emfile)
        now[0] = 61.0
        for _ in range(5):
            loop.call_exception_handler(emfile)
    loop.close()
    said = [e for e in logs if e["event"] == "http_accept_failing"]
    assert [e["times"] for e in said] == [1, 1000]
    assert said[0]["error"] == os.strerror(errno.EMFILE)


def test_the_server_s_loop_uses_the_quiet_handler(make_server):
    web = make_server()
    assert isinstance(web._loop.get_exception_handler(), AcceptErrors)


# --- uploads ------------------------------------------------------------------------------------

def _temp_files(web: WebServer) -> list[str]:
    return [p.name for p in web.ctx.blobs.root.iterdir() if p.name.startswith(".")]


def test_an_upload_with_two_files_is_refused_and_leaves_no_temporary_file(make_server):
    web = make_server()
    auth = {"Authorization": f"Bearer {TOKEN}"}
    with httpx.Client(base_url=web.url, timeout=10, headers=auth) as http:
        files = [("file", ("a.jsonl", JSONL * 1000)), ("file", ("b.jsonl", JSONL))]
        r = http.post("/v1/files", files=files, data={"purpose": "fine-tune"})
        assert r.status_code == 400 and "more than one file" in r.json()["error"]["message"]
        assert _temp_files(web) == []
        r = http.post("/v1/files", files={"file": ("a.jsonl", JSONL)},
                      data={"purpose": "fine-tune"})
        assert r.status_code == 200 and r.json()["bytes"] == len(JSONL)
        assert _temp_files(web) == []


def test_an_upload_over_the_bound_is_refused_with_413(make_server, monkeypatch):
    monkeypatch.setattr(openai_api, "MAX_UPLOAD_BYTES", 1000)
    web = make_server()
    auth = {"Authorization": f"Bearer {TOKEN}"}
    with httpx.Client(base_url=web.url, timeout=10, headers=auth) as http:
        # Counted as it streams in (a chunked body has no length to check first) ...
        r = http.post("/v1/files", files={"file": ("big.jsonl", JSONL * 100)},
                      data={"purpose": "fine-tune"})
        assert r.status_code == 413 and "larger than" in r.json()["error"]["message"]
        assert _temp_files(web) == []
        # ... and refused before reading when its length says so.
        r = http.post("/v1/files", files={"file": ("big.jsonl", JSONL * 10000)},
                      data={"purpose": "fine-tune"})
        assert r.status_code == 413
        assert _temp_files(web) == []


def test_the_job_api_answers_a_malformed_request_with_a_json_error_not_a_500(make_server):
    """What an outside run sent: a JSON null, a form that is not multipart, batch_size 0 with
    n_epochs, a method herd does not train (it trained supervised, unsaid), an unknown path and
    method: each a 4xx with an OpenAI-shaped JSON error (a 500, or text/plain, before)."""
    web = make_server()
    auth = {"Authorization": f"Bearer {TOKEN}"}
    with httpx.Client(base_url=web.url, timeout=10, headers=auth) as http:
        sha = http.post("/v1/files", files={"file": ("a.jsonl", JSONL * 8)},
                        data={"purpose": "fine-tune"}).json()["id"]
        base = {"model": "/nonexistent/model", "training_file": sha}
        cases = [
            (http.post("/v1/fine_tuning/jobs", content=b"null",
                       headers={"Content-Type": "application/json"}), 400, "not a JSON object"),
            (http.post("/v1/fine_tuning/jobs", content=b"[" * 100_000 + b"]" * 100_000,
                       headers={"Content-Type": "application/json"}), 400, "nested too deeply"),
            (http.post("/v1/files", content=b"just bytes"), 400, "not multipart"),
            (http.post("/v1/fine_tuning/jobs", json={**base, "hyperparameters": {
                "n_epochs": 2, "batch_size": 0}}), 400, "batch_size = 0"),
            (http.post("/v1/fine_tuning/jobs", json={**base, "method": {"type": "dpo"}}), 400,
             "method.type 'dpo' is not available"),
            (http.get("/v1/no_such_thing"), 404, "GET /v1/no_such_thing: Not Found"),
            (http.delete("/v1/files"), 405, "Method Not Allowed"),
        ]
        for r, status, said in cases:
            assert r.status_code == status, (r.request.url, r.text)
            assert r.headers["Content-Type"].startswith("application/json"), r.text
            assert said in r.json()["error"]["message"], r.text


def test_the_sweep_removes_stale_temporary_upload_files(tmp_path):
    from coordinator.housekeeping import ORPHAN_GRACE_S, TEMP_GRACE_S, sweep_blobs
    from coordinator.models import ModelStore

    store, blobs = JobStore(tmp_path / "db"), BlobStore(tmp_path / "blobs")
    models = ModelStore(tmp_path / "models", blobs)
    now = time.time()
    names = {".upload-old1": True, f".{'a' * 64}.part-x1": True, ".upload-live": False,
             f".{'b' * 64}.link": False}  # name: stale (a link being made is not a temp write)
    for name, stale in names.items():
        (blobs.root / name).write_bytes(b"x" * 10)
        if stale or name.endswith(".link"):
            os.utime(blobs.root / name, (now - TEMP_GRACE_S - 30,) * 2)
    # What arrived of a broken PutBlob waits a day for its uploader to resume it, then goes.
    partial = blobs.root / f".{'c' * 64}.part-upload"
    partial.write_bytes(b"y" * 7)
    os.utime(partial, (now - TEMP_GRACE_S - 30,) * 2)
    assert sweep_blobs(store, models, blobs, now) == (2, 20)
    assert sorted(p.name for p in blobs.root.iterdir()) == sorted(
        [partial.name, *(n for n, stale in names.items() if not stale)])
    # (a day on, the ".upload-live" written now is stale too)
    assert sweep_blobs(store, models, blobs, now + ORPHAN_GRACE_S) == (2, 17)
    assert not partial.exists()
    store.close()


def test_no_other_site_may_frame_the_dashboard_and_a_session_over_tls_is_secure(make_server):
    """An outside run found no anti-framing or script policy, and the session cookie without
    Secure where a TLS proxy fronts the dashboard."""
    web = make_server()
    with httpx.Client(base_url=web.url, timeout=10) as http:
        for path in ("/", "/api/cluster", "/v1/fine_tuning/jobs"):
            r = http.get(path)
            assert r.headers["X-Frame-Options"] == "DENY", path
            assert "frame-ancestors 'none'" in r.headers["Content-Security-Policy"], path
            assert r.headers["X-Content-Type-Options"] == "nosniff", path
        plain = http.post("/login", data={"token": TOKEN})
        assert "secure" not in plain.headers["set-cookie"].lower()  # (plain HTTP: it must work)
        proxied = http.post("/login", data={"token": TOKEN},
                            headers={"X-Forwarded-Proto": "https"})
        assert "secure" in proxied.headers["set-cookie"].lower()
