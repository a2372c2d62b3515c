"""The planner against reality: predicted peak memory vs ``mx.get_peak_memory()`` of one real
training step (fresh process per config), and the layouts / refusals it gives.

Run as a script (``python tests/test_planner.py '<json>'``) it is the measuring child process.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from coordinator.planner import (
    GIB,
    WorkerMemory,
    estimate_memory,
    macos_usable_bytes,
    plan_job,
    why_unused,
)
from herd.config import parse_config
from herd.errors import ConfigError, PlacementError

REPO = Path(__file__).resolve().parent.parent

LLAMA_70B = {
    "model_type": "llama", "hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80,
    "num_attention_heads": 64, "num_key_value_heads": 8, "vocab_size": 128256,
    "tie_word_embeddings": False, "torch_dtype": "bfloat16",
}


def tiny_config(arch: str, hidden: int, layers: int, vocab: int, dtype: str) -> dict:
    from herd.cli.tiny import model_config

    cfg = model_config(arch, layers, hidden, vocab)
    cfg["torch_dtype"] = dtype
    return cfg


def measure(spec: dict) -> dict:
    """One training step (two, so Adam's state exists during the second) in this process; the
    MLX allocator's peak over it."""
    import mlx.core as mx
    import mlx.nn as nn
    from mlx_lm.tuner.trainer import grad_checkpoint
    from mlx_lm.utils import _get_classes

    from worker.rank.model import apply_adapters, build_optimizer, quantize_in_place
    from worker.rank.trainer import default_loss

    cfg, job = spec["model_config"], parse_config(spec["job"])
    model_cls, args_cls = _get_classes(cfg)
    model = model_cls(args_cls.from_dict(cfg))
    model.set_dtype(getattr(mx, cfg["torch_dtype"]))
    if job.quantize is not None:
        quantize_in_place(model, job)
    apply_adapters(model, job)
    mx.eval(model.parameters())
    if job.grad_checkpoint:
        grad_checkpoint(model.layers[0])
    optimizer = build_optimizer(job)
    batch = mx.random.randint(0, cfg["vocab_size"], (job.batch_size, job.max_seq_length + 1))
    lengths = mx.array([[0, job.max_seq_length]] * job.batch_size)
    mx.eval(batch, lengths)
    mx.reset_peak_memory()
    step = nn.value_and_grad(model, default_loss)
    for _ in range(2):
        (loss, ntoks), grad = step(model, batch, lengths)
        optimizer.update(model, grad)
        mx.eval(loss, model.parameters(), optimizer.state)
        del grad
    return {"peak": mx.get_peak_memory()}


def measured_peak(model_config: dict, job: dict) -> int:
    from worker.rank.runtime import preload_env

    out = subprocess.run(
        [sys.executable, __file__, json.dumps({"model_config": model_config, "job": job})],
        capture_output=True, text=True, timeout=120, cwd=REPO, env=preload_env(),
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])["peak"]


JOB = {"model": "x", "num_layers": -1, "batch_size": 2, "max_seq_length": 256}
CASES = {
    # name: (arch, hidden, layers, vocab, dtype, job overrides)
    "lora-fp32": ("llama", 256, 4, 2048, "float32", {}),
    "lora-bf16-qwen2": ("qwen2", 256, 4, 2048, "bfloat16", {"num_layers": 2, "batch_size": 1}),
    "lora-rank64-bf16": ("llama", 256, 4, 2048, "bfloat16",
                         {"lora_parameters": {"rank": 64}, "batch_size": 1}),
    "qlora-4bit": ("llama", 128, 2, 2048, "bfloat16",
                   {"quantize": {"bits": 4, "group_size": 64}, "batch_size": 1}),
    "long-seq-1024": ("llama", 128, 2, 1024, "float32", {"max_seq_length": 1024, "batch_size": 1}),
}
# With grad_checkpoint the order in which MLX recomputes a block and frees the logits varies, and
# the additive model (everything alive at once) over-predicts by up to ~20%: safe for placement.
CHECKPOINTED = {
    "grad-checkpoint-bf16": ("llama", 256, 4, 2048, "bfloat16", {"grad_checkpoint": True}),
}
# Full fine-tuning, shaped so the trained weights dominate (it was sized as LoRA: 0.25-0.37 of
# the measured peak): gradients, optimizer states and the update's transient copy.
SHORT = {"fine_tune_type": "full", "max_seq_length": 32, "batch_size": 1}
FULL = {
    "full-adam-fp32": ("llama", 512, 4, 256, "float32", {**SHORT, "optimizer": "adam"}),
    "full-sgd-bf16": ("llama", 512, 4, 256, "bfloat16", {**SHORT, "optimizer": "sgd"}),
    "full-adamw-bf16-half": ("llama", 512, 4, 256, "bfloat16", {**SHORT, "num_layers": 2}),
}


def _compare(case) -> tuple[int, int]:
    arch, hidden, layers, vocab, dtype, over = case
    cfg = tiny_config(arch, hidden, layers, vocab, dtype)
    job = {**JOB, **over}
    return estimate_memory(cfg, parse_config(job)).total, measured_peak(cfg, job)


@pytest.fixture(scope="module")
def measured() -> dict[str, tuple[int, int]]:
    """(predicted, measured) per case; two fresh processes at a time (one per core)."""
    from concurrent.futures import ThreadPoolExecutor

    cases = {**CASES, **CHECKPOINTED, **FULL}
    with ThreadPoolExecutor(2) as pool:
        return dict(zip(cases, pool.map(_compare, cases.values())))


@pytest.mark.slow
def test_estimate_within_ten_percent_of_measured_peak(measured):
    off = {n: (p, m) for n, (p, m) in measured.items() if n in CASES and abs(p - m) / m > 0.10}
    assert not off, f"predicted vs measured peak bytes off by more than 10%: {off}"


@pytest.mark.slow
def test_checkpointed_estimate_is_close_and_never_low(measured):
    for name in CHECKPOINTED:
        predicted, m = measured[name]
        assert 0.95 * m <= predicted <= 1.25 * m, (name, predicted, m)


@pytest.mark.slow
def test_full_fine_tuning_is_sized_by_the_weights_it_trains(measured):
    """(The update's transients vary with MLX's order of evaluation: a looser bound, within
    what HEADROOM covers.)"""
    for name in FULL:
        predicted, m = measured[name]
        assert 0.88 * m <= predicted <= 1.2 * m, (name, predicted, m, predicted / m)


def test_seventy_b_table_is_physical():
    # Weights from the same formulas: bf16 ~141 GB, 4-bit ~40 GB (shared/FACTS.md), LoRA rank 8 on
    # 16 blocks = 20.7 M parameters.
    bf16 = estimate_memory(LLAMA_70B, parse_config({"num_layers": 16, "batch_size": 1}))
    q4 = estimate_memory(LLAMA_70B, parse_config({"quantize": {"bits": 4}, "batch_size": 1}))
    assert 138e9 < bf16.weights < 143e9
    assert 37e9 < q4.weights < 41e9
    assert bf16.lora == 8 * 161_792 * 16 * 4
    assert bf16.optimizer == 2 * bf16.lora


def test_stage_holds_only_its_layers():
    job = parse_config({"batch_size": 1, "grad_checkpoint": True, "num_layers": -1})
    whole = estimate_memory(LLAMA_70B, job)
    first = estimate_memory(LLAMA_70B, job, (0, 40), has_head=False)
    last = estimate_memory(LLAMA_70B, job, (40, 80), has_embed=False)
    assert first.logits == 0 and last.logits > 0
    assert abs(first.weights + last.weights - whole.weights) < 0.01 * whole.weights


def test_layout_uses_fewest_stages_and_splits_by_memory():
    job = parse_config({"batch_size": 2, "grad_checkpoint": True, "max_seq_length": 1024,
                        "num_layers": 16})
    workers = [WorkerMemory("a", 120 * GIB), WorkerMemory("b", 60 * GIB)]
    plan = plan_job(LLAMA_70B, job, workers)  # bf16 70B: ~141 GB, fits neither alone
    assert (plan.data_parallel, plan.pipeline_stages) == (1, 2)
    (s0, e0), (s1, e1) = plan.stage_layers
    assert (s0, e1) == (0, 80) and e0 == s1
    assert e0 - s0 > e1 - s1  # the bigger worker holds more blocks
    for w in workers:
        assert plan.peak_bytes_per_worker[w.worker_id] <= w.memory_bytes

    # Two pipelines on mixed Macs share one cut (data-parallel peers sum the same blocks' grads).
    mixed = [WorkerMemory("a", 128 * GIB), WorkerMemory("b", 128 * GIB),
             WorkerMemory("c", 100 * GIB), WorkerMemory("d", 100 * GIB)]
    plan = plan_job(LLAMA_70B, job, mixed)
    assert (plan.data_parallel, plan.pipeline_stages) == (2, 2)
    assert sorted(w for rep in plan.assignments for w in rep) == ["a", "b", "c", "d"]
    for w in mixed:
        assert plan.peak_bytes_per_worker[w.worker_id] <= w.memory_bytes * 0.9
    (r0s0, r0s1), (r1s0, r1s1) = plan.assignments
    assert plan.ring_order() == [r0s0, r0s1, r1s1, r1s0]  # ring ranks 0..3 (pipeline_link.Topology)

    q = parse_config({"batch_size": 2, "quantize": {"bits": 4}, "grad_checkpoint": True,
                      "max_seq_length": 1024})
    plan = plan_job(LLAMA_70B, q, [WorkerMemory(n, 64 * GIB) for n in "abcd"])
    assert (plan.data_parallel, plan.pipeline_stages) == (2, 1)  # 4-bit fits one 64 GB: pure DP


def test_cut_balances_compute_when_memory_allows():
    from herd.stage_cut import balanced_split, head_blocks, stage_cost

    # An earlier stage runs each adapted block's forward twice (once to pass it on, once under
    # mx.vjp) plus its backward: 3; the last stage 2. 5 blocks: 2 x 3 = 6 against 3 x 2 = 6.
    assert balanced_split(5, 2) == [(0, 2), (2, 5)]
    # Blocks before the first adapted one only run forward: a frozen first stage takes more.
    assert balanced_split(8, 2, first_adapted=6) == [(0, 5), (5, 8)]
    for blocks, stages in [(80, 4), (28, 3), (5, 5)]:
        spans = balanced_split(blocks, stages, 1.3, first_adapted=blocks // 2)
        assert spans[0][0] == 0 and spans[-1][1] == blocks
        assert all(a < b for a, b in spans) and all(x[1] == y[0] for x, y in zip(spans, spans[1:]))
    assert 1.0 < head_blocks(LLAMA_70B) < 1.6  # a 128k vocabulary: more than one block of work
    # The cut's costliest stage is the least of every possible cut's (all of them, small cases).
    import itertools

    for blocks, stages, adapted in [(7, 3, 0), (9, 4, 5), (10, 2, 3), (8, 8, 2), (12, 5, 6)]:
        def worst(ends):
            starts = (0, *ends[:-1])
            return max(stage_cost(a, b, b == blocks, adapted, 1.3) for a, b in zip(starts, ends))

        every = [(*cut, blocks) for cut in itertools.combinations(range(1, blocks), stages - 1)]
        got = tuple(b for _, b in balanced_split(blocks, stages, 1.3, first_adapted=adapted))
        assert worst(got) == min(map(worst, every)), (blocks, stages, adapted)

    job = parse_config({"batch_size": 2, "grad_checkpoint": True, "max_seq_length": 1024,
                        "num_layers": 16})
    equal = [WorkerMemory("a", 128 * GIB), WorkerMemory("b", 128 * GIB)]
    plan = plan_job(LLAMA_70B, job, equal)
    assert plan.stage_layers == balanced_split(80, 2, head_blocks(LLAMA_70B), first_adapted=64)
    (s0, e0), (s1, e1) = plan.stage_layers
    costs = [stage_cost(s0, e0, False, 64), stage_cost(s1, e1, True, 64, head_blocks(LLAMA_70B))]
    assert max(costs) / min(costs) < 1.05  # an even 40/40 cut would be 40 against 58.6
    for w in equal:
        assert plan.peak_bytes_per_worker[w.worker_id] <= w.memory_bytes * 0.9


def test_data_parallel_on_macs_of_different_memory_caps_each_ranks_share():
    """A 192 GB Studio and a 64 GB MacBook, 4-bit 70B, batch 8: an equal split (4 each) does not
    fit the MacBook, but token-weighted DP is exact for any split, so both train: each rank is
    capped at what its memory holds (sent to the ranks as cluster.max_shares, which the speed
    balancer respects). Before, the MacBook sat idle (one rank of 8)."""
    from coordinator.launching import launches, planned_config
    from coordinator.placement import Placement, _place_with_planner
    from coordinator.planner import HEADROOM
    from coordinator.planner.layout import max_examples
    from tests.test_service_units import job as service_job
    from tests.test_service_units import worker

    def per_rank(k: int) -> dict:
        return {"batch_size": k, "quantize": {"bits": 4}, "grad_checkpoint": True,
                "max_seq_length": 2048}

    job = parse_config(per_rank(8))
    studio, mbp = WorkerMemory("studio", 192 * GIB), WorkerMemory("mbp", 64 * GIB)
    budget = {w.worker_id: int(w.memory_bytes * (1 - HEADROOM)) for w in (studio, mbp)}
    assert estimate_memory(LLAMA_70B, parse_config(per_rank(4))).total > budget["mbp"]
    plan = plan_job(LLAMA_70B, job, [studio, mbp])
    assert (plan.data_parallel, plan.pipeline_stages) == (2, 1)
    assert plan.ring_order() == ["studio", "mbp"]
    assert plan.max_shares == (8, 3)
    for w, cap in zip(("studio", "mbp"), plan.max_shares):  # the most that fits, exactly
        assert estimate_memory(LLAMA_70B, parse_config(per_rank(cap))).total <= budget[w]
        assert cap == 8 or estimate_memory(LLAMA_70B, parse_config(per_rank(cap + 1))).total \
            > budget[w]
        assert plan.peak_bytes_per_worker[w] <= budget[w]
    assert max_examples(LLAMA_70B, job, 1 * GIB) == 0
    # Equal Macs: any split fits both, no cap. mlx_lm's averaging needs equal splits: no caps,
    # so the MacBook is left out as before.
    even = plan_job(LLAMA_70B, job, [studio, WorkerMemory("other", 192 * GIB)])
    assert (even.data_parallel, even.max_shares) == (2, None)
    mean = parse_config({**per_rank(8), "cluster": {"gradient_average": "mlx_lm"}})
    alone = plan_job(LLAMA_70B, mean, [studio, mbp])
    assert (alone.data_parallel, alone.max_shares) == (1, None)

    # Through placement to what the ranks are sent: the caps in rank order, the lower of the
    # planner's and the user's own where both cover the batch.
    records = [worker(1, mem=192 * GIB), worker(2, mem=64 * GIB)]
    placed = _place_with_planner(job, records, LLAMA_70B)
    assert (placed.worker_ids, placed.max_shares) == (["w1", "w2"], (8, 3))
    sj = service_job(workers=2)
    sj.config = job
    sent = [launch.job.config.cluster.max_shares
            for launch in launches(sj, placed, {w.worker_id: w for w in records})]
    assert sent == [list(placed.max_shares)] * 2
    assert sj.config.cluster.max_shares is None  # the stored job keeps the user's config
    mine = parse_config({**per_rank(8), "cluster": {"max_shares": [6, 6]}})

    def capped(cfg, caps, ranks=2):
        return planned_config(cfg, Placement([f"w{i}" for i in range(ranks)], 0,
                                             data_parallel=ranks, max_shares=caps))

    assert capped(mine, (8, 3)).cluster.max_shares == [6, 3]
    assert capped(mine, (8, 1)).cluster.max_shares == [8, 1]  # 6 + 1 < 8: the planner's
    # An elastic job of 4 shrunk to 3 Macs of different memory: its caps name 3 ranks. (They
    # were checked against the 4 it asked for, after the job was PLACING: stuck there.)
    four = parse_config({**per_rank(8), "cluster": {"workers": 4}})
    shrunk = capped(four, (4, 3, 2), ranks=3).cluster
    assert (shrunk.workers, shrunk.max_shares) == (3, [4, 3, 2])
    assert four.cluster.workers == 4
    users = parse_config({**per_rank(8), "cluster": {"workers": 4, "max_shares": [2, 2, 2, 2]}})
    assert capped(users, None, ranks=3).cluster.max_shares is None  # (4 entries: not for 3)
    assert capped(users, (4, 3, 2), ranks=3).cluster.max_shares == [4, 3, 2]
    assert capped(users, None, ranks=4) is users  # (nothing to change)


def test_three_macs_train_mlx_lms_default_batch_of_four():
    """mlx-lm's default batch_size 4 on 3 Macs (`workers: 3`): token-weighted data parallelism
    splits it 2, 1, 1 (the same update as one process: tests/test_balance.py), where mlx-lm's
    launcher refuses a batch its hosts do not divide. Before, `herd check` refused it and auto
    left a Mac out. mlx-lm's averaging keeps equal splits: 2 of the 3."""
    from coordinator.placement import place
    from tests.test_service_units import worker

    base = {"batch_size": 4, "quantize": {"bits": 4}, "grad_checkpoint": True,
            "max_seq_length": 2048}
    macs = [WorkerMemory(n, 128 * GIB) for n in "abc"]
    for cluster in ({"workers": 3}, {"workers": 3, "parallelism": {"data": 3}}):
        job = parse_config({**base, "cluster": cluster})
        plan = plan_job(LLAMA_70B, job, macs)
        assert (plan.data_parallel, plan.pipeline_stages) == (3, 1), cluster
        placed = place(job, [worker(i, mem=128 * GIB) for i in (1, 2, 3)], LLAMA_70B)
        assert placed.worker_ids == ["w1", "w2", "w3"]
    mean = parse_config({**base, "cluster": {"gradient_average": "mlx_lm"}})
    assert plan_job(LLAMA_70B, mean, macs).data_parallel == 2
    with pytest.raises(ConfigError, match="does not split evenly over the 3 data-parallel"):
        parse_config({**base, "cluster": {"workers": 3, "gradient_average": "mlx_lm"}})


def test_a_stage_counts_the_inputs_it_holds_in_flight():
    from coordinator.planner import estimate_memory

    job = parse_config({"batch_size": 8, "max_seq_length": 512, "num_layers": -1})
    mid = dict(has_embed=False, has_head=False, microbatches=8)
    one = estimate_memory(LLAMA_70B, job, (40, 60), in_flight=1, **mid)
    three = estimate_memory(LLAMA_70B, job, (40, 60), in_flight=3, **mid)
    hidden_state = 1 * 512 * 8192 * 2  # one microbatch's bf16 hidden states
    assert three.activations - one.activations == 2 * hidden_state
    # The first stage's inputs are token ids: nothing to add.
    first = [estimate_memory(LLAMA_70B, job, (0, 20), has_head=False, microbatches=8, in_flight=k)
             for k in (1, 4)]
    assert first[0].activations == first[1].activations > 0
    # In a plan, stage s of S holds S - s inputs under 1F1B (worker/pipeline/schedule.py).
    from coordinator.planner.layout import ModelShape, _stage_estimate

    shape = ModelShape.from_config(LLAMA_70B)
    per_stage = [_stage_estimate(LLAMA_70B, job, shape, (40, 60), 4, 1, s).activations
                 for s in (1, 2, 3)]
    mb_state = (8 // 8) * 512 * 8192 * 2  # 8 examples in 8 microbatches (one each)
    assert per_stage[0] - per_stage[1] == per_stage[1] - per_stage[2] == mb_state


def test_keys_of_other_architectures_and_the_head_are_estimated_not_refused():
    """mlx-lm takes any lora_parameters.keys (phi3's fused qkv_proj/gate_up_proj, lm_head, which
    it matches against the whole model): planned, never refused; lm_head's adapter only on the
    rank that holds the head."""
    def lora(keys, **kw):
        job = parse_config({"num_layers": 16, "lora_parameters": {"rank": 8, "keys": keys}})
        return estimate_memory(LLAMA_70B, job, **kw).lora

    h, vocab = LLAMA_70B["hidden_size"], LLAMA_70B["vocab_size"]
    v = lora(["self_attn.v_proj"])
    assert lora(["self_attn.v_proj", "lm_head"]) == v + 8 * (h + vocab) * 4
    assert lora(["self_attn.v_proj", "lm_head"], layers=(0, 40), has_head=False) == lora(
        ["self_attn.v_proj"], layers=(0, 40), has_head=False)
    fused = lora(["self_attn.qkv_proj", "mlp.gate_up_proj"])
    split = lora(["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj",
                  "mlp.up_proj"])
    assert split > fused > 0  # one adapter per fused linear: fewer in-dimensions
    assert lora(["block_sparse_moe.gate"]) >= lora(["mlp.up_proj"]) > 0  # unknown: the largest


def test_a_multimodal_config_is_planned_from_its_text_config():
    nested = {"model_type": "llava", "text_config": {k: v for k, v in LLAMA_70B.items()}}
    job = parse_config({"batch_size": 2, "quantize": {"bits": 4}, "grad_checkpoint": True,
                        "max_seq_length": 1024})
    plan = plan_job(nested, job, [WorkerMemory("a", 64 * GIB), WorkerMemory("b", 64 * GIB)])
    assert plan.stage_layers[0][0] == 0 and plan.stage_layers[-1][1] == 80


def test_refusal_lists_fixes_with_numbers():
    job = parse_config({"batch_size": 4, "max_seq_length": 4096, "num_layers": 16})
    mac = macos_usable_bytes(64 * GIB)
    with pytest.raises(PlacementError) as e:
        plan_job(LLAMA_70B, job, [WorkerMemory("mac", mac)])
    text = str(e.value)
    assert "QLoRA" in text and "grad_checkpoint" in text and "more worker" in text
    assert " GB" in text


LLAMA_8B = {**LLAMA_70B, "hidden_size": 4096, "intermediate_size": 14336,
            "num_hidden_layers": 32, "num_attention_heads": 32}


def test_full_fine_tuning_is_planned_for_the_weights_it_trains_and_never_cut():
    """An 8B, full fine-tuning of 16 blocks, on two 25 GB workers: it was sized as LoRA and cut
    into 2 stages, which it cannot be ("needs 12.6 GB ... offers 22.7 GB", not fitting), and
    QLoRA was offered, which full fine-tuning refuses (an outside run). Now: its own figure, on
    one worker, more than LoRA's by its gradients and Adam states; LoRA on a 4-bit base offered."""
    full = parse_config({"fine_tune_type": "full", "num_layers": 16, "batch_size": 4,
                         "max_seq_length": 2048, "cluster": {"workers": 2}})
    lora = parse_config({"num_layers": 16, "batch_size": 4, "max_seq_length": 2048})
    trained = 16 * sum(i * o for i, o in
                       ((4096, 4096), (4096, 1024), (4096, 1024), (4096, 4096),
                        (4096, 14336), (4096, 14336), (14336, 4096))) * 2  # bf16 bytes
    gap = estimate_memory(LLAMA_8B, full).total - estimate_memory(LLAMA_8B, lora).total
    assert 3.5 * trained < gap < 4.5 * trained  # gradients, 2 Adam states, the update's copy
    with pytest.raises(PlacementError) as e:
        plan_job(LLAMA_8B, full, [WorkerMemory(f"w{i}", int(25.3e9)) for i in range(2)])
    text = str(e.value)
    assert "on one worker (it cannot be cut into pipeline stages: pipeline stages train " \
           "LoRA/DoRA adapters, not fine_tune_type: full)" in text, text
    need = float(re.search(r"needs ([\d.]+) GB on one worker", text).group(1))
    offers = float(re.search(r"the largest worker offers ([\d.]+) GB", text).group(1))
    assert need > offers, text  # (the figure that binds: it said 12.6 needed, 22.7 offered)
    assert "LoRA on a 4-bit base (fine_tune_type: lora, quantize: {bits: 4}) -> fits" in text
    assert "  - QLoRA" not in text


def test_a_refusal_speaks_of_the_workers_the_job_asks_for_and_offers_the_idle_ones():
    """`cluster.workers: 2` on three verified 16 GB Macs: the refusal said "even cut into 3
    stages" (the 3 verified, not the 2 asked for) and offered "1 more worker" to buy, where the
    third sat idle (an outside run)."""
    job = parse_config({"num_layers": 16, "batch_size": 4, "max_seq_length": 2048,
                        "cluster": {"workers": 2}})
    with pytest.raises(PlacementError) as e:
        plan_job(LLAMA_8B, job, [WorkerMemory(f"w{i}", 16 * GIB) for i in range(3)])
    text = str(e.value)
    assert "even cut into 2 pipeline stage(s)" in text and "(cluster.workers: 2)" in text, text
    assert "cluster.workers: 3 (3 are verified) -> fits: 1 x 3" in text, text
    assert "more worker" not in text, text


def test_pipeline_stages_a_model_or_job_cannot_have_are_refused_at_plan_not_on_a_worker():
    """A stage runs embed -> blocks -> norm -> head: a gemma cut into stages trained a different
    network silently (its embedding scale skipped) and gemma2 crashed on the worker; 8 stages of
    a 6-block model were "needs 0.0 GB"; test: true failed on a rank (outside runs). Fixed
    stages are refused with the reason; auto plans no stages for them."""
    from herd.errors import ConfigError

    gemma = {**LLAMA_70B, "model_type": "gemma"}
    two = {"parallelism": {"data": 1, "pipeline": 2}}
    macs = [WorkerMemory("a", macos_usable_bytes(64 * GIB)),
            WorkerMemory("b", macos_usable_bytes(64 * GIB))]
    qlora = {"quantize": {"bits": 4}, "batch_size": 1, "max_seq_length": 512}
    with pytest.raises(ConfigError, match="pipeline stages run llama, mistral, phi3, qwen2, "
                                          "qwen3 models; this one is gemma"):
        plan_job(gemma, parse_config({**qlora, "cluster": two}), macs)
    # auto: a 2-stage pipeline for the llama, nothing that cuts the gemma
    assert plan_job(LLAMA_70B, parse_config(qlora), macs).pipeline_stages == 2
    with pytest.raises(PlacementError) as e:
        plan_job(gemma, parse_config(qlora), macs)
    assert "more worker" not in str(e.value)  # (more Macs would not help: no stages for it)
    six = {**LLAMA_70B, "num_hidden_layers": 6}
    eight = {"workers": 8, "parallelism": {"data": 1, "pipeline": 8}}
    with pytest.raises(ConfigError, match="pipeline = 8, but the model has 6 blocks"):
        plan_job(six, parse_config({"cluster": eight}), macs * 4)
    with pytest.raises(ConfigError, match="test: not supported when the model is cut"):
        parse_config({"test": True, "cluster": two})


def test_plan_says_why_a_worker_is_left_idle():
    """`herd plan` listed "unused: w2" and nothing more (an outside run): each reason the
    layout search meets, in its words."""
    def why(job: dict, gbs: list[int]) -> str:
        workers = [WorkerMemory(f"w{i}", gb * GIB) for i, gb in enumerate(gbs)]
        cfg = parse_config({"quantize": {"bits": 4}, "grad_checkpoint": True, **job})
        return why_unused(LLAMA_70B, cfg, workers, plan_job(LLAMA_70B, cfg, workers))

    assert why({"batch_size": 2}, [48, 48, 48]) == \
        "each replica of this 2-stage pipeline takes 2 workers"
    assert "one example of the batch needs" in why({"batch_size": 8}, [192, 192, 8])
    assert why({"batch_size": 2}, [192, 192, 192]) == \
        "batch_size 2 gives at most 2 replicas an example each"
    assert why({"batch_size": 4, "cluster": {"gradient_average": "mlx_lm"}}, [192] * 3) == (
        "batch_size 4 does not split evenly over 3 replicas (cluster.gradient_average: mlx_lm "
        "averages each rank's own mean, which is the global batch's only when the ranks take "
        "equal shares)")
    assert why({"batch_size": 4, "cluster": {"workers": 2}}, [192] * 3) == \
        "the job asks for cluster.workers: 2"
    assert why({"batch_size": 4}, [192, 192]) == ""  # every worker used


def test_a_refusal_names_the_worker_that_binds():
    """An even cut over a 64 and a 128 GB Mac is bound by the 64 GB one: the refusal said "needs
    78.0 GB ... the largest worker offers 92.8 GB" (an outside run: it read as a contradiction)."""
    cfg = parse_config({"batch_size": 4, "grad_checkpoint": True, "max_seq_length": 2048,
                        "num_layers": 16, "cluster": {"workers": 2, "parallelism": {
                            "data": 1, "pipeline": 2}}})
    macs = [WorkerMemory("small", macos_usable_bytes(64 * GIB)),
            WorkerMemory("big", macos_usable_bytes(128 * GIB))]
    with pytest.raises(PlacementError) as e:
        plan_job(LLAMA_70B, cfg, macs)
    said = e.value.message
    assert "even cut into 2 pipeline stage(s), and no uneven cut fits either; the smallest of " \
           "them, small, offers 46.4 GB (51.5 GB usable less 10% headroom)" in said, said
    assert "largest" not in said.splitlines()[0]


def test_macos_wired_limit():
    assert macos_usable_bytes(64 * GIB) == int(64 * GIB * 0.75)
    assert macos_usable_bytes(64 * GIB, wired_limit_mb=60_000) == 60_000 * (1 << 20)
    assert macos_usable_bytes(16 * GIB) < 0.7 * 16 * GIB


def test_herd_plan_cli(tmp_path):
    model = tmp_path / "m"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(LLAMA_70B))
    cfg = tmp_path / "job.yaml"
    cfg.write_text(f"model: {model}\nbatch_size: 1\nquantize: {{bits: 4}}\ngrad_checkpoint: true\n")
    ok = subprocess.run([sys.executable, "-m", "herd", "plan", str(cfg), "--workers", "64,64",
                         "--macos"], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert "weights" in ok.stdout and "1 x 2 (data x pipeline)" in ok.stdout
    # The config sets no cluster.workers: `herd submit` would place it on one worker, where it
    # does not fit (an outside run: plan and submit disagreed, plan exiting 0). The note says
    # so and what to add, and the exit is submit's, 4.
    fix = "cluster: {workers: 2, parallelism: {data: 1, pipeline: 2}}"
    assert ok.returncode == 4, ok.stderr
    assert ("the config asks for 1 (cluster.workers), so `herd submit` would place it on 1; as "
            "written it does not fit (its 80-block") in ok.stderr, ok.stderr
    assert f"add `{fix}` to run it as planned" in ok.stderr, ok.stderr
    # (the refusal's reason only: its fixes, with their own `cluster:` lines, ran into this one)
    assert "changes that would fit" not in ok.stderr and ok.stderr.count("cluster:") == 1
    as_json = subprocess.run([sys.executable, "-m", "herd", "plan", str(cfg), "--workers", "64,64",
                              "--macos", "--json"], capture_output=True, text=True, timeout=60,
                             cwd=REPO)
    assert as_json.returncode == 4 and json.loads(as_json.stdout)["fits_as_written"] is False
    cfg.write_text(cfg.read_text() + fix + "\n")
    pinned = subprocess.run([sys.executable, "-m", "herd", "plan", str(cfg), "--workers",
                             "64,64", "--macos"], capture_output=True, text=True, timeout=60,
                            cwd=REPO)
    assert pinned.returncode == 0 and "1 x 2 (data x pipeline)" in pinned.stdout, pinned.stderr
    assert "note:" not in pinned.stderr, pinned.stderr
    cfg.write_text(cfg.read_text().replace(fix + "\n", ""))
    alone = subprocess.run([sys.executable, "-m", "herd", "plan", str(cfg), "--workers", "64",
                            "--macos"], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert alone.returncode == 4 and f"1 more worker(s) of 52 GB ({fix})" in alone.stderr, \
        alone.stderr
    cfg.write_text(f"model: {model}\nbatch_size: 1\n")
    bad = subprocess.run([sys.executable, "-m", "herd", "plan", str(cfg), "--workers", "64",
                          "--macos"], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert bad.returncode == 4
    assert "QLoRA" in bad.stderr
    cfg.write_text(f"model: {model}\nbatch_size: 8\nmax_seq_length: 2048\nquantize: {{bits: 4}}\n"
                   "grad_checkpoint: true\n")
    mixed = subprocess.run([sys.executable, "-m", "herd", "plan", str(cfg), "--workers",
                            "192,64", "--json"], capture_output=True, text=True, timeout=60,
                           cwd=REPO)
    assert mixed.returncode == 0, mixed.stderr
    shown = json.loads(mixed.stdout)
    assert shown["data_parallel"] == 2 and shown["max_shares"][0] == 8
    assert 1 <= shown["max_shares"][1] < 4, shown
    assert (shown["workers_asked"], shown["workers_available"]) == (None, 2)
    cfg.write_text(cfg.read_text() + "cluster: {workers: 4}\n")
    short = subprocess.run([sys.executable, "-m", "herd", "plan", str(cfg), "--workers",
                            "192,64", "--json"], capture_output=True, text=True, timeout=60,
                           cwd=REPO)
    asked = json.loads(short.stdout or "{}").get("workers_asked")
    assert (asked, short.returncode) == (4, 0), short.stderr


if __name__ == "__main__":
    if sys.argv[1] == "--table":  # the calibration table in bench/results/planner-*.md
        sys.path.insert(0, str(REPO))
        print("| config | measured peak (MB) | predicted (MB) | predicted / measured |")
        print("|---|---|---|---|")
        for name, case in {**CASES, **CHECKPOINTED}.items():
            p, m = _compare(case)
            print(f"| {name} {case} | {m / 1e6:.1f} | {p / 1e6:.1f} | {p / m:.3f} |", flush=True)
    else:
        print(json.dumps(measure(json.loads(sys.argv[1]))))


LOAD_PEAK = r"""
import json, sys
import mlx.core as mx
from herd.config import parse_config
job = parse_config({"model": sys.argv[1], "data": "d", "num_layers": 2,
                    "quantize": {"bits": 4, "group_size": 64}})
if sys.argv[2] == "one process":
    from worker.rank.model import load_base
    model, _ = load_base(job)
else:
    from worker.pipeline.stage import StageSpec, build_stage
    model = build_stage(job, StageSpec(0, 2, 0, 6, 8)).model
mx.eval(model.parameters())
print(json.dumps({"peak": mx.get_peak_memory(), "steady": mx.get_active_memory()}))
"""


@pytest.mark.parametrize("where", ["one process", "pipeline stage"])
def test_quantizing_on_load_peaks_near_the_quantized_model_not_the_full_one(tmp_path, where):
    """QLoRA on load held every full-precision weight (of the model, or the stage) while it
    quantized: 6x the 4-bit weights the plan counts, so the shipped 70B layout on two 64 GB Macs
    could not load (an outside run). Blocks are now read and quantized one at a time: the load's
    peak is the quantized weights plus about one block's full-precision ones."""
    from herd.cli.tiny import make_tiny_model

    model = make_tiny_model(tmp_path / "m", layers=8, hidden=256, intermediate=1024)
    full = sum(f.stat().st_size for f in model.glob("*.safetensors"))  # float32, 8 blocks
    out = subprocess.run([sys.executable, "-c", LOAD_PEAK, str(model), where], cwd=REPO,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    block = full / 8  # (about: the embedding is 1/64 of this model)
    # the steady quantized weights, one or two blocks' full-precision ones in flight, slack
    assert got["peak"] <= got["steady"] + 2 * block + 0.05 * full, (got, full)
    assert got["peak"] < 0.5 * full, (got, full)  # it was 0.86-1.0 of it


def test_a_job_that_fits_whole_memory_but_not_what_is_free_says_so():
    """Submit and `herd plan` count a worker's whole memory, placement what is free now: the job
    waited with "does not fit" after plan said it fits (an outside run). The wait says why; and
    a worker that declares more than its RAM (--memory, a local cluster posing as big Macs)
    reports free memory against the declared size."""
    from coordinator.domain import WorkerRecord
    from coordinator.placement import place
    from herd.errors import DoesNotFitError
    from worker.agent.machine import Machine

    cfg = parse_config({"model": "m", "data": "d", "batch_size": 1, "quantize": {"bits": 4},
                        "grad_checkpoint": True, "cluster": {"workers": 1}})
    busy = WorkerRecord("big", "10.0.0.1", 7000, 8000, 9000, memory_bytes=192 * GIB,
                        free_memory_bytes=20 * GIB, chip="Apple M2 Ultra")
    with pytest.raises(DoesNotFitError, match="it fits these workers' whole memory, not what is "
                       "free on them now") as e:
        place(cfg, [busy], LLAMA_70B)
    assert e.value.hint == "it starts once that memory is free"
    small = WorkerRecord("small", "10.0.0.2", 7000, 8000, 9000, memory_bytes=16 * GIB,
                         free_memory_bytes=16 * GIB, chip="Apple M2")
    with pytest.raises(DoesNotFitError) as e:  # too small whole: the planner's own refusal
        place(cfg, [small], LLAMA_70B)
    assert "whole memory" not in e.value.message
    posing = Machine("x", memory_bytes=128 * GIB, gpu_cores=0, os="Linux", mlx_version="",
                     ram_bytes=24 * GIB)
    assert posing.free_bytes(20 * GIB) == 124 * GIB  # 4 GiB held by others, of 128 declared
    share = Machine("x", memory_bytes=64 * GIB, gpu_cores=0, os="macOS", mlx_version="",
                    ram_bytes=128 * GIB)
    assert (share.free_bytes(100 * GIB), share.free_bytes(30 * GIB)) == (64 * GIB, 30 * GIB)
    assert share.free_bytes(0) == 64 * GIB  # (nothing known: the declared size)


def test_auto_plans_at_most_two_pipelines_the_mlx_ring_can_carry():
    """A 70B bf16 job on six equal Macs: on 64 GiB ones auto planned 2 x 3, on bigger ones 3 x 2,
    which the MLX ring cannot carry (Plan.ring_order refused it at every placement: a review).
    Auto stays within 2 pipelines; a pinned 3 x 2 is refused at `herd check`, not after submit."""
    job = parse_config({"batch_size": 12, "max_seq_length": 2048, "grad_checkpoint": True,
                        "num_layers": -1, "cluster": {"workers": 6}})
    for gib in (64, 96, 128):
        plan = plan_job(LLAMA_70B, job, [WorkerMemory(f"m{i}", gib * GIB) for i in range(6)])
        assert plan.pipeline_stages == 1 or plan.data_parallel <= 2, (gib, plan.data_parallel,
                                                                    plan.pipeline_stages)
        assert len(plan.ring_order()) == plan.data_parallel * plan.pipeline_stages
    with pytest.raises(ConfigError, match="carries at most 2 pipelines"):
        parse_config({"batch_size": 12, "cluster": {"parallelism": {"data": 3, "pipeline": 2}}})
