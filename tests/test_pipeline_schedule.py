"""The 1F1B schedule (worker/pipeline/schedule.py): complete, deadlock-free under blocking
send/recv, and 1F1B-shaped (bounded in-flight inputs, the last stage never waits for all
forwards)."""

from __future__ import annotations

import pytest

from worker.pipeline.schedule import (
    BWD,
    FWD,
    FWD_BWD,
    RECV_BWD,
    RECV_FWD,
    SEND_BWD,
    SEND_FWD,
    Op,
    one_f_one_b,
    simulate,
)


def schedules(stages: int, m: int, frozen: int = 0) -> list[list[Op]]:
    """Every stage's ops; stages before ``frozen`` have no adapters (forward only)."""
    return [one_f_one_b(s, stages, m, trains=s >= frozen, sends_back=s - 1 >= frozen)
            for s in range(stages)]


@pytest.mark.parametrize("stages", range(1, 9))
def test_every_stage_runs_every_microbatch_once_without_deadlock(stages):
    for m in range(1, 17):
        for frozen in range(stages):
            plan = schedules(stages, m, frozen)
            simulate(plan)  # raises on a deadlock or a mismatched transfer
            for s, ops in enumerate(plan):
                kinds = [op.kind for op in ops]
                if s == stages - 1:  # gradients are summed in microbatch order on every stage
                    assert [op.mb for op in ops if op.kind == FWD_BWD] == list(range(m))
                else:
                    assert sorted(op.mb for op in ops if op.kind == FWD) == list(range(m))
                    want_bwd = list(range(m)) if s >= frozen else []
                    assert [op.mb for op in ops if op.kind == BWD] == want_bwd  # in order
                assert (SEND_BWD in kinds) == (s > frozen)


@pytest.mark.parametrize("stages", range(1, 9))
def test_every_op_finds_what_it_needs(stages):
    """What worker/pipeline/step.py's executor keeps between ops exists when an op uses it."""
    for m in range(1, 17):
        for frozen in range(stages):
            for s, ops in enumerate(schedules(stages, m, frozen)):
                first = s == 0
                received, done_fwd, saved, cts, dxs = set(), set(), set(), set(), set()
                for op in ops:
                    i = op.mb
                    if op.kind == RECV_FWD:
                        received.add(i)
                    elif op.kind in (FWD, FWD_BWD):
                        assert first or i in received, (s, op)
                        received.discard(i)
                        if op.kind == FWD_BWD:
                            dxs.add(i)
                        else:
                            done_fwd.add(i)
                            if s >= frozen:  # only a stage with adapters keeps inputs
                                saved.add(i)
                    elif op.kind == SEND_FWD:
                        assert i in done_fwd, (s, op)
                        done_fwd.remove(i)
                    elif op.kind == RECV_BWD:
                        cts.add(i)
                    elif op.kind == BWD:
                        assert i in saved and i in cts, (s, op)
                        saved.remove(i), cts.remove(i), dxs.add(i)
                    elif op.kind == SEND_BWD:
                        assert i in dxs, (s, op)
                        dxs.remove(i)
                assert not received and not cts and not saved and not done_fwd, s


def test_in_flight_inputs_are_bounded_by_the_stages_after():
    stages, m = 4, 12
    for s, ops in enumerate(schedules(stages, m)[:-1]):
        held = peak = 0
        for op in ops:
            held += op.kind == FWD
            held -= op.kind == BWD
            peak = max(peak, held)
        assert peak == stages - s  # GPipe would hold all m


def test_last_stage_starts_its_backward_after_the_first_input():
    ops = one_f_one_b(1, 2, 8)
    assert ops[:2] == [Op(RECV_FWD, 0), Op(FWD_BWD, 0)]


def test_neighbours_sending_to_each_other_at_once_is_a_deadlock():
    # The naive 1F1B order: stage 0 sends microbatch 1 forward while stage 1 sends microbatch 0's
    # cotangent back. Blocking transfers cannot both complete; the parity order avoids it.
    naive = [[Op(FWD, 0), Op("send_fwd", 0), Op(FWD, 1), Op("send_fwd", 1), Op("recv_bwd", 0),
              Op(BWD, 0), Op("recv_bwd", 1), Op(BWD, 1)],
             [Op(RECV_FWD, 0), Op(FWD_BWD, 0), Op("send_bwd", 0), Op(RECV_FWD, 1),
              Op(FWD_BWD, 1), Op("send_bwd", 1)]]
    with pytest.raises(RuntimeError, match="deadlock"):
        simulate(naive)
    simulate(schedules(2, 2))
