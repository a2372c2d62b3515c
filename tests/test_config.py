"""The job config: mlx_lm.lora's keys and defaults, herd's sections, errors that name the fix."""

from __future__ import annotations

from pathlib import Path

import pytest
from mlx_lm.lora import CONFIG_DEFAULTS

from herd.config import JobConfig, load_config, parse_config, read_yaml
from herd.errors import ConfigError

REPO = Path(__file__).resolve().parent.parent


def test_mlx_lm_defaults_are_ours():
    """An mlx-lm config runs unchanged: same keys, same defaults."""
    ours = JobConfig().model_dump()
    for key, default in CONFIG_DEFAULTS.items():
        assert key in ours, f"mlx_lm.lora key {key} is not accepted"
        if key == "lora_parameters":
            assert {k: ours[key][k] for k in default} == default
        else:
            assert ours[key] == default, f"{key}: ours {ours[key]!r} != mlx-lm {default!r}"


def test_a_null_value_is_mlx_lm_s_default_for_that_key(tmp_path):
    """mlx_lm.lora fills every None from CONFIG_DEFAULTS: a config that lists every key with
    null (written from a dict, or a template) is the default config, in a file or a dict."""
    nulls = {k: None for k in CONFIG_DEFAULTS if k not in ("model", "data")}
    cfg = parse_config({"model": "m", **nulls})
    assert cfg == parse_config({"model": "m"})
    assert cfg.seed == CONFIG_DEFAULTS["seed"] and cfg.lora_parameters.rank == 8
    path = tmp_path / "job.yaml"
    path.write_text("model: m\nseed: null\nlora_parameters:\ntest_batches: ~\n")
    assert load_config(path).model_dump() == parse_config({"model": "m"}).model_dump()


def test_full_mlx_lm_config_validates():
    parse_config({**CONFIG_DEFAULTS, "train": True}, "mlx-lm defaults")
    parse_config({**CONFIG_DEFAULTS, "test": True}, "mlx-lm defaults")
    # neither train nor test: mlx_lm.lora stops ("Must provide at least one of --train or
    # --test"), and so does herd, before loading anything
    with pytest.raises(ConfigError, match="leaves nothing to do"):
        parse_config(dict(CONFIG_DEFAULTS), "mlx-lm defaults")


# Every key of the installed mlx-lm's CONFIG_DEFAULTS, and how herd handles it: a new key in an
# mlx-lm upgrade fails test_every_mlx_lm_key_is_handled until it is handled and listed here (or
# listed in NOT_HANDLED with the reason), so no key is ever silently ignored.
HANDLED = {
    "model": "mlx_lm.utils.load (worker/rank/model.py load_base)",
    "train": "JobConfig.trains(): train, or only evaluate (tests/test_training.py)",
    "fine_tune_type": "linear_to_lora_layers / unfrozen blocks (model.apply_adapters)",
    "optimizer": "lower-cased, then the mlx.optimizers class (model.build_optimizer)",
    "optimizer_config": "the chosen optimizer's keyword arguments (model.build_optimizer)",
    "data": "a local folder, else a hub dataset through `datasets` (herd/hf_dataset.py)",
    "seed": "numpy and mx.random seeds, the batch order (batches.DataOrder)",
    "num_layers": "the last N blocks (model.apply_adapters)",
    "batch_size": "the global batch (batches.sorted_batches)",
    "iters": "micro-batches (trainer.train)",
    "val_batches": "trainer.evaluate",
    "learning_rate": "model.build_optimizer",
    "steps_per_report": "trainer.train",
    "steps_per_eval": "batches.val_iterations",
    "resume_adapter_file": "weights only, optimizer fresh (rank/cli._resume)",
    "adapter_path": "where adapters and checkpoints go; test-only reads it (rank/cli.run)",
    "save_every": "trainer.checkpoint_due (on optimizer steps)",
    "test": "rank/cli._test after training or of the adapter at adapter_path",
    "test_batches": "rank/cli._test",
    "max_seq_length": "batches.collate, and the dataset check's warning",
    "grad_checkpoint": "mlx_lm's grad_checkpoint (trainer.train)",
    "grad_accumulation_steps": "trainer.train (cluster.gradient_average chooses the mean)",
    "clear_cache_threshold": "trainer.train (mlx_lm.lora's own CLI default of 0 overrides the "
    "config's value; herd honours the config)",
    "lr_schedule": "mlx_lm's build_schedule (model.build_optimizer)",
    "lora_parameters": "linear_to_lora_layers (model.apply_adapters)",
    "mask_prompt": "mlx_lm's dataset classes; the dataset check",
    "report_to": "mlx_lm's get_reporting_callbacks on rank 0 (rank/reporter.Reporter)",
    "project_name": "mlx_lm's get_reporting_callbacks",
    "trust_remote_code": "mlx_lm.utils.load (model.load_base)",
}
NOT_HANDLED = {
    "config": "the YAML file's own path (mlx_lm.lora's -c); herd takes the file as an argument",
}


def test_every_mlx_lm_key_is_handled():
    """A key the installed mlx-lm reads that herd neither handles nor lists with a reason fails
    here, so an mlx-lm upgrade cannot add a key herd silently ignores."""
    unlisted = set(CONFIG_DEFAULTS) - set(HANDLED) - set(NOT_HANDLED)
    assert not unlisted, f"mlx-lm keys herd neither handles nor lists: {sorted(unlisted)}"
    assert set(HANDLED) <= set(JobConfig.model_fields), "a handled key must be a config key"
    stale = (set(HANDLED) | set(NOT_HANDLED)) - set(CONFIG_DEFAULTS)
    assert not stale, f"listed keys mlx-lm no longer has: {sorted(stale)}"


def test_mlx_lm_spellings_are_accepted():
    """mlx-lm lower-cases the optimizer; legacy keys map to today's with a warning."""
    from herd.config import LegacyKeyWarning

    assert parse_config({"optimizer": "AdamW"}).optimizer == "adamw"
    with pytest.warns(LegacyKeyWarning, match="use_dora: True is a legacy mlx-lm key"):
        assert parse_config({"use_dora": True}).fine_tune_type == "dora"
    with pytest.warns(LegacyKeyWarning, match="lora_layers"):
        assert parse_config({"lora_layers": 4}).num_layers == 4
    with pytest.raises(ConfigError, match="keep only fine_tune_type"):
        parse_config({"use_dora": True, "fine_tune_type": "lora"})


def test_accumulation_does_not_have_to_divide_save_every_or_iters():
    cfg = parse_config({"grad_accumulation_steps": 3, "train": True})  # save_every 100, iters 1000
    assert (cfg.save_every, cfg.iters) == (100, 1000)


def test_checkpoints_land_on_the_last_optimizer_step_before_each_save_point():
    from worker.rank.trainer import checkpoint_due

    def saved(accum, save_every, iters):
        return [it for it in range(1, iters + 1) if checkpoint_due(it, accum, save_every, iters)]

    assert saved(3, 100, 1000)[:4] == [99, 198, 300, 399]
    assert saved(3, 100, 1000)[-1] == 999  # the last optimizer step; 1000 is never applied
    assert parse_config({"grad_accumulation_steps": 3, "iters": 1000}).last_step() == 999
    assert saved(1, 4, 10) == [4, 8, 10]
    assert saved(2, 4, 8) == [4, 8]
    assert saved(4, 2, 8) == [4, 8]  # save_every below the accumulation: every step


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_validate(path):
    load_config(path)


@pytest.mark.parametrize(
    "raw, expect",
    [
        ({"learning_rte": 1e-5}, "did you mean 'learning_rate'"),
        # inside a union (one entry or a list of them): the user's key, not pydantic's branch
        ({"hf_dataset": [{"path": "a"}, {"path": "b", "splt": 1}]},
         "hf_dataset.1.splt: unknown key (known keys: path, config, train_split"),
        ({"hf_dataset": {"path": "json", "data_files": {}}},
         "hf_dataset.data_files: unknown key (it goes in hf_dataset.config"),
        ({"lora_parameters": {"alpha": 16}}, "uses 'scale', not 'alpha'"),
        ({"lora_parameters": {"rank": 0}}, "lora_parameters.rank = 0"),
        ({"batch_size": "four"}, "batch_size = 'four'"),
        ({"cluster": {"exchange": "nccl"}}, "cluster.exchange"),
        ({"quantize": {"bits": 7}}, "quantize.bits = 7"),
        ({"num_layers": 0}, "use -1 for all layers"),
        ({"train": False}, "train: false and test: false leaves nothing to do"),
        ({"test": True, "hf_dataset": {"path": "json"}}, "needs a test_split"),
        ({"optimizer": "lion"}, "optimizer = 'lion'"),
        ({"cluster": {"gradient_average": "mlx_lm", "parallelism": {"pipeline": 2}}},
         "pipeline stages average by tokens"),
        ({"batch_size": 6, "cluster": {"parallelism": {"data": 4, "pipeline": 1},
                                       "gradient_average": "mlx_lm"}},
         "batch_size 6 does not split evenly over the 4 data-parallel ranks of "
         "cluster.parallelism.data 4 (cluster.gradient_average: mlx_lm averages each rank's "
         "own mean"),
        ({"batch_size": 5, "cluster": {"workers": 4, "parallelism": {"data": "auto",
                                                                      "pipeline": 2}}},
         "does not split evenly over the 2 data-parallel ranks of cluster.workers 4 (the "
         "replicas of a pipeline take equal shares"),
        # placement would refuse it on every try: said at `herd check` / submit, not after 600 s
        ({"batch_size": 1, "cluster": {"workers": 2}},
         "batch_size 1 is smaller than the 2 data-parallel ranks of cluster.workers 2"),
        ({"batch_size": 2, "cluster": {"parallelism": {"data": 3}}},
         "batch_size 2 is smaller than the 3 data-parallel ranks of cluster.parallelism.data 3"),
        ({"batch_size": 6, "cluster": {"workers": 2, "shares": [2, 2, 2]}},
         "cluster.shares [2, 2, 2] names 3 ranks; the job runs 2 data-parallel ranks"),
        ({"batch_size": 6, "cluster": {"workers": 3, "max_shares": [4, 4]}},
         "cluster.max_shares [4, 4] names 2 ranks; the job runs 3 data-parallel ranks"),
        # what mlx-lm refuses on the rank, after placement: said before any worker is touched
        ({"report_to": "tensorboard"}, "report_to = 'tensorboard': tensorboard: mlx-lm reports "
         "to wandb or swanlab"),
        ({"fine_tune_type": "full", "quantize": {"bits": 4}},
         "fine_tune_type: full cannot train a quantized base"),
        ({"train": True, "iters": 2, "grad_accumulation_steps": 4},
         "no optimizer step would run"),
        # passed `herd check`, then "Python int too large" in SQLite / an HTTP 500 (outside run)
        ({"iters": 2**63}, "iters = 9223372036854775808: at most 2147483647"),
        ({"lr_schedule": {"name": "cosine_decay", "arguments": [1e-5, 10**12]}},
         "lr_schedule.arguments.1 = 1000000000000: at most"),
        ({"learning_rate": float("inf")}, "learning_rate = inf: not a finite number"),
        ({"learning_rate": -1e-5}, "learning_rate = -1e-05: Input should be greater than 0"),
        ({"learning_rate": 0}, "learning_rate = 0: Input should be greater than 0"),
        # the schedule's TypeError came from the rank, after placement (an outside run)
        ({"lr_schedule": {"name": "cosine_decay", "arguments": [1e-5]}},
         "lr_schedule.arguments = [1e-05]: 1 argument(s) do not fit cosine_decay(init: float, "
         "decay_steps: int, end: float = 0.0): missing a required argument: 'decay_steps'"),
        ({"lr_schedule": {"name": "step_decay", "arguments": [1e-3, "half", 3]}},
         "step_decay's arguments are numbers"),
        # placement refused it on every try, so it waited out placement_timeout (outside run)
        ({"batch_size": 4, "cluster": {"workers": 2, "exchange": "grpc",
                                       "parallelism": {"data": 1, "pipeline": 2}}},
         "cluster.parallelism.pipeline 2: pipeline stages pass activations over the MLX ring, "
         "and cluster.exchange is grpc"),
        # pydantic's lax mode read `iters: yes` as 1 and trained one step (an outside run)
        ({"iters": True}, "iters = True: a number is needed, not true"),
        ({"lora_parameters": {"rank": True}}, "lora_parameters.rank = True: a number is needed"),
        ({"cluster": {"workers": False}}, "cluster.workers = False: a number is needed"),
    ],
)
def test_bad_config_names_key_and_fix(raw, expect):
    with pytest.raises(ConfigError) as e:
        parse_config(raw, "job.yaml")
    assert expect in str(e.value)
    assert "job.yaml" in str(e.value)


def test_yaml_scientific_notation_is_a_float(tmp_path):
    p = tmp_path / "j.yaml"
    p.write_text("learning_rate: 1e-5\n")
    assert load_config(p).learning_rate == 1e-5


def test_a_key_given_twice_is_refused_naming_both_lines(tmp_path):
    """PyYAML (and so mlx-lm) keeps the last of two equal keys silently: a second
    learning_rate further down a long config would quietly win. Merge keys may still be
    overridden, as YAML means them to be."""
    p = tmp_path / "j.yaml"
    p.write_text("learning_rate: 1e-5\nlora_parameters:\n  rank: 8\n  scale: 10\n"
                 "  rank: 4\n")
    with pytest.raises(ConfigError, match=r"'rank' is given twice \(lines 3 and 5\)"):
        load_config(p)
    merged = read_yaml("base: &b {rank: 8, scale: 10}\nlora: {<<: *b, rank: 4}\n", "j.yaml")
    assert merged["lora"] == {"rank": 4, "scale": 10}


def test_fixed_shares_split_an_odd_global_batch_in_either_spelling():
    """cluster.shares [3, 2] split batch_size 5: the ranks train it (the same update as one
    process), so neither `workers: 2` (refused at check) nor `parallelism: {data: 2}` (accepted,
    then never placed for 600 s) may refuse it (an outside run)."""
    from coordinator.placement import place
    from tests.test_network import worker

    for cluster in ({"workers": 2, "shares": [3, 2]},
                    {"workers": 2, "parallelism": {"data": 2, "pipeline": 1}, "shares": [3, 2]}):
        cfg = parse_config({"model": "m", "data": "d", "batch_size": 5, "cluster": cluster})
        placed = place(cfg, [worker("w1", "10.0.0.1"), worker("w2", "10.0.0.2")])
        assert len(placed.worker_ids) == 2
    with pytest.raises(ConfigError, match="summing to 5"):
        parse_config({"model": "m", "data": "d", "batch_size": 5,
                      "cluster": {"workers": 2, "shares": [3, 3]}})


def test_odd_numbers_in_a_config_or_a_sent_config_json_are_refused_by_name():
    """An outside run: a 5,000-digit integer in a job config, and a model config.json sent with a
    job holding heads 0, "x", infinity or a 40 KB nested array, came back as Python's own
    exceptions (exit 1; 'integer division or modulo by zero')."""
    from coordinator.jobs import sent_model_config
    from coordinator.planner.memory import ModelShape
    from herd.config import config_from_yaml

    with pytest.raises(ConfigError, match="4300 digits"):
        config_from_yaml(f"iters: {'9' * 5000}\n", "job.yaml")
    base = {"hidden_size": 64, "num_attention_heads": 4, "num_hidden_layers": 2,
            "intermediate_size": 128, "vocab_size": 100}
    assert ModelShape.from_config(base).head_dim == 16
    for key, value in (("num_attention_heads", 0), ("hidden_size", "x"),
                       ("vocab_size", float("inf")), ("num_key_value_heads", -2),
                       ("num_hidden_layers", True)):
        with pytest.raises(ConfigError, match=f"{key} = .* is not a positive whole number"):
            ModelShape.from_config({**base, key: value})
    with pytest.raises(ConfigError, match="lacks 'vocab_size'"):
        ModelShape.from_config({k: v for k, v in base.items() if k != "vocab_size"})
    with pytest.raises(ConfigError, match="not JSON"):
        sent_model_config("[" * 20_000 + "]" * 20_000)


def test_mlx_lms_newer_example_key_training_mode_is_read():
    """mlx-lm's example lora_config.yaml on its main branch says `training_mode: normal`
    (mlx-lm 0.32 ignores it): herd refused it as an unknown key (an outside run). normal is what
    herd trains, and is not passed on; dpo is refused by name."""
    cfg = parse_config({"model": "m", "training_mode": "normal"})
    assert "training_mode" not in cfg.mlx_lm_dict()
    with pytest.raises(ConfigError, match="training_mode dpo: herd trains normal"):
        parse_config({"model": "m", "training_mode": "dpo"})
