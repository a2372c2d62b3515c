"""The HTTP job API in the shape of OpenAI's fine-tuning API (shapes in openai_shape.py):

    POST /v1/files                                  upload a JSONL (multipart, purpose fine-tune)
    GET  /v1/files/{file_id}
    POST /v1/fine_tuning/jobs                       create (herd's config and cluster: as extras)
    GET  /v1/fine_tuning/jobs                       list, newest first (after, limit)
    GET  /v1/fine_tuning/jobs/{id}                  retrieve
    GET  /v1/fine_tuning/jobs/{id}/events           events, newest first (after, limit)
    GET  /v1/fine_tuning/jobs/{id}/checkpoints      checkpoints, newest first (after, limit)
    POST /v1/fine_tuning/jobs/{id}/cancel

so the official ``openai`` client, given the coordinator's base URL and the API token, can create,
watch and cancel jobs. Every route wants the bearer token (coordinator/web/auth.py). A job made
here is checked exactly as ``herd submit``'s (coordinator/jobs.py), and the blocking parts (SQLite,
stopping ranks) run in threads, off the server's event loop.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import os
import tempfile
import time
from pathlib import Path

from aiohttp import web

from coordinator.housekeeping import require_checkpoint_room
from coordinator.jobs import new_job
from coordinator.reports import all_events
from coordinator.web import openai_shape as shape
from herd.dataset import numbered_lines
from herd.errors import DatasetError, HerdError
from herd.rpc.files import read_chunks

MAX_LIMIT = 100
# A fine-tuning file is at most this (OpenAI's own bound is 512 MB). The upload lands on the state
# disk that also holds the job database and checkpoints, where a full disk stops the coordinator
# recording anything; aiohttp bounds other bodies (1 MiB) but not a streamed multipart part.
MAX_UPLOAD_BYTES = 512 * 2**20
FORM_BYTES = 64 * 1024  # the rest of the form: the purpose field and the parts' headers


def _limit(request: web.Request) -> tuple[str | None, int]:
    try:
        limit = int(request.query.get("limit", "20"))
    except ValueError:
        raise DatasetError("limit must be a whole number") from None
    return request.query.get("after") or None, max(1, min(limit, MAX_LIMIT))


def _check_jsonl(path: str) -> int:
    """Every non-blank line a JSON object (DatasetError naming the line); returns the count.
    Bounded, and with line ends as mlx-lm reads them, as herd check reads (herd/dataset.py; it
    split on \n alone)."""
    n = 0
    for i, line in numbered_lines(Path(path), hashlib.sha256()):
        if not line.strip():
            continue
        try:
            ok = isinstance(json.loads(line), dict)
        except ValueError:
            ok = False
        if not ok:
            raise DatasetError(f"line {i} is not a JSON object",
                               hint="a fine-tuning file holds one JSON object per line, in "
                               "one of mlx-lm's formats (text, prompt/completion, chat)")
        n += 1
    if not n:
        raise DatasetError("the file holds no examples")
    return n


def _too_large() -> shape.TooLargeError:
    return shape.TooLargeError(f"the file is larger than {MAX_UPLOAD_BYTES // 2**20} MiB",
                               hint="make the file smaller, or ship it with `herd submit`")


class JobApi:
    def __init__(self, ctx):
        self.ctx = ctx  # coordinator/web/server.py WebContext
        self._examples: dict[str, int] = {}  # an uploaded file's examples (n_epochs), by sha

    def routes(self) -> list[web.RouteDef]:
        return [
            web.post("/v1/files", self.upload),
            web.get("/v1/files/{file_id}", self.get_file),
            web.post("/v1/fine_tuning/jobs", self.create),
            web.get("/v1/fine_tuning/jobs", self.list_jobs),
            web.get("/v1/fine_tuning/jobs/{job_id}", self.retrieve),
            web.get("/v1/fine_tuning/jobs/{job_id}/events", self.events),
            web.get("/v1/fine_tuning/jobs/{job_id}/checkpoints", self.checkpoints),
            web.post("/v1/fine_tuning/jobs/{job_id}/cancel", self.cancel),
        ]

    def _job(self, job_id: str) -> dict:
        job = self.ctx.store.get_job(job_id)
        try:
            summary = self.ctx.hub.job(job_id)
        except HerdError:  # the hub has not read its first event yet
            summary = None
        return shape.job_object(job, summary, time.time(), self._epochs(job))

    def _epochs(self, job) -> int | None:
        """The epochs a job's iters make of its training file, when whole (the API echoed
        n_epochs "auto" for a job created with 2: an outside run); None when not, or when the
        file is not one the job API takes (a CLI job's dataset, read only up to that size)."""
        train = next((d for d in job.dataset if d.name == "train.jsonl"), None)
        try:
            if train is None or (self.ctx.blobs.root / train.sha256).stat().st_size > \
                    MAX_UPLOAD_BYTES:
                return None
            per = self._count_examples(train.sha256) // job.config.batch_size
        except (OSError, HerdError):
            return None
        return job.iters // per if per and job.iters % per == 0 else None

    # --- files -----------------------------------------------------------------------------

    async def upload(self, request: web.Request) -> web.Response:
        if (request.content_length or 0) > MAX_UPLOAD_BYTES + FORM_BYTES:
            raise _too_large()  # said before a byte of it is read
        try:
            reader = await request.multipart()
        except (AssertionError, ValueError, KeyError):  # (not multipart: it was a 500)
            raise DatasetError("the upload is not multipart/form-data",
                               hint="send the file as the 'file' field of a form, with purpose "
                               "fine-tune (the openai client's files.create does)") from None
        purpose, filename, tmp, sha, size = None, "", None, None, 0
        blobs = self.ctx.blobs
        try:
            while (part := await reader.next()) is not None:
                if part.name == "purpose":
                    purpose = (await part.text()).strip()
                elif part.name == "file":
                    if tmp is not None:  # (each part used to leave a temporary file behind)
                        raise DatasetError("the upload holds more than one file",
                                           hint="send one file per request")
                    filename = os.path.basename(part.filename or "")
                    fd, tmp = tempfile.mkstemp(dir=blobs.root, prefix=".upload-")
                    h = hashlib.sha256()
                    with os.fdopen(fd, "wb") as f:
                        while chunk := await part.read_chunk(1 << 20):
                            size += len(chunk)
                            if size > MAX_UPLOAD_BYTES:
                                raise _too_large()
                            h.update(chunk)
                            f.write(chunk)
                    sha = h.hexdigest()
            if purpose != "fine-tune":
                raise DatasetError(f"purpose = {purpose!r}: herd stores fine-tune files only")
            if tmp is None:
                raise DatasetError("no file in the upload", hint="send it as the 'file' field")
            examples = await asyncio.to_thread(_check_jsonl, tmp)
            size = await asyncio.to_thread(blobs.put, sha, read_chunks(tmp))
            self._examples[sha] = examples
        finally:
            if tmp is not None:
                Path(tmp).unlink(missing_ok=True)
        return web.json_response(shape.file_object(sha, size, int(time.time()), filename))

    async def get_file(self, request: web.Request) -> web.Response:
        sha = shape.sha_of(request.match_info["file_id"], "file_id")
        path = self.ctx.blobs.root / sha
        if not self.ctx.blobs.has(sha):
            return web.json_response(shape.error_object("no such file"), status=404)
        st = path.stat()
        return web.json_response(shape.file_object(sha, st.st_size, int(st.st_mtime)))

    # --- jobs ------------------------------------------------------------------------------

    def _count_examples(self, sha: str) -> int:
        if not self.ctx.blobs.has(sha):
            raise DatasetError(f"file-{sha} was not uploaded", hint="POST /v1/files first")
        if sha not in self._examples:
            self._examples[sha] = _check_jsonl(str(self.ctx.blobs.root / sha))
        return self._examples[sha]

    def _create(self, body) -> dict:
        name, config_yaml, dataset = shape.job_request(body, self._count_examples)
        blobs = self.ctx.blobs
        dataset = [dataclasses.replace(d, bytes=(blobs.root / d.sha256).stat().st_size)
                   if blobs.has(d.sha256) else d for d in dataset]
        job = new_job(name, config_yaml, dataset, blobs, self.ctx.models)
        require_checkpoint_room(self.ctx.adapters.root, job, self.ctx.keep_checkpoints,
                                self.ctx.store, self.ctx.models.config if self.ctx.models
                                else lambda j: None)  # (as herd submit's: it was not checked)
        job = self.ctx.scheduler.submit(job, by="the job API")
        return self._job(job.job_id)

    async def create(self, request: web.Request) -> web.Response:
        try:
            body = await request.json()
        except ValueError:
            raise DatasetError("the request body is not JSON") from None
        except RecursionError:  # (nested past Python's parser: a 500, an outside run)
            raise DatasetError("the request body is JSON nested too deeply") from None
        return web.json_response(await asyncio.to_thread(self._create, body))

    def _list(self) -> list[dict]:
        return [self._job(j.job_id) for j in self.ctx.store.list_jobs()]

    async def list_jobs(self, request: web.Request) -> web.Response:
        after, limit = _limit(request)
        return web.json_response(shape.page(await asyncio.to_thread(self._list), after, limit))

    async def retrieve(self, request: web.Request) -> web.Response:
        return web.json_response(await asyncio.to_thread(self._job,
                                                         request.match_info["job_id"]))

    def _events(self, job_id: str) -> list[dict]:
        job = self.ctx.store.get_job(job_id)
        return [shape.event_object(e, job.iters)
                for e in reversed(all_events(self.ctx.store, job_id))]

    async def events(self, request: web.Request) -> web.Response:
        after, limit = _limit(request)
        items = await asyncio.to_thread(self._events, request.match_info["job_id"])
        return web.json_response(shape.page(items, after, limit))

    def _checkpoints(self, job_id: str) -> list[dict]:
        job = self.ctx.store.get_job(job_id)
        points = self.ctx.hub.job(job_id)["points"] if self.ctx.store.checkpoints(job_id) else []
        out = []
        for c in reversed(self.ctx.store.checkpoints(job_id)):
            train = [p for p in points if p["it"] <= c.step and p["loss"] is not None]
            val = [p for p in points if p["it"] <= c.step and p["val"] is not None]
            metrics = {"train_loss": train[-1]["loss"] if train else None,
                       "valid_loss": val[-1]["val"] if val else None}
            out.append(shape.checkpoint_object(c, job, metrics))
        return out

    async def checkpoints(self, request: web.Request) -> web.Response:
        after, limit = _limit(request)
        items = await asyncio.to_thread(self._checkpoints, request.match_info["job_id"])
        return web.json_response(shape.page(items, after, limit))

    def _cancel(self, job_id: str) -> dict:
        self.ctx.scheduler.cancel(job_id, by="the job API")
        return self._job(job_id)

    async def cancel(self, request: web.Request) -> web.Response:
        return web.json_response(await asyncio.to_thread(self._cancel,
                                                         request.match_info["job_id"]))
