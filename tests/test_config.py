"""The job config: mlx_lm.lora's keys and defaults, herd's sections, errors that name the fix."""

from __future__ import annotations

from pathlib import Path

import pytest
from mlx_lm.lora import CONFIG_DEFAULTS

from herd.config import JobConfig, load_config, parse_config
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


def test_full_mlx_lm_config_validates():
    parse_config(dict(CONFIG_DEFAULTS), "mlx-lm defaults")


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_validate(path):
    load_config(path)


@pytest.mark.parametrize(
    "raw, expect",
    [
        ({"learning_rte": 1e-5}, "did you mean 'learning_rate'"),
        ({"lora_parameters": {"alpha": 16}}, "uses 'scale', not 'alpha'"),
        ({"lora_parameters": {"rank": 0}}, "lora_parameters.rank = 0"),
        ({"batch_size": "four"}, "batch_size = 'four'"),
        ({"cluster": {"exchange": "nccl"}}, "cluster.exchange"),
        ({"quantize": {"bits": 7}}, "quantize.bits = 7"),
        ({"num_layers": 0}, "use -1 for all layers"),
        ({"iters": 10, "grad_accumulation_steps": 4, "save_every": 8},
         "multiple of grad_accumulation_steps"),
        ({"batch_size": 6, "cluster": {"parallelism": {"data": 4, "pipeline": 1}}},
         "not divisible by cluster.parallelism.data 4"),
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
