"""The job config: an ``mlx_lm.lora`` YAML (same keys, same defaults) plus herd's sections.

Validated once, with pydantic, at ``herd submit`` / ``herd train``. Every error names the key, the
bad value and the fix. An existing mlx-lm LoRA config validates unchanged.
"""

from __future__ import annotations

import difflib
import math
import re
import typing
import warnings
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from herd import bounded_yaml
from herd.errors import ConfigError
from herd.stage_cut import job_refusal

# The names mlx-lm's report_to takes (mlx_lm/tuner/callbacks.py SUPPORT_CALLBACK).
REPORTERS = ("wandb", "swanlab")


OPTIMIZERS = ("adam", "adamw", "muon", "sgd", "adafactor")  # mlx-lm's, by its names


def optimizer_class(name: str):
    """mlx's optimizer class for mlx-lm's name of it (None: no such optimizer)."""
    import mlx.optimizers as optim

    return {"adam": optim.Adam, "adamw": optim.AdamW, "muon": optim.Muon, "sgd": optim.SGD,
            "adafactor": optim.Adafactor}.get(name)


def _optimizer_arguments(name: str) -> list[str] | None:
    """The keyword arguments mlx's optimizer ``name`` takes besides the learning rate (None: no
    such optimizer)."""
    import inspect

    cls = optimizer_class(name)
    if cls is None:
        return None
    return [p for p in inspect.signature(cls.__init__).parameters
            if p not in ("self", "learning_rate")]


def did_you_mean(word: str, choices) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


class LegacyKeyWarning(FutureWarning):
    """A config key older mlx-lm versions read: still accepted, mapped to today's key.
    (A FutureWarning, so Python shows it to users by default; ``herd`` prints it as a
    ``warning:`` line.)"""


# Keys older mlx-lm versions read, mapped to today's (with a DeprecationWarning):
# name -> (today's key, how the value converts).
LEGACY_KEYS: dict[str, tuple[str, Any]] = {
    # mlx-lm < 0.20: DoRA was a flag. (mlx-lm 0.32 reads it no more: it would train plain LoRA.)
    "use_dora": ("fine_tune_type", lambda v: "dora" if v else "lora"),
    # mlx-lm < 0.20 called num_layers lora_layers.
    "lora_layers": ("num_layers", lambda v: v),
}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_number(cls, v, info: ValidationInfo):
        # pydantic reads true as 1 for a number (lax mode): `iters: yes` trained one step.
        # (Not for a job record: one stored before this rule stays readable, as in _cross.)
        if isinstance(v, bool) and not _stored(info) and \
                _takes_number_not_bool(cls.model_fields[info.field_name]):
            raise ValueError(f"a number is needed, not {str(v).lower()}")
        return v


def _stored(info: ValidationInfo) -> bool:
    """A job record's config, read back from the coordinator's store: the rules held when it
    was submitted, and one added since must not make it unreadable (`herd jobs`, the scheduler
    and the dashboard read every record)."""
    return bool(info.context and info.context.get("stored"))


def _takes_number_not_bool(field) -> bool:
    kinds, todo = set(), [field.annotation]
    while todo:
        t = todo.pop()
        kinds.add(t)
        todo.extend(typing.get_args(t))
    return bool(kinds & {int, float}) and bool not in kinds and Any not in kinds


class LoraParameters(_Strict):
    rank: int = Field(8, ge=1, le=1024, description="LoRA rank r (mlx-lm default 8)")

    @field_validator("rank", mode="before")
    @classmethod
    def _positive(cls, v):
        if isinstance(v, int) and v < 1:
            raise ValueError("the LoRA rank must be at least 1 (mlx-lm's default is 8)")
        return v
    scale: float = Field(20.0, gt=0, description="LoRA scale; mlx-lm uses 'scale', not 'alpha'")
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    keys: list[str] | None = Field(None, description="module keys to adapt, e.g. self_attn.q_proj")


class LrSchedule(_Strict):
    name: str = Field(description="an mlx.optimizers.schedulers function, e.g. cosine_decay")
    arguments: list[Any]
    warmup: int = Field(0, ge=0)
    warmup_init: float = 0.0

    @field_validator("name")
    @classmethod
    def _known(cls, v: str) -> str:
        known = ["cosine_decay", "exponential_decay", "linear_schedule", "step_decay"]
        if v not in known:
            raise ValueError(f"unknown schedule {v!r}; one of {known}")
        return v

    @field_validator("arguments")
    @classmethod
    def _fit_the_schedule(cls, v: list, info: ValidationInfo) -> list:
        # mlx-lm calls the schedule with *arguments on the rank: a wrong count was a TypeError
        # there, after placement (an outside run)
        import inspect

        import mlx.optimizers as optim

        if (name := info.data.get("name")) is None or _stored(info):
            return v
        signature = inspect.signature(getattr(optim, name)).replace(
            return_annotation=inspect.Signature.empty)
        if [a for a in v if isinstance(a, bool) or not isinstance(a, (int, float))]:
            raise ValueError(f"{name}'s arguments are numbers: {name}{signature}")
        try:
            signature.bind(*v)
        except TypeError as e:
            raise ValueError(f"{len(v)} argument(s) do not fit {name}{signature}: {e}") from None
        return v


class HfDataset(_Strict):
    """One entry of ``hf_dataset``: a dataset ``datasets.load_dataset`` loads (mlx-lm's keys and
    defaults, ``mlx_lm/tuner/datasets.py`` load_custom_hf_dataset)."""

    path: str = Field(description="a hub id, or a loader such as 'json' with config.data_files")
    config: dict[str, Any] = Field(default_factory=dict,
                                   description="keyword arguments of datasets.load_dataset")
    train_split: str = "train[:80%]"
    valid_split: str = "train[-10%:]"
    test_split: str | None = None
    prompt_feature: str = "prompt"
    completion_feature: str = "completion"
    text_feature: str = "text"
    chat_feature: str = "messages"


class Parallelism(_Strict):
    data: int | Literal["auto"] = "auto"
    pipeline: int = Field(1, ge=1)


class Cluster(_Strict):
    """herd's own section: where and how the job runs."""

    workers: int | None = Field(None, ge=1, description="workers to use (default: data x pipeline)")
    parallelism: Parallelism | Literal["auto"] = "auto"
    exchange: Literal["mlx", "grpc", "auto"] = "auto"
    backend: Literal["zeroconf", "ray", "static"] = "zeroconf"
    ray_address: str = Field(
        "auto", description="backend ray: the Ray cluster to drive: its head's host:port, or "
        "auto (RAY_ADDRESS, else the cluster last started by `ray start` on the coordinator's "
        "machine)")
    max_restarts: int = Field(2, ge=0)
    exchange_timeout_s: float = Field(60.0, gt=0, description="deadline of one gradient exchange")
    wire_dtype: Literal["float32", "bfloat16"] = "float32"
    gradient_average: Literal["tokens", "mlx_lm"] = Field(
        "tokens",
        description="tokens: the step's gradient is the mean over all its target tokens (every "
        "micro-batch and rank divided by the step's token count), so N ranks == 1 rank; mlx_lm: "
        "mlx_lm.lora's numbers (each micro-batch's own mean, averaged over accumulation steps "
        "and ranks)",
    )
    model_source: Literal["auto", "coordinator", "hub"] = Field(
        "auto", description="where workers get a hub model: the coordinator's model store when it "
        "holds it, else straight from the hub (auto); only the store; only the hub")
    allow_wifi: bool = Field(False, description="let gradients go over Wi-Fi when it is the only "
                             "network the workers share (coordinator/planner/network.py)")
    packing: bool = Field(False, description="pack documents into rows (worker/rank/packing.py)")
    balance: bool = Field(True, description="each data-parallel rank's share follows its speed")
    shares: list[Annotated[int, Field(ge=1)]] | None = Field(  # a split of the global batch
        None, min_length=1, description="each data-parallel rank's examples (or rows): the "
        "first split, which follows the ranks' speed after unless balance is false")
    max_shares: list[Annotated[int, Field(ge=1)]] | None = Field(  # planner: memory's limits
        None, min_length=1, description="the most examples (or rows) each rank may take")
    on_non_finite: Literal["fail", "rollback"] = Field(
        "fail", description="a non-finite loss or gradient: fail the job naming the step (fail), "
        "or restart from the last checkpoint with the learning rate times rollback_lr_factor, "
        "at most max_rollbacks times (rollback; the service's, not `herd train`'s)")
    rollback_lr_factor: float = Field(0.5, gt=0, lt=1)
    max_rollbacks: int = Field(3, ge=1)
    lr_scale: float = Field(1.0, gt=0, le=1, description="the learning rate (or its schedule) "
                            "times this; set by the coordinator on each rollback")

    def data_parallel(self) -> int | None:
        """The data-parallel degree if fixed by the config, else None (decided at placement)."""
        if isinstance(self.parallelism, Parallelism) and self.parallelism.data != "auto":
            return int(self.parallelism.data)
        return None

    def pipeline_stages(self) -> int:
        return self.parallelism.pipeline if isinstance(self.parallelism, Parallelism) else 1

    def uneven_split_why_not(self, stages: int | None = None) -> str:
        """Why the global batch must split evenly over the data-parallel ranks ("": any split,
        e.g. 4 examples over 3 Macs as 2, 1, 1). Token-weighted averaging gives the same update
        for any split (worker/rank/balance.py); mlx-lm's mean of per-rank means only for equal
        ones, and a pipeline's replicas take equal micro-batches. ``stages``: the layout's, when
        a planner chose it."""
        if self.gradient_average == "mlx_lm":
            return ("cluster.gradient_average: mlx_lm averages each rank's own mean, which is "
                    "the global batch's only when the ranks take equal shares")
        if (stages or self.pipeline_stages()) > 1:
            return "the replicas of a pipeline take equal shares of the global batch"
        return ""

    @model_validator(mode="after")
    def _ray_address_needs_ray(self):
        # An explicit `auto` without a backend too: a job that named it so (as the README's
        # snippet lists both keys) waited as a zeroconf job, "0 verified", beside Ray nodes (an
        # outside run). (A whole dump, the job API's, names backend: zeroconf and passes.)
        unsaid = "backend" not in self.model_fields_set
        if self.backend != "ray" and (self.ray_address != "auto" or (
                unsaid and "ray_address" in self.model_fields_set)):
            raise ValueError(f"ray_address is only read with backend: ray (backend is "
                             f"{self.backend}{', the default' if unsaid else ''}); set backend: "
                             "ray or drop ray_address")
        return self


class Quantize(_Strict):
    """Quantize the base model on load (QLoRA on an unquantized folder)."""

    bits: Literal[2, 3, 4, 5, 6, 8] = 4
    group_size: Literal[32, 64, 128] = 64


class JobConfig(_Strict):
    """mlx_lm.lora's keys with mlx_lm.lora's defaults (mlx-lm 0.32), plus cluster/quantize."""

    model: str = "Qwen/Qwen3-0.6b"
    train: bool = False
    fine_tune_type: Literal["lora", "dora", "full"] = "lora"
    optimizer: Literal["adam", "adamw", "muon", "sgd", "adafactor"] = Field(
        "adam", description="case-insensitive, as mlx-lm lower-cases it")
    optimizer_config: dict[str, dict[str, Any]] = Field(
        default_factory=lambda: {k: {} for k in ("adam", "adamw", "muon", "sgd", "adafactor")}
    )
    data: str = "mlx-community/WikiSQL"
    hf_dataset: HfDataset | list[HfDataset] | None = Field(
        None, description="read through `datasets` instead of the data folder (as mlx-lm)")
    seed: int = 0
    num_layers: int = Field(16, ge=-1)
    batch_size: int = Field(4, ge=1)
    iters: int = Field(1000, ge=1)
    val_batches: int = Field(25, ge=-1)
    learning_rate: float = Field(1e-5, gt=0)
    steps_per_report: int = Field(10, ge=1)
    steps_per_eval: int = Field(200, ge=1)
    resume_adapter_file: str | None = None
    adapter_path: str = "adapters"
    save_every: int = Field(100, ge=1)
    test: bool = False
    test_batches: int = Field(500, ge=-1)
    max_seq_length: int = Field(2048, ge=2)
    config: str | None = None
    grad_checkpoint: bool = False
    grad_accumulation_steps: int = Field(1, ge=1)
    clear_cache_threshold: int = Field(0, ge=0)
    lr_schedule: LrSchedule | None = None
    lora_parameters: LoraParameters = Field(default_factory=LoraParameters)
    mask_prompt: bool = False
    # mlx-lm reads these optional keys to map custom JSONL field names.
    prompt_feature: str = "prompt"
    completion_feature: str = "completion"
    text_feature: str = "text"
    chat_feature: str = "messages"
    report_to: str | None = None
    project_name: str | None = None
    trust_remote_code: bool = False
    # mlx-lm's example lora_config.yaml on its main branch names it (mlx-lm 0.32 ignores it):
    # "normal" is what herd trains; "dpo" is refused by name (it was "unknown key": an outside run).
    training_mode: str = "normal"

    cluster: Cluster = Field(default_factory=Cluster)
    quantize: Quantize | None = None

    @field_validator("optimizer_config")
    @classmethod
    def _optimizer_arguments(cls, v: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        # Passed as keyword arguments to the mlx optimizer (worker/rank/model.py): a misspelt one
        # is a TypeError in the rank after placement, so it is named here, with a did-you-mean.
        for name, kwargs in v.items():
            known = _optimizer_arguments(name)
            if known is None:
                raise ValueError(f"{name}: not an optimizer mlx-lm offers"
                                 + did_you_mean(name, OPTIMIZERS))
            for arg in kwargs:
                if arg not in known:
                    raise ValueError(f"{name}.{arg}: not an argument of mlx's {name} optimizer"
                                     + did_you_mean(arg, known)
                                     + f" (it takes {', '.join(known)})")
        return v

    @field_validator("training_mode")
    @classmethod
    def _supervised(cls, v: str) -> str:
        if v != "normal":
            raise ValueError(f"training_mode {v}: herd trains normal (supervised) fine-tuning, "
                             "as mlx-lm 0.32 does; remove the key or set it to normal")
        return v

    @field_validator("report_to")
    @classmethod
    def _reporters(cls, v: str | None) -> str | None:
        # mlx-lm's reporting callbacks (mlx_lm/tuner/callbacks.py), which refuse any other name
        # on the rank, after the job has been placed.
        unknown = [r for r in (v or "").split(",") if r.strip() and r.strip().lower()
                   not in REPORTERS]
        if unknown:
            raise ValueError(f"{', '.join(unknown)}: mlx-lm reports to {' or '.join(REPORTERS)} "
                             "(`herd coordinator --tensorboard DIR` writes TensorBoard logs of "
                             "every job)")
        return v

    def last_step(self) -> int:
        """The micro-batch iteration of the last optimizer step, which writes the final adapter:
        ``iters`` unless a partial accumulation trails it (computed, never applied, as in
        mlx-lm)."""
        return self.iters - self.iters % self.grad_accumulation_steps

    @field_validator("model")
    @classmethod
    def _printable(cls, v: str, info: ValidationInfo) -> str:
        stored = _stored(info)  # (a record: readable as it is)
        if not v.isprintable() and not stored:  # (shown in other users' terminals: herd jobs)
            raise ValueError("holds control characters: give a hub id or a folder path")
        return v

    @field_validator("num_layers")
    @classmethod
    def _layers(cls, v: int) -> int:
        if v == 0:
            raise ValueError("0 layers trains nothing; use -1 for all layers or N for the last N")
        return v

    @model_validator(mode="after")
    def _cross(self, info: ValidationInfo) -> "JobConfig":
        if _stored(info):
            # A job record: these rules held when it was submitted, and a rule added since must
            # not make a stored job unreadable (`herd jobs` would fail for every job). What can
            # no longer run fails at its launch, with the reason.
            return self
        if self.train and self.iters < self.grad_accumulation_steps:
            raise ValueError(
                f"iters {self.iters} is fewer than grad_accumulation_steps "
                f"{self.grad_accumulation_steps}: no optimizer step would run (iters counts "
                "micro-batches, as in mlx-lm)")
        if self.fine_tune_type == "full" and self.quantize is not None:
            raise ValueError(
                "fine_tune_type: full cannot train a quantized base (a quantized weight has no "
                "gradient): use lora or dora (QLoRA), or drop the quantize: section")
        dp = self.cluster.data_parallel()
        workers, stages = self.cluster.workers, self.cluster.pipeline_stages()
        ranks = dp or (workers // stages if workers and workers > 1 else None)
        if ranks and self.cluster.shares is None:
            # What placement would refuse on every try (coordinator/placement.py): said now.
            # (Given shares split any batch: checked below.)
            of = (f"cluster.parallelism.data {dp}" if dp else f"cluster.workers {workers}")
            if self.batch_size < ranks:
                raise ValueError(
                    f"batch_size {self.batch_size} is smaller than the {ranks} data-parallel "
                    f"ranks of {of}: every rank takes at least one example of each global "
                    f"batch; use a batch_size of at least {ranks}, or fewer workers")
            if self.batch_size % ranks and (why := self.cluster.uneven_split_why_not()):
                raise ValueError(
                    f"batch_size {self.batch_size} does not split evenly over the {ranks} "
                    f"data-parallel ranks of {of} ({why}): use a batch_size that is a multiple "
                    f"of {ranks}, or fewer workers")
        shares, caps = self.cluster.shares, self.cluster.max_shares
        for key, given in (("shares", shares), ("max_shares", caps)):
            if given is not None and ranks and len(given) != ranks:  # (else every rank fails)
                raise ValueError(
                    f"cluster.{key} {given} names {len(given)} ranks; the job runs {ranks} "
                    f"data-parallel ranks: give one entry per rank, or remove cluster.{key}")
        if shares is not None and (sum(shares) != self.batch_size or dp and len(shares) != dp):
            raise ValueError(f"cluster.shares {shares} split the global batch: one per "
                             f"data-parallel rank ({dp or 'any'}), summing to {self.batch_size}")
        if caps is not None and sum(caps) < self.batch_size:
            raise ValueError(f"cluster.max_shares {caps} sum below batch_size {self.batch_size}")
        if self.cluster.gradient_average == "mlx_lm" and (shares or caps or self.cluster.packing):
            raise ValueError("cluster.gradient_average: mlx_lm takes no shares or packing")
        if (stages := self.cluster.pipeline_stages()) > 1 and (dp or 0) > 2:
            # (placement refused it on every try, after submit: Plan.ring_order)
            raise ValueError(f"cluster.parallelism {{data: {dp}, pipeline: {stages}}}: the MLX "
                             "ring carries at most 2 pipelines; pin data to 1 or 2, or leave "
                             "it auto")
        if self.cluster.pipeline_stages() > 1 and (refused := job_refusal(self)) is not None:
            raise ValueError(f"cluster.parallelism.pipeline {self.cluster.pipeline_stages()}: "
                             f"{refused[0]} ({refused[1]})")
        if self.cluster.gradient_average == "mlx_lm" and self.cluster.pipeline_stages() > 1:
            raise ValueError(
                "cluster.gradient_average: mlx_lm is for data-parallel and single-process jobs; "
                "pipeline stages average by tokens (remove gradient_average or the pipeline)"
            )
        hf = self.hf_datasets()
        if self.test and hf and any(d.test_split is None for d in hf):
            raise ValueError(
                "test: true with hf_dataset needs a test_split in every hf_dataset entry "
                "(mlx-lm reads it from there), e.g. test_split: test"
            )
        if not self.train and not self.test and "train" in self.model_fields_set:
            raise ValueError(
                "train: false and test: false leaves nothing to do (mlx_lm.lora stops the same "
                "way); set train: true, or test: true to evaluate an existing adapter"
            )
        return self

    @model_validator(mode="before")
    @classmethod
    def _mlx_lm_spellings(cls, raw: Any) -> Any:
        """What mlx-lm accepts that the schema spells one way: optimizer names in any case
        (mlx-lm lower-cases them) and legacy keys (mapped, with a deprecation warning)."""
        if not isinstance(raw, dict):
            return raw
        raw = dict(raw)
        if isinstance(raw.get("optimizer"), str):
            raw["optimizer"] = raw["optimizer"].lower()
        for old, (new, convert) in LEGACY_KEYS.items():
            if old not in raw:
                continue
            value = raw.pop(old)
            if new in raw:
                raise ValueError(f"{old} (legacy) and {new} are both set; keep only {new}")
            mapped = convert(value)
            warnings.warn(f"{old}: {value!r} is a legacy mlx-lm key, read as {new}: "
                          f"{mapped!r}; write {new} instead", LegacyKeyWarning, stacklevel=2)
            raw[new] = mapped
        return raw

    def hf_datasets(self) -> list[HfDataset]:
        hf = self.hf_dataset
        return [] if hf is None else hf if isinstance(hf, list) else [hf]

    def trains(self) -> bool:
        """What ``herd train`` does with this config, as ``mlx_lm.lora -c`` would: train when
        ``train: true``; only evaluate when ``test: true`` and train is false or unset. A config
        that says neither trains (mlx-lm would stop; ``herd train`` is told what to do by its
        name)."""
        return self.train or ("train" not in self.model_fields_set and not self.test)

    def why_no_training(self) -> str:
        """Why a config that does not train does not, in the user's own terms (a test: true
        that left out train: read as "train: false", a key they never wrote: an outside run)."""
        if "train" in self.model_fields_set:
            return "train: false (test: true runs the test set on the adapter at adapter_path)"
        return ("test: true and no `train: true` (mlx-lm's default is train: false): add "
                "train: true to train first, then test")

    def check_trains_on_a_cluster(self) -> None:
        """ConfigError unless the config trains: a cluster job does (its ranks train whatever
        the config says), whichever door it comes in by (the CLI, gRPC, the HTTP job API)."""
        if not self.trains():
            raise ConfigError(f"a cluster job trains; this config evaluates only: "
                              f"{self.why_no_training()}",
                              hint="evaluate an adapter on one machine: herd train CONFIG")

    # mlx-lm's TrainingArgs and adapter_config.json speak these names.
    def first_adapted_layer(self, total_layers: int) -> int:
        """The first block with adapters: LoRA goes on the last ``num_layers`` (-1: all)."""
        n = total_layers if self.num_layers == -1 else min(self.num_layers, total_layers)
        return total_layers - n

    def mlx_lm_dict(self) -> dict[str, Any]:
        d = self.model_dump(exclude={"cluster", "quantize", "training_mode"}, mode="json")
        return d


class _Loader(yaml.SafeLoader):
    """mlx-lm's YAML loader reads 1e-5 as a float (PyYAML's default reads it as a string).
    mlx-lm changes PyYAML's global SafeLoader for that; herd changes only its own subclass, so
    importing herd.config changes no other ``yaml.safe_load`` in the process.

    It also refuses a key given twice in one mapping, naming both lines: PyYAML (and so mlx-lm)
    keeps the last silently, so a second ``learning_rate`` further down would quietly win."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            first: dict[str, int] = {}
            for key_node, _ in node.value:
                if not isinstance(key_node, yaml.ScalarNode) or key_node.value == "<<":
                    continue  # (a merge key: explicit keys may override merged ones)
                line = key_node.start_mark.line + 1
                if key_node.value in first:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"key {key_node.value!r} is given twice (lines "
                        f"{first[key_node.value]} and {line}): keep one", key_node.start_mark)
                first[key_node.value] = line
        return super().construct_mapping(node, deep)


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+][0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)

_HINTS = {
    "data_files": "it goes in hf_dataset.config, load_dataset's arguments, as in mlx-lm",
    "alpha": "mlx-lm's LoRA config uses 'scale', not 'alpha'",
    "lora_rank": "put it under lora_parameters: {rank: N}",
    "rank": "put it under lora_parameters: {rank: N}",
    "lr": "the key is learning_rate",
    "epochs": "mlx-lm counts iterations: set iters",
    "gradient_accumulation_steps": "the key is grad_accumulation_steps",
    "gradient_checkpointing": "the key is grad_checkpoint",
}


def _tag(part) -> bool:
    """A part of pydantic's error path that is not the user's key: a list index, a union
    branch (``HfDataset``, ``list[HfDataset]``) or a validator (``function-after[...]``)."""
    return (not isinstance(part, str) or part[:1].isupper() or "[" in part or "-" in part
            or part in ("int", "float", "str", "bool", "dict", "list"))


def _models_in(ann) -> BaseModel | None:
    """The model class inside an annotation (``X | list[X] | None`` -> X)."""
    if isinstance(ann, type) and issubclass(ann, BaseModel):
        return ann
    for arg in getattr(ann, "__args__", ()):
        if (found := _models_in(arg)) is not None:
            return found
    return None


def _model_for(loc: tuple) -> type[BaseModel] | None:
    model: Any = JobConfig
    for part in [p for p in loc[:-1] if not _tag(p)]:
        field = getattr(model, "model_fields", {}).get(part)
        if field is None or (model := _models_in(field.annotation)) is None:
            return None
    return model


def _format(err: ValidationError, source: str) -> ConfigError:
    lines = []
    errors = [(".".join(str(p) for p in e["loc"] if not _tag(p) or isinstance(p, int))
               or "(top level)", e) for e in err.errors()]
    # A value a union rejects gets one error per branch: where one branch got further (a key
    # deeper inside it), the others' "should be a list / 'auto'" only add noise.
    deeper = {k for k, _ in errors}
    for key, e in errors:
        loc = tuple(e["loc"])
        if any(d.startswith(key + ".") for d in deeper) and e["type"] != "extra_forbidden":
            continue
        if e["type"] == "extra_forbidden":
            name = str(loc[-1])
            model = _model_for(loc)
            known = list(model.model_fields) if model else []
            close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
            hint = _HINTS.get(name) or (
                f"did you mean {close[0]!r}?" if close else f"known keys: {', '.join(known)}")
            lines.append(f"{key}: unknown key ({hint})")
        else:
            msg = e["msg"].removeprefix("Value error, ")
            if key == "(top level)":  # a cross-field rule: its message names the keys itself
                lines.append(msg)
                continue
            value = e.get("input")
            shown = repr(value) if not isinstance(value, dict) else "{...}"
            lines.append(f"{key} = {shown}: {msg}")
    return ConfigError(
        f"invalid job config {source}:\n  " + "\n  ".join(lines),
        hint="see configs/ for complete examples; keys follow mlx_lm.lora",
    )


def parse_config(raw: dict[str, Any], source: str = "<dict>", stored: bool = False) -> JobConfig:
    """``raw`` validated as a job config; ``stored``: a job record's, whose cross-field rules
    were checked at its submission (JobConfig._cross)."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: a job config is a YAML mapping, got {type(raw).__name__}")
    # `key: null` is mlx-lm's default for that key (mlx_lm.lora fills every None from its
    # CONFIG_DEFAULTS): configs written from a dict, or templates that list every key, hold them.
    raw = {k: v for k, v in raw.items() if v is not None}
    try:
        cfg = JobConfig.model_validate(raw, context={"stored": stored})
    except ValidationError as e:
        raise _format(e, source) from None
    if not stored:  # (a job record's held at its submission; the scheduler reads them each tick)
        _check_bounds(cfg.model_dump(mode="python"), source)
    return cfg


MAX_INT = 2**31 - 1  # iters, seeds, sizes: more than any job needs, and what NumPy's seed takes


def _check_bounds(value: Any, source: str, path: str = "") -> None:
    """Every number in the config finite and within MAX_INT: iters: 1e20 passed `herd check` and
    then failed in SQLite ("Python int too large") or as an HTTP 500, and learning_rate: .inf
    on the rank at its first step (an outside run)."""
    if isinstance(value, dict):
        for k, v in value.items():
            _check_bounds(v, source, f"{path}.{k}" if path else str(k))
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _check_bounds(v, source, f"{path}.{i}")
    elif isinstance(value, bool):
        return
    elif isinstance(value, int) and abs(value) > MAX_INT:
        raise ConfigError(f"{source}: {path} = {value}: at most {MAX_INT}",
                          hint="a job config's whole numbers fit in 32 bits")
    elif isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{source}: {path} = {value}: not a finite number")


def load_config(path: str | Path, overrides: dict[str, Any] | None = None,
                defaults: dict[str, Any] | None = None) -> JobConfig:
    """Read a YAML job config. Relative paths in it (``model``, ``data``, ``adapter_path``)
    resolve from the current folder, as ``mlx_lm.lora -c`` resolves them, so one config means the
    same job to both. ``overrides`` (flags) win over the file; ``defaults`` fill keys it lacks."""
    try:  # (its size is refused before it is read)
        raw = bounded_yaml.load_file(path := Path(path), _Loader) or {}
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a job config is a YAML mapping, got {type(raw).__name__}")
    raw = {k: v for k, v in raw.items() if v is not None}  # (as parse_config: mlx-lm's defaults)
    raw.update({k: v for k, v in (overrides or {}).items() if v is not None})
    raw.update({k: v for k, v in (defaults or {}).items() if v is not None and k not in raw})
    return parse_config(raw, str(path))


# The job config crosses process boundaries as YAML text (JobSpec.config_yaml,
# StartRankRequest.config_yaml, the coordinator's store, a rank's config.yaml): the user's own
# mlx-lm document, holding only the keys they set. Inside a process it is a JobConfig.

def config_from_yaml(text: str, source: str, stored: bool = False) -> JobConfig:
    """Parse a config that crossed a boundary as text (validated again: text is not trusted).
    ``stored``: a job record's (parse_config)."""
    return parse_config(read_yaml(text, source), source, stored)


def read_yaml(text: str, source: str) -> Any:
    """YAML text as mlx-lm reads it (1e-5 a float), bounded, with duplicate keys refused."""
    try:
        return bounded_yaml.load(text, _Loader, source) if text else None
    except yaml.YAMLError as e:
        raise ConfigError(f"{source} is not valid YAML: {e}") from None


def with_cluster(cfg: JobConfig, source: str, **changes) -> JobConfig:
    """``cfg`` with keys of its ``cluster`` section set by the coordinator (a rollback's rate, the
    planner's memory caps), validated again; the keys the user set stay as they were."""
    raw = cfg.model_dump(mode="json", exclude_unset=True)
    raw.setdefault("cluster", {}).update(changes)
    return parse_config(raw, source)


def config_to_yaml(cfg: JobConfig) -> str:
    """The config as text: the keys that were set, in the schema's order."""
    return yaml.safe_dump(cfg.model_dump(mode="json", exclude_unset=True), sort_keys=False)
