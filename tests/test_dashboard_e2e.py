"""See the cluster, end to end: `herd up --workers 2` with its HTTP side, a real headless Chromium
(Debian's, driven by Playwright) on the dashboard, Prometheus's own parser on /metrics, and the
official `openai` client on the job API.

One cluster and one browser for the module. The first job is watched by the browser and scraped
every second while it runs (``live``); the tests after it assert on what was seen.
"""

from __future__ import annotations

import io
import json
import sys
import tarfile
import threading
import time
from pathlib import Path

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import free_ports, up_worker_ids, write_job
from tests.test_service_e2e import HOST, Cluster

pytestmark = pytest.mark.slow
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run"]
# Long enough (several seconds of training even on a fast, quiet machine) for the page, which
# redraws at most once a second, and the once-a-second scraper to see the job mid-run.
ITERS, REPORT, SAVE = 240, 4, 40


class WebCluster(Cluster):
    def __init__(self, root: Path):
        super().__init__(root)
        self.http_port = free_ports(1)[0]
        self.url = f"http://{HOST}:{self.http_port}"

    def start(self) -> None:
        import subprocess

        self.up = subprocess.Popen(
            [sys.executable, "-m", "herd", "up", "--workers", "2", "--port", str(self.port),
             "--http-port", str(self.http_port), "--state-dir", str(self.state)],
            env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = WebCluster(tmp_path_factory.mktemp("dashboard"))
    c.herd("init")
    c.start()
    c.wait_workers(2)
    yield c
    c.stop()


@pytest.fixture(scope="module")
def token(cluster) -> str:
    return cluster.herd("api-token", coordinator=False).stdout.strip()


@pytest.fixture(scope="module")
def read_token(cluster) -> str:
    return cluster.herd("api-token", "--read-only", coordinator=False).stdout.strip()


@pytest.fixture(scope="module")
def job_yaml(tmp_path_factory, tiny_model, tiny_data):
    d = tmp_path_factory.mktemp("jobs")
    return lambda name, **kw: write_job(d / f"{name}.yaml", tiny_model, tiny_data, **kw)


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        pytest.skip(f"no {CHROMIUM}: `make setup` installs Debian's chromium")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        yield b
        b.close()


# What the page shows, recorded by the page itself on every change to the jobs table.
RECORDER = """() => {
  window.__seen = [];
  const record = () => {
    for (const r of document.querySelectorAll('#jobs tr[data-job]')) {
      window.__seen.push({job: r.dataset.job, it: Number(r.dataset.iteration),
        state: r.querySelector('.state').textContent,
        points: Number(document.querySelector('#chart-loss').dataset.points || 0)});
    }
  };
  new MutationObserver(record).observe(document.querySelector('#jobs tbody'),
                                       {childList: true, subtree: true});
}"""


def _scrape(url: str, token: str, stop: threading.Event, out: list[str]) -> None:
    """/metrics once a second, as a Prometheus server would (with the read token)."""
    with httpx.Client(timeout=10, headers={"Authorization": f"Bearer {token}"}) as http:
        while not stop.wait(1.0):
            out.append(http.get(f"{url}/metrics").text)


@pytest.fixture(scope="module")
def live(cluster, read_token, browser, job_yaml, tmp_path_factory):
    """A 2-worker job run while the dashboard is open and /metrics is scraped every second."""
    page = browser.new_page(viewport={"width": 1300, "height": 1500})
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(cluster.url + "/")
    page.wait_for_selector(f"#workers tr[data-worker='{up_worker_ids(cluster.home, 2)[1]}']",
                           timeout=60_000)
    loaded_at = page.evaluate("window.__herdLoadedAt")
    page.evaluate(RECORDER)
    scrapes: list[str] = []
    stop = threading.Event()
    scraper = threading.Thread(target=_scrape, args=(cluster.url, read_token, stop, scrapes))
    scraper.start()
    cfg = job_yaml("live", iters=ITERS, steps_per_report=REPORT, steps_per_eval=SAVE,
                   save_every=SAVE, cluster={"workers": 2})
    job_id = cluster.herd("submit", str(cfg)).stdout.strip().splitlines()[-1]
    try:
        page.wait_for_function(
            "id => [...document.querySelectorAll('#jobs tr[data-job]')].some(r => "
            "r.dataset.job === id && r.querySelector('.state').textContent === 'succeeded')",
            arg=job_id, timeout=240_000)
        page.wait_for_timeout(500)
    finally:
        stop.set()
        scraper.join()
    shot = tmp_path_factory.mktemp("screens") / "dashboard.png"
    page.screenshot(path=str(shot), full_page=True)
    result = {"job_id": job_id, "seen": page.evaluate("window.__seen"), "shot": shot,
              "loaded_at": loaded_at, "now_loaded_at": page.evaluate("window.__herdLoadedAt"),
              "workers": page.eval_on_selector_all("#workers tr[data-worker]",
                                                   "rows => rows.map(r => r.dataset.worker)"),
              "points": int(page.get_attribute("#chart-loss", "data-points")),
              "canvas": page.locator("#chart-loss canvas").count(), "scrapes": scrapes,
              "errors": errors, "url": page.url, "html": page.content(),
              "ids": up_worker_ids(cluster.home, 2)}
    page.close()
    return result


def test_the_dashboard_shows_workers_progress_and_a_live_loss_chart(live):
    assert live["errors"] == []
    assert live["workers"] == live["ids"]
    seen = [s for s in live["seen"] if s["job"] == live["job_id"]]
    running = [s for s in seen if s["state"] == "running"]
    progress = sorted({s["it"] for s in running})
    # The page was open before the job began and showed its progress move, without a reload.
    assert len(progress) >= 2 and progress[-1] > progress[0], progress
    assert live["now_loaded_at"] == live["loaded_at"]
    assert max(s["points"] for s in running) >= 2
    assert [s["it"] for s in seen if s["state"] == "succeeded"][-1] == ITERS
    assert live["points"] == ITERS // REPORT and live["canvas"] == 1
    from PIL import Image

    image = Image.open(live["shot"]).convert("RGB")
    assert image.size[0] >= 1000 and image.size[1] >= 800
    colours = image.getcolors(maxcolors=1 << 20)
    assert colours is not None and len(colours) > 50, "the screenshot is blank"


def _samples(text: str, job_id: str) -> dict[str, float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.labels.get("job_id") == job_id and "rank" not in s.labels:
                out[s.name] = s.value
            elif s.labels.get("job_id") == job_id:
                out[f"{s.name}:{s.labels['rank']}"] = s.value
            elif s.name == "herd_worker_info":
                out[f"{s.name}:{s.labels['worker_id']}"] = s.value
    return out


def test_metrics_parse_and_their_counters_move_while_the_job_runs(live):
    job_id = live["job_id"]
    scrapes = [_samples(text, job_id) for text in live["scrapes"]]  # each one parses
    assert len(scrapes) >= 3
    iterations = [s["herd_job_iterations_total"] for s in scrapes
                  if "herd_job_iterations_total" in s]
    tokens = [s["herd_job_tokens_total"] for s in scrapes if "herd_job_tokens_total" in s]
    assert iterations == sorted(iterations) and tokens == sorted(tokens)  # counters never fall
    assert len({i for i in iterations if 0 < i < ITERS}) >= 1, iterations  # seen mid-run
    assert iterations[-1] == ITERS and tokens[-1] > tokens[0] >= 0
    last = scrapes[-1]
    w1, w2 = live["ids"]
    assert last[f"herd_worker_info:{w1}"] == last[f"herd_worker_info:{w2}"] == 1
    for rank in (0, 1):
        assert last[f"herd_rank_exchange_bytes_total:{rank}"] > 0
        assert 0 < last[f"herd_rank_exchange_seconds_total:{rank}"] < \
            last[f"herd_rank_step_seconds_total:{rank}"]
    assert last["herd_job_checkpoints_total"] == ITERS // SAVE


def test_a_pulled_adapter_holds_metrics_jsonl_and_a_loss_png(cluster, live, tmp_path):
    from PIL import Image

    out = tmp_path / "pulled"
    cluster.herd("pull", live["job_id"], "-o", str(out))
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["event"] == "train"]
    assert {r["rank"] for r in train} == {0, 1}
    assert max(r["iteration"] for r in train) == ITERS
    assert any(r["event"] == "val" for r in records)
    png = (out / "loss.png").read_bytes()
    image = Image.open(io.BytesIO(png)).convert("L")
    assert len(set(image.getdata())) > 10, "the loss curve is blank"
    # The dashboard's download link gives the same folder, as a .tar.gz.
    r = httpx.get(f"{cluster.url}/api/jobs/{live['job_id']}/checkpoints/{ITERS}/adapter.tar.gz",
                  timeout=30)
    assert r.status_code == 200
    with tarfile.open(fileobj=io.BytesIO(r.content)) as tar:
        names = {Path(n).name for n in tar.getnames()}
        dated = {m.mtime for m in tar.getmembers()}
    assert {"adapters.safetensors", "adapter_config.json", "metrics.jsonl", "loss.png"} <= names
    assert min(dated) > time.time() - 3600  # the checkpoint's time (it was 1970)


def test_no_secret_in_a_page_a_url_or_a_log(cluster, live, token):
    # The cluster CA's key (the token is derived from it): a line of its base64 body.
    secret = (cluster.home / "tls" / "ca.key").read_text().splitlines()[1]
    assert token not in live["url"] and token not in live["html"]
    assert secret not in live["html"]
    logs = [p for p in cluster.state.rglob("*") if p.is_file() and p.suffix in (".log", ".jsonl")]
    assert logs
    for path in logs:
        text = path.read_text(errors="replace")
        assert token not in text and secret not in text, path


def test_the_openai_client_creates_watches_and_cancels_jobs(cluster, token, job_yaml, tiny_data):
    import openai

    client = openai.OpenAI(base_url=cluster.url + "/v1", api_key=token, max_retries=0)
    train = client.files.create(file=open(tiny_data / "train.jsonl", "rb"), purpose="fine-tune")
    valid = client.files.create(file=open(tiny_data / "valid.jsonl", "rb"), purpose="fine-tune")
    config = yaml.safe_load(job_yaml("api", iters=12, steps_per_report=2, save_every=6,
                                     steps_per_eval=1000).read_text())
    model = config.pop("model")
    for key in ("data", "adapter_path"):
        config.pop(key)
    job = client.fine_tuning.jobs.create(
        model=model, training_file=train.id, validation_file=valid.id, suffix="api",
        extra_body={"config": yaml.safe_dump(config), "cluster": {"workers": 2}})
    assert job.status == "queued" and job.model_extra["cluster"]["workers"] == 2
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        events = list(client.fine_tuning.jobs.list_events(job.id, limit=20))
        if any(e.message.startswith(("job succeeded", "job failed")) for e in events):
            break
        time.sleep(1)
    assert events[0].message == "job succeeded", [e.message for e in events[:5]]
    steps = [e.data["step"] for e in events if e.type == "metrics"]
    assert max(steps) == 12 and len(set(steps)) >= 2
    done = client.fine_tuning.jobs.retrieve(job.id)
    assert done.status == "succeeded" and done.trained_tokens > 0 and done.fine_tuned_model
    checkpoints = client.fine_tuning.jobs.checkpoints.list(job.id).data
    assert [c.step_number for c in checkpoints] == [12, 6]
    assert checkpoints[0].metrics.train_loss > 0
    assert job.id in [j.id for j in client.fine_tuning.jobs.list().data]

    # A long second job, cancelled while its ranks train.
    long = client.fine_tuning.jobs.create(
        model=model, training_file=train.id, suffix="long",
        extra_body={"config": {**config, "iters": 100_000}, "cluster": {"workers": 2}})
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        if any(e.type == "metrics" for e in client.fine_tuning.jobs.list_events(long.id).data):
            break
        time.sleep(1)
    cancelled = client.fine_tuning.jobs.cancel(long.id)
    assert cancelled.status == "cancelled"
    assert client.fine_tuning.jobs.retrieve(long.id).status == "cancelled"
    deadline = time.monotonic() + 60
    while any(long.id in row for row in cluster.workers()) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not any(long.id in row for row in cluster.workers()), "a rank still runs"

    # Anonymous and wrong-token callers get 401, on the job API even on loopback.
    for headers in ({}, {"Authorization": "Bearer herd-wrong"}):
        r = httpx.get(cluster.url + "/v1/fine_tuning/jobs", headers=headers, timeout=10)
        assert r.status_code == 401
        r = httpx.post(cluster.url + "/v1/fine_tuning/jobs", json={}, headers=headers, timeout=10)
        assert r.status_code == 401
    wrong = openai.OpenAI(base_url=cluster.url + "/v1", api_key="herd-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.fine_tuning.jobs.list()



def test_the_read_token_only_reads_and_a_rotation_ends_the_old_tokens(cluster, token, read_token):
    """The read token (a Prometheus server's) reads /metrics and the dashboard's data, and is
    refused the job API with 403 naming the full token; `herd api-token --rotate` makes the
    running coordinator refuse both old tokens at once (sessions: test_web_units)."""
    def get(path: str, tok: str | None = None, **kw) -> httpx.Response:
        headers = {"Authorization": f"Bearer {tok}"} if tok else {}
        return httpx.get(cluster.url + path, headers=headers, timeout=10, **kw)

    assert token != read_token and read_token.startswith("herd-read-")
    assert get("/metrics", read_token).status_code == 200
    assert get("/api/cluster", read_token).status_code == 200
    for r in (get("/v1/fine_tuning/jobs", read_token),
              httpx.post(cluster.url + "/v1/fine_tuning/jobs", json={}, timeout=10,
                         headers={"Authorization": f"Bearer {read_token}"})):
        assert r.status_code == 403 and "full token" in r.json()["error"]["message"], r.text
    assert get("/v1/fine_tuning/jobs", token).status_code == 200
    login = httpx.post(cluster.url + "/login", data={"token": read_token}, timeout=10)
    assert login.status_code == 200  # (a session of the read token: reading, as any session)

    # A dashboard stream already open, with the read token: it ends at the rotation too (open
    # streams went on for ever: an outside run).
    ended = threading.Event()
    opened = threading.Event()

    def follow() -> None:
        with httpx.stream("GET", cluster.url + "/api/stream", timeout=60,
                          headers={"Authorization": f"Bearer {read_token}"}) as r:
            assert r.status_code == 200
            for _ in r.iter_bytes():
                opened.set()
        ended.set()

    threading.Thread(target=follow, daemon=True).start()
    assert opened.wait(30) and not ended.wait(3)  # it streams, and goes on
    generation = cluster.home / "tls" / "api-token.generation"
    try:
        rotated = cluster.herd("api-token", "--rotate", coordinator=False)
        assert ended.wait(15), "a stream opened with the old token outlived the rotation"
        new = rotated.stdout.strip()
        assert "refuses the old ones" in rotated.stderr and new not in (token, read_token)
        for old in (token, read_token):
            assert get("/metrics", old).status_code == 401
            assert get("/v1/fine_tuning/jobs", old).status_code == 401
        assert get("/v1/fine_tuning/jobs", new).status_code == 200
        new_read = cluster.herd("api-token", "--read-only", coordinator=False).stdout.strip()
        assert get("/metrics", new_read).status_code == 200
    finally:  # (the module's other tests hold the first tokens)
        generation.unlink(missing_ok=True)
    assert get("/v1/fine_tuning/jobs", token).status_code == 200
