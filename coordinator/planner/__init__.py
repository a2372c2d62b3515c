"""The memory planner: predicts each worker's peak memory from ``config.json`` alone and picks a
data x pipeline layout, or refuses with the changes that would make the job fit.

Pure arithmetic: no MLX, no grpc, no weights read. Every term is the size of real tensors (counts of
elements x bytes per element); the number of *copies* of each tensor that MLX keeps alive during a
training step was measured with ``mx.get_peak_memory()`` on tiny llama/qwen2 models (fp32 and bf16,
LoRA and QLoRA, gradient checkpointing on and off, sequences 256-512) and is recorded below with
what it is. tests/test_planner.py re-measures five configs in fresh processes and asserts +-10%.
The 32B/70B tables in docs/planning.md come from the same formulas.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from herd.config import JobConfig, Quantize
from herd.errors import ConfigError, DoesNotFitError, PlacementError
from herd.stage_cut import balanced_split, head_blocks

GB = 1e9
GIB = 1 << 30

# --- Copies MLX keeps alive per token during value_and_grad (measured, see module docstring). ---
# Each entry is (copies at the activation dtype, copies at float32). LoRA's low-rank path runs in
# float32 (lora_a/lora_b are fp32), so part of each block's saved tensors is fp32 whatever the base.
_BLOCK_PER_HIDDEN = (3.25, 4.5)  # residual stream, norm outputs, q/k/v/o, LoRA outputs of o/down
_BLOCK_PER_INTERMEDIATE = (2.0, 4.5)  # gate, up, swiglu and the fp32 LoRA outputs of gate/up
_BLOCK_PER_RANK = (0.0, 0.6)  # x @ lora_a per adapted linear, fp32
_LOGIT_COPIES = 4.0  # logits, log-softmax, its exp and the logits' cotangent, at the activation dtype
# The fused attention saves no B x heads x L x L probabilities; its backward materializes about
# 3.6 score-sized temporaries for the one block being differentiated.
_WORKSET_SCORE_COPIES = 3.6
# The rest of the backward working set: cotangents of the hidden state and the float32 upcasts of
# RMSNorm (none needed when the model is already fp32), in fp32 copies of one token x hidden tensor.
_WORKSET_FP32_COPIES = {4: 2.25, 2: 7.5}

# Adam/AdamW keep two fp32 moments per trainable parameter; SGD without momentum keeps none.
_OPTIMIZER_STATES = {"adam": 2, "adamw": 2, "muon": 1, "sgd": 0, "adafactor": 1}
_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
# plan_job keeps this much of each worker free: the model's measured error is within 10%.
HEADROOM = 0.10


@dataclass(frozen=True)
class WorkerMemory:
    worker_id: str
    memory_bytes: int  # usable bytes (macOS: the GPU wired limit, not total RAM)


@dataclass(frozen=True)
class MemoryEstimate:
    weights: int
    lora: int
    grads: int
    optimizer: int
    activations: int
    logits: int
    overhead: int

    @property
    def total(self) -> int:
        return (
            self.weights + self.lora + self.grads + self.optimizer
            + self.activations + self.logits + self.overhead
        )


@dataclass(frozen=True)
class Plan:
    data_parallel: int
    pipeline_stages: int
    stage_layers: list[tuple[int, int]]  # [start, end) per stage
    assignments: list[list[str]]  # [replica][stage] -> worker_id
    peak_bytes_per_worker: dict[str, int]
    microbatches: int = 1  # per replica and optimizer step (1F1B); 1 without pipelining
    estimates: dict[str, MemoryEstimate] = field(default_factory=dict)

    def ring_order(self) -> list[str]:
        """Worker ids in MLX-ring rank order for ``python -m worker.pipeline``: replica 0's
        stages forward, then replica 1's backward, so every pipeline hop and every replica pair
        are ring neighbours (worker/pipeline_link.py Topology). Data parallel only: replica order."""
        if self.pipeline_stages == 1:
            return [rep[0] for rep in self.assignments]
        if self.data_parallel > 2:
            raise PlacementError(
                f"{self.data_parallel} x {self.pipeline_stages} needs a transport that reaches any "
                "peer; the MLX ring carries at most 2 pipelines",
                hint="pin cluster.parallelism.data to 1 or 2",
            )
        order = list(self.assignments[0])
        if self.data_parallel == 2:
            order += list(reversed(self.assignments[1]))
        return order


@dataclass(frozen=True)
class ModelShape:
    """What the planner needs from a Hugging Face / mlx-lm ``config.json``."""

    model_type: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tie_embeddings: bool
    qkv_bias: bool
    dtype_bytes: int
    bits: int | None  # pre-quantized base (config.json "quantization")
    group_size: int

    @classmethod
    def from_config(cls, cfg: dict) -> "ModelShape":
        cfg = {**cfg.get("text_config", {}), **cfg} if "text_config" in cfg else cfg
        try:
            hidden = int(cfg["hidden_size"])
            heads = int(cfg["num_attention_heads"])
            layers = int(cfg["num_hidden_layers"])
            inter = int(cfg["intermediate_size"])
            vocab = int(cfg["vocab_size"])
        except KeyError as e:
            raise ConfigError(
                f"model config.json lacks {e.args[0]!r}",
                hint="herd plans dense llama/qwen2-style models from their config.json",
            ) from None
        q = cfg.get("quantization") or cfg.get("quantization_config") or {}
        model_type = str(cfg.get("model_type", "llama"))
        return cls(
            model_type=model_type,
            hidden=hidden,
            intermediate=inter,
            layers=layers,
            heads=heads,
            kv_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=int(cfg.get("head_dim") or hidden // heads),
            vocab=vocab,
            tie_embeddings=bool(cfg.get("tie_word_embeddings", model_type != "llama")),
            qkv_bias=bool(cfg.get("attention_bias", model_type == "qwen2")),
            dtype_bytes=_DTYPE_BYTES.get(str(cfg.get("torch_dtype", "bfloat16")), 2),
            bits=int(q["bits"]) if "bits" in q else None,
            group_size=int(q.get("group_size", 64)),
        )

    def linears(self) -> dict[str, tuple[int, int]]:
        """(in, out) of each linear in one block, named as mlx-lm names them."""
        h, i = self.hidden, self.intermediate
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        return {
            "self_attn.q_proj": (h, q),
            "self_attn.k_proj": (h, kv),
            "self_attn.v_proj": (h, kv),
            "self_attn.o_proj": (q, h),
            "mlp.gate_proj": (h, i),
            "mlp.up_proj": (h, i),
            "mlp.down_proj": (i, h),
        }


def _matrix_bytes(rows: int, cols: int, bits: int | None, group: int, dtype_bytes: int) -> int:
    """A weight matrix, quantized as mlx does it (packed bits + a scale and a bias per group)."""
    n = rows * cols
    if bits is None:
        return n * dtype_bytes
    return n * bits // 8 + 2 * (n // group) * dtype_bytes


def _adapted_keys(shape: ModelShape, job: JobConfig) -> dict[str, tuple[int, int]]:
    # mlx-lm's linear_to_lora_layers adapts every Linear of a block unless keys are given.
    lin = shape.linears()
    keys = job.lora_parameters.keys
    if keys is None:
        return lin
    unknown = [k for k in keys if k not in lin]
    if unknown:
        raise ConfigError(
            f"lora_parameters.keys {unknown} are not linears of a {shape.model_type} block",
            hint=f"known keys: {', '.join(lin)}",
        )
    return {k: lin[k] for k in keys}


def _copies(pair: tuple[float, float], act_bytes: int) -> float:
    return pair[0] * act_bytes + pair[1] * 4


def estimate_memory(
    model_config: dict,
    job: JobConfig,
    layers: tuple[int, int] | None = None,
    *,
    has_embed: bool = True,
    has_head: bool = True,
    microbatches: int = 1,
    data_parallel: int = 1,
    in_flight: int | None = None,
) -> MemoryEstimate:
    """Peak bytes of one rank that holds blocks ``layers`` = [start, end) (all by default), trains
    ``batch_size / data_parallel`` examples of ``max_seq_length`` tokens per step, split into
    ``microbatches`` when pipelined (a stage keeps the inputs of the microbatches in flight,
    ``in_flight`` of them, default all; and one microbatch's block activations at a time, because
    it recomputes them under ``mx.vjp``)."""
    shape = ModelShape.from_config(model_config)
    start, end = layers if layers is not None else (0, shape.layers)
    if not 0 <= start <= end <= shape.layers:
        raise ConfigError(f"layers {start}:{end} outside the model's 0:{shape.layers}")
    bits, group = shape.bits, shape.group_size
    if bits is None and job.quantize is not None:
        bits, group = job.quantize.bits, job.quantize.group_size
    db = shape.dtype_bytes
    n_blocks = end - start

    # Base weights: the blocks this rank owns, plus embedding / head / final norm where it holds them.
    block = sum(_matrix_bytes(i, o, bits, group, db) for i, o in shape.linears().values())
    block += 2 * shape.hidden * db
    if shape.qkv_bias:
        block += (shape.heads + 2 * shape.kv_heads) * shape.head_dim * db
    embed = _matrix_bytes(shape.vocab, shape.hidden, bits, group, db)
    weights = n_blocks * block
    if has_embed:
        weights += embed
    if has_head:
        weights += shape.hidden * db + (0 if shape.tie_embeddings and has_embed else embed)

    # LoRA on the last num_layers blocks of the model; this rank owns the part inside [start, end).
    adapted = max(0, end - max(start, job.first_adapted_layer(shape.layers)))
    keys = _adapted_keys(shape, job)
    r = job.lora_parameters.rank
    per_block = sum(r * (i + o) for i, o in keys.values())
    if job.fine_tune_type == "dora":
        per_block += sum(o for _, o in keys.values())
    params = adapted * per_block
    lora = params * 4
    grads = params * 4
    optimizer = params * 4 * _OPTIMIZER_STATES.get(job.optimizer, 2)

    # Activations. Only blocks with trainable parameters (and those after them) keep anything for
    # the backward pass; blocks before the first adapted one run forward only.
    per_replica = max(1, job.batch_size // max(1, data_parallel))
    b_micro = max(1, per_replica // max(1, microbatches))
    seq = job.max_seq_length
    tokens = b_micro * seq
    ab = db  # activations run at the model's dtype (quantized models: their scales' dtype)
    saved_blocks = adapted if adapted else 0
    one_block = tokens * (
        shape.hidden * _copies(_BLOCK_PER_HIDDEN, ab)
        + shape.intermediate * _copies(_BLOCK_PER_INTERMEDIATE, ab)
        + r * len(keys) * _copies(_BLOCK_PER_RANK, ab)
    )
    hidden_state = tokens * shape.hidden * ab
    if saved_blocks == 0:
        activations = 0.0
    elif job.grad_checkpoint:
        # mlx-lm checkpoints every block: it keeps each block's input and recomputes one at a time.
        activations = saved_blocks * hidden_state + one_block
    else:
        activations = saved_blocks * one_block
    held = microbatches if in_flight is None else max(1, min(in_flight, microbatches))
    if held > 1 and saved_blocks and not has_embed:
        # The stage keeps the input of every microbatch in flight (1F1B: stage s of S holds at
        # most S - s, worker/pipeline_schedule.py); the first stage's inputs are token ids.
        activations += (held - 1) * hidden_state
    logits = _LOGIT_COPIES * tokens * shape.vocab * ab if has_head and saved_blocks else 0.0
    overhead = (
        _WORKSET_FP32_COPIES.get(ab, 7.5) * tokens * shape.hidden * 4
        + _WORKSET_SCORE_COPIES * b_micro * shape.heads * seq * seq * ab
        if saved_blocks else 0.0
    )
    return MemoryEstimate(
        weights=int(weights),
        lora=int(lora),
        grads=int(grads),
        optimizer=int(optimizer),
        activations=int(activations),
        logits=int(logits),
        overhead=int(overhead),
    )


def macos_usable_bytes(total_bytes: int, wired_limit_mb: int | None = None) -> int:
    """What the GPU may wire on a Mac: ``iogpu.wired_limit_mb`` when set, else macOS's default
    (about two thirds of RAM up to 36 GB, three quarters above)."""
    if wired_limit_mb:
        return min(total_bytes, int(wired_limit_mb) * (1 << 20))
    fraction = 0.67 if total_bytes <= 36 * GIB else 0.75
    return int(total_bytes * fraction)


def _stage_estimate(cfg: dict, job: JobConfig, shape: ModelShape, span: tuple[int, int],
                    stages: int, dp: int, stage: int = 0) -> MemoryEstimate:
    return estimate_memory(
        cfg, job, span,
        has_embed=span[0] == 0, has_head=span[1] == shape.layers,
        microbatches=_microbatches(job, stages, dp), data_parallel=dp, in_flight=stages - stage,
    )


def _microbatches(job: JobConfig, stages: int, dp: int) -> int:
    # One example per microbatch: the most microbatches a replica's batch allows, which is what
    # brings GPipe closest to its bound m / (m + S - 1).
    return 1 if stages == 1 else max(1, job.batch_size // dp)


def _split(cfg: dict, job: JobConfig, shape: ModelShape, mems: list[int], dp: int
           ) -> list[tuple[int, int]] | None:
    """Cut the blocks into len(mems) contiguous stages so that the fullest stage's share of its
    worker's budget is as small as possible (bisection on that share, greedy packing)."""
    stages = len(mems)
    if stages > shape.layers:
        return None

    def pack(share: float) -> list[tuple[int, int]] | None:
        spans, start = [], 0
        for s, mem in enumerate(mems):
            left = stages - s - 1
            end = start
            # Greedy: take blocks while they fit, leaving at least one block per later stage.
            while end < shape.layers - left:
                est = _stage_estimate(cfg, job, shape, (start, end + 1), stages, dp, s)
                if est.total > share * mem:
                    break
                end += 1
            if s == stages - 1 and end < shape.layers:
                return None
            if end == start:
                return None
            spans.append((start, end))
            start = end
        return spans

    lo, hi = 0.0, 1.0
    best = pack(hi)
    if best is None:
        return None
    for _ in range(20):
        mid = (lo + hi) / 2
        spans = pack(mid)
        if spans is None:
            lo = mid
        else:
            hi, best = mid, spans
    return best


def _balanced_if_it_fits(cfg: dict, job: JobConfig, shape: ModelShape, mems: list[int], dp: int
                         ) -> list[tuple[int, int]] | None:
    """The cut of equal compute (herd/stage_cut.py) when every stage fits its worker: a pipeline
    runs at its slowest stage's pace, so memory decides the cut only when it must."""
    stages = len(mems)
    if not 1 < stages <= shape.layers:
        return None  # one stage has nothing to balance
    spans = balanced_split(shape.layers, stages, head_blocks(cfg),
                           job.first_adapted_layer(shape.layers))
    for s, (span, mem) in enumerate(zip(spans, mems)):
        if _stage_estimate(cfg, job, shape, span, stages, dp, s).total > mem:
            return None
    return spans


def _layout(cfg: dict, job: JobConfig, workers: list[WorkerMemory]) -> Plan | None:
    shape = ModelShape.from_config(cfg)
    budget = {w.worker_id: int(w.memory_bytes * (1 - HEADROOM)) for w in workers}
    pool = sorted(workers, key=lambda w: -w.memory_bytes)
    if job.cluster.workers:
        pool = pool[: job.cluster.workers]
    fixed_dp = job.cluster.data_parallel()
    fixed_pp = job.cluster.pipeline_stages() if job.cluster.parallelism != "auto" else None
    for stages in ([fixed_pp] if fixed_pp else range(1, min(len(pool), shape.layers) + 1)):
        max_dp = len(pool) // stages
        if max_dp == 0:
            continue
        for dp in ([fixed_dp] if fixed_dp else range(max_dp, 0, -1)):
            if dp > max_dp or job.batch_size % dp:
                continue
            used = pool[: dp * stages]
            # Deal the workers, largest first, so every pipeline gets a similar mix.
            replicas = [used[i::dp] for i in range(dp)]
            # One cut for every replica: data-parallel peers must hold the same blocks to sum
            # their gradients. Each stage is sized for the smallest worker that will run it.
            mems = [min(budget[rep[s].worker_id] for rep in replicas) for s in range(stages)]
            spans = _balanced_if_it_fits(cfg, job, shape, mems, dp) or _split(cfg, job, shape, mems, dp)
            if spans is not None:
                return _make_plan(cfg, job, shape, replicas, spans, dp, stages)
    return None


def _make_plan(cfg, job, shape, replicas, spans, dp, stages) -> Plan:
    peaks, estimates = {}, {}
    for rep in replicas:
        for s, (w, span) in enumerate(zip(rep, spans)):
            est = _stage_estimate(cfg, job, shape, span, stages, dp, s)
            peaks[w.worker_id], estimates[w.worker_id] = est.total, est
    return Plan(
        data_parallel=dp,
        pipeline_stages=stages,
        stage_layers=list(spans),
        assignments=[[w.worker_id for w in rep] for rep in replicas],
        peak_bytes_per_worker=peaks,
        microbatches=_microbatches(job, stages, dp),
        estimates=estimates,
    )


def _least_peak(cfg: dict, job: JobConfig, workers: list[WorkerMemory]) -> int:
    """The smallest per-worker peak any layout over ``workers`` can reach (for the refusal text)."""
    shape = ModelShape.from_config(cfg)
    stages = min(len(workers), shape.layers)
    per_stage = -(-shape.layers // stages)
    spans = [(s, min(s + per_stage, shape.layers)) for s in range(0, shape.layers, per_stage)]
    return max(_stage_estimate(cfg, job, shape, sp, len(spans), 1, s).total
               for s, sp in enumerate(spans))


def plan_job(model_config: dict, job: JobConfig, workers: list[WorkerMemory]) -> Plan:
    """The layout with the fewest pipeline stages that fits, using as many data-parallel replicas
    as the workers allow; or PlacementError listing changes that fit, with their numbers."""
    if not workers:
        raise PlacementError("no workers to place the job on", hint="start `herd worker` on a Mac")
    plan = _layout(model_config, job, workers)
    if plan is not None:
        return plan
    fixed = job.cluster.data_parallel() or 1, job.cluster.pipeline_stages()
    if job.cluster.parallelism != "auto" and fixed[0] * fixed[1] > len(workers):
        raise PlacementError(
            f"cluster.parallelism asks for {fixed[0]} x {fixed[1]} (data x pipeline) = "
            f"{fixed[0] * fixed[1]} workers; {len(workers)} available",
            hint="add workers, or set cluster.parallelism: auto to let the planner choose",
        )
    raise DoesNotFitError(_refusal(model_config, job, workers), hint="apply one of the fixes above")


def _fits(cfg: dict, job: JobConfig, workers: list[WorkerMemory]) -> Plan | None:
    try:
        return _layout(cfg, job, workers)
    except ConfigError:
        return None


def _describe(plan: Plan | None, cfg: dict, job: JobConfig, workers: list[WorkerMemory]) -> str:
    if plan is None:
        return f"still too big (needs {_least_peak(cfg, job, workers) / GB:.1f} GB per worker)"
    peak = max(plan.peak_bytes_per_worker.values())
    return (f"fits: {plan.data_parallel} x {plan.pipeline_stages} (data x pipeline), "
            f"peak {peak / GB:.1f} GB per worker")


def fixes(model_config: dict, job: JobConfig, workers: list[WorkerMemory]) -> list[str]:
    """Changes that would make the job fit, each with the layout and peak it would give."""
    shape = ModelShape.from_config(model_config)
    out: list[str] = []
    if shape.bits is None and job.quantize is None:
        j = job.model_copy(update={"quantize": Quantize(bits=4, group_size=64)})
        fit = _describe(_fits(model_config, j, workers), model_config, j, workers)
        out.append(f"QLoRA (quantize: {{bits: 4}}) -> {fit}")
    if not job.grad_checkpoint:
        j = job.model_copy(update={"grad_checkpoint": True})
        fit = _describe(_fits(model_config, j, workers), model_config, j, workers)
        out.append(f"grad_checkpoint: true -> {fit}")
    n = shape.layers if job.num_layers == -1 else min(job.num_layers, shape.layers)
    while n > 1:
        n //= 2
        j = job.model_copy(update={"num_layers": n})
        if (p := _fits(model_config, j, workers)) is not None:
            out.append(f"num_layers {n} -> {_describe(p, model_config, j, workers)}")
            break
    batch = job.batch_size
    while batch > 1:
        batch //= 2
        j = job.model_copy(update={"batch_size": batch, "cluster": job.cluster.model_copy(
            update={"parallelism": "auto"})})
        if (p := _fits(model_config, j, workers)) is not None:
            out.append(f"batch_size {batch} (raise grad_accumulation_steps to keep the batch) -> "
                       f"{_describe(p, model_config, j, workers)}")
            break
    seq = job.max_seq_length
    while seq > 128:
        seq //= 2
        j = job.model_copy(update={"max_seq_length": seq})
        if (p := _fits(model_config, j, workers)) is not None:
            out.append(f"max_seq_length {seq} -> {_describe(p, model_config, j, workers)}")
            break
    biggest = max(w.memory_bytes for w in workers)
    for extra in range(1, 33):
        more = workers + [WorkerMemory(f"new-{i}", biggest) for i in range(extra)]
        j = job.model_copy(update={"cluster": job.cluster.model_copy(update={"workers": None})})
        if (p := _fits(model_config, j, more)) is not None:
            fit = _describe(p, model_config, j, more)
            out.append(f"{extra} more worker(s) of {biggest / GB:.0f} GB -> {fit}")
            break
    return out


def _refusal(cfg: dict, job: JobConfig, workers: list[WorkerMemory]) -> str:
    shape = ModelShape.from_config(cfg)
    mems = ", ".join(f"{w.worker_id} {w.memory_bytes / GB:.0f} GB" for w in workers)
    need = _least_peak(cfg, job, workers)
    top = max(w.memory_bytes for w in workers)
    lines = [
        f"the job does not fit: its {shape.layers}-block {shape.model_type} model needs "
        f"{need / GB:.1f} GB on the fullest worker even cut into {min(len(workers), shape.layers)} "
        f"pipeline stage(s); the largest worker offers {top * (1 - HEADROOM) / GB:.1f} GB "
        f"({top / GB:.1f} GB usable less {HEADROOM:.0%} headroom). Workers: {mems}",
        "changes that would fit:",
    ]
    lines += [f"  - {f}" for f in fixes(cfg, job, workers)] or ["  - none found"]
    return "\n".join(lines)
