"""Speed-balanced data parallelism (issue 19): any split of a global batch is the same update,
the split follows measured speeds, and a resumed run continues with its split."""

from __future__ import annotations

import json

import pytest

from tests.conftest import (
    SAME_UPDATE,
    SAME_UPDATE_RTOL,
    herd,
    initial_adapter,
    load_adapter,
    max_abs_diff,
    start_ranks,
    update_diff,
    wait_all,
    write_job,
)
from worker.rank.balance import Balancer, owners, split, take


def test_equal_shares_are_mlx_lms_strided_split():
    items = list(range(12))
    for size in (1, 2, 3, 4):
        shares = split(12, [1.0] * size)
        assert [take(items, shares, r) for r in range(size)] == [
            items[r::size] for r in range(size)]


def test_unequal_shares_interleave_and_cover_the_batch():
    shares = (3, 1)
    assert owners(shares) == [0, 0, 1, 0]
    items = list(range(8))
    mine = [take(items, (6, 2), r) for r in range(2)]
    assert sorted(mine[0] + mine[1]) == items and len(mine[0]) == 6
    # a sorted batch: each rank gets items from along it, not only the shortest
    assert mine[1] == [2, 6]


def test_split_follows_speed_within_caps():
    assert split(8, [3.0, 1.0]) == (6, 2)
    assert split(8, [1.0, 1.0]) == (4, 4)
    assert split(8, [100.0, 1.0]) == (7, 1)  # every rank keeps at least one item
    assert split(8, [3.0, 1.0], caps=[5, 8]) == (5, 3)  # memory caps
    with pytest.raises(ValueError):
        split(8, [1.0, 1.0], caps=[3, 3])


def test_balancer_moves_only_for_a_real_gain_and_skips_warmup():
    b = Balancer(rank=1, shares=(2, 2))
    b.observe(100.0)  # the first step (compiles): not timed
    b.observe(2.0)
    b.observe(2.0)
    assert b.local_rates() == [0.0, 1.0]  # 4 items in 4 s, in its own slot
    # the ranks' rates summed: rank 0 three times as fast
    assert b.decide([3.0, 1.0], iteration=10) == (3, 1)
    assert b.shares == (3, 1) and b.history == [(10, (3, 1))]
    # within GAIN of the best: stay (noise must not move the split, nor recompile)
    assert b.decide([3.3, 1.0], iteration=20) is None
    # a rank with no measurement yet: no decision
    assert b.decide([3.0, 0.0], iteration=30) is None
    assert Balancer(0, (2, 2), enabled=False).local_rates() == []
    assert Balancer(0, (4,)).local_rates() == []


def test_a_split_that_is_not_one_of_the_batch_is_refused_early():
    """At submit (config) or at launch (the world): a clear error, before any training."""
    from pydantic import ValidationError

    from herd.config import JobConfig
    from herd.errors import ConfigError
    from worker.rank.cli import _check_world

    base = dict(model="m", data="d", batch_size=4)
    for cluster, words in (({"shares": [3, 2]}, "summing to 4"), ({"shares": [4, 0]}, "shares"),
                           ({"max_shares": [1, 2]}, "sum below batch_size 4"),
                           ({"shares": [3, 1], "gradient_average": "mlx_lm"}, "no shares")):
        with pytest.raises(ValidationError, match=words):
            JobConfig(**base, cluster=cluster)
    job = JobConfig(**base, cluster={"shares": [3, 1], "max_shares": [3, 2]})
    _check_world(job, 2)
    with pytest.raises(ConfigError, match="names 2 ranks; the job runs 3"):
        _check_world(job, 3)
    _check_world(JobConfig(**{**base, "batch_size": 5}, cluster={"shares": [3, 2]}), 2)


def test_watch_shows_each_ranks_share():
    """A rank's report of the split reaches ``herd watch``: agent relay -> protobuf ->
    coordinator -> the watch line (share of each global batch, measured items per second)."""
    from coordinator.convert import progress_from_pb, progress_to_pb
    from herd.cli.watch import describe
    from protos.v1 import common_pb2
    from worker.agent.domain import Progress
    from worker.agent.relay import _share
    from worker.rank.events import TrainReport

    report = TrainReport(rank=1, iteration=10, train_loss=2.0, learning_rate=1e-4,
                         tokens_per_second=50.0, trained_tokens=500, peak_memory_gb=0.1,
                         exchange="mlx", world_size=2, shares=[3, 1], rank_rates=[6.0, 2.0])
    assert _share(report) == {"share": 1, "items_per_second": 2.0}
    p = Progress(iteration=10, **_share(report))
    pb = common_pb2.RankProgress(rank=1, iteration=p.iteration, share=p.share,
                                 items_per_second=p.items_per_second)
    event = common_pb2.JobEvent(kind=common_pb2.JobEvent.KIND_PROGRESS,
                                progress=progress_to_pb(progress_from_pb(pb)))
    assert "tok/s 0.0 share 1 (2.0/s)" in describe(event, 20)
    from herd.cli.watch import stats_line

    ranks = {0: common_pb2.RankProgress(rank=0, share=3), 1: event.progress}
    assert "split 3:1" in stats_line(ranks, 0.0)
    one = TrainReport(rank=0, iteration=10, train_loss=2.0, learning_rate=1e-4,
                      tokens_per_second=50.0, trained_tokens=500, peak_memory_gb=0.1,
                      exchange="local", world_size=1)
    assert _share(one) == {"share": 0, "items_per_second": 0.0}
    event.progress.share = 0
    assert "share" not in describe(event, 20)


# --- the same update for any split: 3:1 == 1:1 == one rank -------------------------------------

KW = dict(iters=8, save_every=4, batch_size=4, grad_accumulation_steps=2, **SAME_UPDATE)


@pytest.mark.slow
def test_unequal_split_same_adapter(tmp_path, tiny_model, tiny_data):
    """2 ranks taking 3 and 1 examples of every global batch of 4, and 3 ranks with no split
    given (mlx-lm's default batch of 4 on 3 Macs: 2, 1 and 1), give the adapter of one rank
    with the batch of 4 (float32 rounding: SAME_UPDATE), with accumulation."""
    one = write_job(tmp_path / "one.yaml", tiny_model, tiny_data,
                    adapter_path=str(tmp_path / "one"), **KW)
    herd("train", one, "--quiet")
    start = initial_adapter(one)
    for shares, world in (([3, 1], 2), (None, 3)):
        name = "-".join(map(str, shares)) if shares else f"{world}-ranks"
        cluster = {"exchange": "mlx", "balance": False, **({"shares": shares} if shares else {})}
        cfg = write_job(tmp_path / f"{name}.yaml", tiny_model, tiny_data,
                        adapter_path=str(tmp_path / name), cluster=cluster, **KW)
        metrics = tmp_path / f"{name}.jsonl"
        wait_all(start_ranks(["train", str(cfg), "--quiet", "--metrics-file", str(metrics)],
                             world=world, hostfile_dir=tmp_path))
        reports = [json.loads(x) for x in metrics.read_text().splitlines() if '"train"' in x]
        assert reports and all(r["shares"] == (shares or [2, 1, 1]) for r in reports)
        rel = update_diff(load_adapter(tmp_path / name), load_adapter(tmp_path / "one"), start)
        print(f"{name}: update differs from one rank by {rel:.2e} of its size")
        assert rel <= SAME_UPDATE_RTOL, f"{name} differs from one rank by {rel:.2e}"


@pytest.mark.slow
def test_resume_continues_with_the_checkpoints_split(tmp_path, tiny_model, tiny_data):
    """A checkpoint records the split in force; a run resumed from it (no split in its config)
    takes that split, and ends bit-identical to the straight run."""
    def job(name, **cluster):
        return write_job(tmp_path / f"{name}.yaml", tiny_model, tiny_data,
                         adapter_path=str(tmp_path / name),
                         cluster={"exchange": "mlx", "balance": False, **cluster}, **KW)

    straight = job("straight", shares=[3, 1])
    wait_all(start_ranks(["train", str(straight), "--quiet"], world=2, hostfile_dir=tmp_path))
    first = job("split", shares=[3, 1])
    wait_all(start_ranks(["train", str(first), "--quiet", "--iters", "4"], world=2,
                         hostfile_dir=tmp_path))
    state = json.loads((tmp_path / "split/checkpoints/0000004/trainer_state.json").read_text())
    assert state["shares"] == [3, 1]
    resumed = job("split")  # the config names no split: the checkpoint's is taken
    metrics = tmp_path / "resumed.jsonl"
    wait_all(start_ranks(["train", str(resumed), "--quiet", "--resume", str(tmp_path / "split"),
                          "--metrics-file", str(metrics)], world=2, hostfile_dir=tmp_path))
    reports = [json.loads(x) for x in metrics.read_text().splitlines() if '"train"' in x]
    assert reports and all(r["shares"] == [3, 1] for r in reports)
    assert max_abs_diff(load_adapter(tmp_path / "straight"), load_adapter(tmp_path / "split")) == 0
