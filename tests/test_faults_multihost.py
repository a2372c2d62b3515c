"""Faults across hosts (network namespaces, tests/netns.py): a coordinator, two workers and the
CLI each in their own namespace, real zeroconf, real MLX rings and gRPC exchanges between the
hosts' own addresses (tests/faults.py runs them). Every fault is injected into a running 2-worker
job, must be detected within the documented bound (worker/agent/watchdog.py: 2 x step time +
exchange_timeout_s) having redone at most ``save_every`` iterations, and the job must finish with
the adapter of one uninterrupted process (tests/conftest.py SAME_UPDATE).

The cuts last CUT_S seconds (HERD_FAULT_CUT_S, default 12): past the detection bound and a
registry removal, which is what the recovery depends on. The review cut for 120 s (a worker) and
150 s (worker to worker): bench/faults.py runs those durations, one job per fault, and writes the
detection table. Cost: 3-7 min for both exchanges (8 faults) on 2 shared cores (4.1 min
after the last merge, 7.7 at load average 10-17), most of it waiting (the cuts, ranks starting)."""

from __future__ import annotations

import os

import pytest

from tests import faults
from tests.conftest import SAME_UPDATE_RTOL
from tests.netns import lan  # noqa: F401 (a fixture)

pytestmark = pytest.mark.slow

CUT_S = float(os.environ.get("HERD_FAULT_CUT_S", "12"))
EXCHANGE_TIMEOUT_S = 10.0
# The watchdog polls, reports travel to the CLI, the machine is shared: generous, and far below
# what an undetected hang would take (the job would never finish).
SLACK_S = 15.0


@pytest.fixture(scope="module")
def cluster(lan, tmp_path_factory):  # noqa: F811
    c = faults.Cluster(lan, tmp_path_factory.mktemp("faults"))
    c.start()
    return c


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_model, tiny_data):
    return faults.reference(tmp_path_factory.mktemp("reference"), tiny_model, tiny_data)


@pytest.fixture(scope="module")
def scenarios(cluster):
    return dict(faults.scenarios(cluster, cut_s=CUT_S, ring_cut_s=CUT_S, stop_s=CUT_S))


# Per exchange, one job takes every fault in turn (each once the job is back to normal after
# the previous one): the ranks start once per fault instead of a job per fault (~half the time).
# The coordinator restart comes last: its ranks may well finish while it is down.
SEQUENCES = {
    "mlx": ["stopped rank", "worker cut off", "worker-to-worker link cut", "killed agent",
            "lost worker", "coordinator killed"],
    # A worker cut off is the coordinator losing it, whichever exchange the ranks use; what the
    # gRPC exchange adds is its own deadline, on a stopped peer and on a cut link.
    # The coordinator cut off from both workers comes last too: the tiny job's ranks may finish
    # while it is cut off (then it succeeds once their reports arrive, restarting nothing).
    "grpc": ["stopped rank", "worker-to-worker link cut", "coordinator cut off"],
}


@pytest.mark.timeout(1500)  # one job takes six faults in turn (a few minutes on a loaded box)
@pytest.mark.parametrize("exchange", ["mlx", "grpc"])
def test_faults_are_detected_within_the_bound_and_the_job_finishes_exactly(
        cluster, reference, scenarios, tmp_path, tiny_model, tiny_data, exchange):
    """- a stopped rank (SIGSTOP): its peer's collective stalls; the agent's watchdog (MLX, which
      has no deadline) or the exchange's own (gRPC) ends the attempt;
    - a worker cut off (its cable pulled at the switch): the coordinator loses it, its own
      watchdog stops its stalled rank meanwhile, and once it is back the job resumes on both;
    - only the worker-to-worker link cut (both still answer the coordinator): the collective
      stalls, restarts back off until the link is back (a ring that cannot form is retried);
    - (MLX) a killed agent: its rank dies with it (asserted), the restarted agent takes part;
    - (MLX) the coordinator SIGKILLed and restarted on its state folder: the ranks train on, the
      attempt is re-adopted, nothing is redone;
    - (gRPC) the coordinator cut off from both workers (its own link broke): it loses both, but
      waits for them instead of restarting; the ranks train on and the attempt is re-adopted
      (or, the tiny job being done meanwhile, ends as succeeded), nothing redone;
    - (MLX) a worker lost for good: after the elastic grace the job carries on one worker with
      the same global batch, and grows back at a checkpoint when the worker returns.
    Each detected within 2 x step time + exchange_timeout_s (+ slack), at most save_every
    iterations redone; the final adapter is one uninterrupted process's."""
    names = SEQUENCES[exchange]
    picked = [(n, dict(next(v for k, v in scenarios.items() if k.startswith(n)))) for n in names]
    for _, kw in picked:
        kw.pop("mlx_only", None)
    job = faults.run_faults(cluster, reference, tmp_path, tiny_model, tiny_data, exchange,
                            picked, timeout_s=EXCHANGE_TIMEOUT_S)
    bound = 2 * max(job["step_s"], 0.5) + EXCHANGE_TIMEOUT_S + SLACK_S
    for f in job["faults"]:
        print(f"{f['name']} [{exchange}]: detected in {f['detected_s']:.1f}s (bound "
              f"{bound:.0f}s), resumed from {f['resumed']} (newest stored {f['stored']}), "
              f"redone {f['redone']}, rank 0 on {f['uploader']}: {f['line']}")
    assert job["outcome"] == "succeeded", job["text"][-5000:] + cluster.herd.log(
        cluster.c, "coordinator")[-3000:]
    assert job["rel"] <= SAME_UPDATE_RTOL, f"the adapter differs from one process by {job['rel']}"
    for f in job["faults"]:
        assert f["detected_s"] <= bound, (f["name"], f["detected_s"], bound, f["line"])
        # Restarted from the newest checkpoint the coordinator held: nothing stored is redone.
        assert f["resumed"] is None or f["resumed"] == f["stored"], (f, job["text"][-3000:])
        # At most save_every iterations redone (+ one report's worth, as the watch sees them)...
        # unless the fault took the link or the agent of rank 0's worker, which uploads the
        # checkpoints: then the checkpoints its rank made while one was being uploaded go with
        # it too. The tiny job makes one every ~80 ms, less than an upload takes; a real job
        # (steps of seconds, save_every of ~100) makes one every few minutes.
        takes_uploader = f["uploader"] == cluster.w2.name and f["name"].startswith(
            ("worker cut off", "killed agent", "lost worker"))
        if not takes_uploader:
            assert f["redone"] <= faults.SAVE_EVERY + faults.JOB["steps_per_report"], (
                f["name"], f["redone"], job["text"][-3000:])
    by_name = {f["name"]: f for f in job["faults"]}
    if exchange == "grpc":
        cut = next(f for n, f in by_name.items() if n.startswith("coordinator cut off"))
        after = [ln for t, ln in job["lines"] if t >= cut["t0"]]
        assert cut["resumed"] is None and not any(": state restarting" in ln for ln in after), (
            "\n".join(after)[-3000:])
        assert any("did not answer the coordinator" in ln for ln in after) or (
            "state succeeded" in after[-1]), "\n".join(after)[-3000:]
    if exchange == "mlx":
        assert "stalled: all_sum" in by_name["stopped rank"]["line"]
        assert "stalled: all_sum" in by_name["worker-to-worker link cut"]["line"]
        coordinator = by_name["coordinator killed"]
        assert coordinator["resumed"] is None and "re-adopted attempt" in coordinator["line"]
        text = job["text"]
        assert "shrunk to 1 of 2 workers" in text and "[local x1]" in text, text[-3000:]
        assert "growing back to 2 workers from checkpoint" in text, text[-3000:]


def test_the_cluster_is_left_clean(cluster):
    """No rank of any fault is left running, stopped or orphaned."""
    cluster.wait_idle()
    for host in (cluster.w1, cluster.w2):
        left = list((cluster.root / host.name / "worker").glob("jobs/*/*/rank.pid"))
        assert left == [], left
    for pid in map(int, filter(str.isdigit, os.listdir("/proc"))):
        try:
            cmd = open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\0", b" ").decode()
        except OSError:
            continue
        assert not (" -m worker.rank " in cmd and str(cluster.root) in cmd), cmd
