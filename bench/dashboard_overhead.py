"""Does watching cost training speed? A 2-worker job's tok/s with the dashboard open in a browser
and /metrics scraped every second, against the same job with nobody watching (goal >= 0.99).

Run by hand (not a test):  uv run python bench/dashboard_overhead.py [--rounds 3] [--iters 60]
Writes bench/results/dashboard-overhead-<date>.md with the machine noted.

One `herd up --workers 2` cluster on loopback runs every job; the modes take turns, in an order
that turns each round, so a drift in the machine's load falls on all. "watched" is the real thing:
Debian's Chromium (headless, Playwright) on the dashboard, which follows the running job and
redraws its charts as reports come, and a scraper that GETs /metrics once a second with the token.
"served" is the same server work without a browser on the box (a client reads the job's event
stream): on a real cluster the browser runs on a laptop, not on the Macs that train.
tok/s per job = tokens / seconds over its rank-0 report windows, the first (warm-up) left out, read
from the metrics.jsonl that `herd pull` brings with the adapter.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.train_throughput import job, long_text_data, machine  # noqa: E402
from herd.cli.tiny import make_tiny_model  # noqa: E402
from herd.rpc.ports import free_ports  # noqa: E402

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run"]


class Cluster:
    def __init__(self, root: Path):
        self.root = root
        self.port, self.http_port = free_ports(2)
        self.url = f"http://127.0.0.1:{self.http_port}"
        self.env = {**os.environ, "HERD_HOME": str(root / "home"), "HERD_LOG_LEVEL": "warning",
                    "HERD_ZEROCONF_INTERFACES": "127.0.0.1"}
        for k in ("HERD_SECRET", "HERD_COORDINATOR"):
            self.env.pop(k, None)

    def herd(self, *args: str, check: bool = True) -> str:
        argv = [sys.executable, "-m", "herd", *args]
        if args[0] not in ("init", "api-token"):
            argv += ["--coordinator", f"127.0.0.1:{self.port}"]
        out = subprocess.run(argv, env=self.env, capture_output=True, text=True, timeout=900)
        if out.returncode and check:
            raise RuntimeError(f"herd {' '.join(args)}: {out.stderr[-2000:]}")
        return out.stdout

    def __enter__(self) -> Cluster:
        self.herd("init")
        self.up = subprocess.Popen(
            [sys.executable, "-m", "herd", "up", "--workers", "2", "--port", str(self.port),
             "--http-port", str(self.http_port), "--state-dir", str(self.root / "cluster")],
            env=self.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if len(self.herd("workers", check=False).strip().splitlines()) == 3:
                return self
            time.sleep(0.5)
        raise RuntimeError("the cluster did not come up")

    def __exit__(self, *exc) -> None:
        self.up.terminate()
        self.up.wait(timeout=30)


def steady_tok_s(metrics: Path) -> float:
    train = [r for r in map(json.loads, metrics.read_text().splitlines())
             if r["event"] == "train" and r["rank"] == 0 and r["window_iterations"]][1:]
    seconds = sum(r["window_seconds"] for r in train)
    return sum(r["tokens_per_second"] * r["window_seconds"] for r in train) / seconds


class Watcher:
    """Who watches a job: ``watched`` = the browser on the dashboard (which follows the newest job
    and redraws on every report) and the once-a-second /metrics scraper; ``served`` = the same
    server work without a browser drawing (a client reading the job's event stream, and the
    scraper): the coordinator's own cost, apart from a browser's on the same cores."""

    def __init__(self, url: str, token: str, browser: bool):
        self.url, self.token = url, token
        self.scrapes = 0
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._scrape, daemon=True)]
        self._threads[0].start()
        self.page = None
        if browser:
            from playwright.sync_api import sync_playwright

            self._pw = sync_playwright().start()
            self.browser = self._pw.chromium.launch(executable_path="/usr/bin/chromium",
                                                    args=CHROMIUM_FLAGS)
            self.page = self.browser.new_page(viewport={"width": 1300, "height": 1500})
            self.page.goto(url + "/")

    def _scrape(self) -> None:
        import httpx

        with httpx.Client(timeout=10, headers={"Authorization": f"Bearer {self.token}"}) as h:
            while not self._stop.wait(1.0):
                h.get(self.url + "/metrics").raise_for_status()
                self.scrapes += 1

    def _stream(self, job_id: str) -> None:
        import httpx

        auth = {"Authorization": f"Bearer {self.token}"}
        with httpx.stream("GET", f"{self.url}/api/stream?job={job_id}", headers=auth,
                          timeout=None) as r:
            for _ in r.iter_lines():
                if self._stop.is_set():
                    return

    def follow(self, job_id: str) -> None:
        if self.page is not None:  # the page follows the newest job by itself
            self.page.wait_for_selector(f"#jobs tr[data-job='{job_id}']", timeout=60_000)
        else:
            t = threading.Thread(target=self._stream, args=(job_id,), daemon=True)
            t.start()

    def close(self) -> None:
        self._stop.set()
        self._threads[0].join()
        if self.page is not None:
            self.browser.close()
            self._pw.stop()


def run_job(c: Cluster, cfg: Path, out: Path, watch: Watcher | None) -> float:
    job_id = c.herd("submit", str(cfg), "--no-check").strip().splitlines()[-1]
    if watch is not None:
        watch.follow(job_id)
    c.herd("watch", job_id, "--plain")
    c.herd("pull", job_id, "-o", str(out / job_id))
    return steady_tok_s(out / job_id / "metrics.jsonl")


DESCRIBE = {
    "none": "nobody watching",
    "watched": "headless Chromium on the dashboard + /metrics every 1 s",
    "served": "the job's event stream read by a client (no browser) + /metrics every 1 s",
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3, help="each mode once per round")
    ap.add_argument("--modes", default="none,watched,served")
    ap.add_argument("--iters", type=int, default=60)
    ap.add_argument("--hidden", type=int, default=384)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--note", default="")
    a = ap.parse_args()
    modes = a.modes.split(",")
    tmp = Path(tempfile.mkdtemp(prefix="herd-bench-dash-"))
    model = make_tiny_model(tmp / "model", "llama", layers=a.layers, hidden=a.hidden,
                            vocab_size=1024)
    data = long_text_data(tmp / "data", n_train=128, words=200)
    cfg = job(tmp / "job.yaml", model, data, a.iters, tmp / "adapters", steps_per_report=5,
              save_every=a.iters // 2, max_seq_length=256, cluster={"workers": 2})
    results: dict[str, list[float]] = {m: [] for m in modes}
    scrapes = 0
    with Cluster(tmp) as c:
        token = c.herd("api-token").strip()
        for r in range(a.rounds):
            # The order turns each round, so a drift in the machine's load falls on every mode.
            for mode in modes[r % len(modes):] + modes[:r % len(modes)]:
                watch = None if mode == "none" else Watcher(c.url, token, mode == "watched")
                try:
                    tps = run_job(c, cfg, tmp / "pulled", watch)
                finally:
                    if watch is not None:
                        scrapes += watch.scrapes
                        watch.close()
                results[mode].append(tps)
                print(f"round {r + 1} {mode:8s} {tps:8.1f} tok/s", flush=True)
    median = {m: statistics.median(v) for m, v in results.items()}
    date = dt.date.today().isoformat()
    lines = [
        f"# Dashboard and /metrics overhead, {date}", "",
        f"Machine: {machine()}.",
        f"Job: 2 workers (`herd up --workers 2`, one rank each, on this one machine), llama hidden "
        f"{a.hidden}, {a.layers} layers, LoRA r8 on all layers, batch 4 x <=256 tokens, "
        f"{a.iters} iterations, reports every 5; tok/s = rank 0's report windows after the first, "
        "from the job's metrics.jsonl.",
        f"Modes, one job each per round, the order turning each round ({scrapes} scrapes in all): "
        + "; ".join(f"{m} = {DESCRIBE[m]}" for m in modes) + ".",
        *([f"Note: {a.note}"] if a.note else []), "",
        "| round | " + " | ".join(f"{m} tok/s" for m in modes) + " |",
        "|---|" + "---|" * len(modes),
        *[f"| {r + 1} | " + " | ".join(f"{results[m][r]:.1f}" for m in modes) + " |"
          for r in range(a.rounds)],
        "", "| comparison (medians) | tok/s | none tok/s | ratio | goal |", "|---|---|---|---|---|",
        *[f"| {DESCRIBE[m]} vs nobody watching | {median[m]:.1f} | {median['none']:.1f} | "
          f"{median[m] / median['none']:.3f} | >= 0.99 |" for m in modes if m != "none"], "",
    ]
    out = REPO / "bench" / "results" / f"dashboard-overhead-{date}.md"
    out.write_text("\n".join(lines))
    print("\n".join(lines))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
