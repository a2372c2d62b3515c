"""One pipeline stage: blocks [start, end) of an mlx-lm model, loaded from the safetensors shards
without ever materializing another stage's weights.

The stage is mlx-lm's own model class built with ``end - start`` blocks: module constructors only
record lazy random initializers, which are replaced by the loaded weights before anything is
evaluated, and the embedding / final norm / head are removed from the stages that do not own
them. Parameter names inside the stage are local (``model.layers.0``); ``global_name`` maps them
back to the full model's names so the stages' adapters merge into one mlx-lm adapter file.
"""

from __future__ import annotations

import glob
import json
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.base import create_attention_mask
from mlx_lm.tuner.dora import DoRALinear
from mlx_lm.tuner.lora import LoRALinear
from mlx_lm.tuner.trainer import grad_checkpoint
from mlx_lm.tuner.utils import linear_to_lora_layers
from mlx_lm.utils import _get_classes

from herd.config import JobConfig
from herd.errors import ConfigError
from herd.models.manifest import stage_shards
from herd.models.ref import INDEX, local_folder
from herd.stage_cut import StagePiece, model_refusal, owned_key, shift_block
from worker.rank.model import materialize, quantize_in_place, read_model_config
from worker.rank.packing import DocumentAttention, enable_packing


@dataclass(frozen=True)
class StageSpec:
    index: int
    count: int
    start: int  # first block (global index)
    end: int  # one past the last block
    total_layers: int
    first_adapted: int = 0  # first block with LoRA (the last num_layers blocks are adapted)

    @property
    def trains(self) -> bool:
        """Whether this stage has adapters: stages wholly before the adapted blocks need no
        backward."""
        return self.end > self.first_adapted

    @property
    def first(self) -> bool:
        return self.index == 0

    @property
    def last(self) -> bool:
        return self.index == self.count - 1


class Stage:
    """A stage's model, forward function, and name mapping."""

    def __init__(self, model: nn.Module, spec: StageSpec, tied: bool):
        self.model, self.spec, self.tied = model, spec, tied

    def forward(self, x: mx.array, layout: mx.array | None = None) -> mx.array:
        """Token ids (first stage) or hidden states in; hidden states or logits (last stage) out.
        ``layout``: packed rows' documents (worker/rank/packing.py), as the whole model takes
        them."""
        inner = self.model.model
        h = inner.embed_tokens(x) if self.spec.first else x
        documents = DocumentAttention(layout) if layout is not None else None
        mask = create_attention_mask(h, documents)
        for layer in inner.layers:
            h = layer(h, mask, cache=documents)
        if self.spec.last:
            h = inner.norm(h)
            h = inner.embed_tokens.as_linear(h) if self.tied else self.model.lm_head(h)
        return h

    def global_name(self, local: str) -> str:
        return shift_block(local, self.spec.start)


def _owned(key: str, spec: StageSpec, tied: bool) -> str | None:
    """The stage-local name of a checkpoint key this stage owns, else None."""
    return owned_key(key, spec.start, spec.end, spec.first, spec.last, tied)


def load_stage_weights(model_dir: Path, spec: StageSpec, tied: bool) -> dict[str, mx.array]:
    """The weights this stage owns, from the shards that hold them (the index's weight map, when
    the model has one: a worker may hold only those shards), else from every shard.
    ``mx.load`` maps a safetensors file lazily; keys dropped here are never read into memory."""
    index = model_dir / INDEX
    if index.is_file():
        piece = StagePiece(spec.index, spec.count, spec.start, spec.end)
        files = [str(model_dir / s) for s in stage_shards(json.loads(index.read_text()), piece,
                                                          tied)]
    else:
        files = sorted(glob.glob(str(model_dir / "*.safetensors")))
    if not files:
        raise ConfigError(f"no *.safetensors in {model_dir}",
                          hint="a stage loads its blocks from the model's safetensors shards")
    weights: dict[str, mx.array] = {}
    for f in files:
        for key, value in mx.load(f).items():
            local = _owned(key, spec, tied)
            if local is not None:
                weights[local] = value
    return weights


def build_stage(job: JobConfig, spec: StageSpec) -> Stage:
    model_dir = local_folder(job.model)
    config = read_model_config(model_dir)
    if config["num_hidden_layers"] != spec.total_layers:
        raise ConfigError(
            f"{model_dir} has {config['num_hidden_layers']} blocks, the plan says "
            f"{spec.total_layers}"
        )
    if (refused := model_refusal(config)) is not None:  # (refused at submit: never trained wrong)
        raise ConfigError(*refused)
    tied = bool(config.get("tie_word_embeddings", True))
    stage_config = {**config, "num_hidden_layers": spec.end - spec.start}
    stage_config.pop("layer_types", None)
    model_cls, args_cls = _get_classes(stage_config)
    model = model_cls(args_cls.from_dict(stage_config))
    tied = getattr(model.args, "tie_word_embeddings", tied)
    # Drop what this stage does not own before anything is evaluated: no lazy init ever runs.
    if not (spec.first or (spec.last and tied)):
        model.model.pop("embed_tokens")
    if not spec.last:
        model.model.pop("norm")
        if "lm_head" in model:
            model.pop("lm_head")
    weights = load_stage_weights(model_dir, spec, tied)
    if hasattr(model, "sanitize"):
        weights = model.sanitize(weights)
    if (q := config.get("quantization")) is not None:
        nn.quantize(
            model, group_size=q["group_size"], bits=q["bits"],
            class_predicate=lambda p, m: f"{p}.scales" in weights,
        )
    _load(model, weights, spec, model_dir)
    weights.clear()  # (else every block's full-precision weights stay alive until it is built)
    if job.quantize is not None:
        quantize_in_place(model, job)
    _apply_adapters(model, job, spec)
    if job.cluster.packing:
        enable_packing(model, config.get("model_type", ""))
    materialize(model)
    if job.grad_checkpoint and len(model.layers):
        grad_checkpoint(model.layers[0])
    return Stage(model, spec, tied)


def _load(model: nn.Module, weights: dict[str, mx.array], spec: StageSpec, model_dir: Path):
    """The stage's weights into its model; ConfigError naming the missing ones by the full
    model's names (mlx named them as the stage does, model.layers.0: names the file does hold,
    when config.json promised more blocks than the weights have: an outside run)."""
    from mlx.utils import tree_flatten

    missing = sorted(set(dict(tree_flatten(model.parameters()))) - set(weights))
    if missing:
        stage = Stage(model, spec, tied=False)
        names = [stage.global_name(k) for k in missing]
        raise ConfigError(
            f"{model_dir} lacks {len(names)} weights of blocks {spec.start}:{spec.end}: "
            + ", ".join(names[:6]) + (" ..." if len(names) > 6 else ""),
            hint="config.json's num_hidden_layers must match the weights: an incomplete "
            "download, or a config from another model")
    model.load_weights(list(weights.items()), strict=True)


def _apply_adapters(model: nn.Module, job: JobConfig, spec: StageSpec) -> None:
    """LoRA on this stage's share of the last ``num_layers`` blocks, initialized with exactly the
    random draws one process makes for them (worker.rank.model.apply_adapters): seed, then skip the
    draws the earlier stages' adapted linears take, then convert ours in mlx-lm's order."""
    n_lora = spec.total_layers if job.num_layers == -1 else job.num_layers
    if n_lora > spec.total_layers:
        raise ConfigError(
            f"num_layers = {job.num_layers}, but the model has {spec.total_layers} layers")
    first_adapted = spec.total_layers - n_lora
    mine = max(0, spec.end - max(spec.start, first_adapted))
    before = max(0, min(spec.start, spec.total_layers) - first_adapted)
    mx.random.seed(job.seed)
    model.freeze()
    if not len(model.layers):
        return
    params = job.lora_parameters.model_dump(exclude_none=True)
    per_block = _adapted_per_block(model.layers[0], params.get("keys"))
    cls = DoRALinear if job.fine_tune_type == "dora" else LoRALinear
    for _ in range(before * per_block):
        cls(input_dims=1, output_dims=1, r=1)  # the same number of draws as one real conversion
    if mine:
        linear_to_lora_layers(model, mine, params, use_dora=job.fine_tune_type == "dora")


def _adapted_per_block(block: nn.Module, keys: list[str] | None) -> int:
    types = (nn.Linear, nn.QuantizedLinear, nn.Embedding, nn.QuantizedEmbedding)
    names = [p for p, m in block.named_modules() if hasattr(m, "to_lora") or isinstance(m, types)]
    return len(names) if keys is None else len([p for p in names if p in set(keys)])
