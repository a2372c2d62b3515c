"""Loading a base model and putting adapters on it, the way mlx_lm.lora does.

The order of random draws matters for exact equality with ``mlx_lm.lora``: seed, freeze,
convert linears to LoRA/DoRA (their init draws from mx.random), then load resumed weights.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx_lm.tuner.utils import build_schedule, linear_to_lora_layers
from mlx_lm.utils import load

from herd.adapter_card import BASE_MODEL_ENV, RUN_PATHS, base_model
from herd.config import JobConfig, optimizer_class
from herd.errors import ConfigError
from herd.model_config import full_of_quantized, too_many_layers
from herd.models.ref import local_folder


def load_base(job: JobConfig):
    """(model, tokenizer) for ``job.model``: a local folder or a hub id, ``org/name[@revision]``
    (herd.models.ref: from the hub cache, downloaded only where the hub is reachable)."""
    try:
        model, tokenizer = load(
            str(local_folder(job.model)),
            tokenizer_config={"trust_remote_code": job.trust_remote_code},
            trust_remote_code=job.trust_remote_code,
            # QLoRA on load: nothing read yet, so each block is read and quantized in turn
            lazy=job.quantize is not None,
        )
    except FileNotFoundError as e:
        raise ConfigError(
            f"model {job.model!r} could not be loaded: {e}",
            hint="give a local model folder (config.json, *.safetensors, tokenizer) or a hub id "
            "this machine can download",
        ) from None
    if job.quantize is not None:
        quantize_in_place(model, job)
        materialize(model)
    return model, tokenizer


def materialize(model: nn.Module) -> None:
    """Evaluates a lazily loaded model block by block. Quantized on load, a block's
    full-precision weights are read, quantized and let go before the next block's are read: the
    load peaks at the quantized model plus one block, not at the full-precision model (which
    evaluating it all at once, or loading it eagerly, holds: 6x the 4-bit weights, so a 70B on
    two 64 GB Macs could not load: an outside run)."""
    for block in getattr(model, "layers", []):
        mx.eval(block.parameters())
    mx.eval(model.parameters())


def is_quantized(model: nn.Module) -> bool:
    return any(isinstance(m, nn.QuantizedLinear) for _, m in model.named_modules())


def quantize_in_place(model: nn.Module, job: JobConfig) -> None:
    """QLoRA on an unquantized folder: quantize the base on load (as mlx_lm.convert -q would)."""
    q = job.quantize
    if is_quantized(model):
        raise ConfigError(
            f"quantize: {{bits: {q.bits}}} was given but {job.model} is already quantized",
            hint="remove the quantize: section; LoRA on a quantized folder is already QLoRA",
        )

    def predicate(_path, module):
        return hasattr(module, "to_quantized") and module.weight.shape[-1] % q.group_size == 0

    nn.quantize(model, group_size=q.group_size, bits=q.bits, class_predicate=predicate)


def apply_adapters(model: nn.Module, job: JobConfig) -> None:
    """Freeze the base and make the last ``num_layers`` blocks trainable (LoRA, DoRA or full)."""
    mx.random.seed(job.seed)
    model.freeze()
    n_blocks = len(model.layers)
    if job.num_layers > n_blocks:
        raise too_many_layers(job.num_layers, job.model, n_blocks)
    if job.fine_tune_type == "full":
        if is_quantized(model):  # else mlx fails mid-step: no gradient wrt quantized weights
            raise full_of_quantized(job.model)
        for layer in model.layers[-max(job.num_layers, 0) :]:
            layer.unfreeze()
        return
    params = job.lora_parameters.model_dump(exclude_none=True)
    linear_to_lora_layers(model, job.num_layers, params, use_dora=job.fine_tune_type == "dora")


def build_optimizer(job: JobConfig) -> optim.Optimizer:
    lr = build_schedule(job.lr_schedule.model_dump()) if job.lr_schedule else job.learning_rate
    if (scale := job.cluster.lr_scale) != 1.0:  # lowered by a rollback (coordinator/scheduler.py)
        lr = (lambda step, sched=lr: scale * sched(step)) if callable(lr) else lr * scale
    return optimizer_class(job.optimizer)(learning_rate=lr,
                                          **job.optimizer_config.get(job.optimizer, {}))


def adapter_config(job: JobConfig) -> dict:
    """What mlx_lm.lora writes as adapter_config.json (mlx_lm.generate/fuse read it), less the
    run's own paths, plus the base model it was trained on (herd/adapter_card.py)."""
    cfg = job.mlx_lm_dict()
    for key in RUN_PATHS:
        cfg.pop(key, None)
    if job.fine_tune_type == "full":
        cfg["lora_parameters"] = None
    # Under an agent, the job's own model reference (job.model may be its model cache's folder).
    ref = os.environ.get(BASE_MODEL_ENV) or job.model
    cfg["model"] = ref  # what mlx_lm.lora would have written from the user's config
    cfg["base_model"] = base_model(ref, job.quantize.model_dump() if job.quantize else None,
                                   local=job.model)
    return cfg


def read_model_config(model: str | Path) -> dict:
    return json.loads((local_folder(str(model)) / "config.json").read_text())
