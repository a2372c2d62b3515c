"""Where to cut a model's blocks into pipeline stages: evenly, or so the stages' compute balances.

A pipeline runs at the pace of its slowest stage, and a block does not cost the same on every
stage. In units of one block's forward F (LoRA's backward B costs about one F: the input's
cotangent is one more pass through the frozen weights; the adapters' own gradients are small):

- on the last stage, an adapted block runs forward and backward in one ``mx.vjp``: F + B = 2;
- on an earlier stage it runs forward alone first, to pass the activations on, then again under
  ``mx.vjp`` for the backward: 2F + B = 3;
- a block before the first adapted one needs no backward: 1 (2 on an earlier stage that trains,
  which recomputes it inside its vjp);
- the last stage also projects onto the vocabulary, forward and backward: 2 x ``head_blocks``.

An even cut of 6 adapted blocks over 2 stages leaves the last stage idle a quarter of the time
(9 against 6.5: measured 0.22 s against 0.16 s per step, bench/results/pipeline-linux-cpu.md).
Used by the planner (coordinator/planner/) and by ``python -m worker.pipeline``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

from herd.errors import ConfigError


@dataclass(frozen=True)
class StagePiece:
    """One pipeline stage's share of a checkpoint: stage ``index`` of ``count``, blocks
    [start, end). The agent tags an upload with it; the coordinator merges a step's pieces."""

    index: int
    count: int
    start: int
    end: int


_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.*)$")


def shift_block(key: str, offset: int) -> str:
    """``model.layers.N.rest`` as ``model.layers.{N + offset}.rest`` (a stage's local names to the
    model's, or back with a negative offset); any other key as it is. The one renumbering the
    stages' saves, their loads and the coordinator's merge all use."""
    m = _LAYER.match(key)
    return f"model.layers.{int(m.group(1)) + offset}.{m.group(2)}" if m and offset else key


def owned_key(key: str, start: int, end: int, first: bool, last: bool, tied: bool) -> str | None:
    """The stage-local name of a checkpoint key that the stage holding blocks [start, end) owns
    (blocks renumbered from 0), else None: the first stage owns the embedding, the last the final
    norm and the head (and the embedding too when the head is tied to it). The stage loader reads
    only these weights, and a worker fetches only the shards that hold them."""
    if m := _LAYER.match(key):
        return shift_block(key, -start) if start <= int(m.group(1)) < end else None
    if key.startswith("model.embed_tokens."):
        return key if first or (last and tied) else None
    if key.startswith(("model.norm.", "lm_head.")):
        return key if last else None
    return None


def even_split(total_layers: int, stages: int) -> list[tuple[int, int]]:
    """Blocks cut as evenly as possible."""
    _check(total_layers, stages)
    base, extra = divmod(total_layers, stages)
    spans, start = [], 0
    for s in range(stages):
        end = start + base + (1 if s < extra else 0)
        spans.append((start, end))
        start = end
    return spans


def stage_cost(start: int, end: int, last: bool, first_adapted: int = 0,
               head_blocks: float = 0.0) -> float:
    """Compute per microbatch of a stage holding blocks [start, end), in block forwards."""
    adapted = max(0, end - max(start, first_adapted))
    frozen = (end - start) - adapted
    if last:
        return 2 * adapted + frozen + 2 * head_blocks
    if adapted == 0:  # no adapters: forward only, no cotangent to compute or send
        return frozen
    return 3 * adapted + 2 * frozen


def balanced_split(total_layers: int, stages: int, head_blocks: float = 0.0,
                   first_adapted: int = 0) -> list[tuple[int, int]]:
    """Contiguous spans, at least one block each, that minimize the costliest stage's compute
    (``stage_cost``). ``first_adapted``: the first block with adapters (LoRA is on the last
    ``num_layers`` blocks). Ties go to the cut with more blocks early."""
    _check(total_layers, stages)
    return list(_balanced(total_layers, stages, head_blocks, first_adapted))


@lru_cache(maxsize=4096)
def _balanced(total_layers: int, stages: int, head_blocks: float,
              first_adapted: int) -> tuple[tuple[int, int], ...]:
    """balanced_split, remembered: the planner asks for the same cuts many times over while it
    looks for a layout, and for fixes (80 blocks into 27 stages took ~0.4 s each, 15 s per
    refusal, past the client's deadline)."""

    @lru_cache(maxsize=None)
    def best(s: int, start: int) -> tuple[float, int]:
        """(max cost, this stage's end) for stages s.. over blocks start..total_layers: each
        stage's end is distinct, so more blocks early is the only tie-break needed."""
        if s == stages - 1:
            return stage_cost(start, total_layers, True, first_adapted, head_blocks), total_layers
        key, cut = None, start + 1
        for end in range(start + 1, total_layers - (stages - s - 1) + 1):
            here = stage_cost(start, end, False, first_adapted)
            option = (max(here, best(s + 1, end)[0]), -(end - start))
            if key is None or option < key:
                key, cut = option, end
        return key[0], cut

    spans, start = [], 0
    for s in range(stages):
        end = best(s, start)[1]
        spans.append((start, end))
        start = end
    return tuple(spans)


def _check(total_layers: int, stages: int) -> None:
    if not 1 <= stages <= total_layers:
        raise ConfigError(f"cannot cut {total_layers} blocks into {stages} pipeline stages")


def head_blocks(model_config: dict) -> float:
    """The last stage's vocabulary projection in units of one block's matmul work (from
    ``config.json``; multimodal configs keep the text model under ``text_config``): about 1.3 for
    Llama-3.1-70B, whose 128k vocabulary is large. 0 when the config lacks a size."""
    cfg = model_config
    if "text_config" in cfg:
        cfg = {**cfg["text_config"], **cfg}
    try:
        hidden = int(cfg["hidden_size"])
        heads = int(cfg["num_attention_heads"])
        head_dim = int(cfg.get("head_dim") or hidden // heads)
        kv = int(cfg.get("num_key_value_heads") or heads) * head_dim
        mlp = 3 * hidden * int(cfg["intermediate_size"])
        vocab = int(cfg["vocab_size"])
    except (KeyError, TypeError, ValueError, ZeroDivisionError):
        return 0.0  # the cut then ignores the head; the planner reports the missing size itself
    attention = 2 * hidden * heads * head_dim + 2 * hidden * kv
    return vocab * hidden / (attention + mlp)


# --- what a pipeline stage can run ---------------------------------------------------------------

# Model types whose mlx-lm forward is exactly embed -> blocks(h, mask) -> norm -> head, which is
# what a stage runs (worker/pipeline/stage.py Stage.forward): llama and qwen2 are tested against
# one process (tests/test_pipeline.py), mistral and phi3 were in an outside run; qwen3's forward
# is qwen2's. Others add steps a stage would skip silently (gemma scales the embeddings, gemma2
# also caps logits and passes masks its own way): trained, they would be a different network.
PIPELINE_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3", "phi3"})

# mlx-lm keys a stage does not implement, and what to do instead.
_NOT_IN_STAGES = {
    "test": "evaluate the adapter with `herd train` on one machine (train: false, test: true)",
    "resume_adapter_file": "train the first run as a herd job and resume its checkpoint",
    "report_to": "follow the job with `herd watch` or its metrics",
}


def job_refusal(job) -> tuple[str, str] | None:
    """(why, what to do) when this job config cannot be cut into pipeline stages at all."""
    found = [k for k in _NOT_IN_STAGES if getattr(job, k)]
    if found:
        return (f"{', '.join(found)}: not supported when the model is cut into pipeline stages",
                "; ".join(f"{k}: {_NOT_IN_STAGES[k]}" for k in found))
    if job.fine_tune_type == "full":
        return ("pipeline stages train LoRA/DoRA adapters, not fine_tune_type: full",
                "use fine_tune_type: lora (or dora), or data parallelism")
    if job.cluster.exchange == "grpc":  # (placement refused it, so the job waited: outside run)
        return ("pipeline stages pass activations over the MLX ring, and cluster.exchange is "
                "grpc", "use cluster.exchange: auto (or mlx) for pipeline jobs")
    return None


def model_refusal(model_config: dict) -> tuple[str, str] | None:
    """(why, what to do) when this model cannot be cut into pipeline stages."""
    kind = model_config.get("model_type", "?")
    hint = "train it data parallel (quantize: {bits: 4} makes a large model fit one Mac)"
    if kind not in PIPELINE_MODEL_TYPES:
        return (f"pipeline stages run {', '.join(sorted(PIPELINE_MODEL_TYPES))} models; this one "
                f"is {kind}", hint)
    if any(t != "full_attention" for t in model_config.get("layer_types") or ()):
        return (f"this {kind} model has sliding-window attention layers (layer_types), which a "
                "pipeline stage does not run", hint)
    return None


def pipeline_refusal(job, model_config: dict | None) -> tuple[str, str] | None:
    """Why ``job`` (a JobConfig) cannot run cut into stages, with what to do; None if it can.
    Checked at submit and by the planner (which then plans no stages), and by the stage."""
    return job_refusal(job) or (model_refusal(model_config) if model_config else None)


def check_stages(model_config: dict, job) -> None:
    """ConfigError when ``job`` (a JobConfig) asks for pipeline stages this model cannot have:
    more stages than blocks, or a model (or job) a stage cannot run. Said at `herd plan`,
    `herd submit` and by the coordinator, before any worker is touched."""
    stages = job.cluster.pipeline_stages() if job.cluster.parallelism != "auto" else 1
    if stages <= 1:
        return
    config = {**model_config.get("text_config", {}), **model_config}
    blocks = config.get("num_hidden_layers")
    if isinstance(blocks, int) and stages > blocks:
        raise ConfigError(f"cluster.parallelism.pipeline = {stages}, but the model has {blocks} "
                          f"blocks: at most {blocks} stages",
                          hint=f"use at most {blocks} pipeline stages")
    if (refused := pipeline_refusal(job, config)) is not None:
        raise ConfigError(f"cluster.parallelism.pipeline = {stages}: {refused[0]}",
                          hint=refused[1])
