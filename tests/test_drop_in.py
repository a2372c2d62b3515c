"""herd as a drop-in for `mlx_lm.lora` (issue 12): the keys mlx-lm reads beyond training itself
(train/test, resume_adapter_file, report_to, hf_dataset, legacy keys), each handled as mlx-lm
handles it and checked against mlx-lm's own run where it prints or writes something."""

from __future__ import annotations

import json
import re
import shutil
import struct
from pathlib import Path

import mlx.core as mx
import pytest

from herd.errors import ConfigError, DatasetError
from tests.conftest import herd, load_adapter, max_abs_diff, write_job
from tests.test_training import side_by_side

TEST_LOSS = re.compile(r"Test loss (\d+\.\d+), Test ppl (\d+\.\d+)\.")


def _test_line(output: str) -> str:
    found = TEST_LOSS.findall(output)
    assert len(found) == 1, output[-2000:]
    return "Test loss {}, Test ppl {}.".format(*found[0])


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file()}


def test_test_loss_is_mlx_lm_s_after_training_and_of_an_existing_adapter(tmp_path, tiny_model,
                                                                         tiny_data):
    """`test: true` prints the test loss mlx_lm.lora prints, after training (the test batch is
    drawn from the numpy stream after every epoch's and validation pass's draws) and with
    `train: false`, which evaluates the adapter at adapter_path and leaves it byte-identical."""
    # 8 test examples = 2 batches; test_batches 1 takes the one mlx-lm's permutation puts first
    kw = dict(iters=20, save_every=20, steps_per_eval=5, test=True, test_batches=1)
    ours = write_job(tmp_path / "herd.yaml", tiny_model, tiny_data,
                     adapter_path=str(tmp_path / "herd"), **kw)
    theirs = write_job(tmp_path / "mlx.yaml", tiny_model, tiny_data,
                       adapter_path=str(tmp_path / "mlx"), **kw)
    herd_run, mlx_run = side_by_side(("train", ours, "--quiet"), theirs)
    assert _test_line(herd_run.stdout) == _test_line(mlx_run.stdout)
    assert max_abs_diff(load_adapter(tmp_path / "herd"), load_adapter(tmp_path / "mlx")) == 0.0

    before = _files(tmp_path / "herd")
    # num_layers: mlx-lm's default 16 on this 2-block model: a job that only tests loads the
    # adapter's own layout, so mlx-lm does not read it (nor may herd's check)
    kw.update(train=False, test_batches=-1, num_layers=16)
    ours = write_job(tmp_path / "herd-test.yaml", tiny_model, tiny_data,
                     adapter_path=str(tmp_path / "herd"), **kw)
    theirs = write_job(tmp_path / "mlx-test.yaml", tiny_model, tiny_data,
                       adapter_path=str(tmp_path / "herd"), **kw)
    proc, mlx_run = side_by_side(("train", ours, "--metrics-file", tmp_path / "m.jsonl"), theirs)
    assert _test_line(proc.stdout) == _test_line(mlx_run.stdout)
    assert "iter" not in proc.stdout  # evaluated, not trained
    assert _files(tmp_path / "herd") == before  # not one byte of the adapter folder changed
    events = [json.loads(line) for line in (tmp_path / "m.jsonl").read_text().splitlines()]
    assert [e["event"] for e in events] == ["test", "done"]


def _wandb_history(run_file: Path) -> list[dict]:
    """The history rows of a wandb offline run file. wandb 0.31 reads these files only in its
    Go core, so the framing (a LevelDB-style log: 7-byte header, 32 KiB blocks of records, each
    crc32, length, type) is read here, and each record with wandb's own protobuf message."""
    from wandb.proto import wandb_internal_pb2

    raw, block, pos = run_file.read_bytes(), 32 * 1024, 7
    records, part = [], b""
    while pos + 7 <= len(raw):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", raw[pos:pos + 7])
        part += raw[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a full record, or a split record's last piece
            records.append(part)
            part = b""
    rows = []
    for data in records:
        rec = wandb_internal_pb2.Record()
        rec.ParseFromString(data)
        if rec.WhichOneof("record_type") == "history":
            rows.append({"/".join(i.nested_key): json.loads(i.value_json)
                         for i in rec.history.item})
    return rows


def test_a_bad_test_record_stops_only_a_job_that_tests(tmp_path, tiny_model, tiny_chat_data):
    """mlx-lm parses test.jsonl and renders none of it unless it tests: a record the chat
    template cannot take is a warning for a job with test: false (it trains), a dataset error
    for one that tests; a line that is not JSON fails both, as it fails mlx-lm's loader."""
    data = tmp_path / "data"
    shutil.copytree(tiny_chat_data, data)
    with open(data / "test.jsonl", "a") as f:
        f.write(json.dumps({"messages": "hello"}) + "\n")
    cfg = write_job(tmp_path / "job.yaml", tiny_model, data, iters=2,
                    adapter_path=str(tmp_path / "ad"))
    trained = herd("train", cfg, "--quiet", check=False)
    assert trained.returncode == 0, trained.stderr[-2000:]
    assert "test.jsonl: 1 record" in trained.stderr and "not used by this job" in trained.stderr
    tested = write_job(tmp_path / "tested.yaml", tiny_model, data, iters=2, test=True,
                       adapter_path=str(tmp_path / "ad2"))
    refused = herd("check", tested, check=False)
    assert refused.returncode == DatasetError.exit_code and "test.jsonl: 1 record" in (
        refused.stderr), refused.stderr
    with open(data / "test.jsonl", "a") as f:
        f.write("{not json\n")
    broken = herd("check", cfg, check=False)
    assert broken.returncode == DatasetError.exit_code and "malformed JSON" in broken.stderr


def test_submit_refuses_a_file_loader_before_loading_it(tmp_path, tiny_model, tiny_data):
    """A cluster job reads hub datasets only: `herd submit` says so first, before it loads the
    json loader's file here and reports its parse error (an outside run was sent to fix data
    that would be refused anyway). No coordinator is asked (port 9: nothing listens)."""
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{not json\n")
    cfg = write_job(tmp_path / "job.yaml", tiny_model, tiny_data, cluster={"workers": 1},
                    hf_dataset={"path": "json", "config": {"data_files": {"train": str(bad)}}})
    proc = herd("submit", cfg, "--coordinator", "127.0.0.1:9", check=False)
    assert proc.returncode == ConfigError.exit_code, proc.stderr[-2000:]
    assert "hub dataset" in proc.stderr and "could not be loaded" not in proc.stderr


def test_a_valid_set_smaller_than_a_batch_is_fine_when_nothing_validates(tmp_path, tiny_model,
                                                                         tiny_data):
    """val_batches: 0 draws no validation batch in mlx-lm (its iterator never starts): a valid
    set smaller than batch_size trains; validating from it is refused before training."""
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    lines = (data / "valid.jsonl").read_text().splitlines()[:2]
    (data / "valid.jsonl").write_text("\n".join(lines) + "\n")
    quiet = write_job(tmp_path / "quiet.yaml", tiny_model, data, iters=2, batch_size=4,
                      val_batches=0, adapter_path=str(tmp_path / "a"))
    trained = herd("train", quiet, "--quiet", check=False)
    assert trained.returncode == 0, trained.stderr[-2000:]
    loud = write_job(tmp_path / "loud.yaml", tiny_model, data, iters=2, batch_size=4,
                     val_batches=1, adapter_path=str(tmp_path / "b"))
    refused = herd("check", loud, check=False)
    assert refused.returncode == DatasetError.exit_code, refused.stderr
    assert "valid.jsonl: 2 records, fewer than batch_size 4" in refused.stderr


def test_a_step_with_no_target_token_is_a_dataset_error_not_a_learning_rate(
        tmp_path, tiny_model, tiny_completions_data):
    """mask_prompt with every prompt as long as max_seq_length: no completion token is left to
    train on (mlx-lm trains on NaN). herd used to stop on the non-finite loss and suggest a
    lower learning rate; it names the cause and the fix instead (an outside run)."""
    # Every prompt that long: said by the dataset check, before anything trains.
    cfg = write_job(tmp_path / "job.yaml", tiny_model, tiny_completions_data, iters=2,
                    mask_prompt=True, max_seq_length=2, adapter_path=str(tmp_path / "a"))
    proc = herd("train", cfg, "--quiet", check=False)
    assert proc.returncode == DatasetError.exit_code, proc.stderr[-2000:]
    assert "with mask_prompt, no record keeps a completion token" in proc.stderr
    assert "raise max_seq_length" in proc.stderr and "learning_rate" not in proc.stderr
    # Only some (a warning at the check): a batch of only those (mlx-lm cuts batches in file
    # order here: it sorts (tokens, offset) pairs by their len(), 2) stops its step, named.
    data = tmp_path / "some"
    data.mkdir()
    long = {"prompt": "what colour is the dog " * 8, "completion": "red"}
    short = {"prompt": "dog?", "completion": "red"}
    (data / "train.jsonl").write_text("".join(json.dumps(r) + "\n"
                                              for r in [long] * 4 + [short] * 4))
    (data / "valid.jsonl").write_text("".join(json.dumps(short) + "\n" for _ in range(4)))
    cfg = write_job(tmp_path / "some.yaml", tiny_model, data, iters=2, batch_size=4,
                    mask_prompt=True, max_seq_length=16, adapter_path=str(tmp_path / "b"))
    proc = herd("train", cfg, "--quiet", check=False)
    assert proc.returncode == DatasetError.exit_code, proc.stderr[-2000:]
    assert "4 of 8 records keep no completion token within max_seq_length 16 (lines 1, 2, 3, " \
        "4)" in proc.stderr, proc.stderr[-2000:]
    assert re.search(r"iteration [12]'s batch has no target token", proc.stderr), proc.stderr
    assert "learning_rate" not in proc.stderr


def test_report_to_wandb_logs_what_mlx_lm_logs(tmp_path, tiny_model, tiny_data):
    """report_to: wandb goes through mlx-lm's own callback (offline here): the run lands under
    adapter_path/wandb with every train and validation report herd makes."""
    pytest.importorskip("wandb")
    cfg = write_job(tmp_path / "job.yaml", tiny_model, tiny_data,
                    adapter_path=str(tmp_path / "ad"), report_to="wandb", project_name="herd-t",
                    steps_per_eval=4)
    herd("train", cfg, "--quiet", "--metrics-file", tmp_path / "m.jsonl",
         env={"WANDB_MODE": "offline", "WANDB_SILENT": "true"})
    (run_file,) = (tmp_path / "ad" / "wandb").glob("offline-run-*/run-*.wandb")
    rows = _wandb_history(run_file)
    events = [json.loads(line) for line in (tmp_path / "m.jsonl").read_text().splitlines()]
    train = [(e["iteration"], e["train_loss"]) for e in events if e["event"] == "train"]
    val = [(e["iteration"], e["val_loss"]) for e in events if e["event"] == "val"]
    assert train and val
    assert [(r["iteration"], r["train_loss"]) for r in rows if "train_loss" in r] == train
    # mlx-lm's trainer reports a validation pass that runs before step it as it - 1
    # (trainer.py: "iteration": it - 1): so does herd, for wandb's steps to line up with its.
    assert [(r["iteration"] + 1, r["val_loss"]) for r in rows if "val_loss" in r] == val
    assert rows[0]["iteration"] == 0
    assert all("peak_memory" in r for r in rows if "train_loss" in r)  # mlx-lm's key names


def test_a_reporter_that_cannot_start_is_a_config_error_not_a_traceback(tmp_path, tiny_model,
                                                                         tiny_data):
    """swanlab is not installed here (mlx-lm imports it only when asked): the rank says which
    reporter, why, and what to do, and exits with ConfigError's code."""
    try:
        import swanlab  # noqa: F401
        pytest.skip("swanlab is installed here")
    except ImportError:
        pass
    cfg = write_job(tmp_path / "job.yaml", tiny_model, tiny_data,
                    adapter_path=str(tmp_path / "ad"), report_to="swanlab")
    proc = herd("train", cfg, "--quiet", check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "report_to swanlab could not start on this worker" in proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]


@pytest.fixture
def hf_env(tmp_path, monkeypatch) -> dict:
    """Offline, with a private datasets cache (nothing leaves the machine or touches ~/.cache)."""
    env = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "HF_DATASETS_CACHE": str(tmp_path / "hf-cache")}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    return env


def test_hf_dataset_trains_as_mlx_lm_does(tmp_path, tiny_model, tiny_data, hf_env):
    """hf_dataset through `datasets` (local JSON files, mlx-lm's default 80% / last 10% splits of
    train): checked before training, and the adapter is mlx-lm's, bit for bit."""
    pytest.importorskip("datasets")
    hf = {"path": "json", "config": {"data_files": str(tiny_data / "train.jsonl")}}
    # (mlx-lm ignores data when hf_dataset is set)
    ours = write_job(tmp_path / "herd.yaml", tiny_model, Path("no-such/dataset"),
                     adapter_path=str(tmp_path / "herd"), hf_dataset=hf)
    theirs = write_job(tmp_path / "mlx.yaml", tiny_model, Path("no-such/dataset"),
                       adapter_path=str(tmp_path / "mlx"), hf_dataset=hf)
    check = herd("check", ours, env=hf_env)
    assert "json[train[:80%]]: 51 records (text)" in check.stdout  # 80% of 64
    assert "json[train[-10%:]]: 6 records (text)" in check.stdout
    side_by_side(("train", ours, "--quiet"), theirs, env=hf_env)
    assert max_abs_diff(load_adapter(tmp_path / "herd"), load_adapter(tmp_path / "mlx")) == 0.0


def test_hf_dataset_problems_name_dataset_split_and_row(tmp_path, hf_env):
    pytest.importorskip("datasets")
    from herd.config import parse_config
    from herd.dataset import check_job_dataset

    rows = [{"text": f"the cat is red {i}"} for i in range(8)] + [{"text": 7}, {"title": "x"}]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    hf = {"path": "json", "config": {"data_files": str(tmp_path / "d.jsonl")},
          "train_split": "train", "valid_split": "train[:4]"}
    with pytest.raises(DatasetError) as e:
        check_job_dataset(parse_config({"hf_dataset": hf, "train": True}))
    msg = str(e.value)
    # (a row of a datasets table has every column: the one without "text" has text None)
    assert "json[train]: 2 records whose 'text' is not a string (rows 8, 9); row 8: 7" in msg
    missing = parse_config({"hf_dataset": {"path": "json", "config": {
        "data_files": str(tmp_path / "nope.jsonl")}}, "train": True})
    with pytest.raises(DatasetError, match="could not be loaded"):
        check_job_dataset(missing)


@pytest.mark.parametrize("given", ["folder", "file"])
def test_resume_takes_an_mlx_lm_adapter_folder_or_file(tmp_path, tiny_model, tiny_data,
                                                      start_adapter, given):
    """`herd train --resume FOLDER` (or the folder's .safetensors file) with an mlx-lm adapter:
    its weights, a fresh optimizer (said in the log), the same adapter as mlx_lm.lora with
    resume_adapter_file."""
    folder = tmp_path / "mlx-adapter"
    folder.mkdir()
    shutil.copy(start_adapter, folder / "adapters.safetensors")
    ours = write_job(tmp_path / "herd.yaml", tiny_model, tiny_data,
                     adapter_path=str(tmp_path / "herd"))
    theirs = write_job(tmp_path / "mlx.yaml", tiny_model, tiny_data,
                       adapter_path=str(tmp_path / "mlx"),
                       resume_adapter_file=str(folder / "adapters.safetensors"))
    resume = folder if given == "folder" else folder / "adapters.safetensors"
    proc, _ = side_by_side(("train", ours, "--quiet", "--resume", resume), theirs)
    assert "resumed_weights_only" in proc.stderr and "fresh" in proc.stderr
    assert max_abs_diff(load_adapter(tmp_path / "herd"), load_adapter(tmp_path / "mlx")) == 0.0


def test_an_adapter_of_another_layout_is_refused_by_name(tmp_path, tiny_model, start_adapter):
    from herd.config import parse_config
    from worker.rank.checkpoint import load_adapter_weights
    from worker.rank.model import apply_adapters, load_base

    job = parse_config({"model": str(tiny_model), "num_layers": -1, "train": True,
                        "lora_parameters": {"rank": 8}})  # the adapter was made with rank 4
    model, _ = load_base(job)
    apply_adapters(model, job)
    with pytest.raises(ValueError, match=r"lora_a: shape \(64, 4\), the job's is \(64, 8\)"):
        load_adapter_weights(start_adapter, model)
    with pytest.raises(FileNotFoundError, match="neither a herd checkpoint"):
        load_adapter_weights(tmp_path, model)
    full = parse_config({"model": str(tiny_model), "fine_tune_type": "full", "train": True,
                         "num_layers": -1})
    model, _ = load_base(full)
    apply_adapters(model, full)
    with pytest.raises(ValueError, match="lora_a: not a trainable parameter of this job's model"):
        load_adapter_weights(start_adapter, model)  # nothing of it is the job's: nothing resumed


def test_an_adapter_of_more_layers_resumes_the_ones_the_job_trains(tmp_path, tiny_model,
                                                                   tiny_data, start_adapter):
    """resume_adapter_file written for every layer, a job of num_layers 1: mlx-lm loads what its
    model has (load_weights strict=False) and trains; so does herd, saying what it left out."""
    kw = dict(num_layers=1, resume_adapter_file=str(start_adapter),
              lora_parameters={"rank": 4, "scale": 10.0, "dropout": 0.0})
    ours = write_job(tmp_path / "herd.yaml", tiny_model, tiny_data,
                     adapter_path=str(tmp_path / "herd"), **kw)
    theirs = write_job(tmp_path / "mlx.yaml", tiny_model, tiny_data,
                       adapter_path=str(tmp_path / "mlx"), **kw)
    proc, _ = side_by_side(("train", ours, "--quiet"), theirs)
    assert "adapter_tensors_ignored" in proc.stderr, proc.stderr[-2000:]
    assert max_abs_diff(load_adapter(tmp_path / "herd"), load_adapter(tmp_path / "mlx")) == 0.0


def test_resume_is_exact_across_an_epoch_boundary_with_validation(tmp_path, tiny_model,
                                                                  tiny_data):
    """k micro-batches, stop, resume to n == n straight (adapter and optimizer state), with
    dropout, accumulation, validation passes (whose numpy draws shift later epochs) and the stop
    past an epoch boundary (16 batches an epoch) at a point the straight run does not validate."""
    kw = dict(iters=28, save_every=4, grad_accumulation_steps=2, steps_per_eval=5,
              lora_parameters={"rank": 4, "scale": 10.0, "dropout": 0.2})
    straight = write_job(tmp_path / "a.yaml", tiny_model, tiny_data,
                         adapter_path=str(tmp_path / "a"), **kw)
    split = write_job(tmp_path / "b.yaml", tiny_model, tiny_data,
                      adapter_path=str(tmp_path / "b"), **kw)
    herd("train", straight, "--quiet")
    herd("train", split, "--quiet", "--iters", "18")
    assert not (tmp_path / "b" / "checkpoints" / "0000020").exists()
    herd("train", split, "--quiet", "--resume", tmp_path / "b")
    assert max_abs_diff(load_adapter(tmp_path / "a"), load_adapter(tmp_path / "b")) == 0.0
    sa = dict(mx.load(str(tmp_path / "a/checkpoints/0000028/trainer_state.safetensors")))
    sb = dict(mx.load(str(tmp_path / "b/checkpoints/0000028/trainer_state.safetensors")))
    assert max_abs_diff(sa, sb) == 0.0
    assert sa["step"].item() == 14  # 28 micro-batches / 2 accumulation


def test_legacy_keys_warn_and_submit_refuses_what_a_cluster_cannot_do(tmp_path, tiny_model,
                                                                      tiny_data):
    cfg = write_job(tmp_path / "job.yaml", tiny_model, tiny_data, use_dora=True,
                    optimizer="AdamW")
    cfg.write_text(cfg.read_text().replace("fine_tune_type: lora\n", ""))
    proc = herd("check", cfg)
    assert "warning: use_dora: True is a legacy mlx-lm key, read as fine_tune_type: 'dora'" \
        in proc.stderr

    from herd.cli.laptop import job_spec
    from herd.config import parse_config

    evaluate_only = parse_config({"model": str(tiny_model), "data": str(tiny_data),
                                  "train": False, "test": True})
    with pytest.raises(ConfigError, match="a cluster job trains"):
        job_spec(evaluate_only, "x")
    hub = parse_config({"model": str(tiny_model), "train": True,
                        "hf_dataset": {"path": "some/dataset"}})
    spec, files = job_spec(hub, "x")
    assert files == [] and not spec.dataset  # each rank loads it through `datasets`


def _wait_for_file(path: Path, procs, deadline: float) -> None:
    """Until a process has written ``path`` whole (mlx-lm writes its checkpoints in place:
    until the file's size stays put)."""
    import time

    last = -1
    while time.monotonic() < deadline:
        for proc in procs:
            assert proc.poll() is None, proc.communicate()[1][-3000:]
        size = path.stat().st_size if path.exists() else -1
        if size > 0 and size == last:
            return
        last = size
        time.sleep(0.5)
    raise AssertionError(f"{path} was not written in time")


@pytest.mark.slow
def test_mlx_lm_example_config_as_shipped(tmp_path, tiny_model_16):
    """mlx-lm's example lora_config.yaml (mlx_lm/examples/, commit c3b4a15 of ml-explore/mlx-lm,
    kept verbatim in tests/data/), only `model` and `data` changed: the same adapter as
    mlx_lm.lora's, bit for bit (AdamW, LoRA on q/v of the last 16 blocks). Both run the config as
    it is (1000 iterations) side by side and are compared at the first checkpoint, iteration 100
    (6 epochs of this data, after a validation pass), then stopped: the rest would cost minutes
    and is what the matrix's other cases cover."""
    import subprocess
    import sys
    import time

    from herd.cli.tiny import make_tiny_data
    from tests.test_training import MLX_LM_LORA
    from worker.rank.runtime import preload_env

    data = make_tiny_data(tmp_path / "data", train=64, valid=16, test=8)
    text = (Path(__file__).parent / "data" / "mlx_lm_example_lora_config.yaml").read_text()
    text = text.replace('model: "mlx-community/Llama-3.2-1B-Instruct-bf16"',
                        f'model: "{tiny_model_16}"')
    text = text.replace('data: "mlx-community/WikiSQL"', f'data: "{data}"')
    assert str(tiny_model_16) in text and str(data) in text
    for who in ("herd", "mlx"):  # adapter_path: "adapters", relative to where each runs
        (tmp_path / who).mkdir()
        (tmp_path / who / "lora_config.yaml").write_text(text)
    env = {**preload_env(), "PYTHONPATH": str(Path(__file__).parents[1])}
    procs = [
        subprocess.Popen([sys.executable, "-m", "herd", "train", "lora_config.yaml", "--quiet"],
                         cwd=tmp_path / "herd", env=env, stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, text=True),
        subprocess.Popen([sys.executable, "-c", MLX_LM_LORA, "lora_config.yaml"],
                         cwd=tmp_path / "mlx", env=env, stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, text=True),
    ]
    try:
        deadline = time.monotonic() + 280
        ours = tmp_path / "herd/adapters/checkpoints/0000100"
        theirs = tmp_path / "mlx/adapters/0000100_adapters.safetensors"
        _wait_for_file(ours / "manifest.json", procs, deadline)  # written last, atomically
        _wait_for_file(theirs, procs, deadline)
        a, b = load_adapter(ours), dict(mx.load(str(theirs)))
    finally:
        for proc in procs:
            proc.kill()
            proc.communicate()
    assert max_abs_diff(a, b) == 0.0
    assert any(k.endswith("v_proj.lora_b") for k in a) and not any("k_proj" in k for k in a)
