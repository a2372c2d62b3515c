"""The planner's memory model: each rank's peak bytes from ``config.json`` alone.

Pure arithmetic: no MLX, no grpc, no weights read. Every term is the size of real tensors (counts of
elements x bytes per element); the number of *copies* of each tensor that MLX keeps alive during a
training step was measured with ``mx.get_peak_memory()`` on tiny llama/qwen2 models (fp32 and bf16,
LoRA and QLoRA, gradient checkpointing on and off, sequences 256-512) and is recorded below with
what it is. tests/test_planner.py re-measures five configs in fresh processes and asserts +-10%.
The 32B/70B tables in docs/planning.md come from the same formulas.
"""

from __future__ import annotations

from dataclasses import dataclass

from herd.config import JobConfig
from herd.digest import GB_SI, GIB  # noqa: F401  (the planner's units, re-exported)
from herd.errors import ConfigError

# --- Copies MLX keeps alive per token during value_and_grad (measured, see module docstring). ---
# Each entry is (copies at the activation dtype, copies at float32). LoRA's low-rank path runs in
# float32 (lora_a/lora_b are fp32), so part of each block's saved tensors is fp32 whatever the base.
_BLOCK_PER_HIDDEN = (3.25, 4.5)  # residual stream, norm outputs, q/k/v/o, LoRA outputs of o/down
_BLOCK_PER_INTERMEDIATE = (2.0, 4.5)  # gate, up, swiglu and the fp32 LoRA outputs of gate/up
_BLOCK_PER_RANK = (0.0, 0.6)  # x @ lora_a per adapted linear, fp32
# Logits, log-softmax, its exp and the logits' cotangent, at the activation dtype.
_LOGIT_COPIES = 4.0
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
        text = cfg.get("text_config") if isinstance(cfg, dict) else None
        cfg = {**text, **cfg} if isinstance(text, dict) else cfg
        sizes = ("hidden_size", "num_attention_heads", "num_hidden_layers", "intermediate_size",
                 "vocab_size")
        for key in (*sizes, "num_key_value_heads", "head_dim"):
            if key not in sizes and not cfg.get(key):
                continue  # (optional: derived below)
            if key not in cfg:
                raise ConfigError(
                    f"model config.json lacks {key!r}",
                    hint="herd plans dense llama/qwen2-style models from their config.json")
            value = cfg[key]
            # (a laptop's config.json reaches the coordinator's planner: an outside run sent
            # heads 0, "x" and infinity, and got Python's exceptions back)
            if isinstance(value, bool) or not isinstance(value, int) or not 0 < value < 2**40:
                raise ConfigError(f"model config.json: {key} = {value!r} is not a positive "
                                  "whole number")
        hidden, heads = cfg["hidden_size"], cfg["num_attention_heads"]
        layers, inter, vocab = (cfg["num_hidden_layers"], cfg["intermediate_size"],
                                cfg["vocab_size"])
        q = cfg.get("quantization") or cfg.get("quantization_config") or {}
        if not isinstance(q, dict):
            q = {}
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
    """(in, out) of each linear LoRA adapts in one block. mlx-lm adapts every Linear of a block
    unless keys are given, and a key that names no module of a block adapts nothing there (not
    an error in mlx-lm either): a key the planner does not know (another architecture's names)
    is sized as the block's largest linear, so the estimate errs on the safe side."""
    lin = shape.linears()
    keys = job.lora_parameters.keys
    if keys is None:
        return lin
    h, i = shape.hidden, shape.intermediate
    q, kv = shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    fused = {"self_attn.qkv_proj": (h, q + 2 * kv), "mlp.gate_up_proj": (h, 2 * i)}  # phi3's
    return {k: lin.get(k) or fused.get(k) or (h, max(h, i, q)) for k in keys
            if k not in TOP_LEVEL_KEYS}


# Keys mlx-lm matches against the whole model rather than a block (linear_to_lora_layers):
# adapted once, on the rank that holds the head.
TOP_LEVEL_KEYS = ("lm_head",)


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

    # Base weights: the blocks this rank owns, plus embedding / head / final norm where it holds
    # them.
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
    if has_head and "lm_head" in (job.lora_parameters.keys or ()):
        params += r * (shape.hidden + shape.vocab)
    lora = params * 4
    grads = params * 4
    optimizer = params * 4 * _OPTIMIZER_STATES.get(job.optimizer, 2)
    if job.fine_tune_type == "full":
        # The adapted blocks' own weights train (worker/rank/model.py apply_adapters): their
        # gradients and optimizer states at the weights' dtype, as MLX keeps them, and the
        # update's new weights while the old are alive (measured: 2.25-2.4 + states copies of the
        # trained weights, tests/test_planner.py). It was sized as LoRA: a full 8B read as
        # fitting with a third of what it needs (an outside run).
        lora, grads = 0, adapted * block
        optimizer = int(grads * (_OPTIMIZER_STATES.get(job.optimizer, 2) + 1.25))
        r = 0  # (no adapter activations)

    # Activations. Only blocks with trainable parameters (and those after them) keep anything for
    # the backward pass; blocks before the first adapted one run forward only.
    per_replica = max(1, -(-job.batch_size // max(1, data_parallel)))  # the largest share
    b_micro = max(1, per_replica // max(1, microbatches))
    seq = job.max_seq_length
    tokens = b_micro * seq
    ab = db  # activations run at the model's dtype (quantized models: their scales' dtype)
    saved_blocks = adapted
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
        # most S - s, worker/pipeline/schedule.py); the first stage's inputs are token ids.
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
