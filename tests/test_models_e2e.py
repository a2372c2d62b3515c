"""Models onto the workers, end to end with real processes on loopback (`herd up`: a
coordinator and two worker agents), a model store, a prepared hub cache (HF_HUB_OFFLINE=1) and
real MLX rings. Tests run in file order and build on each other's caches:

1. a sharded tiny model put into the store: a 2-stage pipeline job gets on each worker only the
   shards of its blocks (checked against the index), and its adapter equals `herd train` on the
   original folder;
2. the same model as a hub id: `herd plan` and `herd submit` read config.json alone (the laptop's
   hub cache holds nothing else); a wrong id or revision fails at submit, naming it; `herd models
   add org/tiny` stores it once; a 2-worker data-parallel job gets the whole model on each worker
   (only the shards it lacked move) and equals `herd train` too;
3. a corrupted cached shard is fetched again, and nothing else moves;
4. a worker with too little free disk refuses the job before any transfer, with the figure.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import (
    SAME_UPDATE,
    SAME_UPDATE_RTOL,
    initial_adapter,
    load_adapter,
    update_diff,
    write_job,
)
from tests.hub_cache import write_hub_cache
from tests.test_service_e2e import HOST, Cluster

pytestmark = pytest.mark.slow
FETCHED = re.compile(r": fetched rank (\d+) \((\S+)\) from (\w+): (\d+) files, (\d+) bytes needed, "
                     r"(\d+) cached, (\d+) received")
KW = dict(iters=8, save_every=8, num_layers=-1, **SAME_UPDATE)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The sharded model, its hub caches (the cluster's: whole; the laptop's: config.json and the
    index only) and one cluster whose processes see the whole cache, offline."""
    from herd.cli.tiny import make_tiny_data, make_tiny_model

    root = tmp_path_factory.mktemp("models-e2e")
    model = make_tiny_model(root / "tiny", layers=4, shards=3)
    data = make_tiny_data(root / "data", fmt="text", train=64, valid=16, test=8)
    commit = write_hub_cache(root / "hf", "org/tiny", model)
    write_hub_cache(root / "hf-laptop", "org/tiny", model,
                    names=["config.json", "model.safetensors.index.json"])
    cluster = Cluster(root)
    cluster.env.update({"HF_HOME": str(root / "hf"), "HF_HUB_OFFLINE": "1"})
    cluster.herd("init")
    cluster.start()
    cluster.wait_workers(2)
    laptop = {**cluster.env, "HF_HOME": str(root / "hf-laptop")}
    yield {"root": root, "model": model, "data": data, "commit": commit, "cluster": cluster,
           "laptop": laptop}
    cluster.stop()


def _herd(world, *args, laptop: bool = True, check: bool = True, timeout: float = 240):
    """The CLI as a laptop runs it (its own hub cache), against the cluster's coordinator."""
    c = world["cluster"]
    argv = [sys.executable, "-m", "herd", *args]
    if args[0] not in ("train", "plan"):
        argv += ["--coordinator", c.address]
    proc = subprocess.run(argv, env=world["laptop"] if laptop else c.env, capture_output=True,
                          text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"herd {' '.join(args)} -> {proc.returncode}\n{proc.stdout}\n"
                             f"{proc.stderr[-3000:]}")
    return proc


def _job(world, name: str, model: str, **kw) -> Path:
    return write_job(world["root"] / f"{name}.yaml", model, world["data"],
                     adapter_path=str(world["root"] / name), **kw)


def _run(world, cfg: Path) -> tuple[str, list[str]]:
    submitted = _herd(world, "submit", str(cfg))
    world["submitted"] = submitted.stderr  # what submit said besides the id
    job_id = submitted.stdout.strip().splitlines()[-1]
    watch = _herd(world, "watch", job_id, "--plain", check=False, timeout=300)
    return job_id, watch.stdout.splitlines()


def _fetched(lines: list[str]) -> dict[str, tuple]:
    """worker -> (rank, source, files, needed, cached, received), from the final fetch events."""
    out = {}
    for ln in lines:
        if m := FETCHED.search(ln):
            rank, worker, source, *numbers = m.groups()
            # `herd up`'s worker-N-TAG, as its state folder names it: worker-N
            out[re.sub(r"-[0-9a-f]{4}$", "", worker)] = (int(rank), source, *map(int, numbers))
    return out


def _sizes(model: Path) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in model.iterdir()}


def _stage_files(model: Path, start: int, end: int, first: bool, last: bool) -> set[str]:
    """What a stage of blocks [start, end) needs, read from the index: the shards holding those
    blocks (the first stage's the embedding too, the last stage's the norm and head; this llama's
    head is not tied), and every file that is not weights."""
    index = json.loads((model / "model.safetensors.index.json").read_text())
    shards = set()
    for key, shard in index["weight_map"].items():
        if m := re.match(r"model\.layers\.(\d+)\.", key):
            if start <= int(m.group(1)) < end:
                shards.add(shard)
        elif key.startswith("model.embed_tokens.") and first or not key.startswith(
                "model.embed_tokens.") and last:
            shards.add(shard)
    return shards | {n for n in _sizes(model) if not n.endswith(".safetensors")}


def _cached_shas(world, worker: str) -> set[str]:
    blobs = world["cluster"].state / worker / "models" / "blobs"
    return {p.name for p in blobs.iterdir()}


def _shas(model: Path, names: set[str]) -> set[str]:
    from herd.digest import sha256_file

    return {sha256_file(model / n) for n in names}


@pytest.fixture(scope="module")
def baseline(world) -> Path:
    """`herd train` on the original folder: what every layout must reproduce."""
    cfg = _job(world, "single", str(world["model"]), **KW)
    _herd(world, "train", str(cfg), "--quiet")
    return cfg


def _same_as_baseline(world, job_id: str, baseline: Path) -> None:
    out = world["root"] / f"pulled-{job_id}"
    _herd(world, "pull", job_id, "-o", str(out))
    # The adapter names the job's model, never the worker's model cache it was loaded from
    # (neither its base_model nor mlx-lm's own "model" key).
    config = json.loads((out / "adapter_config.json").read_text())
    assert str(world["cluster"].state) not in json.dumps(config), config
    rel = update_diff(load_adapter(out), load_adapter(world["root"] / "single"),
                      initial_adapter(baseline))
    print(f"{job_id} vs `herd train` on the folder: the update differs by {rel:.2e}")
    assert rel <= SAME_UPDATE_RTOL, f"{job_id} differs from one process by {rel:.2e}"


def test_a_pipeline_stage_fetches_only_the_shards_of_its_blocks(world, baseline):
    model = world["model"]
    added = _herd(world, "models", "add", str(model), "--plain").stdout
    assert "stored tiny as " in added and "(8 files" in added, added
    listing = _herd(world, "models").stdout
    assert re.search(r"^tiny\s+[0-9a-f]{12}\s+8\s+", listing, re.M), listing
    cfg = _job(world, "pp", str(model), cluster={"workers": 2, "parallelism": {"pipeline": 2}},
               **KW)
    job_id, lines = _run(world, cfg)
    assert f"{job_id}: state succeeded" in lines, "\n".join(lines[-30:])
    # (submit says which copy: it said nothing for a stored folder, an outside run)
    assert f"the coordinator's stored copy {_digest(world)}" in world["submitted"]
    assert any("blocks 0:2,2:4" in ln for ln in lines)
    fetched = _fetched(lines)
    sizes = _sizes(model)
    assert sorted(fetched) == ["worker-1", "worker-2"], lines
    for worker, (rank, source, files, needed, cached, received) in fetched.items():
        want = _stage_files(model, *((0, 2, True, False) if rank == 0 else (2, 4, False, True)))
        assert [n for n in want if n.endswith(".safetensors")] != [
            n for n in sizes if n.endswith(".safetensors")]
        assert (source, files, needed, cached) == ("store", len(want),
                                                   sum(sizes[n] for n in want), 0)
        assert received == needed  # bytes received, against the index
        assert _cached_shas(world, worker) == _shas(model, want)  # and nothing else on disk
    assert f"tiny ({_digest(world)[:12]})" in _herd(world, "jobs").stdout
    _same_as_baseline(world, job_id, baseline)


def _digest(world) -> str:
    listing = _herd(world, "models").stdout
    return re.search(r"^tiny\s+([0-9a-f]{12})", listing, re.M).group(1)


def test_a_hub_id_is_planned_and_pinned_from_config_json_alone(world):
    plan = _herd(world, "plan", "--workers", "64,64", _job(world, "plan", "org/tiny",
                                                          cluster={"workers": 2}))
    assert "layout:" in plan.stdout, plan.stdout
    for model, named in (("org/nope", "org/nope"), ("org/tiny@v9", "'v9'")):
        bad = _herd(world, "submit", str(_job(world, "bad", model)), check=False)
        assert bad.returncode == 2 and named in bad.stderr, bad.stderr  # ConfigError, named
    # A store's own name (`herd models add --name tiny`) read as a bare hub id: the hint says
    # what a job names instead (it spoke only of the hub: an outside run).
    bare = _herd(world, "submit", str(_job(world, "bad", "tiny")), check=False)
    assert bare.returncode == 2 and "herd models add --name" in bare.stderr, bare.stderr
    assert not list((world["root"] / "hf-laptop").rglob("*.safetensors"))  # no weights moved


def test_a_data_parallel_job_on_a_stored_hub_model_gets_the_whole_model_once(world, baseline):
    model, commit = world["model"], world["commit"]
    before = {w: _cached_shas(world, w) for w in ("worker-1", "worker-2")}
    added = _herd(world, "models", "add", "org/tiny", "--plain").stdout
    assert f"stored tiny, org/tiny@{commit} as " in added, added  # the same files: stored once
    cfg = _job(world, "dp", "org/tiny", cluster={"workers": 2, "model_source": "coordinator"},
               **KW)
    job_id, lines = _run(world, cfg)
    assert f"{job_id}: state succeeded" in lines, "\n".join(lines[-30:])
    sizes = _sizes(model)
    everything = _shas(model, set(sizes))
    fetched = _fetched(lines)
    assert sorted(fetched) == ["worker-1", "worker-2"], lines
    for worker, (_, source, files, needed, cached, received) in fetched.items():
        held = sum(sizes[n] for n in sizes if _shas(model, {n}) <= before[worker])
        assert (source, files, needed) == ("store", len(sizes), sum(sizes.values()))
        assert (cached, received) == (held, needed - held)  # only what it lacked moved
        assert _cached_shas(world, worker) == everything
    jobs = _herd(world, "jobs").stdout
    assert f"org/tiny@{commit}" in jobs  # the revision pinned in the job record
    digest = re.search(r" as ([0-9a-f]{12}) ", added).group(1)
    assert (f"model org/tiny@{commit}: the coordinator's copy {digest}, which it fetched from "
            "the hub") in world["submitted"], world["submitted"]
    _same_as_baseline(world, job_id, baseline)


def test_a_folder_cannot_take_a_hub_models_name(world):
    """A folder listed as org/tiny@<commit> trained every other user's org/tiny jobs (an outside
    review): `herd models add` refuses the name before uploading anything."""
    name = f"org/tiny@{world['commit']}"
    squat = _herd(world, "models", "add", str(world["model"]), "--name", name, "--plain",
                  check=False)
    assert squat.returncode == 2 and "hub id's form" in squat.stderr, squat.stderr
    assert "uploading" not in squat.stdout + squat.stderr


def _stored_and_fetched(world) -> None:
    """org/tiny in the store and on both workers, as the data-parallel test above leaves it
    (a test run alone, or in another order, does it here)."""
    from herd.digest import sha256_file

    shard = sorted(world["model"].glob("*.safetensors"))[-1]
    blobs = world["cluster"].state / "worker-1" / "models" / "blobs"
    if not (blobs / sha256_file(shard)).exists():
        _herd(world, "models", "add", str(world["model"]), "--plain")  # (as "tiny")
        _herd(world, "models", "add", "org/tiny", "--plain")  # (the same files: stored once)
        cfg = _job(world, "first", "org/tiny", cluster={"workers": 2}, iters=2, save_every=2)
        job_id, lines = _run(world, cfg)
        assert f"{job_id}: state succeeded" in lines, "\n".join(lines[-30:])


def test_a_corrupted_cached_shard_is_fetched_again_and_nothing_else_moves(world):
    from herd.digest import sha256_file

    model = world["model"]
    shard = sorted(model.glob("*.safetensors"))[1]
    blob = world["cluster"].state / "worker-1" / "models" / "blobs" / sha256_file(shard)
    _stored_and_fetched(world)
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped bit-pattern mid-file: the size still matches
    blob.write_bytes(bytes(data))
    cfg = _job(world, "again", "org/tiny", cluster={"workers": 2}, iters=2, save_every=2)
    job_id, lines = _run(world, cfg)
    assert f"{job_id}: state succeeded" in lines, "\n".join(lines[-30:])
    fetched = _fetched(lines)
    assert fetched["worker-1"][-1] == shard.stat().st_size  # the corrupted shard, again
    assert fetched["worker-2"][-1] == 0  # a worker holding the model moves 0 bytes
    assert sha256_file(blob) == sha256_file(shard)


def test_a_worker_with_too_little_disk_refuses_before_any_transfer(world):
    if os.geteuid() != 0 or not shutil.which("unshare"):
        pytest.skip("needs root and unshare(1) for a small tmpfs disk of its own")
    c = world["cluster"]
    _stored_and_fetched(world)
    cache = world["root"] / "small-disk"
    cache.mkdir()
    # Its own mount namespace: a 64 kB tmpfs as its model cache, gone when it exits.
    small = subprocess.Popen(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c",
         'mount -t tmpfs -o size=64k herd-small "$0" && exec "$@"', str(cache),
         sys.executable, "-m", "herd", "worker", "--host", HOST, "--id", "worker-small",
         "--state-dir", str(world["root"] / "wsmall"), "--model-cache", str(cache)],
        env=c.env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    c.extra.append(small)
    try:
        c.wait_workers(3)
        cfg = _job(world, "small", "org/tiny", cluster={"workers": 3}, batch_size=6, iters=2,
                   save_every=2)
        job_id, lines = _run(world, cfg)
        total = sum(_sizes(world["model"]).values())
        failed = [ln for ln in lines if "state failed" in ln]
        assert failed and "worker worker-small cannot hold the model" in failed[0], lines[-20:]
        assert f"need {total:,} bytes" in failed[0]  # the figure it needs: the whole model
        assert "the disk has 65,536 bytes" in failed[0]  # the tmpfs: 64 kB free
        assert not any("fetched rank" in ln and "(worker-small)" in ln for ln in lines)
    finally:
        small.send_signal(signal.SIGTERM)
        small.wait(timeout=30)
    assert not list(cache.iterdir())  # the tmpfs went with its namespace: nothing was written
    c.wait_workers(2)


def test_a_stored_model_is_listed_for_scripts_and_removed_once(world):
    """After the jobs above (or its own): `herd models --json` names the model, its files and
    its jobs; `herd models rm NAME` removes that name while the model has another (the hub id
    the same files were fetched for), `rm DIGEST` the model, freeing what no other model or
    dataset holds; a second rm exits 7, naming it."""
    import json

    _stored_and_fetched(world)
    listed = json.loads(_herd(world, "models", "--json").stdout)
    tiny = next(m for m in listed if "tiny" in m["names"])
    assert re.fullmatch(r"[0-9a-f]{64}", tiny["digest"]) and tiny["jobs"], tiny
    assert tiny["bytes"] == sum(f["bytes"] for f in tiny["files"]) > 0
    removed = _herd(world, "models", "rm", "tiny").stdout
    others = [n for n in tiny["names"] if n != "tiny"]
    if others:
        assert removed.startswith(f"removed the name tiny; {tiny['digest'][:12]} is still "
                                  f"stored as {', '.join(others)}"), removed
        removed = _herd(world, "models", "rm", tiny["digest"][:12]).stdout
    assert f"({tiny['digest'][:12]}); freed " in removed, removed
    assert not [m for m in json.loads(_herd(world, "models", "--json").stdout)
                if tiny["digest"] == m["digest"]]
    again = _herd(world, "models", "rm", "tiny", check=False)
    assert again.returncode == 7 and "no stored model 'tiny'" in again.stderr, again.stderr
