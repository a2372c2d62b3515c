"""The agent's relay while the coordinator is away (restarting, or its link cut): every report
the rank made meanwhile reaches it once it is back, in order, so `herd watch`, the dashboard and
the pulled metrics.jsonl have no gap. The coordinator is the edge here: a client whose calls
fail while it is "down" (a real restart with real processes: tests/test_faults_multihost.py)."""

from __future__ import annotations

import threading

from herd import log
from herd.errors import PeerLostError
from protos.v1 import coordinator_pb2
from worker.agent import relay as relay_module
from worker.agent.relay import Relay


class AwayCoordinator:
    def __init__(self):
        self.down, self.taken = False, []

    def report(self, request) -> bool:
        if self.down:
            raise PeerLostError("coordinator:7450 is unreachable")
        self.taken.append(request)
        return False


def progress(iteration: int) -> coordinator_pb2.ReportRankRequest:
    r = coordinator_pb2.ReportRankRequest(job_id="j", attempt=1, worker_id="w")
    r.progress.iteration = iteration
    return r


def note(text: str) -> coordinator_pb2.ReportRankRequest:
    return coordinator_pb2.ReportRankRequest(job_id="j", attempt=1, worker_id="w", log=text)


def _relay(client, tmp_path) -> Relay:
    return Relay(None, "w", tmp_path, client, threading.Event(), lambda: None,
                 log.get("test").bind())


def _what(request) -> str:
    kind = request.WhichOneof("report")
    return f"iter {request.progress.iteration}" if kind == "progress" else request.log


def test_reports_made_while_the_coordinator_is_away_all_arrive_in_order(tmp_path):
    coordinator = AwayCoordinator()
    relay = _relay(coordinator, tmp_path)
    relay._send(progress(10))
    coordinator.down = True
    for i in (20, 30, 40):
        relay._send(progress(i))
    relay._send(note("checkpoint 40 saved"))
    relay._send(progress(50))
    coordinator.down = False
    relay._flush(force=True)
    assert [_what(r) for r in coordinator.taken] == [
        "iter 10", "iter 20", "iter 30", "iter 40", "checkpoint 40 saved", "iter 50"]


def test_a_coordinator_away_for_very_long_costs_the_oldest_reports_only(tmp_path, monkeypatch):
    monkeypatch.setattr(relay_module, "MAX_PENDING_REPORTS", 3)
    coordinator = AwayCoordinator()
    relay = _relay(coordinator, tmp_path)
    coordinator.down = True
    for i in range(1, 6):
        relay._send(progress(i))
    coordinator.down = False
    relay._flush(force=True)
    assert [_what(r) for r in coordinator.taken] == ["iter 3", "iter 4", "iter 5"]
