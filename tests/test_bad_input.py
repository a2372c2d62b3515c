"""Issue 2, "Done when" 5: bad configs and datasets fail before training, naming the key or line.

Each row starts from a good job (which `herd check` accepts: the control test), breaks one thing,
and runs the real CLI: `herd check` in-process through herd.cli.main, `herd train` as a real
subprocess (it re-executes itself to preload OpenBLAS, so it cannot run inside pytest). Every row
must exit non-zero, name the key or the file and line, and leave no adapter folder behind.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from herd.cli.main import main as herd_main
from herd.errors import ConfigError
from tests.conftest import herd, start_ranks

GOOD_JOB = {
    "model": "no-model-needed",  # every row fails before a model would load
    "train": True,
    "batch_size": 4,
    "iters": 4,
    "num_layers": -1,
    "lora_parameters": {"rank": 4, "scale": 10.0, "dropout": 0.0},
}


@dataclass(frozen=True)
class Job:
    dir: Path
    config: dict

    @property
    def data(self) -> Path:
        return self.dir / "data"

    @property
    def adapters(self) -> Path:
        return self.dir / "adapters"

    def lines(self, split: str, lines: list[str]) -> None:
        (self.data / f"{split}.jsonl").write_text("".join(f"{x}\n" for x in lines))

    def write(self) -> Path:
        cfg = {**self.config, "data": str(self.data), "adapter_path": str(self.adapters)}
        path = self.dir / "job.yaml"
        path.write_text(yaml.safe_dump(cfg))
        return path


def records(n: int) -> list[str]:
    return [json.dumps({"text": f"the cat is red. {i}"}) for i in range(n)]


@pytest.fixture
def job(tmp_path: Path) -> Job:
    j = Job(tmp_path, json.loads(json.dumps(GOOD_JOB)))
    j.data.mkdir()
    j.lines("train", records(8))
    j.lines("valid", records(4))
    return j


def set_key(key: str, value) -> Callable[[Job], None]:
    def apply(job: Job) -> None:
        *parents, last = key.split(".")
        node = job.config
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value

    return apply


def set_keys(**values) -> Callable[[Job], None]:
    def apply(job: Job) -> None:
        job.config.update(values)

    return apply


def num_layers_beyond_the_model(job: Job) -> None:
    """mlx-lm's default num_layers (16) on a 2-block model: its config.json says so."""
    model = job.dir / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "llama",
                                                   "num_hidden_layers": 2}))
    job.config.update(model=str(model), num_layers=16)


def lora_keys_no_module_has(job: Job) -> None:
    """A typo and a name without its block's prefix, on a llama whose config.json is here."""
    from herd.cli.tiny import model_config

    model = job.dir / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(model_config("llama", 2, 64, 512)))
    job.config.update(model=str(model), num_layers=-1,
                      lora_parameters={"keys": ["q_proj", "self_attn.v_prj"]})


def resume_adapter_not_safetensors(job: Job) -> None:
    (job.dir / "adapters.safetensors").write_text("not tensors")
    job.config["resume_adapter_file"] = str(job.dir / "adapters.safetensors")


def resume_adapter_of_another_rank(job: Job) -> None:
    """An adapter trained with LoRA rank 2, resumed by the job's rank 4."""
    import numpy as np
    from safetensors.numpy import save_file

    save_file({"model.layers.0.self_attn.q_proj.lora_a": np.zeros((64, 2), np.float32),
               "model.layers.0.self_attn.q_proj.lora_b": np.zeros((2, 64), np.float32)},
              str(job.dir / "adapters.safetensors"))
    job.config["resume_adapter_file"] = str(job.dir / "adapters.safetensors")


def malformed_line(job: Job) -> None:
    job.lines("train", records(5) + ['{"text": "the cat is'] + records(2))


def empty_file(job: Job) -> None:
    job.lines("valid", [])


def train_is_a_folder(job: Job) -> None:
    (job.data / "train.jsonl").unlink()
    (job.data / "train.jsonl").mkdir()


def missing_train(job: Job) -> None:
    (job.data / "train.jsonl").unlink()


def unknown_record_keys(job: Job) -> None:
    job.lines("valid", records(2) + [json.dumps({"question": "q", "answer": "a"})] + records(1))


def too_few_records(job: Job) -> None:
    job.lines("train", records(3))


def mixed_formats(job: Job) -> None:
    job.lines("train", records(6) + [json.dumps({"prompt": "p", "completion": "c"})])


def mask_prompt_on_text(job: Job) -> None:
    job.config["mask_prompt"] = True


def missing_data_folder(job: Job) -> None:
    for f in job.data.iterdir():
        f.unlink()
    job.data.rmdir()


# (id, break the good job, exit code, strings the message must contain)
ROWS = [
    # -- config: herd.config.load_config (ConfigError, exit 2) --
    ("unknown key", set_key("lora_rank", 8), 2,
     ["lora_rank: unknown key", "lora_parameters"]),
    ("misspelt key", set_key("learning_rat", 1e-4), 2,
     ["learning_rat: unknown key", "did you mean 'learning_rate'"]),
    ("unknown nested key", set_key("lora_parameters.alpha", 16), 2,
     ["lora_parameters.alpha: unknown key", "'scale'"]),
    ("wrong type", set_key("batch_size", "four"), 2,
     ["batch_size = 'four'", "valid integer"]),
    ("wrong type nested", set_key("cluster.exchange", "tcp"), 2,
     ["cluster.exchange = 'tcp'", "'mlx'", "'grpc'"]),
    ("rank 0", set_key("lora_parameters.rank", 0), 2,
     ["lora_parameters.rank = 0", "must be at least 1"]),
    ("num_layers 0", set_key("num_layers", 0), 2,
     ["num_layers = 0", "-1 for all layers"]),
    ("batch not divisible by data ranks",
     set_keys(batch_size=3, cluster={"parallelism": {"data": 2}, "gradient_average": "mlx_lm"}),
     2, ["batch_size 3 does not split evenly over the 2 data-parallel ranks of "
         "cluster.parallelism.data 2 (cluster.gradient_average: mlx_lm", "multiple of 2"]),
    # what a rank would refuse after placement: said at `herd check` / submit
    ("report_to not mlx-lm's", set_key("report_to", "tensorboard"), 2,
     ["report_to = 'tensorboard'", "mlx-lm reports to wandb or swanlab"]),
    ("full fine-tune of a base quantized on load",
     set_keys(fine_tune_type="full", quantize={"bits": 4}), 2,
     ["fine_tune_type: full cannot train a quantized base", "quantize:"]),
    ("num_layers beyond the model", num_layers_beyond_the_model, 2,
     ["num_layers = 16, but", "has only 2 layers", "num_layers: -1"]),
    # the rank failed at its first step with MLX's "[grad] Must specify at least one argument"
    ("LoRA keys no module has", lora_keys_no_module_has, 2,
     ["lora_parameters.keys: 'q_proj' (did you mean 'self_attn.q_proj'?), 'self_attn.v_prj' "
      "(did you mean 'self_attn.v_proj'?) match no module of", "self_attn.o_proj"]),
    ("misspelt optimizer argument",
     set_keys(optimizer="adamw", optimizer_config={"adamw": {"betass": [0.9, 0.9]}}), 2,
     ["adamw.betass: not an argument of mlx's adamw optimizer", "did you mean 'betas'"]),
    ("missing resume adapter", set_key("resume_adapter_file", "nope.safetensors"), 2,
     ["resume_adapter_file nope.safetensors does not exist"]),
    ("resume adapter that is not safetensors", resume_adapter_not_safetensors, 2,
     ["adapters.safetensors is not a safetensors file"]),
    ("resume adapter of another LoRA rank", resume_adapter_of_another_rank, 2,
     ["was trained with LoRA rank 2 (model.layers.0.self_attn.q_proj.lora_a: shape (64, 2)); "
      "this job's lora_parameters.rank is 4"]),
    # -- dataset: herd.dataset.check_dataset (DatasetError, exit 3) --
    ("missing split", missing_train, 3, ["train.jsonl: missing from"]),
    ("split that is a folder", train_is_a_folder, 3, ["train.jsonl in", "is a folder, not a file"]),
    ("missing data folder", missing_data_folder, 3, ["data is not a local folder"]),
    ("malformed line", malformed_line, 3,
     ["train.jsonl: 1 malformed JSON line (line 6)"]),
    ("empty file", empty_file, 3, ["valid.jsonl: the file is empty (0 records)"]),
    ("record with no known key", unknown_record_keys, 3,
     ["valid.jsonl: 1 record with none of the known keys (line 3)", "['answer', 'question']"]),
    ("mixed formats", mixed_formats, 3,
     ["train.jsonl: 1 completions record in a text file (line 7)"]),
    ("fewer records than batch_size", too_few_records, 3,
     ["train.jsonl: 3 records, fewer than batch_size 4"]),
    ("mask_prompt on text", mask_prompt_on_text, 3,
     ["train.jsonl: mask_prompt is set but the data is text"]),
]


def _assert_failed_before_training(job: Job, code: int, out: str, expected: int, needles):
    assert code == expected, f"exit {code}, expected {expected}:\n{out}"
    for needle in needles:
        assert needle in out, f"{needle!r} not in:\n{out}"
    assert not job.adapters.exists(), "an adapter folder was created before the input was checked"


def test_the_good_job_passes_the_check(job: Job, capsys):
    assert herd_main(["check", str(job.write())]) == 0
    out = capsys.readouterr().out
    assert "train: 8 records (text)" in out and "ok" in out


def test_check_says_what_a_config_does_that_the_user_may_not_have_meant(job: Job, capsys):
    """mlx-lm's defaults fill what a config leaves out: `test: true` without `train: true`
    evaluates only, and no `model:` is Qwen3-0.6b. `herd check` said "ok" to both (an outside
    run); `herd submit` blamed a `train: false` nobody wrote."""
    from herd.cli import laptop

    del job.config["train"]
    del job.config["model"]
    job.config["test"] = True
    job.lines("test", records(4))
    assert herd_main(["check", str(job.write())]) == 0
    got = capsys.readouterr()
    assert "evaluates only: test: true and no `train: true` (mlx-lm's default is train: " \
        "false)" in got.out, got.out
    assert "warning: model: the config sets none: mlx-lm's default 'Qwen/Qwen3-0.6b'" in got.err
    from herd.config import load_config

    with pytest.raises(ConfigError) as refused:  # (what `herd submit` says, before any call)
        laptop.job_spec(load_config(job.write()), "j")
    assert "this config evaluates only: test: true and no `train: true`" in str(refused.value)
    assert "train: false:" not in str(refused.value)


def test_long_sequences_are_a_warning_not_an_error(job: Job, tiny_model: Path, capsys):
    # With the model folder at hand the check tokenizes, as training will, and warns.
    job.lines("train", [json.dumps({"text": "the cat is red. " * 3})] * 2 + records(6))
    job.config.update(model=str(tiny_model), max_seq_length=8)
    assert herd_main(["check", str(job.write())]) == 0
    err = capsys.readouterr().err
    assert "warning: train.jsonl: 2 of 8 records are longer than max_seq_length 8 tokens" in err
    assert "truncated to 8" in err


def test_prompts_that_fill_max_seq_length_under_mask_prompt_are_said_at_check(
        job: Job, tiny_model: Path, capsys):
    """With mask_prompt a prompt as long as max_seq_length leaves nothing to train on: every
    record so is refused (the job failed at iteration 1 on a worker, after a truncation warning
    at submit: an outside run); some records so are a warning naming their lines."""
    long = [json.dumps({"prompt": "what colour is the dog " * 4, "completion": "red"})] * 8
    short = [json.dumps({"prompt": "dog?", "completion": "red"})] * 6
    job.lines("train", long)
    job.lines("valid", short[:4])
    job.config.update(model=str(tiny_model), max_seq_length=12, mask_prompt=True)
    assert herd_main(["check", str(job.write())]) == 3
    err = capsys.readouterr().err
    assert ("train.jsonl: with mask_prompt, no record keeps a completion token within "
            "max_seq_length 12 (every prompt fills it; lines 1, 2, 3, 4, 5 and 3 more)") in err, err
    job.lines("train", long[:2] + short)
    assert herd_main(["check", str(job.write())]) == 0
    err = capsys.readouterr().err
    assert ("warning: train.jsonl: with mask_prompt, 2 of 8 records keep no completion token "
            "within max_seq_length 12 (lines 1, 2)") in err, err


def test_a_model_path_that_is_not_here_is_a_warning_naming_it(job: Job, tmp_path, capsys):
    # The workers may hold it at that path (allowed), but a typo would only fail on them.
    job.config.update(model="./no-such-model")
    assert herd_main(["check", str(job.write())]) == 0
    err = capsys.readouterr().err
    assert "warning: model ./no-such-model is not a folder here" in err
    assert "every worker must hold it at that path" in err
    job.config.update(model=str(tmp_path))  # a folder here: nothing to say
    assert herd_main(["check", str(job.write())]) == 0
    assert "is not a folder here" not in capsys.readouterr().err
    # `herd train` trains here: a path with no folder is a typo, said before anything loads (it
    # went to the hub as a repo id and failed after the data check: an outside run)
    job.config.update(model=str(tmp_path / "mdoel"))
    assert herd_main(["train", str(job.write())]) == 2
    err = capsys.readouterr().err
    assert f"model = '{tmp_path / 'mdoel'}': no such folder" in err, err
    assert not job.adapters.exists()


def test_custom_completion_keys_from_the_config_are_used(job: Job, capsys):
    pairs = [json.dumps({"input": f"q{i}", "output": f"a{i}"}) for i in range(8)]
    job.lines("train", pairs)
    job.lines("valid", pairs[:4])
    job.config.update(prompt_feature="input", completion_feature="output")
    assert herd_main(["check", str(job.write())]) == 0, capsys.readouterr().err
    assert "train: 8 records (completions)" in capsys.readouterr().out


@pytest.mark.parametrize("name, breaks, code, needles", ROWS, ids=[r[0] for r in ROWS])
def test_herd_check_rejects(job: Job, capsys, name, breaks, code, needles):
    breaks(job)
    rc = herd_main(["check", str(job.write())])
    _assert_failed_before_training(job, rc, capsys.readouterr().err, code, needles)


# `herd train` is slower (a process each), so it runs one config row and one dataset row per
# kind of failure; `herd check` above covers the whole table.
TRAIN_ROWS = [r for r in ROWS if r[0] in (
    "unknown key", "wrong type", "rank 0", "batch not divisible by data ranks",
    "missing split", "malformed line", "empty file",
)]


@pytest.mark.parametrize("name, breaks, code, needles", TRAIN_ROWS, ids=[r[0] for r in TRAIN_ROWS])
def test_herd_train_rejects(job: Job, name, breaks, code, needles):
    breaks(job)
    proc = herd("train", job.write(), check=False, timeout=120, cwd=job.dir)
    _assert_failed_before_training(job, proc.returncode, proc.stderr, code, needles)


def test_a_full_fine_tune_of_a_quantized_model_is_refused_at_check(job: Job, tiny_quantized,
                                                                     capsys):
    """mlx would fail mid-step (no gradient wrt quantized weights), after placement."""
    job.config.update(model=str(tiny_quantized), fine_tune_type="full")
    rc = herd_main(["check", str(job.write())])
    _assert_failed_before_training(job, rc, capsys.readouterr().err, 2, [
        f"fine_tune_type: full cannot train {tiny_quantized}: it is quantized"])


@pytest.mark.slow
def test_batch_not_divisible_by_the_ranks_of_a_real_group(job: Job):
    # No data parallelism in the config: the number of ranks is only known once the group
    # forms (2 here). (Token-weighted averaging, the default, splits 3 as 2 and 1.)
    job.config["batch_size"] = 3
    job.config["cluster"] = {"gradient_average": "mlx_lm"}
    job.lines("train", records(9))
    procs = start_ranks(["train", str(job.write())], world=2, hostfile_dir=job.dir)
    try:
        results = [(p.wait(timeout=120), p.stderr.read()) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for code, err in results:
        # Raised from the launcher's env, before any ring forms.
        assert code == ConfigError.exit_code, err
        assert ("batch_size = 3 is not divisible by the 2 data-parallel ranks "
                "(cluster.gradient_average: mlx_lm") in err, err
    assert not job.adapters.exists()


def test_herd_help_lists_every_exit_code_herd_uses():
    """Each error class's exit code is in `herd --help` (the README's table says it is)."""
    from herd import errors
    from herd.usage import EXIT_CODES

    listed = {code for code, _ in EXIT_CODES}
    used = {cls.exit_code for cls in vars(errors).values()
            if isinstance(cls, type) and issubclass(cls, errors.HerdError)}
    assert used - listed == set(), f"exit codes herd uses but --help does not list: {used - listed}"


def test_herd_with_no_command_is_an_error_for_scripts(capsys):
    """`herd $CMD` with an empty variable printed the help and exited 0 (an outside run)."""
    assert herd_main([]) == 2
    assert "usage" in capsys.readouterr().err.lower()
    assert herd_main(["--help"]) == 0
