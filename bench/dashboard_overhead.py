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

`--interleave 10 --iters 600`: a 1% effect hides in a 10% drift between separate jobs on a shared
machine, so one long job per mode has its watcher switched on and off every 10 s and compares
the report windows of either phase (bench/results/dashboard-overhead-<date>-interleaved.md).
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

    def herd(self, *args: str, check: bool = True, timeout: float | None = 900) -> str:
        argv = [sys.executable, "-m", "herd", *args]
        if args[0] not in ("init", "api-token"):
            argv += ["--coordinator", f"127.0.0.1:{self.port}"]
        out = subprocess.run(argv, env=self.env, capture_output=True, text=True, timeout=timeout)
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
        self._active = threading.Event()  # off (--interleave): no scrapes, the page blank
        self._active.set()
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
                if self._active.is_set():
                    h.get(self.url + "/metrics").raise_for_status()
                    self.scrapes += 1

    def _stream(self, job_id: str) -> None:
        import httpx

        auth = {"Authorization": f"Bearer {self.token}"}
        with httpx.stream("GET", f"{self.url}/api/stream?job={job_id}", headers=auth,
                          timeout=None) as r:
            for _ in r.iter_lines():
                if self._stop.is_set() or not self._active.is_set():
                    return

    def switch(self, on: bool, job_id: str) -> None:
        """--interleave: start or stop watching the running job."""
        if on:
            self._active.set()
            if self.page is not None:
                self.page.goto(self.url + "/")
            self.follow(job_id)
        else:
            self._active.clear()
            if self.page is not None:
                self.page.goto("about:blank")

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


def interleaved(c: Cluster, cfg: Path, out: Path, watch: Watcher, phase_s: float,
                settle_s: float) -> dict:
    """One long job, the watcher switched on and off every ``phase_s`` seconds (in the main
    thread: Playwright's page belongs to it). Each rank-0 report window falls in one phase or
    straddles two (dropped, as are windows that began within ``settle_s`` of a switch: the
    page's load or unload, which a user pays once per job, not per step). A drift in the
    machine's load over minutes falls on both alike, which separate jobs cannot promise."""
    job_id = c.herd("submit", str(cfg), "--no-check").strip().splitlines()[-1]
    finished = threading.Event()

    def wait_for_the_end() -> None:
        try:
            c.herd("watch", job_id, "--plain", check=False, timeout=None)
        finally:
            finished.set()

    threading.Thread(target=wait_for_the_end, daemon=True).start()
    phases, on = [], False
    watch.switch(False, job_id)
    while not finished.is_set():
        start = time.time()
        finished.wait(phase_s)
        phases.append((start, time.time(), on))
        on = not on
        watch.switch(on, job_id)
    c.herd("pull", job_id, "-o", str(out / job_id))
    records = [r for r in map(json.loads, (out / job_id / "metrics.jsonl").read_text().splitlines())
               if r["event"] == "train" and r["rank"] == 0 and r["window_iterations"]][1:]
    windows: dict[int, list[tuple[float, float]]] = {}  # phase index -> (tokens, seconds)
    for r in records:
        end = r["time_unix_ms"] / 1000
        begin = end - r["window_seconds"]
        for i, (p0, p1, _) in enumerate(phases):
            if p0 + settle_s <= begin and end <= p1:
                windows.setdefault(i, []).append(
                    (r["tokens_per_second"] * r["window_seconds"], r["window_seconds"]))

    def rate(i: int) -> float | None:
        w = windows.get(i)
        return sum(t for t, _ in w) / sum(s for _, s in w) if w else None

    total = {flag: [w for i, ws in windows.items() if phases[i][2] == flag for w in ws]
             for flag in (True, False)}
    tok_s = {flag: sum(t for t, _ in ws) / sum(s for _, s in ws) for flag, ws in total.items()}
    # Each watched phase against the mean of the unwatched phases on either side of it.
    pairs = []
    for i, (_, _, flag) in enumerate(phases):
        around = [rate(j) for j in (i - 1, i + 1) if 0 <= j < len(phases)]
        around = [x for x in around if x is not None]
        if flag and rate(i) is not None and around:
            pairs.append(rate(i) / statistics.fmean(around))
    return {"on": tok_s[True], "off": tok_s[False], "pairs": pairs,
            "windows": {flag: len(ws) for flag, ws in total.items()},
            "phases": sum(1 for p in phases if p[2])}


def main_interleaved(a, c: Cluster, cfg: Path, tmp: Path, token: str) -> list[str]:
    rows = []
    for mode in [m for m in a.modes.split(",") if m != "none"]:
        watch = Watcher(c.url, token, mode == "watched")
        try:
            r = interleaved(c, cfg, tmp / "pulled", watch, a.interleave, a.settle)
        finally:
            watch.close()
        q = statistics.quantiles(r["pairs"], n=4) if len(r["pairs"]) >= 2 else [float("nan")] * 3
        rows.append(f"| {DESCRIBE[mode]} | {r['on']:.1f} ({r['windows'][True]} windows) | "
                    f"{r['off']:.1f} ({r['windows'][False]} windows) | "
                    f"{r['on'] / r['off']:.3f} | {q[1]:.3f} [{q[0]:.3f}, {q[2]:.3f}] "
                    f"({len(r['pairs'])} phases) | >= 0.99 |")
        print(rows[-1], flush=True)
    return [f"Design: one {a.iters}-iteration job per mode, the watcher switched on and off every "
            f"{a.interleave:.0f} s (page to about:blank and scraper paused when off); report "
            f"windows of 2 iterations, those straddling a switch or beginning within "
            f"{a.settle:.0f} s after one dropped; the first window (warm-up) dropped.", "",
            "| mode | watched tok/s | unwatched tok/s | ratio | per phase vs its neighbours: "
            "median [quartiles] | goal |", "|---|---|---|---|---|---|", *rows, ""]


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
    ap.add_argument("--interleave", type=float, default=0.0,
                    help="seconds per phase: one long job per mode, its watcher switched on and "
                         "off (use with --iters 600 or so); 0 = one job per mode and round")
    ap.add_argument("--settle", type=float, default=2.0,
                    help="--interleave: seconds after a switch whose windows are dropped")
    a = ap.parse_args()
    modes = a.modes.split(",")
    tmp = Path(tempfile.mkdtemp(prefix="herd-bench-dash-"))
    model = make_tiny_model(tmp / "model", "llama", layers=a.layers, hidden=a.hidden,
                            vocab_size=1024)
    data = long_text_data(tmp / "data", n_train=128, words=200)
    cfg = job(tmp / "job.yaml", model, data, a.iters, tmp / "adapters",
              steps_per_report=2 if a.interleave else 5,
              save_every=a.iters // 2, max_seq_length=256, cluster={"workers": 2})
    results: dict[str, list[float]] = {m: [] for m in modes}
    scrapes = 0
    with Cluster(tmp) as c:
        token = c.herd("api-token").strip()
        if a.interleave:
            return write_interleaved(a, main_interleaved(a, c, cfg, tmp, token))
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


def write_interleaved(a, table: list[str]) -> None:
    date = dt.date.today().isoformat()
    lines = [f"# Dashboard and /metrics overhead, interleaved, {date}", "",
             f"Machine: {machine()}.",
             f"Job: 2 workers (`herd up --workers 2`, one rank each, on this one machine), llama "
             f"hidden {a.hidden}, {a.layers} layers, LoRA r8 on all layers, batch 4 x <=256 "
             "tokens; tok/s = rank 0's report windows, from the job's metrics.jsonl.",
             *([f"Note: {a.note}"] if a.note else []), "", *table]
    out = REPO / "bench" / "results" / f"dashboard-overhead-{date}-interleaved.md"
    out.write_text("\n".join(lines))
    print("\n".join(lines))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
