"""/metrics: the cluster in Prometheus's text format, with the official ``prometheus_client``.

A custom collector (the client's way to export another system's state): each scrape reads the
registry's workers and the metrics hub's job views, so a worker or job that is gone disappears
and nothing here keeps a second copy of the numbers. Labels are the same everywhere (``job_id``,
``job_name``, ``worker_id``, ``rank``), so a Grafana board joins them without relabelling;
``job_id`` rather than ``job``, which Prometheus sets to the scrape job's name.
"""

from __future__ import annotations

import time
from typing import Callable, Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from coordinator.domain import JobState, WorkerRecord
from coordinator.web.hub import JobView, MetricsHub

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
JOB = ["job_id", "job_name"]
RANK = JOB + ["rank", "worker_id"]
# Finished jobs stay on /metrics this long, so a scrape after the end still sees their totals.
FINISHED_KEEP_S = 24 * 3600


def _gauge(name: str, doc: str, labels: list[str]) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, labels=labels)


def _counter(name: str, doc: str, labels: list[str]) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, labels=labels)


class HerdCollector:
    def __init__(self, hub: MetricsHub, workers: Callable[[], list[WorkerRecord]],
                 health: Callable[[], str] = lambda: ""):
        self.hub, self.workers, self.health = hub, workers, health
        # Workers an earlier scrape saw, and when: one gone since is reported down (0) for a
        # day, so an alert can say which Mac left (a series that just vanished names none).
        self._seen_ms: dict[str, float] = {}

    def collect(self) -> Iterator[Metric]:
        degraded = _gauge("herd_coordinator_degraded", "1 while the coordinator cannot write its "
                          "job database (what it reports is as of its last write)", [])
        degraded.add_metric([], 1 if self.health() else 0)
        yield degraded
        yield from self._workers(self.workers())
        now_ms = time.time() * 1000
        views = [v for v in self.hub.views() if not JobState(v.state).final
                 or now_ms - v.updated_ms < FINISHED_KEEP_S * 1000]
        yield from self._jobs(views)

    def _workers(self, workers: list[WorkerRecord]) -> Iterator[Metric]:
        now_ms = time.time() * 1000
        info = _gauge("herd_worker_info", "A verified worker (value 1), with its chip and OS",
                      ["worker_id", "host", "chip", "os", "mlx_version"])
        total = _gauge("herd_worker_memory_bytes", "Total (unified) memory", ["worker_id"])
        used = _gauge("herd_worker_memory_used_bytes", "Memory in use (total - available)",
                      ["worker_id"])
        busy = _gauge("herd_worker_busy", "1 while the worker runs a rank", ["worker_id"])
        seen = _gauge("herd_worker_heartbeat_age_seconds",
                      "Seconds since the worker last answered an authenticated health check",
                      ["worker_id"])
        for w in workers:
            info.add_metric([w.worker_id, w.host, w.chip, w.os, w.mlx_version], 1)
            total.add_metric([w.worker_id], w.memory_bytes)
            used.add_metric([w.worker_id], max(w.memory_bytes - w.free_memory_bytes, 0))
            busy.add_metric([w.worker_id], 1 if w.running_job_id else 0)
            if w.last_seen_ms:
                seen.add_metric([w.worker_id], max(now_ms - w.last_seen_ms, 0) / 1000)
        count = _gauge("herd_workers", "Verified workers", [])
        count.add_metric([], len(workers))
        up = _gauge("herd_worker_up", "1 while the worker is verified and healthy; 0 for a day "
                    "once a worker seen before is gone (lost, stopped or removed)", ["worker_id"])
        here = {w.worker_id for w in workers}
        self._seen_ms |= {w: now_ms for w in here}
        for worker_id, at_ms in sorted(self._seen_ms.items()):
            if worker_id not in here and now_ms - at_ms > FINISHED_KEEP_S * 1000:
                del self._seen_ms[worker_id]
            else:
                up.add_metric([worker_id], 1 if worker_id in here else 0)
        yield from (count, up, info, total, used, busy, seen)

    def _jobs(self, views: list[JobView]) -> Iterator[Metric]:
        states = _gauge("herd_jobs", "Jobs the coordinator knows, by state", ["state"])
        by_state = {s.value: 0 for s in JobState}
        for v in self.hub.views():
            by_state[v.state] += 1
        for s, n in by_state.items():
            states.add_metric([s], n)
        queue = _gauge("herd_queue_length", "Jobs waiting for workers (queued or restarting)", [])
        queue.add_metric([], by_state["queued"] + by_state["restarting"])
        yield from (states, queue)

        g = {
            "state": _gauge("herd_job_state", "1 for the job's current state", JOB + ["state"]),
            "iteration": _gauge("herd_job_iteration", "Latest iteration reported", JOB),
            "iters": _gauge("herd_job_iterations_target", "The job's iters", JOB),
            "loss": _gauge("herd_job_train_loss", "Latest training loss", JOB),
            "val": _gauge("herd_job_val_loss", "Latest validation loss", JOB),
            "eta": _gauge("herd_job_eta_seconds", "Estimated seconds to the last iteration", JOB),
            "tps": _gauge("herd_job_tokens_per_second", "Tokens per second over all ranks (as "
                          "its lowest rank last measured it; not a sum of the ranks')", JOB),
        }
        c = {
            "steps": _counter("herd_job_iterations", "Iterations completed (an iteration redone "
                              "after a restart counts once)", JOB),
            "tokens": _counter("herd_job_tokens", "Tokens trained, over all ranks", JOB),
            "restarts": _counter("herd_job_restarts", "Attempts restarted after a failure", JOB),
            "ckpt_bytes": _counter("herd_job_checkpoint_bytes", "Bytes of checkpoints stored",
                                   JOB),
            "ckpts": _counter("herd_job_checkpoints", "Checkpoints stored", JOB),
        }
        r = {
            "tps": _gauge("herd_rank_tokens_per_second", "Tokens per second over all ranks, as "
                          "this rank last measured it (the job's rate: not to be summed)", RANK),
            "mem": _gauge("herd_rank_peak_memory_bytes", "The rank's peak MLX memory", RANK),
            "step_s": _counter("herd_rank_step_seconds", "Seconds spent in training steps",
                               RANK),
            "ex_s": _counter("herd_rank_exchange_seconds", "Seconds of those in the gradient "
                             "exchange (moving bytes and waiting for the slowest rank)", RANK),
            "ex_b": _counter("herd_rank_exchange_bytes", "Gradient bytes all-reduced (payload)",
                             RANK),
        }
        for v in views:
            job = [v.job_id, v.name]
            g["state"].add_metric(job + [v.state], 1)
            g["iteration"].add_metric(job, v.iteration)
            g["iters"].add_metric(job, v.iters)
            # the lowest rank that holds each (a pipeline's last stage holds the losses)
            ranked = [v.ranks[r] for r in sorted(v.ranks)]
            if loss := next((p.train_loss for p in ranked if p.train_loss), None):
                g["loss"].add_metric(job, loss)
            if val := next((p.val_loss for p in ranked if p.val_loss), None):
                g["val"].add_metric(job, val)
            if (eta := v.eta_s()) is not None:
                g["eta"].add_metric(job, eta)
            running = JobState(v.state).active
            if running and (rate := next((p.tokens_per_second for p in ranked
                                          if p.tokens_per_second), None)):
                g["tps"].add_metric(job, rate)
            c["steps"].add_metric(job, v.iterations_done)
            c["tokens"].add_metric(job, v.tokens_done)
            c["restarts"].add_metric(job, v.restarts)
            c["ckpt_bytes"].add_metric(job, v.checkpoint_bytes)
            c["ckpts"].add_metric(job, len(v.checkpoints))
            for rank, p in sorted(v.ranks.items()):
                labels = job + [str(rank), p.worker_id]
                if running:  # a finished job's last rate is not a rate any more
                    r["tps"].add_metric(labels, p.tokens_per_second)
                r["mem"].add_metric(labels, p.peak_memory_gb * 1e9)
            for (rank, worker), k in sorted(v.rank_counters.items()):
                labels = job + [str(rank), worker]
                r["step_s"].add_metric(labels, k.step_seconds)
                r["ex_s"].add_metric(labels, k.exchange_seconds)
                r["ex_b"].add_metric(labels, k.exchange_bytes)
        yield from (*g.values(), *c.values(), *r.values())


def metrics_registry(hub: MetricsHub, workers: Callable[[], list[WorkerRecord]],
                     health: Callable[[], str] = lambda: ""):
    """A registry of the coordinator's own (never the process-global default registry: two
    coordinators in one test process must not share one)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(HerdCollector(hub, workers, health))
    return registry


def render(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)
