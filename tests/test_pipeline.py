"""Pipeline parallelism (issue 5): 2 and 3 real stage processes on a loopback MLX ring give the
same losses and the same adapter as one process (``herd train``), and a stage holds only its own
blocks' weights."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import pytest

from tests.conftest import (
    SAME_UPDATE,
    SAME_UPDATE_RTOL,
    free_ports,
    herd,
    initial_adapter,
    load_adapter,
    max_abs_diff,
    update_diff,
    write_job,
)
from worker.rank.runtime import preload_env

REPO = Path(__file__).resolve().parent.parent
# One process and a pipeline sum the same per-token terms in a different order (microbatches,
# per-stage vjp): float32 rounding only. Adapters are compared as updates (SGD, relative to how far
# training moved them: tests/conftest.py SAME_UPDATE), losses relative to their size.
LOSS_RTOL = 1e-5


def run_stages(cfg: Path, adapters: Path, stages: int, tmp: Path, *extra: str) -> list[dict]:
    ports = free_ports(stages)
    hostfile = tmp / f"hosts-{ports[0]}.json"
    hostfile.write_text(json.dumps([f"127.0.0.1:{p}" for p in ports]))
    metrics = tmp / f"metrics-{ports[0]}.jsonl"
    procs = []
    for r in range(stages):
        env = {**preload_env(), "MLX_RANK": str(r), "MLX_WORLD_SIZE": str(stages),
               "MLX_HOSTFILE": str(hostfile),
               "OPENBLAS_NUM_THREADS": "1"}
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "worker.pipeline", str(cfg), "--adapter-path", str(adapters),
             "--metrics-file", str(metrics), *extra],
            env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        ))
    try:
        outs = []
        for p in procs:
            out, err = p.communicate(timeout=180)
            assert p.returncode == 0, f"stage exited {p.returncode}:\n{err[-3000:]}"
            outs.append(out)
        # A stage without the loss says where it is (`herd logs` shows rank 0's log, whose
        # lines read "loss -": an outside run); the last stage holds it.
        said = [out for out in outs if "the loss is the last stage's, in rank" in out]
        assert outs[0] in said and len(said) == len(outs) - 1, outs  # (one rank reports it)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    EVENTS.append([r for r in rows if r["event"] != "stage_done"])
    return sorted((r for r in rows if r["event"] == "stage_done"), key=lambda r: r["rank"])


EVENTS: list[list[dict]] = []  # the contract's metrics events of each run_stages call


def single_process_losses(metrics: Path) -> list[float]:
    rows = map(json.loads, metrics.read_text().splitlines())
    return [r["train_loss"] for r in rows if r.get("event") == "train"]


def reported(rows: list[dict], kind: str, key: str) -> list[tuple[int, float]]:
    """(A pipeline's stages before the last report train progress without the loss: 0.)"""
    return [(r["iteration"], r[key]) for r in rows if r.get("event") == kind and r[key]]


def loss_reports(events: list[dict]) -> list[dict]:
    return [e for e in events if e["event"] == "train" and e["train_loss"]]


def assert_same_reports(pipeline: list[dict], one: Path) -> None:
    """A pipeline reports what one process reports: each window's mean train loss (mlx-lm's
    figure) and the validation losses, at the same iterations, to float rounding. (It reported
    the last step's loss and never validated: an outside review.)"""
    rows = [json.loads(line) for line in one.read_text().splitlines()]
    for kind, key in (("train", "train_loss"), ("val", "val_loss")):
        got, want = reported(pipeline, kind, key), reported(rows, kind, key)
        assert [i for i, _ in got] == [i for i, _ in want] and want, (kind, got, want)
        assert all(abs(g - w) <= LOSS_RTOL * abs(w) for (_, g), (_, w) in zip(got, want)), (
            kind, got, want)


def _stage_weight_bytes(model_dir: Path, start: int, end: int, first: bool, last: bool,
                        tied: bool) -> int:
    from worker.pipeline.stage import StageSpec, _owned

    spec = StageSpec(0 if first else 1, 2 if not (first and last) else 1, start, end, 10**6)
    spec = StageSpec(0 if first else 1, 1 if (first and last) else (2 if first or last else 3),
                     start, end, 10**6)
    total = 0
    for k, v in mx.load(str(model_dir / "model.safetensors")).items():
        if _owned(k, spec, tied) is not None:
            total += v.nbytes
    return total


@pytest.mark.slow
@pytest.mark.parametrize("arch,stages,cut", [("llama", 2, None), ("qwen2", 3, "0:1,1:3,3:4")])
def test_pipeline_equals_one_process(tmp_path, arch, stages, cut, blas_kernels):
    from herd.adapter_merge import merge_stage_adapters
    from herd.cli.tiny import make_tiny_model

    model = make_tiny_model(tmp_path / arch, arch=arch, layers=4, hidden=64)
    data = REPO_DATA(tmp_path)
    kw = dict(iters=4, steps_per_report=1, save_every=4, batch_size=4, num_layers=3, **SAME_UPDATE)
    one = write_job(tmp_path / "one.yaml", model, data, adapter_path=str(tmp_path / "one"), **kw)
    herd("train", one, "--quiet", "--metrics-file", tmp_path / "one.jsonl")
    pp = write_job(tmp_path / "pp.yaml", model, data, adapter_path=str(tmp_path / "pp"), **kw)
    rows = run_stages(pp, tmp_path / "pp", stages, tmp_path,
                      *(["--stage-layers", cut] if cut else []))

    want = single_process_losses(tmp_path / "one.jsonl")
    got = rows[-1]["losses"]
    assert len(got) == len(want) == 4
    assert all(abs(g - w) <= LOSS_RTOL * abs(w) for g, w in zip(got, want)), (got, want)

    pieces = sorted((tmp_path / "pp" / "stages").iterdir())
    merged = merge_stage_adapters(pieces, tmp_path / "merged")
    rel = update_diff(load_adapter(merged), load_adapter(tmp_path / "one"), initial_adapter(one))
    print(f"update differs by {rel:.2e} of its size")
    assert rel <= SAME_UPDATE_RTOL, f"pipeline adapter differs from one process by {rel:.2e}"
    # Rank 0 merged the same on the shared disk, and mlx-lm loads it onto the base model.
    assert max_abs_diff(load_adapter(merged), load_adapter(tmp_path / "pp")) == 0
    from mlx_lm.utils import load

    load(str(model), adapter_path=str(tmp_path / "pp"))
    train = loss_reports(EVENTS[-1])
    assert [e["train_loss"] for e in train] == got and EVENTS[-1][-1]["event"] == "done"
    assert_same_reports(EVENTS[-1], tmp_path / "one.jsonl")

    # Each stage's memory right after loading is its own blocks' weights (+ LoRA), never the
    # model's.
    tied = arch == "qwen2"
    full = sum(v.nbytes for v in mx.load(str(model / "model.safetensors")).values())
    for r in rows:
        start, end = r["layers"]
        own = _stage_weight_bytes(model, start, end, r["rank"] == 0, r["rank"] == stages - 1, tied)
        assert r["load_peak_bytes"] <= own * 1.10 + 64_000, (r["rank"], r["load_peak_bytes"], own)
        assert r["load_peak_bytes"] < 0.8 * full


def REPO_DATA(tmp_path: Path) -> Path:
    from herd.cli.tiny import make_tiny_data

    return make_tiny_data(tmp_path / "data", fmt="text", train=64, valid=16, test=8)


def test_merge_refuses_missing_or_overlapping_stages(tmp_path):
    from herd.adapter_merge import merge_stage_adapters
    from herd.errors import HerdError

    def piece(name: str, stage: int, keys: list[str]) -> Path:
        d = tmp_path / name
        d.mkdir()
        mx.save_safetensors(str(d / "adapters.safetensors"), {k: mx.zeros((2,)) for k in keys})
        (d / "adapter_config.json").write_text("{}")
        (d / "stage.json").write_text(json.dumps({"stage": stage, "stages": 2, "layers": [0, 1]}))
        return d

    a = piece("a", 0, ["model.layers.0.x"])
    b = piece("b", 1, ["model.layers.1.x"])
    c = piece("c", 1, ["model.layers.0.x"])
    out = merge_stage_adapters([a, b], tmp_path / "out")
    merged = sorted(mx.load(str(out / "adapters.safetensors")))
    assert merged == ["model.layers.0.x", "model.layers.1.x"]
    with pytest.raises(HerdError, match="missing"):
        merge_stage_adapters([a], tmp_path / "out2")
    with pytest.raises(HerdError, match="two stages"):
        merge_stage_adapters([a, c], tmp_path / "out3")


@pytest.mark.slow
def test_two_pipelines_of_two_stages_equal_one_process(tmp_path, blas_kernels):
    """2 x 2 (data x pipeline) on 4 local ranks: one ring, pipeline hops and replica pairs are all
    ring neighbours; gradients are summed per token across the replicas."""
    from herd.adapter_merge import merge_stage_adapters
    from herd.cli.tiny import make_tiny_model

    model = make_tiny_model(tmp_path / "llama", arch="llama", layers=4, hidden=64)
    data = REPO_DATA(tmp_path)
    kw = dict(iters=3, steps_per_report=2, steps_per_eval=2, save_every=3, batch_size=4,
              num_layers=-1, **SAME_UPDATE)
    one = write_job(tmp_path / "one.yaml", model, data, adapter_path=str(tmp_path / "one"), **kw)
    herd("train", one, "--quiet", "--metrics-file", tmp_path / "one.jsonl")
    pp = write_job(tmp_path / "pp.yaml", model, data, adapter_path=str(tmp_path / "pp"), **kw)
    rows = run_stages(pp, tmp_path / "pp", 4, tmp_path, "--data-parallel", "2")
    # reports at 2 (the mean of steps 1-2) and 3; validation at 1, 2 and 3, over both replicas
    assert_same_reports(EVENTS[-1], tmp_path / "one.jsonl")
    assert len({tuple(r["losses"]) for r in rows if r["stage"] == 1}) == 1  # replicas agree
    pieces = sorted((tmp_path / "pp" / "stages").iterdir())
    merged = merge_stage_adapters(pieces, tmp_path / "merged")
    rel = update_diff(load_adapter(merged), load_adapter(tmp_path / "one"), initial_adapter(one))
    print(f"update differs by {rel:.2e} of its size")
    assert rel <= SAME_UPDATE_RTOL, f"2 x 2 adapter differs from one process by {rel:.2e}"


def test_a_data_by_pipeline_run_resumed_on_fewer_replicas_equals_it_straight(tmp_path,
                                                                              blas_kernels):
    """What an elastic shrink does (coordinator/elastic.py): 2 x 2 for 2 steps, then resumed from
    its stage pieces as 1 x 2 (a Mac gone), equals 2 x 2 straight to the end: the same global
    batch over fewer replicas, each stage with its own optimizer state."""
    from herd.adapter_merge import merge_stage_adapters
    from herd.cli.tiny import make_tiny_model

    model = make_tiny_model(tmp_path / "llama", arch="llama", layers=4, hidden=64)
    data = REPO_DATA(tmp_path)
    kw = dict(iters=4, steps_per_report=2, save_every=2, batch_size=4, num_layers=-1,
              **SAME_UPDATE)
    straight = write_job(tmp_path / "a.yaml", model, data, adapter_path=str(tmp_path / "a"), **kw)
    run_stages(straight, tmp_path / "a", 4, tmp_path, "--data-parallel", "2")
    shrunk = write_job(tmp_path / "b.yaml", model, data, adapter_path=str(tmp_path / "b"), **kw)
    run_stages(shrunk, tmp_path / "b", 4, tmp_path, "--data-parallel", "2", "--iters", "2")
    run_stages(shrunk, tmp_path / "b", 2, tmp_path, "--resume", str(tmp_path / "b"))
    merged = [merge_stage_adapters(sorted((tmp_path / x / "stages").iterdir()), tmp_path / f"m{x}")
              for x in ("a", "b")]
    rel = update_diff(load_adapter(merged[1]), load_adapter(merged[0]), initial_adapter(straight))
    print(f"update differs by {rel:.2e} of its size")
    assert rel <= SAME_UPDATE_RTOL, f"resumed on fewer replicas, the adapter differs by {rel:.2e}"


def test_a_pipeline_with_accumulation_reports_every_steps_per_report_and_at_the_end(
        tmp_path, tiny_model):
    """Accumulation 3, a report every 2 iterations, 8 iterations: a pipeline reported only at
    steps on a multiple of steps_per_report (6) and never the last, and its reports covered no
    window (an outside run). It reports at the first step at or after every 2 iterations (3, 6)
    and at the last (8: the trailing partial accumulation, never applied, as in mlx-lm)."""
    from worker.agent.relay import _window_iterations
    from worker.rank.events import TrainReport

    data = REPO_DATA(tmp_path)
    pp = write_job(tmp_path / "pp.yaml", tiny_model, data, adapter_path=str(tmp_path / "pp"),
                   iters=8, grad_accumulation_steps=3, steps_per_report=2, save_every=6,
                   batch_size=2, num_layers=-1)
    rows = run_stages(pp, tmp_path / "pp", 2, tmp_path)
    train = loss_reports(EVENTS[-1])
    assert [e["iteration"] for e in train] == [3, 6, 8], train
    # Stage 0 reports its own progress too, its speed and peak memory (only the last stage's
    # reached watch, the dashboard and /metrics: an outside run), and no loss: it holds none.
    first = [e for e in EVENTS[-1] if e["event"] == "train" and e["rank"] == 0]
    assert [e["iteration"] for e in first] == [3, 6, 8] and train[0]["rank"] == 1, first
    assert all(e["train_loss"] == 0 and e["peak_memory_gb"] > 0 and e["tokens_per_second"] > 0
               for e in first), first
    # Each stage's time in send/recv and the activations (or cotangents) it sent: the dashboard
    # split read 100% compute for a pipeline (an outside run). Both stages send every microbatch.
    for e in first + train:
        assert 0 < e["exchange_seconds"] <= e["step_seconds"] and e["exchange_bytes"] > 0, e
    fields = set(TrainReport.__dataclass_fields__)
    windows = [_window_iterations(TrainReport(**{k: v for k, v in e.items() if k in fields}))
               for e in train]
    assert windows == [3, 3, 2]
    assert all(0 < e["train_loss"] < 20 for e in train)
    assert len(rows[-1]["losses"]) == 2  # two optimizer steps applied


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["prequantized", "quantize-on-load"])
def test_qlora_pipeline_equals_one_process(tmp_path, tiny_model, tiny_quantized, variant):
    """QLoRA in 2 stages: a pre-quantized (mlx_lm.convert -q) folder, each stage quantizing only
    its own layers as the shards describe them; or `quantize:` applied to each stage on load."""
    data = REPO_DATA(tmp_path)
    kw = dict(iters=2, steps_per_report=1, save_every=2, batch_size=2, num_layers=-1, **SAME_UPDATE)
    model = tiny_quantized
    if variant == "quantize-on-load":
        model, kw["quantize"] = tiny_model, {"bits": 4, "group_size": 64}
    one = write_job(tmp_path / "one.yaml", model, data, adapter_path=str(tmp_path / "one"), **kw)
    herd("train", one, "--quiet", "--metrics-file", tmp_path / "one.jsonl")
    pp = write_job(tmp_path / "pp.yaml", model, data, adapter_path=str(tmp_path / "pp"), **kw)
    rows = run_stages(pp, tmp_path / "pp", 2, tmp_path)
    want = single_process_losses(tmp_path / "one.jsonl")
    assert all(abs(g - w) <= LOSS_RTOL * abs(w) for g, w in zip(rows[-1]["losses"], want))
    rel = update_diff(load_adapter(tmp_path / "pp"), load_adapter(tmp_path / "one"),
                      initial_adapter(one))
    print(f"update differs by {rel:.2e} of its size")
    assert rel <= SAME_UPDATE_RTOL, f"QLoRA pipeline adapter differs from one process by {rel:.2e}"


@pytest.mark.slow
def test_pipeline_resume_is_exact(tmp_path, tiny_model):
    """4 steps straight == 2 steps, stop, resume to 4 (each stage from its own checkpoint, with
    its optimizer state and the data cursor)."""
    data = REPO_DATA(tmp_path)
    kw = dict(iters=4, steps_per_report=1, save_every=2, batch_size=4, num_layers=-1)
    a = write_job(tmp_path / "a.yaml", tiny_model, data, adapter_path=str(tmp_path / "a"), **kw)
    run_stages(a, tmp_path / "a", 2, tmp_path)
    b = write_job(tmp_path / "b.yaml", tiny_model, data, adapter_path=str(tmp_path / "b"), **kw)
    run_stages(b, tmp_path / "b", 2, tmp_path, "--iters", "2")
    latest = tmp_path / "b" / "stages" / "stage-01" / "checkpoints" / "latest"
    assert latest.read_text().strip() == "0000002"
    run_stages(b, tmp_path / "b", 2, tmp_path, "--resume", str(tmp_path / "b"))
    assert max_abs_diff(load_adapter(tmp_path / "a"), load_adapter(tmp_path / "b")) == 0


def test_a_stage_names_the_missing_blocks_by_the_models_names(tmp_path, tiny_model):
    """config.json promising more blocks than the weights hold: the stage said "Missing 18
    parameters: model.layers.2..." (its own names, which the file does hold: an outside run)."""
    import shutil

    from herd.config import parse_config
    from herd.errors import ConfigError
    from worker.pipeline.stage import StageSpec, build_stage

    model = shutil.copytree(tiny_model, tmp_path / "m")
    config = json.loads((model / "config.json").read_text())
    blocks = config["num_hidden_layers"]
    config["num_hidden_layers"] = blocks + 2
    (model / "config.json").write_text(json.dumps(config))
    job = parse_config({"model": str(model), "data": "d", "num_layers": -1})
    with pytest.raises(ConfigError) as e:
        build_stage(job, StageSpec(1, 2, blocks - 1, blocks + 2, blocks + 2))
    assert f"lacks 18 weights of blocks {blocks - 1}:{blocks + 2}" in e.value.message
    assert f"model.layers.{blocks}." in e.value.message
    assert f"model.layers.{blocks - 1}." not in e.value.message
