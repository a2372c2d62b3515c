"""The training core against its acceptance criteria (issue 2): real mlx-lm models, real MLX
rings."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.conftest import (
    REPO,
    SAME_UPDATE,
    SAME_UPDATE_RTOL,
    herd,
    initial_adapter,
    load_adapter,
    max_abs_diff,
    reformat_data,
    start_ranks,
    update_diff,
    wait_all,
    write_job,
)
from worker.rank.runtime import preload_env

# `python -m mlx_lm lora`, with wandb and swanlab kept out of the process as herd's ranks keep
# them out when a job does not report to them (an import of ~1 s that changes no number).
MLX_LM_LORA = ("import sys; sys.modules['wandb'] = sys.modules['swanlab'] = None; "
               "from mlx_lm.lora import main; sys.argv = ['mlx_lm.lora', '-c', sys.argv[1]]; "
               "main()")


def mlx_lm_lora(cfg: Path, cwd: Path | None = None, timeout: float = 240
                ) -> subprocess.CompletedProcess:
    # With the BLAS herd runs with (herd train preloads OpenBLAS on Linux): the same ops on the
    # same kernels give the same bits.
    proc = subprocess.run(
        [sys.executable, "-c", MLX_LM_LORA, str(cfg)],
        capture_output=True, text=True, timeout=timeout, env=preload_env(), cwd=cwd,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def side_by_side(herd_args: tuple, mlx_cfg: Path, env: dict | None = None
                 ) -> tuple[subprocess.CompletedProcess, subprocess.CompletedProcess]:
    """`herd ARGS` and `mlx_lm.lora -c CFG` at once (each is mostly its imports: two cores run
    the pair in the time of one); both checked."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(2) as pool:
        ours = pool.submit(herd, *herd_args, env=env)
        theirs = pool.submit(mlx_lm_lora, mlx_cfg)
        return ours.result(), theirs.result()


@dataclass(frozen=True)
class Variant:
    config: dict = field(default_factory=dict)
    model: str = "tiny_model"  # a fixture of tests/conftest.py
    data: str = "text"  # a key of the data_sets fixture
    haswell: bool = False  # also run on OpenBLAS's Haswell kernels (a representative subset)


SCHEDULE = {"arguments": [1e-3, 8], "warmup": 2}
VARIANTS = {
    "lora": Variant(haswell=True),
    "qlora": Variant(model="tiny_quantized", haswell=True),  # a folder mlx_lm.convert made
    "bf16": Variant(model="tiny_bf16", haswell=True),  # bfloat16 weights, as hub models are
    "dora-dropout": Variant({"fine_tune_type": "dora",
                             "lora_parameters": {"rank": 4, "scale": 10.0, "dropout": 0.3}},
                            haswell=True),
    # several epochs (16 batches each) with a validation pass every 5 iterations: each pass
    # draws from the numpy stream the epochs draw from
    "epochs-validation": Variant({"iters": 40, "save_every": 40, "steps_per_eval": 5},
                                 haswell=True),
    # a warmup + cosine schedule, AdamW, gradient checkpointing
    "schedule-adamw-checkpointing": Variant({
        "optimizer": "adamw", "optimizer_config": {"adamw": {"weight_decay": 0.01}},
        "lr_schedule": {"name": "cosine_decay", **SCHEDULE}, "grad_checkpoint": True,
    }, haswell=True),
    "lora-dropout": Variant({"lora_parameters": {"rank": 4, "scale": 10.0, "dropout": 0.2}}),
    "8bit": Variant(model="tiny_quantized8"),
    "full": Variant({"fine_tune_type": "full", "learning_rate": 1e-4}),
    # each other optimizer mlx-lm offers, each with another of its lr schedules
    "sgd-linear": Variant({"optimizer": "SGD", "lr_schedule": {
        "name": "linear_schedule", "arguments": [1e-2, 1e-3, 8]}}),
    "adafactor-exponential": Variant({"optimizer": "adafactor", "lr_schedule": {
        "name": "exponential_decay", "arguments": [1e-3, 0.9]}}),
    "muon-step": Variant({"optimizer": "muon", "lr_schedule": {
        "name": "step_decay", "arguments": [1e-3, 0.5, 3]}}),
    "batch1": Variant({"batch_size": 1}),
    "completions": Variant(data="completions"),
    "completions-custom-keys-masked": Variant(
        {"prompt_feature": "question", "completion_feature": "answer", "mask_prompt": True},
        data="completions-custom"),
    "chat": Variant(data="chat"),
    "chat-custom-key-masked": Variant({"chat_feature": "conversation", "mask_prompt": True},
                                      data="chat-custom"),
    # (the tool definitions take ~200 tokens of the tiny tokenizer: room for the answers)
    "tools": Variant({"max_seq_length": 512}, model="tiny_tools_model", data="tools"),
    "tools-masked": Variant({"mask_prompt": True, "max_seq_length": 512},
                            model="tiny_tools_model", data="tools"),
    "text-custom-key": Variant({"text_feature": "body"}, data="text-custom"),
    # mlx-lm's own accumulation numbers (cluster.gradient_average: mlx_lm; mlx-lm ignores the
    # cluster key), with a save point and an end that are not optimizer steps
    "accumulation-mlx-lm-mean": Variant({"grad_accumulation_steps": 3, "iters": 10,
                                         "save_every": 4,
                                         "cluster": {"gradient_average": "mlx_lm"}}),
    # an mlx-lm adapter to start from: weights only, in both
    "resume-adapter-file": Variant({"resume_adapter_file": "START"}),
}


@pytest.fixture(scope="session")
def data_sets(tmp_path_factory, tiny_data, tiny_chat_data, tiny_completions_data):
    """Every dataset the matrix trains on (mlx-lm's formats, custom feature keys, tools)."""
    root = tmp_path_factory.mktemp("formats")
    tools = [{"type": "function", "function": {
        "name": "colour_of", "description": "the colour of an animal",
        "parameters": {"type": "object", "properties": {"animal": {"type": "string"}}}}}]
    return {
        "text": tiny_data,
        "chat": tiny_chat_data,
        "completions": tiny_completions_data,
        "text-custom": reformat_data(tiny_data, root / "text-custom",
                                     lambda r: {"body": r["text"], "id": 1}),
        "chat-custom": reformat_data(tiny_chat_data, root / "chat-custom",
                                     lambda r: {"conversation": r["messages"]}),
        "completions-custom": reformat_data(
            tiny_completions_data, root / "completions-custom",
            lambda r: {"question": r["prompt"], "answer": r["completion"]}),
        "tools": reformat_data(tiny_chat_data, root / "tools",
                               lambda r: {**r, "tools": tools}),
    }


class Matrix:
    """The whole matrix per kernel family, trained the first time a test asks for it: every
    variant's `herd train` in one process and its `mlx_lm.lora` in another, the two side by side
    (tests/train_many.py: each run is its command's own main(); the imports are paid once, not
    twice per variant)."""

    def __init__(self, root: Path, request, data_sets, start_adapter):
        self.root, self.request = root, request
        self.data_sets, self.start_adapter = data_sets, start_adapter
        self.done: dict[str, dict[str, dict]] = {}  # kernels -> variant -> paths and results

    def result(self, variant: str, kernels: str) -> dict:
        if kernels not in self.done:
            self.done[kernels] = self._train(kernels)
        return self.done[kernels][variant]

    def _train(self, kernels: str) -> dict[str, dict]:
        runs = {}
        for name, spec in VARIANTS.items():
            if kernels != "default" and not spec.haswell:
                continue
            folder = self.root / kernels / name
            folder.mkdir(parents=True)
            model = self.request.getfixturevalue(spec.model)
            kw = dict(spec.config)
            if kw.get("resume_adapter_file") == "START":
                kw["resume_adapter_file"] = str(self.start_adapter)
            data = self.data_sets[spec.data]
            runs[name] = {
                "herd": write_job(folder / "herd.yaml", model, data,
                                  adapter_path=str(folder / "herd"), **kw),
                "mlx_lm": write_job(folder / "mlx.yaml", model, data,
                                    adapter_path=str(folder / "mlx"), **kw)}
        # The environment as blas_kernels set it, with the OpenBLAS herd train preloads for both.
        procs = {tool: subprocess.Popen(
            [sys.executable, "-m", "tests.train_many", tool, *(str(r[tool]) for r in
                                                                runs.values())],
            stdout=subprocess.PIPE, stderr=open(self.root / f"{kernels}-{tool}.log", "w"),
            text=True, env=preload_env(), cwd=REPO) for tool in ("herd", "mlx_lm")}
        results = {tool: {} for tool in procs}
        for tool, proc in procs.items():
            out, _ = proc.communicate(timeout=1200)
            for line in out.splitlines():
                r = json.loads(line)
                results[tool][r["config"]] = r
        log = {tool: (self.root / f"{kernels}-{tool}.log").read_text()[-3000:] for tool in procs}
        for r in runs.values():
            for tool in procs:
                r[f"{tool}_result"] = results[tool].get(str(r[tool])) or {
                    "ok": False, "error": f"never ran: its process ended first\n{log[tool]}"}
        return runs


@pytest.fixture(scope="module")
def matrix(tmp_path_factory, request, data_sets, start_adapter) -> Matrix:
    return Matrix(tmp_path_factory.mktemp("matrix"), request, data_sets, start_adapter)


@pytest.mark.parametrize(
    "variant, blas_kernels",
    [(v, k) for v, spec in VARIANTS.items() for k in ("default", "Haswell")[:1 + spec.haswell]],
    indirect=["blas_kernels"],
)
def test_same_adapter_as_mlx_lm_lora(matrix, variant, blas_kernels):
    """Same config and seed, one process: herd's adapter equals the one `mlx_lm.lora` writes,
    bit for bit, across mlx-lm's model kinds, fine-tune types, optimizers, schedules, data
    formats and keys. The whole matrix on OpenBLAS's default kernels, a representative subset
    on its Haswell kernels too."""
    run = matrix.result(variant, blas_kernels)
    for tool in ("herd", "mlx_lm"):
        assert run[f"{tool}_result"]["ok"], f"{tool}: {run[f'{tool}_result']['error']}"
    a = load_adapter(Path(run["herd"]).parent / "herd")
    b = load_adapter(Path(run["mlx_lm"]).parent / "mlx")
    # One process: herd runs mlx-lm's exact ops in mlx-lm's order (loss divided by the batch's
    # target count inside the graph, same batch order, same RNG stream), on the same BLAS
    # kernels, so the adapters are bit-identical on any kernel choice.
    assert max_abs_diff(a, b) == 0.0
    # and training moved the adapter (lora_b starts at zero; a full fine-tune moves weights)
    start = initial_adapter(run["herd"])
    assert max_abs_diff(a, start) > 1e-5
    # adapter_config.json, which `mlx_lm.generate --adapter-path` reads to rebuild the layers
    # (fine_tune_type, num_layers, lora_parameters' rank and scale, ...): every key mlx-lm
    # writes, as it writes it, but for this run's own files and herd's cluster: section. (herd's
    # also names the job's model in base_model, and spells out defaults: lr_schedule's warmup.)
    ours, theirs = (json.loads((Path(run[t]).parent / d / "adapter_config.json").read_text())
                    for t, d in (("herd", "herd"), ("mlx_lm", "mlx")))
    for key in sorted(set(theirs) - {"adapter_path", "config", "data", "resume_adapter_file",
                                     "cluster"}):
        got, want = ours.get(key), theirs[key]
        if isinstance(want, dict) and isinstance(got, dict):  # mlx-lm's keys, as it has them
            got = {k: v for k, v in got.items() if k in want}
        if key == "optimizer":  # (mlx-lm lowers the name it reads: herd writes it so)
            want = want.lower()
        assert got == want, (key, got, want)


@pytest.mark.slow
@pytest.mark.parametrize("accum", [1, 2])
def test_two_ranks_equal_one_rank(tmp_path, tiny_model, tiny_data, accum, blas_kernels):
    """2 ranks on a loopback MLX ring with global batch B == 1 rank with batch B (token-weighted),
    to float32 rounding (tests/conftest.py SAME_UPDATE)."""
    kw = dict(grad_accumulation_steps=accum, iters=8, save_every=8, batch_size=4,
              steps_per_report=2, steps_per_eval=4, **SAME_UPDATE)
    one = write_job(tmp_path / "one.yaml", tiny_model, tiny_data,
                    adapter_path=str(tmp_path / "one"), **kw)
    two = write_job(tmp_path / "two.yaml", tiny_model, tiny_data,
                    adapter_path=str(tmp_path / "two"),
                    cluster={"exchange": "mlx"}, **kw)
    herd("train", one, "--quiet", "--metrics-file", tmp_path / "one.jsonl")
    wait_all(start_ranks(["train", str(two), "--quiet", "--metrics-file",
                          str(tmp_path / "two.jsonl")], world=2, hostfile_dir=tmp_path))
    rel = update_diff(load_adapter(tmp_path / "two"), load_adapter(tmp_path / "one"),
                      initial_adapter(one))
    print(f"update differs by {rel:.2e} of its size")
    assert rel <= SAME_UPDATE_RTOL, f"2-rank adapter differs from 1-rank by {rel:.2e} of the update"
    # What the ranks report is what one process reports: each window's train loss and the
    # validation losses, over the whole global batch (not rank 0's part), at the same iterations.
    assert_same_losses(tmp_path / "two.jsonl", tmp_path / "one.jsonl")


LOSS_RTOL = 1e-5  # float32 sums in another order (tests/test_pipeline.py's bound)


def assert_same_losses(ranks: Path, one: Path) -> None:
    rows = [json.loads(line) for line in ranks.read_text().splitlines()]
    want_rows = [json.loads(line) for line in one.read_text().splitlines()]
    for kind, key in (("train", "train_loss"), ("val", "val_loss")):
        want = [(r["iteration"], r[key]) for r in want_rows if r.get("event") == kind]
        assert want, (kind, want_rows)
        by_rank: dict[int, list] = {}
        for r in rows:
            if r.get("event") == kind:
                by_rank.setdefault(r.get("rank", 0), []).append((r["iteration"], r[key]))
        assert sorted(by_rank) == [0, 1], (kind, sorted(by_rank))  # (each rank reports)
        for rank, got in by_rank.items():
            assert [i for i, _ in got] == [i for i, _ in want], (kind, rank, got, want)
            assert all(abs(g - w) <= LOSS_RTOL * abs(w) for (_, g), (_, w) in zip(got, want)), (
                kind, rank, got, want)


@pytest.mark.slow
def test_mlx_lm_averaging_on_two_ranks_is_mlx_lm_lora_on_two_ranks(tmp_path, tiny_model,
                                                                    tiny_data):
    """cluster.gradient_average: mlx_lm on a 2-rank MLX ring gives the adapter `mlx_lm.lora`
    itself gives on a 2-rank ring (its data-parallel step: each rank's own mean, averaged over
    the ranks). SGD: a gradient's scale shows in the update (Adam's normalisation hides it)."""
    kw = dict(iters=6, save_every=6, batch_size=4, optimizer="sgd", learning_rate=0.05,
              cluster={"gradient_average": "mlx_lm", "exchange": "mlx"})
    ours = write_job(tmp_path / "herd.yaml", tiny_model, tiny_data,
                     adapter_path=str(tmp_path / "herd"), **kw)
    theirs = write_job(tmp_path / "mlx.yaml", tiny_model, tiny_data,
                       adapter_path=str(tmp_path / "mlx"), **kw)  # (mlx-lm ignores cluster:)
    wait_all(start_ranks(["train", str(ours), "--quiet"], world=2, hostfile_dir=tmp_path))
    wait_all(start_ranks([str(theirs)], world=2, hostfile_dir=tmp_path,
                         extra_env=preload_env(), command=("-c", MLX_LM_LORA)))
    a, b = load_adapter(tmp_path / "herd"), load_adapter(tmp_path / "mlx")
    rel = update_diff(a, b, initial_adapter(ours))
    print(f"herd vs mlx_lm.lora on 2 ranks: max abs {max_abs_diff(a, b):.2e}, update {rel:.2e}")
    assert rel <= SAME_UPDATE_RTOL, f"the 2-rank updates differ by {rel:.2e}"


@pytest.mark.slow
@pytest.mark.parametrize("stages", [1, 2])
def test_a_rank_that_loses_its_mlx_peer_exits_as_peer_lost(tmp_path, tiny_model, tiny_data, stages):
    """Kill one rank of a 2-rank MLX ring (data parallel, or a 2-stage pipeline): the survivor
    exits with PeerLostError's code, which the scheduler restarts from the last checkpoint, not
    with a bare RuntimeError's 1, which would fail the job for good."""
    import signal
    import time

    from herd.errors import PeerLostError

    metrics = tmp_path / "m.jsonl"
    layout = {"exchange": "mlx"} if stages == 1 else {"parallelism": {"data": 1, "pipeline": 2}}
    cfg = write_job(tmp_path / "job.yaml", tiny_model, tiny_data, adapter_path=str(tmp_path / "a"),
                    iters=100_000, steps_per_report=1, save_every=100_000, cluster=layout)
    procs = start_ranks(["train", str(cfg), "--quiet", "--metrics-file", str(metrics)], world=2,
                        hostfile_dir=tmp_path)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and '"train"' not in (
                metrics.read_text() if metrics.exists() else ""):
            assert all(p.poll() is None for p in procs), [p.communicate()[1][-2000:] for p in procs]
            time.sleep(0.2)
        procs[1].send_signal(signal.SIGKILL)
        _, err = procs[0].communicate(timeout=60)
        assert procs[0].returncode == PeerLostError.exit_code, err[-3000:]
        assert "lost a peer" in err
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


def _test_loss(model_path: Path, data: Path, adapter: Path | None) -> float:
    import argparse

    from mlx_lm.tuner.datasets import CacheDataset, load_dataset
    from mlx_lm.tuner.trainer import evaluate
    from mlx_lm.utils import load

    model, tok = load(str(model_path), adapter_path=str(adapter) if adapter else None)
    ns = argparse.Namespace(data=str(data), train=False, test=True, mask_prompt=False)
    _, _, test = load_dataset(ns, tok)
    return evaluate(model, CacheDataset(test), batch_size=4, num_batches=-1, max_seq_length=128)


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["lora", "dora", "qlora"])
def test_adapter_loads_in_mlx_lm_and_learns(tmp_path, tiny_model, tiny_data, variant):
    """The adapter loads with mlx-lm (as `mlx_lm.generate --adapter-path` does) and lowers the
    held-out loss on the tiny task; QLoRA here quantizes on load (quantize: {bits: 4})."""
    extra = {"fine_tune_type": "dora"} if variant == "dora" else {}
    if variant == "qlora":
        extra["quantize"] = {"bits": 4, "group_size": 64}
    cfg = write_job(tmp_path / "job.yaml", tiny_model, tiny_data, adapter_path=str(tmp_path / "ad"),
                    iters=48, save_every=48, learning_rate=3e-3, **extra)
    herd("train", cfg, "--quiet")
    base_model = tiny_model
    if variant == "qlora":  # compare against the same 4-bit base the adapter was trained on
        from mlx_lm import convert

        base_model = tmp_path / "q4"
        convert(str(tiny_model), str(base_model), quantize=True, q_bits=4, q_group_size=64)
    before = _test_loss(base_model, tiny_data, None)
    after = _test_loss(base_model, tiny_data, tmp_path / "ad")
    assert after < before - 1.0, f"{variant}: test loss {before:.3f} -> {after:.3f}"


@pytest.mark.slow
def test_compiled_path_matches(tmp_path, tiny_model, tiny_data):
    """Production (macOS) runs compiled: it must give the adapter the uncompiled tests check (to
    rounding: compiled kernels fuse ops; tests/conftest.py SAME_UPDATE)."""
    kw = dict(iters=4, save_every=4, **SAME_UPDATE)
    a = write_job(tmp_path / "a.yaml", tiny_model, tiny_data,
                  adapter_path=str(tmp_path / "a"), **kw)
    b = write_job(tmp_path / "b.yaml", tiny_model, tiny_data,
                  adapter_path=str(tmp_path / "b"), **kw)
    herd("train", a, "--quiet", env={"MLX_DISABLE_COMPILE": "0"})
    herd("train", b, "--quiet")
    rel = update_diff(load_adapter(tmp_path / "a"), load_adapter(tmp_path / "b"),
                      initial_adapter(b))
    print(f"update differs by {rel:.2e} of its size")
    assert rel <= SAME_UPDATE_RTOL


def test_an_accumulation_steps_denominator_counts_every_target_of_its_micro_batches(
        tiny_model, tiny_data):
    """Token weighting divides a step's summed loss by the target tokens of all its micro-batches
    on all ranks: the sum of what mlx-lm's own loss counts (its ntoks) for each rank's part.
    (Runs of herd compared with each other share this number: a wrong count moved them alike,
    so it is checked here against mlx-lm's.)"""
    import argparse

    from mlx_lm.tuner.datasets import CacheDataset, load_dataset
    from mlx_lm.tuner.trainer import default_loss
    from mlx_lm.utils import load

    from worker.rank.batches import BatchStream, DataOrder, global_batches

    model, tok = load(str(tiny_model))
    ns = argparse.Namespace(data=str(tiny_data), train=True, test=False, mask_prompt=False)
    train = CacheDataset(load_dataset(ns, tok)[0])
    iters = 7
    order = DataOrder.draw(0, len(global_batches(train, 4, 128)), iters)
    streams = [BatchStream(train, 4, 128, rank, 2, order) for rank in range(2)]

    def counted(it: int) -> int:  # mlx-lm's count, over both ranks' parts of iteration it
        return sum(default_loss(model, *s.batch(order.train[it - 1]))[1].item() for s in streams)

    # steps of 1 and of 3 micro-batches, and a trailing partial step (iteration 7 alone)
    for first, count in ((1, 1), (1, 3), (4, 3), (7, 3)):
        want = sum(counted(it) for it in range(first, min(first + count - 1, iters) + 1))
        assert [s.targets(first, count) for s in streams] == [want, want], (first, count)


def test_progress_and_metrics(tmp_path, tiny_model, tiny_chat_data):
    """Progress shows iteration, loss, tok/s and peak memory; the metrics file is JSON lines."""
    import json

    cfg = write_job(tmp_path / "job.yaml", tiny_model, tiny_chat_data,
                    adapter_path=str(tmp_path / "ad"),
                    mask_prompt=True)
    proc = herd("train", cfg, "--metrics-file", tmp_path / "m.jsonl",
                env={"HERD_LOG_LEVEL": "info"})
    assert "loss" in proc.stdout and "tok/s" in proc.stdout and "peak" in proc.stdout
    # The start line says what the process runs with; on Linux (glibc) freed memory is kept for
    # reuse, which the 2-rank throughput depends on (worker/rank/runtime.py).
    start = [json.loads(line) for line in proc.stderr.splitlines()
             if '"train_start"' in line]
    assert len(start) == 1 and start[0]["exchange"] == "local"
    if sys.platform == "linux":
        assert start[0]["reuse_freed_memory"] is True
    events = [json.loads(line) for line in (tmp_path / "m.jsonl").read_text().splitlines()]
    kinds = [e["event"] for e in events]
    assert kinds.count("checkpoint") == 2 and kinds[-1] == "done"
    train = [e for e in events if e["event"] == "train"]
    assert all(e["tokens_per_second"] > 0 and e["peak_memory_gb"] > 0 for e in train)
    assert all(e["exchange"] == "local" and e["world_size"] == 1 for e in train)


def test_a_trailing_partial_accumulation_reports_its_own_mean_loss(tmp_path, tiny_model, tiny_data):
    """iters 7 with accumulation 3: micro-batch 7 is a step of one (computed, never applied, as in
    mlx-lm). Its reported loss is that micro-batch's mean, as mlx-lm's figure is (gradient_average
    mlx_lm: each micro-batch its own mean), not three times it; its checkpoint is the last
    optimizer step's (6). Every window of one micro-batch, cutting its step, reports that
    micro-batch's mean too (each was scaled by its part of its step's tokens: an outside run)."""
    import json

    losses = {}
    for mode in ("tokens", "mlx_lm"):
        # A rate too small to move the weights apart: the two modes' updates differ (token
        # weighting) but not the loss at micro-batch 7 beyond rounding.
        cfg = write_job(tmp_path / f"{mode}.yaml", tiny_model, tiny_data, iters=7,
                        grad_accumulation_steps=3, steps_per_report=1, save_every=100,
                        learning_rate=1e-7, adapter_path=str(tmp_path / mode),
                        cluster={"gradient_average": mode})
        herd("train", cfg, "--quiet", "--metrics-file", tmp_path / f"{mode}.jsonl")
        events = [json.loads(line)
                  for line in (tmp_path / f"{mode}.jsonl").read_text().splitlines()]
        losses[mode] = {e["iteration"]: e["train_loss"] for e in events if e["event"] == "train"}
        assert [e["step"] for e in events if e["event"] == "checkpoint"] == [6], events
    assert losses["tokens"][7] == pytest.approx(losses["mlx_lm"][7], rel=1e-3), losses
    assert sorted(losses["tokens"]) == list(range(1, 8))
    for it in range(1, 7):
        assert losses["tokens"][it] == pytest.approx(losses["mlx_lm"][it], rel=1e-3), (it, losses)
