"""The coordinator's HTTP side, on its own port (default 7480): the dashboard, /metrics and the job
API, served by aiohttp on an event loop in one thread of the coordinator process.

aiohttp because one well-kept library gives the server, streamed responses (the dashboard's
server-sent events), multipart uploads and a test client, on a loop of its own beside gRPC's
thread pool; the stdlib's http.server has none of these, and starlette would need uvicorn too.

    GET  /                        the dashboard (static files in coordinator/web/static, no CDN)
    POST /login, /logout          the dashboard's session (the token posted, a cookie back)
    GET  /api/cluster             workers and jobs
    GET  /api/jobs/{id}           one job: series, step time split, checkpoints, event log
    GET  /api/stream?job=ID       server-sent events: the above, live
    GET  /api/jobs/{id}/checkpoints/{step}/adapter.tar.gz    a checkpoint with its report files
    GET  /metrics                 Prometheus
    /v1/...                       the job API (openai_api.py)
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import tarfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from aiohttp import web

from coordinator.artifacts import AdapterStore, BlobStore
from coordinator.domain import WorkerRecord
from coordinator.models import ModelCatalog
from coordinator.reports import adapter_with_report
from coordinator.scheduler import Scheduler
from coordinator.store import JobStore
from coordinator.web import prometheus
from coordinator.web.auth import COOKIE, SESSION_S, Access, WebAuth
from coordinator.web.hub import MetricsHub
from coordinator.web.limits import AcceptErrors, Admission
from coordinator.web.openai_api import JobApi
from coordinator.web.openai_shape import error_object, error_status
from herd import log
from herd.errors import HerdError, NotFoundError
from herd.netif import hostport

logger = log.get(__name__)
DEFAULT_HTTP_PORT = 7480  # 7450: gRPC; 7451, 7460, 7461: a worker's (deploy/README.md)
STATIC = Path(__file__).parent / "static"
LOGIN_MAX_BYTES, LOGIN_BODY_S = 4096, 10.0
CLUSTER_EVERY_S = 2.0  # worker heartbeats age: the overview is re-sent at least this often
QUEUE_MAX = 2000  # a stream that falls this far behind is closed; the browser reconnects
OVERVIEW_JOBS = 100
KEEPALIVE_S = 30.0  # an idle connection, or one dripping its next request head, is closed then
CONTEXT = web.AppKey("ctx", object)
METRICS = web.AppKey("metrics", object)


@dataclass
class WebContext:
    store: JobStore
    scheduler: Scheduler
    hub: MetricsHub
    workers: Callable[[], list[WorkerRecord]]
    blobs: BlobStore
    adapters: AdapterStore
    auth: WebAuth
    models: ModelCatalog | None = None  # pins a hub model as gRPC SubmitJob does
    keep_checkpoints: int = 0  # the coordinator's --keep-checkpoints (its disk check at submit)


def worker_json(w: WorkerRecord) -> dict:
    return {"id": w.worker_id, "host": w.host, "chip": w.chip, "os": w.os,
            "memory_bytes": w.memory_bytes,
            "used_bytes": max(w.memory_bytes - w.free_memory_bytes, 0),
            "gpu_cores": w.gpu_cores, "mlx": w.mlx_version, "job": w.running_job_id,
            "state": "busy" if w.running_job_id else "idle", "last_seen_ms": w.last_seen_ms}


def _required(request: web.Request) -> Access:
    path = request.path
    if path.startswith("/v1/") or request.method not in ("GET", "HEAD"):
        return Access.FULL
    if path.startswith("/api/") or path == "/metrics":
        return Access.READ
    return Access.NONE  # the page and its static files hold no data


def _allowed(request: web.Request, ctx: WebContext) -> bool:
    """What an open stream re-checks each turn (at least every CLUSTER_EVERY_S): streams opened
    before `herd api-token --rotate`, or on a session since expired, went on for ever (an
    outside run)."""
    try:
        return ctx.auth.access(request.headers.get("Authorization"), request.cookies.get(COOKIE),
                               request.headers.get("Host")) >= _required(request)
    except HerdError:
        return False


@web.middleware
async def _guard(request: web.Request, handler):
    ctx: WebContext = request.app[CONTEXT]
    if request.path not in ("/login", "/logout"):
        need, host = _required(request), request.headers.get("Host")
        try:
            have = ctx.auth.access(request.headers.get("Authorization"),
                                   request.cookies.get(COOKIE), host)
        except HerdError as e:  # (a hand-edited api-token.generation: said, not a 500)
            return web.json_response(error_object(e), status=error_status(e))
        if have < need:
            why = "a valid API token is required (`herd api-token` prints it)"
            if have is Access.READ and request.headers.get("Authorization"):
                return web.json_response(error_object(
                    "the read token only reads (the dashboard, /metrics): this wants the full "
                    "token (`herd api-token` prints it)", "insufficient_scope"), status=403)
            if ctx.auth.anonymous_read and not ctx.auth.host_ok(host):
                # 401, not 403: the dashboard then asks for the token, so a name the operator
                # chose (an alias, a tunnel) still works after one login.
                why = (f"this was asked for as {host!r}: the dashboard is read without a token "
                       "only at localhost or its own address (another name may be a web page "
                       "that pointed its name at this machine); log in with the token "
                       "(`herd api-token` prints it)")
            return web.json_response(error_object(why, "invalid_api_key"), status=401,
                                     headers={"WWW-Authenticate": 'Bearer realm="herd"'})
    try:
        return await handler(request)
    except HerdError as e:
        return web.json_response(error_object(e), status=error_status(e))
    except web.HTTPException as e:  # (404, 405, 413 from aiohttp: JSON too on the job API)
        if not request.path.startswith("/v1/") or e.status < 400:
            raise
        said = f"{request.method} {request.path}: {e.reason}" + (
            f" ({e.text})" if e.text and not e.text.startswith(f"{e.status}:") else "")
        return web.json_response(error_object(said, "invalid_request_error"), status=e.status)


class Dashboard:
    def __init__(self, ctx: WebContext):
        self.ctx = ctx

    def routes(self) -> list[web.RouteDef]:
        return [
            web.get("/", self.index),
            web.post("/login", self.login),
            web.post("/logout", self.logout),
            web.get("/api/cluster", self.cluster),
            web.get("/api/jobs/{job_id}", self.job),
            web.get("/api/stream", self.stream),
            web.get(r"/api/jobs/{job_id}/checkpoints/{step:\d+}/adapter.tar.gz", self.download),
            web.get("/metrics", self.metrics),
            web.static("/static", STATIC),
        ]

    async def index(self, request: web.Request) -> web.FileResponse:
        return web.FileResponse(STATIC / "index.html")

    async def login(self, request: web.Request) -> web.Response:
        # The one body read before any credential: small, with its length said, and whole
        # within LOGIN_BODY_S (bodies dripped a byte every 5 s held every HTTP slot, the
        # dashboard and the job API down for everyone: an outside run).
        if not 0 < (request.content_length or 0) <= LOGIN_MAX_BYTES:
            return web.json_response(error_object(
                f"a login form has a Content-Length of at most {LOGIN_MAX_BYTES} bytes",
                "invalid_request_error"), status=413 if request.content_length else 411)
        try:
            form = await asyncio.wait_for(request.post(), LOGIN_BODY_S)
        except asyncio.TimeoutError:
            late = web.json_response(error_object(
                f"the login form did not arrive within {LOGIN_BODY_S:.0f} s",
                "invalid_request_error"), status=408)
            late.force_close()  # (the connection ends with this answer)
            return late
        if self.ctx.auth.token_access(str(form.get("token", "")).strip()) is Access.NONE:
            return web.json_response(error_object("wrong token", "invalid_api_key"), status=401)
        resp = web.json_response({"ok": True})
        # (Secure where the browser reached it over TLS: a proxy in front says so)
        secure = request.secure or request.headers.get("X-Forwarded-Proto") == "https"
        resp.set_cookie(COOKIE, self.ctx.auth.new_session(), max_age=SESSION_S, httponly=True,
                        secure=secure,
                        samesite="Strict", path="/")
        return resp

    async def logout(self, request: web.Request) -> web.Response:
        resp = web.json_response({"ok": True})
        resp.del_cookie(COOKIE, path="/")
        return resp

    def _cluster(self) -> dict:
        # The newest jobs only: the overview is re-sent every second or two to every browser.
        jobs = self.ctx.hub.jobs()
        return {"workers": [worker_json(w) for w in self.ctx.workers()],
                "jobs": jobs[:OVERVIEW_JOBS], "jobs_total": len(jobs),
                "health": self.ctx.scheduler.health}  # why it cannot record jobs ("" if it can)

    async def cluster(self, request: web.Request) -> web.Response:
        return web.json_response(self._cluster())

    async def job(self, request: web.Request) -> web.Response:
        return web.json_response(self.ctx.hub.job(request.match_info["job_id"]))

    async def metrics(self, request: web.Request) -> web.Response:
        body = await asyncio.to_thread(prometheus.render, request.app[METRICS])
        return web.Response(body=body, headers={"Content-Type": prometheus.CONTENT_TYPE})

    async def stream(self, request: web.Request) -> web.StreamResponse:
        """Server-sent events: ``cluster`` (the overview) at once, on changes and every few
        seconds; for ``?job=ID`` its ``job`` detail at once, then each ``change`` to it."""
        job_id = request.query.get("job") or None
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()

        def listener(change: dict) -> None:  # called on the hub's thread
            loop.call_soon_threadsafe(queue.put_nowait, change)

        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                           "Cache-Control": "no-cache"})
        await resp.prepare(request)
        detail = self.ctx.hub.subscribe(listener, job_id)
        sent = loop.time()
        try:
            await _send(resp, "cluster", self._cluster())
            if detail is not None:
                await _send(resp, "job", detail)
            while _allowed(request, self.ctx):  # (a rotated token ends it at once too)
                try:
                    change = await asyncio.wait_for(queue.get(), CLUSTER_EVERY_S)
                    if queue.qsize() > QUEUE_MAX:
                        break
                    if change["job_id"] == job_id:
                        await _send(resp, "change", change)
                except asyncio.TimeoutError:
                    pass
                # The overview after a burst of changes, at most once a second (and at least
                # every CLUSTER_EVERY_S, for the workers' heartbeats).
                if queue.empty() and loop.time() - sent >= 1.0:
                    await _send(resp, "cluster", self._cluster())
                    sent = loop.time()
        except (ConnectionResetError, asyncio.CancelledError):
            pass
        finally:
            self.ctx.hub.unsubscribe(listener)
        return resp

    async def download(self, request: web.Request) -> web.Response:
        job_id, step = request.match_info["job_id"], int(request.match_info["step"])
        body = await asyncio.to_thread(self._tar, job_id, step)
        return web.Response(body=body, headers={
            "Content-Type": "application/gzip",
            "Content-Disposition": f'attachment; filename="{job_id}-step{step}.tar.gz"'})

    def _tar(self, job_id: str, step: int) -> bytes:
        found = [c for c in self.ctx.store.checkpoints(job_id) if c.step == step]
        if not found:
            raise NotFoundError(f"job {job_id} has no checkpoint at step {step}")
        files, chunks = adapter_with_report(self.ctx.store, self.ctx.adapters, found[0])
        data: dict[str, bytearray] = {f.name: bytearray() for f in files}
        for name, block in chunks:
            data[name] += block
        out = io.BytesIO()
        with tarfile.open(fileobj=out, mode="w:gz") as tar:
            for name, content in data.items():
                info = tarfile.TarInfo(f"{job_id}-step{step}/{name}")
                info.size, info.mode = len(content), 0o644
                info.mtime = found[0].created_ms // 1000  # (0 unpacked as 1970: an outside run)
                tar.addfile(info, io.BytesIO(bytes(content)))
        return out.getvalue()


async def _send(resp: web.StreamResponse, event: str, data: dict) -> None:
    await resp.write(f"event: {event}\ndata: {json.dumps(data)}\n\n".encode())


# Every answer: no page of another site may frame the dashboard (clickjacking) or run script in
# it, and no type is guessed (an outside run found none of these set).
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data: blob:; style-src "
                               "'self' 'unsafe-inline'; frame-ancestors 'none'; base-uri 'none'; "
                               "form-action 'self'",
    "X-Frame-Options": "DENY", "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer"}


async def _security_headers(request: web.Request, response: web.StreamResponse) -> None:
    response.headers.update(SECURITY_HEADERS)


def make_app(ctx: WebContext) -> web.Application:
    app = web.Application(middlewares=[_guard])
    app.on_response_prepare.append(_security_headers)
    app[CONTEXT] = ctx
    app[METRICS] = prometheus.metrics_registry(ctx.hub, ctx.workers,
                                               lambda: ctx.scheduler.health)
    app.add_routes(Dashboard(ctx).routes() + JobApi(ctx).routes())
    return app


class WebServer:
    """The app on ``host:port`` (0 = any free port), on an event loop in a thread of its own."""

    def __init__(self, ctx: WebContext, host: str, port: int, admission: Admission | None = None):
        self.ctx, self.host, self.port = ctx, host, port
        self.admission = admission or Admission()  # connections per source, head deadline
        self._loop = asyncio.new_event_loop()
        self._runner: web.AppRunner | None = None
        self._listener: asyncio.Server | None = None
        self._started = threading.Event()
        self._error: BaseException | None = None

    @property
    def url(self) -> str:
        return f"http://{hostport(self.host, self.port)}/"  # an IPv6 host in brackets

    def start(self) -> None:
        threading.Thread(target=self._run, daemon=True, name="http").start()
        self._started.wait(30)
        if self._error is not None:
            raise HerdError(f"the dashboard cannot listen on {self.host}:{self.port}: "
                            f"{self._error}", hint="choose another --http-port") from self._error

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_until_complete(self._serve())
        except BaseException as e:  # reported to start(), which raises it in the caller
            self._error = e
            # (closed here, in its own thread: left to the garbage collector, the loop printed
            # an "Exception ignored ... Invalid file descriptor" traceback after the message)
            with contextlib.suppress(Exception):  # (a runner that never set up)
                if self._runner is not None:
                    self._loop.run_until_complete(self._runner.cleanup())
            self._loop.close()
            self._started.set()
            return
        self._started.set()
        self._loop.run_forever()

    async def _serve(self) -> None:
        # No access log: it would hold every URL, and nothing secret must reach a log anyway.
        self._loop.set_exception_handler(AcceptErrors())  # out of descriptors: said once a minute
        self._runner = web.AppRunner(make_app(self.ctx), access_log=None,
                                     handler_cancellation=True, shutdown_timeout=2.0,
                                     keepalive_timeout=KEEPALIVE_S)
        await self._runner.setup()
        # Our own listener instead of web.TCPSite: every connection goes through the admission
        # guard (coordinator/web/limits.py) before aiohttp sees it.
        self._listener = await self._loop.create_server(
            self.admission.factory(self._runner.server), self.host, self.port)
        self.port = self._listener.sockets[0].getsockname()[1]

    async def _close(self) -> None:
        if self._listener is not None:
            self._listener.close()  # (not wait_closed: it waits for every client to leave)
        await self._runner.cleanup()

    def stop(self) -> None:
        if self._runner is None or not self._loop.is_running():
            return
        fut = asyncio.run_coroutine_threadsafe(self._close(), self._loop)
        try:
            fut.result(timeout=10)
        except Exception as e:  # stopping anyway; say why it was not clean
            logger.warning("http_stop_failed", error=str(e))
        self._loop.call_soon_threadsafe(self._loop.stop)
