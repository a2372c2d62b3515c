"""The order in which one pipeline stage runs and communicates its microbatches: 1F1B.

One forward, one backward (PipeDream-Flush / Megatron's non-interleaved schedule): stage s first
runs ``min(S - s - 1, m)`` forwards (warm-up), then alternates one forward and one backward,
then drains the remaining backwards. The bubble is GPipe's, (S - 1) / (m + S - 1), but the last
stage starts its backward as soon as its first input arrives instead of after every forward, and
a stage holds at most S - s microbatch inputs instead of m.

Stages talk with blocking point-to-point send/recv (MLX's ring). A send may wait until its
receiver is at the matching recv, so the two transfers a stage makes back to back with one
neighbour ("send my output, receive its cotangent") are ordered by stage parity: even stages
send first, odd stages receive first, so a neighbour pair never sends to each other at once.
``simulate`` runs all stages' lists against each other under exactly those semantics; the
tests check every S and m up to 8 and 16 for deadlocks and mismatched transfers.

Pure functions, no MLX: worker/pipeline/step.py executes the list.
"""

from __future__ import annotations

from dataclasses import dataclass

RECV_FWD, FWD, SEND_FWD = "recv_fwd", "fwd", "send_fwd"  # activations from/to the neighbours
RECV_BWD, BWD, SEND_BWD = "recv_bwd", "bwd", "send_bwd"  # cotangents from/to the neighbours
FWD_BWD = "fwd_bwd"  # the last stage: forward, loss and backward in one vjp


@dataclass(frozen=True)
class Op:
    kind: str
    mb: int  # microbatch


def one_f_one_b(stage: int, stages: int, m: int, trains: bool = True,
                sends_back: bool | None = None) -> list[Op]:
    """Stage ``stage``'s ops for one step of ``m`` microbatches.

    ``trains``: the stage has adapters (runs backwards); a stage that does not only relays
    activations forward. ``sends_back``: the previous stage trains, so this one returns
    cotangents to it (default: whenever there is a previous stage).
    """
    if not 0 <= stage < stages or m < 1:
        raise ValueError(f"stage {stage} of {stages} with {m} microbatches")
    first, last = stage == 0, stage == stages - 1
    sends_back = (not first) if sends_back is None else (sends_back and not first)
    if sends_back and not trains:
        raise ValueError("a stage that does not train has no cotangent to send back")
    recv_fwd = [] if first else [Op(RECV_FWD, 0)]

    def forward(i: int) -> list[Op]:
        return [Op(FWD, i)] + ([] if last else [Op(SEND_FWD, i)])

    if not trains:
        return [op for i in range(m) for op in ([] if first else [Op(RECV_FWD, i)]) + forward(i)]
    if last:
        ops = list(recv_fwd)
        for i in range(m):
            ops.append(Op(FWD_BWD, i))
            nxt = [Op(RECV_FWD, i + 1)] if i + 1 < m and not first else []
            back = [Op(SEND_BWD, i)] if sends_back else []
            ops += _pair(stage, back, nxt)
        return ops

    warmup = min(stages - stage - 1, m)
    ops: list[Op] = []
    for i in range(warmup):
        ops += ([] if first else [Op(RECV_FWD, i)]) + forward(i)
    if warmup < m and not first:
        ops.append(Op(RECV_FWD, warmup))
    for j in range(m - warmup):
        f, b = warmup + j, j
        # Forward f, then hand its output on while taking microbatch b's cotangent.
        ops.append(Op(FWD, f))
        ops += _pair(stage, [Op(SEND_FWD, f)], [Op(RECV_BWD, b)])
        ops.append(Op(BWD, b))
        # Return b's cotangent while taking the next input.
        nxt = [Op(RECV_FWD, f + 1)] if f + 1 < m and not first else []
        ops += _pair(stage, [Op(SEND_BWD, b)] if sends_back else [], nxt)
    for b in range(m - warmup, m):
        ops += [Op(RECV_BWD, b), Op(BWD, b)] + ([Op(SEND_BWD, b)] if sends_back else [])
    return ops


def _pair(stage: int, send: list[Op], recv: list[Op]) -> list[Op]:
    # Even stages send first and odd ones receive first: of two neighbours, one sends while
    # the other receives, whichever way the traffic goes.
    return send + recv if stage % 2 == 0 else recv + send


_PEER = {SEND_FWD: (1, RECV_FWD), RECV_FWD: (-1, SEND_FWD),
         SEND_BWD: (-1, RECV_BWD), RECV_BWD: (1, SEND_BWD)}


def simulate(schedules: list[list[Op]]) -> int:
    """Run every stage's ops with rendezvous send/recv (a send completes only together with
    its matching recv, the strictest blocking semantics). Returns the number of rounds taken;
    raises RuntimeError on a deadlock or on a transfer whose two ends disagree."""
    pos = [0] * len(schedules)
    rounds = 0
    while any(p < len(s) for p, s in zip(pos, schedules)):
        rounds += 1
        progressed = False
        for s, ops in enumerate(schedules):
            while pos[s] < len(ops) and ops[pos[s]].kind not in _PEER:
                pos[s] += 1  # compute runs on its own
                progressed = True
        for s, ops in enumerate(schedules):
            if pos[s] >= len(ops) or ops[pos[s]].kind not in (SEND_FWD, SEND_BWD):
                continue
            op = ops[pos[s]]
            step, want = _PEER[op.kind]
            peer = s + step
            if not 0 <= peer < len(schedules):
                raise RuntimeError(f"stage {s} sends {op} past the pipeline's end")
            if pos[peer] < len(schedules[peer]) and schedules[peer][pos[peer]].kind == want:
                other = schedules[peer][pos[peer]]
                if other.mb != op.mb:
                    raise RuntimeError(f"stage {s} sends {op} while stage {peer} expects {other}")
                pos[s] += 1
                pos[peer] += 1
                progressed = True
        if not progressed:
            heads = {s: ops[pos[s]] for s, ops in enumerate(schedules) if pos[s] < len(ops)}
            raise RuntimeError(f"deadlock: stages wait at {heads}")
    return rounds
