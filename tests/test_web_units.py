"""The coordinator's HTTP side without a cluster: the real aiohttp server on loopback over a real
SQLite store (only the rank launcher is a stand-in), its auth rules, the metrics stream's
arithmetic, the Prometheus exposition, the OpenAI request mapping, the report files and the
TensorBoard writer. The whole thing against a live cluster and a browser: test_dashboard_e2e.py."""

from __future__ import annotations

import io
import json
import struct
import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from coordinator.artifacts import AdapterStore, BlobStore
from coordinator.domain import EventKind, Job, JobState, RankProgress, WorkerRecord
from coordinator.reports import loss_png, metric_records
from coordinator.scheduler import Scheduler
from coordinator.store import JobStore
from coordinator.web import openai_shape
from coordinator.web.auth import COOKIE, Access, WebAuth
from coordinator.web.hub import MetricsHub, split_step_time
from coordinator.web.prometheus import metrics_registry, render
from coordinator.web.server import WebContext, WebServer
from herd.config import parse_config
from herd.errors import ConfigError, DatasetError, HerdError
from herd.rpc.api_token import api_token

SECRET = "s3cret-" + "x" * 40
TOKEN = api_token(SECRET)
WORKER = WorkerRecord("worker-1", "10.0.0.2", 7460, 7461, 7462, 64 << 30,
                      free_memory_bytes=48 << 30, chip="Apple M2 Ultra",
                      last_seen_ms=int(time.time() * 1000))


class NoLauncher:
    def start_rank(self, launch):
        raise AssertionError("no rank starts in these tests")

    def stop_job(self, worker, job_id, attempt=0):
        pass


def put_job(store: JobStore, job_id: str, iters: int = 8) -> None:
    cfg = parse_config({"model": "/models/tiny", "iters": iters})
    store.put_job(Job(job_id, "demo", cfg, [], 2, iters, state=JobState.RUNNING, attempt=2,
                      created_ms=1000, updated_ms=1000))


def progress(rank: int, it: int, *, loss=2.0, val=0.0, window=(2, 1.0, 0.2, 4096),
             tokens=100) -> RankProgress:
    n, s, x, b = window
    return RankProgress(rank=rank, worker_id=f"worker-{rank + 1}", iteration=it, train_loss=loss,
                        val_loss=val, tokens_per_second=50.0, trained_tokens=tokens,
                        peak_memory_gb=1.5, world_size=2, window_iterations=n, window_seconds=s,
                        window_exchange_seconds=x, window_exchange_bytes=b)


def feed_job(store: JobStore, job_id: str = "demo-1") -> None:
    """A two-rank job: two report windows, a validation, a restart, one more window and a
    checkpoint (as the scheduler would record them)."""
    put_job(store, job_id)
    add = store.add_event
    add(job_id, 1000, EventKind.STATE, state=JobState.QUEUED)
    add(job_id, 1100, EventKind.STATE, state=JobState.PLACING, message="starting 2 ranks")
    add(job_id, 1200, EventKind.STATE, state=JobState.RUNNING)
    # Rank 1 waited 0.3 s per iteration longer in the exchange than rank 0 in the 1st window.
    add(job_id, 2000, EventKind.PROGRESS, progress=progress(0, 2, window=(2, 2.0, 0.2, 4096)))
    add(job_id, 2000, EventKind.PROGRESS, progress=progress(1, 2, window=(2, 2.0, 0.8, 4096)))
    add(job_id, 2500, EventKind.PROGRESS,
        progress=progress(0, 2, val=3.0, window=(0, 0, 0, 0)))  # a validation's report
    add(job_id, 3000, EventKind.PROGRESS, progress=progress(0, 4, loss=1.5, tokens=200))
    add(job_id, 3000, EventKind.PROGRESS, progress=progress(1, 4, loss=1.5, tokens=200))
    add(job_id, 3100, EventKind.STATE, state=JobState.RESTARTING, message="rank 1 lost")
    add(job_id, 3200, EventKind.STATE, state=JobState.PLACING)
    add(job_id, 3300, EventKind.STATE, state=JobState.RUNNING)
    add(job_id, 4000, EventKind.PROGRESS, progress=progress(0, 4, loss=1.4, tokens=180))


# --- pure parts ----------------------------------------------------------------------------------

def test_the_step_time_split_charges_waiting_to_all_but_the_last_rank_in():
    split = split_step_time({0: (2, 2.0, 0.2), 1: (2, 2.0, 0.8), 2: (0, 0.0, 0.0)})
    assert split[0] == pytest.approx({"compute": 0.9, "exchange": 0.1, "wait": 0.0})
    assert split[1] == pytest.approx({"compute": 0.6, "exchange": 0.1, "wait": 0.3})
    assert 2 not in split  # a report without a window (a validation) has no timing
    assert split_step_time({}) == {}


def test_who_may_do_what():
    off_loopback = WebAuth(SECRET, anonymous_read=False)
    on_loopback = WebAuth(SECRET, anonymous_read=True)
    bearer = f"Bearer {TOKEN}"
    assert off_loopback.access(None, None) is Access.NONE
    assert on_loopback.access(None, None) is Access.READ
    assert on_loopback.access(bearer, None) is Access.FULL
    # A wrong token is refused even where anonymous reading is allowed.
    assert on_loopback.access("Bearer herd-wrong", None) is Access.NONE
    assert on_loopback.access(f"Basic {TOKEN}", None) is Access.NONE
    cookie = off_loopback.new_session()
    assert TOKEN not in cookie and SECRET not in cookie
    assert off_loopback.access(None, cookie) is Access.READ
    expiry, mac = cookie.split(".")
    assert off_loopback.access(None, f"{int(expiry) + 999}.{mac}") is Access.NONE  # forged
    assert off_loopback.access(None, off_loopback.new_session(now=0)) is Access.NONE  # expired
    assert WebAuth("another-secret-" + "y" * 30, False).access(None, cookie) is Access.NONE
    assert api_token(SECRET) != api_token(SECRET + "x") and SECRET not in TOKEN


def test_the_read_token_reads_and_a_rotation_ends_tokens_and_sessions(tmp_path):
    from herd.rpc import api_token as tokens

    generation = tokens.generation(tmp_path)
    auth = WebAuth(SECRET, anonymous_read=False, generation=lambda: tokens.generation(tmp_path))
    read = api_token(SECRET, read_only=True)
    assert read.startswith("herd-read-") and read != TOKEN and generation == 0
    assert auth.access(f"Bearer {read}", None) is Access.READ
    assert auth.access(f"Bearer {TOKEN}", None) is Access.FULL
    session = auth.new_session()
    assert auth.access(None, session) is Access.READ
    assert tokens.rotate(tmp_path) == 1
    for old in (TOKEN, read):
        assert auth.access(f"Bearer {old}", None) is Access.NONE
    assert auth.access(None, session) is Access.NONE  # a rotation ends every session
    assert auth.access(f"Bearer {api_token(SECRET, 1)}", None) is Access.FULL
    assert auth.access(f"Bearer {api_token(SECRET, 1, read_only=True)}", None) is Access.READ
    (tmp_path / tokens.GENERATION_FILE).write_text("garbage\n")
    with pytest.raises(ConfigError, match="holds no number"):
        auth.access(f"Bearer {TOKEN}", None)
    assert tokens.rotate(tmp_path) > 1  # (past any generation a token was printed for)


def test_the_hub_counts_each_window_once_and_a_restarted_coordinator_counts_the_same(tmp_path):
    store = JobStore(tmp_path / "herd.db")
    feed_job(store)
    hub = MetricsHub(store, lambda s: None)
    assert hub.poll() == 12
    view = {v.job_id: v for v in hub.views()}["demo-1"]
    assert view.restarts == 1 and view.state == "running"
    assert view.iterations_done == 4  # iteration 4 redone after the restart counts once
    assert view.tokens_done == 200
    rank0 = view.rank_counters[(0, "worker-1")]
    # Windows: (2, 2.0, 0.2), (2, 1.0, 0.2) and after the restart (2, 1.0, 0.2); the validation's
    # report carries none.
    assert rank0.step_seconds == pytest.approx(4.0)
    assert rank0.exchange_seconds == pytest.approx(0.6)
    assert rank0.exchange_bytes == 3 * 4096
    detail = hub.job("demo-1")
    assert [p["val"] for p in detail["points"] if p["val"] is not None] == [3.0]
    assert detail["timing"][0] == pytest.approx(
        {"it": 2, "compute": 0.75, "exchange": 0.1, "wait": 0.15})
    assert any("restarting: rank 1 lost" in line["message"] for line in detail["log"])
    again = MetricsHub(store, lambda s: None)
    again.poll()
    assert again.job("demo-1") == detail
    store.close()


def test_the_hub_follows_the_jobs_submitted_after_a_removed_one(tmp_path):
    """`herd rm` of the newest job deleted the last event rows; SQLite gave their rowids to the
    next job's events, below the cursor the hub had passed, and the dashboard and /metrics never
    saw that job (an outside run). The cursor never goes back now."""
    store = JobStore(tmp_path / "herd.db")
    hub = MetricsHub(store, lambda s: None)
    feed_job(store, "old-1")
    hub.poll()
    store.delete_job("old-1")
    hub.forget("old-1")
    feed_job(store, "new-1")
    hub.poll()
    assert hub.job("new-1")["iteration"] == 4
    assert [c for c, _ in store.events_after(0)] == list(range(13, 25))  # (never reused)
    # A batch the hub read before the removal, applied after it: no ghost job (name "", state
    # queued) on the dashboard until a restart (a review).
    for event in [e for _, e in store.events_after(12) if e.job_id == "new-1"]:
        hub.forget("new-1")
        hub._apply(event)
    assert "new-1" not in [j["id"] for j in hub.jobs()]
    store.close()


def test_an_older_database_keeps_its_events_and_their_order_through_the_migration(tmp_path):
    """A state folder of the last release (events keyed by rowid) opened by this one: the events
    keep their content, order and cursors, and a removal no longer lets a cursor be reused."""
    import sqlite3

    from coordinator.store import _MIGRATIONS

    path = tmp_path / "herd.db"
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("CREATE TABLE migrations (version INTEGER PRIMARY KEY)")
    for version, sql in enumerate(_MIGRATIONS[:5], start=1):  # (the events' cursor is the 6th)
        db.executescript(f"BEGIN; {sql}; INSERT INTO migrations VALUES ({version}); COMMIT;")
    db.execute("INSERT INTO attempts VALUES ('a-1', 1, '[\"w1\"]', 10, NULL, NULL)")
    for seq in range(1, 6):  # as the last release wrote them; the first two removed since
        db.execute("INSERT INTO events VALUES (?,?,?,?,?,?,?,?,?)",
                   ("a-1" if seq > 2 else "gone-1", seq, 1000 * seq, "log", None,
                    f"line {seq}", None, 0, None))
    db.execute("DELETE FROM events WHERE job_id='gone-1'")
    db.close()
    store = JobStore(path)
    assert store.schema_version() == len(_MIGRATIONS)
    assert [(c, e.job_id, e.seq, e.message) for c, e in store.events_after(0)] == [
        (3, "a-1", 3, "line 3"), (4, "a-1", 4, "line 4"), (5, "a-1", 5, "line 5")]
    # An attempt of before its layout was recorded: 0 stages, read as unknown (blob_access).
    assert [(a.attempt, a.stages) for a in store.attempt_history("a-1")] == [(1, 0)]
    store.delete_job("a-1")
    store.add_event("b-1", 9000, EventKind.LOG, message="next")
    assert [c for c, _ in store.events_after(0)] == [6]  # (the rowid of old would be 1)
    assert [e.seq for e in store.events("b-1")] == [1]
    store.close()


def test_metrics_parse_with_the_prometheus_parser_and_carry_grafana_labels(tmp_path):
    store = JobStore(tmp_path / "herd.db")
    feed_job(store)
    hub = MetricsHub(store, lambda s: None)
    hub.poll()
    text = render(metrics_registry(hub, lambda: [WORKER])).decode()
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(text) for s in family.samples}
    job = (("job_id", "demo-1"), ("job_name", "demo"))
    assert samples[("herd_job_iterations_total", job)] == 4
    assert samples[("herd_job_tokens_total", job)] == 200
    assert samples[("herd_job_restarts_total", job)] == 1
    rank1 = job + (("rank", "1"), ("worker_id", "worker-2"))
    assert samples[("herd_rank_exchange_seconds_total", tuple(sorted(rank1)))] == pytest.approx(
        0.8 + 0.2)
    assert samples[("herd_worker_memory_used_bytes", (("worker_id", "worker-1"),))] == 16 << 30
    assert samples[("herd_queue_length", ())] == 0
    # The job's rate once (each rank measures the whole job's: a sum of theirs double-counts)
    rates = {k: v for k, v in samples.items() if k[0] == "herd_rank_tokens_per_second"}
    assert samples[("herd_job_tokens_per_second", job)] == rates[
        ("herd_rank_tokens_per_second", tuple(sorted(job + (("rank", "0"),
                                                            ("worker_id", "worker-1")))))]
    assert samples[("herd_coordinator_degraded", ())] == 0
    # A database it cannot write: a gauge to alert on (`herd jobs` and `herd status` say it too)
    text = render(metrics_registry(hub, lambda: [WORKER], lambda: "disk full")).decode()
    assert ("herd_coordinator_degraded", 1.0) in {
        (s.name, s.value) for f in text_string_to_metric_families(text) for s in f.samples}
    assert samples[("herd_job_state", tuple(sorted(job + (("state", "running"),))))] == 1
    store.close()


def test_a_worker_seen_before_and_gone_is_down_on_metrics_for_a_day(monkeypatch):
    """herd_worker_up: 1 while verified; 0 once gone (an alert names the Mac that left, where
    its other series just vanish); dropped a day later."""
    import dataclasses

    from coordinator.web import prometheus

    now = [1_000_000.0]
    monkeypatch.setattr(prometheus.time, "time", lambda: now[0])
    other = dataclasses.replace(WORKER, worker_id="worker-9")
    present = [WORKER, other]
    registry = metrics_registry(MetricsHub(None, lambda s: None), lambda: list(present))

    def up() -> dict[str, float]:
        return {s.labels["worker_id"]: s.value
                for f in text_string_to_metric_families(render(registry).decode())
                for s in f.samples if s.name == "herd_worker_up"}

    assert up() == {"worker-1": 1, "worker-9": 1}
    present.remove(other)
    now[0] += 60
    assert up() == {"worker-1": 1, "worker-9": 0}
    now[0] += prometheus.FINISHED_KEEP_S + 1
    assert up() == {"worker-1": 1}
    present.append(other)  # (back: up again)
    assert up() == {"worker-1": 1, "worker-9": 1}


def _alias_bomb() -> str:
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 9)]
    return "\n".join(lines) + "\n"


def test_the_dashboard_says_why_a_queued_job_waits(tmp_path):
    store = JobStore(tmp_path / "herd.db")
    put_job(store, "q-1")
    store.add_event("q-1", 1000, EventKind.STATE, state=JobState.QUEUED,
                    message="submitted by client/laptop")
    store.add_event("q-1", 1100, EventKind.LOG, message="waiting: needs 2 workers, 1 verified")
    hub = MetricsHub(store, lambda s: None)
    hub.poll()
    assert hub.job("q-1")["message"] == "waiting: needs 2 workers, 1 verified"
    store.add_event("q-1", 1200, EventKind.STATE, state=JobState.PLACING, message="starting")
    hub.poll()
    assert hub.job("q-1")["message"] == "starting"
    store.close()


def test_the_dashboard_and_the_job_api_show_the_fetch_phase(tmp_path):
    """While its workers fetch the model, the page said "placing" and nothing more for minutes,
    and the job API's fetch events had no message (an outside run)."""
    from coordinator.domain import FetchProgress
    from coordinator.web.openai_shape import event_object

    store = JobStore(tmp_path / "herd.db")
    put_job(store, "f-1")
    store.add_event("f-1", 1000, EventKind.STATE, state=JobState.PLACING, message="starting")
    for rank, got in ((0, 200_000_000), (1, 100_000_000)):
        store.add_event("f-1", 1100, EventKind.FETCH, fetch=FetchProgress(
            rank=rank, worker_id=f"w{rank + 1}", source="store", files=3,
            bytes_needed=400_000_000, bytes_received=got, bytes_per_second=50_000_000))
    hub = MetricsHub(store, lambda s: None)
    hub.poll()
    assert hub.job("f-1")["message"] == (
        "fetching the model: 0/2 workers done, 300.0 MB of 800.0 MB at 100.0 MB/s")
    event = event_object(store.events("f-1")[-1], 10)
    assert event["message"] == ("fetch rank 1 (w2) from store: 3 files, 400000000 bytes needed, "
                                "0 cached, 100000000 received at 50.0 MB/s")
    assert event["data"]["bytes_received"] == 100_000_000
    store.add_event("f-1", 1200, EventKind.STATE, state=JobState.RUNNING)
    hub.poll()
    assert hub.job("f-1")["message"] == ""
    store.close()


def test_a_validation_event_says_its_validation_loss_and_no_training_loss_of_its_own():
    """A validation's report carries the last window's training loss: the job API said step 50
    twice with two training losses (an outside run)."""
    from coordinator.domain import JobEvent
    from coordinator.web.openai_shape import event_object

    def said(p):
        return event_object(JobEvent("j", 1, 1000, EventKind.PROGRESS, progress=p), 100)

    val = said(progress(0, 50, loss=1.25, val=3.0))
    assert val["message"] == "Step 50/100: validation loss=3.0000 (rank 0)"
    assert (val["data"]["train_loss"], val["data"]["valid_loss"]) == (None, 3.0)
    train = said(progress(0, 50, loss=1.5))
    assert train["message"] == "Step 50/100: training loss=1.5000 (rank 0)"
    assert (train["data"]["train_loss"], train["data"]["valid_loss"]) == (1.5, None)


def test_an_openai_create_request_becomes_a_herd_config():
    """(Its config text is read as a job file is: bounded, duplicate keys refused.)"""
    sha = "ab" * 32
    body = {"model": "/models/tiny", "training_file": f"file-{sha}", "suffix": "mine",
            "validation_file": f"file-{'cd' * 32}", "seed": 3,
            "hyperparameters": {"n_epochs": 2, "batch_size": 8},
            "config": "learning_rate: 0.0002\nlora_parameters: {rank: 4}\n",
            "cluster": {"workers": 2}}
    name, text, dataset = openai_shape.job_request(body, lambda s: 100 if s == sha else 0)
    cfg = parse_config(__import__("yaml").safe_load(text))
    assert name == "mine"
    # two mlx-lm epochs of 100 // 8 = 12 batches (the partial thirteenth is dropped, as there)
    assert (cfg.model, cfg.batch_size, cfg.iters, cfg.seed) == ("/models/tiny", 8, 24, 3)
    assert cfg.learning_rate == 2e-4 and cfg.lora_parameters.rank == 4
    assert cfg.cluster.workers == 2
    assert [(d.name, d.sha256) for d in dataset] == [("train.jsonl", sha),
                                                      ("valid.jsonl", "cd" * 32)]
    bad = [({**body, "hyperparameters": {"learning_rate_multiplier": 2}}, "learning_rate"),
           ({**body, "config": {"model": "/elsewhere"}}, "config.model"),
           ({**body, "training_file": "train.jsonl"}, "file id"),
           ({**body, "model": ""}, "model is required"),
           ({**body, "config": "seed: 1\nseed: 2\n"}, "given twice"),
           ({**body, "config": "seed: ["}, "not valid YAML"),
           ({**body, "config": "data: /etc\n"}, "config.data: the job API takes training_file"),
           ({**body, "config": _alias_bomb()}, "more than 100000 values"),
           # unknown fields are refused by name, as OpenAI refuses them (a typo was dropped and
           # the job ran on one worker with default hyperparameters: an outside run)
           ({**body, "clustr": {"workers": 2}}, "unknown field clustr \\(did you mean "
                                                 "'cluster'\\?\\)"),
           ({**body, "hyperparameters": {"n_epoch": 1}}, "unknown field hyperparameters.n_epoch"),
           ({**body, "method": {"supervised": {"hyperparameter": {}}}},
            "unknown field method.supervised.hyperparameter"),
           ([body], "the request body is not a JSON object")]
    for request, words in bad:
        with pytest.raises((ConfigError, DatasetError), match=words):
            openai_shape.job_request(request, lambda s: 100)


def test_a_job_echoes_the_epochs_it_was_created_with(tmp_path):
    """n_epochs 2 became iters 24 (100 examples, batch 8), and the job read back "auto" (an
    outside run): the whole epochs its iters make of its training file are echoed."""
    import dataclasses
    import hashlib
    import types

    from coordinator.artifacts import BlobStore
    from coordinator.domain import FileDigest, Job
    from coordinator.web.openai_api import JobApi

    blobs = BlobStore(tmp_path / "blobs")
    text = b'{"text": "an example"}\n' * 100
    sha = hashlib.sha256(text).hexdigest()
    blobs.put(sha, [text])
    store = JobStore(tmp_path / "herd.db")

    def no_summary(job_id):
        raise HerdError("not yet")

    api = JobApi(types.SimpleNamespace(blobs=blobs, store=store,
                                          hub=types.SimpleNamespace(job=no_summary)))
    job = Job("api-1", "api", parse_config({"model": "m", "batch_size": 8, "iters": 24}),
              [FileDigest("train.jsonl", sha, len(text))], 1, 24)
    store.put_job(job)
    assert api._job("api-1")["hyperparameters"]["n_epochs"] == 2
    store.put_job(dataclasses.replace(job, job_id="api-2", iters=25))
    assert api._job("api-2")["hyperparameters"]["n_epochs"] == "auto"  # (not whole epochs)


def test_a_bad_upload_is_named_as_uploaded_not_as_mlx_lm_s_default_dataset(tmp_path):
    """A job API config has no `data`: its dataset problems name the upload, not the
    mlx-community/WikiSQL that mlx-lm's default would say (an outside run)."""
    import hashlib

    from coordinator.artifacts import BlobStore
    from coordinator.jobs import new_job
    from herd.digest import FileDigest

    blobs = BlobStore(tmp_path / "blobs")
    train = b'{"text": "a"}\n' * 4 + b'{"question": "b"}\n'
    sha = hashlib.sha256(train).hexdigest()
    blobs.put(sha, [train])
    with pytest.raises(DatasetError) as e:
        new_job("api", "model: /models/tiny\n", [FileDigest("train.jsonl", sha, len(train))],
                blobs)
    assert e.value.message.startswith("dataset uploaded with the job has 1 problem(s)")
    assert "WikiSQL" not in e.value.message and "(line 5)" in e.value.message


def test_report_files_hold_every_report_and_a_drawn_loss_curve(tmp_path):
    from PIL import Image

    store = JobStore(tmp_path / "herd.db")
    feed_job(store)
    records = metric_records(store.events("demo-1"), up_to_step=0)
    kinds = [r["event"] for r in records]
    # (rank 0's iteration 4, reported again after the restart over as many iterations: once)
    assert kinds.count("train") == 4 and kinds.count("val") == 1 and kinds.count("state") == 6
    assert [r["train_loss"] for r in records if r["event"] == "train"
            and (r["rank"], r["iteration"]) == (0, 4)] == [1.4]
    assert metric_records(store.events("demo-1"), up_to_step=2).count(records[3]) == 1
    # `herd pull --step 2`: what was recorded up to step 2, not the restart that came later
    upto2 = [r["event"] for r in metric_records(store.events("demo-1"), up_to_step=2)]
    assert upto2.count("state") == 3 and upto2.count("train") == 2, upto2
    assert all(r["iteration"] <= 2 for r in metric_records(store.events("demo-1"), 2)
               if "iteration" in r)
    png = loss_png(records, "demo-1")
    image = Image.open(io.BytesIO(png)).convert("L")
    assert image.size[0] > 300 and len(set(image.getdata())) > 10  # drawn, not blank
    store.close()


def test_a_resumed_attempt_s_short_first_window_does_not_replace_the_full_one(tmp_path):
    """Killed after reporting iteration 24 (checkpoint at 20), the job resumed and reported 21
    over one iteration, then 24 again: metrics.jsonl held both 21s and the curve a bump (an
    outside run). The full window stays; a redone one of as many iterations replaces it."""
    store = JobStore(tmp_path / "herd.db")
    put_job(store, "r-1")
    add = store.add_event
    for t, it, loss, n in ((1, 18, 3.1, 3), (2, 21, 3.04, 3), (3, 24, 2.9, 3),
                           (5, 21, 3.29, 1), (6, 24, 2.91, 3), (7, 27, 2.8, 3)):
        add("r-1", t * 1000, EventKind.PROGRESS, progress=progress(0, it, loss=loss,
                                                                   window=(n, 1.0, 0.1, 64)))
    train = [(r["iteration"], r["train_loss"]) for r in metric_records(store.events("r-1"), 0)
             if r["event"] == "train"]
    assert train == [(18, 3.1), (21, 3.04), (24, 2.91), (27, 2.8)]
    hub = MetricsHub(store, lambda timeout_s: None)  # the dashboard's chart: no bump either
    hub.poll()
    charted = [(p["it"], p["loss"]) for p in hub.job("r-1")["points"]]
    assert (21, 3.29) not in charted and (21, 3.04) in charted
    store.close()


def _tensorboard_scalars(folder) -> dict[str, list[tuple[int, float]]]:
    """Scalars from TensorBoard event files (TFRecord framing: length, crc, event, crc)."""
    from tensorboardX.proto.event_pb2 import Event

    out: dict[str, list] = {}
    for path in folder.rglob("events.out.tfevents.*"):
        data = path.read_bytes()
        while data:
            (n,) = struct.unpack("<Q", data[:8])
            event = Event.FromString(data[12:12 + n])
            data = data[12 + n + 4:]
            for v in event.summary.value:
                out.setdefault(v.tag, []).append((event.step, v.simple_value))
    return out


def test_the_tensorboard_writer_writes_each_jobs_scalars(tmp_path):
    from coordinator.web.tensorboard import TensorBoardWriter

    store = JobStore(tmp_path / "herd.db")
    feed_job(store)
    hub = MetricsHub(store, lambda s: None)
    writer = TensorBoardWriter(tmp_path / "tb")
    writer._since_ms = 0  # these stored events stand for live ones
    hub.subscribe(writer)
    hub.poll()
    writer.close()
    scalars = _tensorboard_scalars(tmp_path / "tb" / "demo-1")
    assert scalars["loss/train"] == [(2, 2.0), (4, 1.5)]  # each iteration once, not per rank
    assert scalars["loss/val"] == [(2, 3.0)]
    assert [s for s, _ in scalars["step_seconds/wait"]] == [2, 4]
    assert "tokens_per_second/rank1" in scalars
    store.close()


# --- the real server -----------------------------------------------------------------------------

@pytest.fixture
def server(tmp_path):
    """The HTTP side as bound to a LAN address without --dashboard-open (anonymous refused)."""
    store = JobStore(tmp_path / "herd.db")
    feed_job(store)
    scheduler = Scheduler(store, lambda: [WORKER], NoLauncher())
    hub = MetricsHub(store, scheduler.wait_for_events)
    hub.poll()
    ctx = WebContext(store, scheduler, hub, lambda: [WORKER], BlobStore(tmp_path / "blobs"),
                     AdapterStore(tmp_path / "adapters"), WebAuth(SECRET, anonymous_read=False))
    web = WebServer(ctx, "127.0.0.1", 0)
    web.start()
    yield web
    web.stop()
    store.close()


def test_anonymous_and_wrong_tokens_read_nothing_and_the_page_holds_no_secret(server):
    with httpx.Client(base_url=server.url, timeout=10) as http:
        for path in ("/api/cluster", "/api/jobs/demo-1", "/metrics", "/v1/fine_tuning/jobs",
                     "/api/jobs/demo-1/checkpoints/4/adapter.tar.gz", "/api/stream"):
            assert http.get(path).status_code == 401, path
            r = http.get(path, headers={"Authorization": "Bearer herd-not-the-token"})
            assert r.status_code == 401, path
            assert r.json()["error"]["code"] == "invalid_api_key"
        assert http.post("/v1/fine_tuning/jobs", json={}).status_code == 401
        for page in ("/", "/static/app.js", "/static/vendor/uPlot.iife.min.js"):
            r = http.get(page)
            assert r.status_code == 200, page
            assert TOKEN not in r.text and SECRET not in r.text


def test_the_login_cookie_reads_the_dashboard_but_never_writes(server):
    with httpx.Client(base_url=server.url, timeout=10) as http:
        assert http.post("/login", data={"token": "herd-wrong"}).status_code == 401
        assert COOKIE not in http.cookies
        r = http.post("/login", data={"token": TOKEN})
        assert r.status_code == 200
        header = r.headers["set-cookie"]
        assert "HttpOnly" in header and "SameSite=Strict" in header and TOKEN not in header
        cluster = http.get("/api/cluster").json()
        assert [w["id"] for w in cluster["workers"]] == ["worker-1"]
        assert cluster["health"] == ""  # (a degraded coordinator's reason: the page shows it)
        assert cluster["jobs"][0]["id"] == "demo-1" and cluster["jobs"][0]["restarts"] == 1
        assert http.get("/metrics").status_code == 200
        # The cookie never creates or cancels: a page on another site could make a browser
        # send it.
        assert http.post("/v1/fine_tuning/jobs/demo-1/cancel").status_code == 401
        assert http.get("/v1/fine_tuning/jobs").status_code == 401


def test_the_bearer_token_opens_the_job_api_and_bad_requests_say_why(server):
    auth = {"Authorization": f"Bearer {TOKEN}"}
    with httpx.Client(base_url=server.url, timeout=10, headers=auth) as http:
        jobs = http.get("/v1/fine_tuning/jobs").json()
        assert jobs["object"] == "list" and jobs["data"][0]["id"] == "demo-1"
        assert jobs["data"][0]["status"] == "running" and jobs["data"][0]["herd"]["restarts"] == 1
        events = http.get("/v1/fine_tuning/jobs/demo-1/events", params={"limit": 3}).json()
        assert len(events["data"]) == 3 and events["has_more"]
        assert events["data"][0]["type"] == "metrics"  # newest first
        older = http.get("/v1/fine_tuning/jobs/demo-1/events",
                         params={"after": events["data"][-1]["id"], "limit": 100}).json()
        assert len(older["data"]) == 12 - 3 and not older["has_more"]
        r = http.post("/v1/fine_tuning/jobs", json={"model": "/m", "training_file": "x.jsonl"})
        assert r.status_code == 400 and "file id" in r.json()["error"]["message"]
        r = http.post("/v1/files", files={"file": ("t.jsonl", b'{"text": "a"}\nnot json\n')},
                      data={"purpose": "fine-tune"})
        assert r.status_code == 400 and "line 2" in r.json()["error"]["message"]
        assert http.get("/v1/fine_tuning/jobs/nope").status_code == 404


def test_the_sample_grafana_board_queries_only_metrics_herd_exports(tmp_path):
    """deploy/grafana/herd-dashboard.json stays in step with /metrics (no relabelling needed)."""
    import re
    from pathlib import Path

    board = json.loads((Path(__file__).parent.parent / "deploy" / "grafana" /
                        "herd-dashboard.json").read_text())
    queried = {name for p in board["panels"] for t in p["targets"]
               for name in re.findall(r"herd_[a-z_]+", t["expr"])}
    store = JobStore(tmp_path / "herd.db")
    feed_job(store)
    store.add_event("demo-1", 5000, EventKind.PROGRESS,
                    progress=progress(0, 4, val=2.5, window=(0, 0, 0, 0)))
    hub = MetricsHub(store, lambda s: None)
    hub.poll()
    text = render(metrics_registry(hub, lambda: [WORKER])).decode()
    exported = {s.name for f in text_string_to_metric_families(text) for s in f.samples}
    assert queried and queried <= exported, queried - exported
    store.close()


def test_an_uploaded_file_with_old_mac_line_ends_is_read_as_herd_check_reads_it(tmp_path):
    """The job API's upload check split lines on \\n alone, so a file of lone \\r line ends,
    which mlx-lm trains on and `herd check` takes, was one bad line there (a review)."""
    from coordinator.web.openai_api import _check_jsonl

    f = tmp_path / "train.jsonl"
    f.write_bytes(b'{"text": "a"}\r{"text": "b"}\r\n{"text": "c"}\r')
    assert _check_jsonl(str(f)) == 3
    f.write_bytes(b'{"text": "a"}\r{"text": \r')
    with pytest.raises(DatasetError, match="line 2 is not a JSON object"):
        _check_jsonl(str(f))
