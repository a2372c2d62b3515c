"""What the model store trusts (an outside security review): a name in hub-id form stands only for
files the coordinator fetched from the hub for that id, never a laptop's folder; a model folder's
symlinks stay inside it (or inside its hub cache repository); a model name holds no control
characters. Real stores, a real CoordinatorService on loopback and real hub-cache layouts
(tests/hub_cache.py), offline."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
from pathlib import Path

import grpc
import pytest

from herd.errors import ConfigError
from tests.hub_cache import write_hub_cache
from tests.test_models import offline_hub, sharded  # noqa: F401 (fixtures)
from tests.test_service_units import coordinator_rpc  # noqa: F401 (fixture)

ESCAPES = "x\x1b[2J\x1b[31mRED\x1b]0;pwned-title\x07"


def _catalog(tmp_path: Path):
    from coordinator.artifacts import BlobStore
    from coordinator.models import ModelCatalog, ModelStore

    blobs = BlobStore(tmp_path / "blobs")
    train = b'{"text": "hello"}\n' * 4
    blobs.put(hashlib.sha256(train).hexdigest(), [train])
    return blobs, ModelCatalog(ModelStore(tmp_path / "models", blobs)), train


def _evil(tmp_path: Path, model: Path) -> Path:
    """The attacker's folder: the same architecture, a poisoned chat template."""
    evil = shutil.copytree(model, tmp_path / "evil")
    (evil / "chat_template.jinja").write_text('{{ "ATTACKER TEMPLATE" }}')
    return evil


def test_a_folder_never_stands_in_for_a_hub_id(
        sharded, offline_hub, tmp_path):  # noqa: F811 (fixtures)
    """`herd models add FOLDER --name acme/tiny-llama@<commit>` made every other user's job on
    acme/tiny-llama train on the folder's files. A folder import may not take a hub id's form; a
    record stored that way before keeps listing and removing but no job's hub id reaches it; the
    coordinator's own hub fetch of that commit is what a job gets."""
    from coordinator.jobs import new_job
    from coordinator.models import fetch_hub_model
    from herd.digest import FileDigest
    from herd.models import ref as refs

    commit = write_hub_cache(offline_hub, "acme/tiny-llama", sharded)
    pinned = f"acme/tiny-llama@{commit}"
    blobs, models, train = _catalog(tmp_path)
    evil = _evil(tmp_path, sharded)
    for name in (pinned, "acme/tiny-llama", "tiny@v1"):
        with pytest.raises(ConfigError, match="hub id's form") as refused:
            models.store.import_folder(evil, name, 0, link=False)
        assert "without '/' or '@'" in refused.value.hint
    assert models.store.list() == []  # refused before a file was hashed into the store
    assert _blobs_held(tmp_path) == [hashlib.sha256(train).hexdigest()]

    # A record a folder import wrote before this rule (names only, no hub_ids).
    squat = models.store.import_folder(evil, "evil", 1, link=False)
    record = models.store.root / f"{squat.digest}.json"
    doc = json.loads(record.read_text())
    del doc["hub_ids"]
    record.write_text(json.dumps({**doc, "names": [pinned]}))
    dataset = [FileDigest("train.jsonl", hashlib.sha256(train).hexdigest(), len(train))]

    def submit(source: str):
        return new_job("j", "model: acme/tiny-llama\ndata: d\n"
                       f"cluster: {{model_source: {source}}}\n", dataset, blobs, models)

    job = submit("auto")
    assert (job.config.model, job.model_digest) == (pinned, "")  # the hub's, not the squat
    with pytest.raises(ConfigError, match="not in the coordinator's model store as fetched from"):
        submit("coordinator")
    assert [m.names for m in models.store.list()] == [(pinned,)]  # still listed

    # The coordinator fetches the hub's files (from its hub cache here, offline): that is what
    # the job's hub id gets.
    *_, (_, _, _, fetched) = fetch_hub_model(models.store, refs.resolve(refs.parse(pinned)), 2,
                                             lambda: True)
    assert fetched.hub_ids == (pinned,) and fetched.digest != squat.digest
    template = "chat_template.jinja"  # the hub's own, not the attacker's
    assert fetched.manifest.by_name()[template] != squat.manifest.by_name()[template]
    assert submit("coordinator").model_digest == fetched.digest
    assert submit("auto").model_digest == fetched.digest
    removed, _, _ = models.remove(squat.digest[:12], [])  # the old record still goes
    assert removed.digest == squat.digest
    assert [m.digest for m in models.store.list()] == [fetched.digest]


def _args(model: Path, name: str | None = None) -> argparse.Namespace:
    return argparse.Namespace(model=str(model), name=name, plain=True)


def _blobs_held(tmp_path: Path) -> list[str]:
    return sorted(p.name for p in (tmp_path / "blobs").iterdir() if len(p.name) == 64)


def test_herd_models_add_refuses_a_hub_like_or_escaped_name_before_uploading(
        sharded, tmp_path, coordinator_rpc):  # noqa: F811 (fixtures)
    """The CLI says the rule before hashing or uploading anything; the coordinator refuses the
    same names from a raw client that uploaded the files itself."""
    from herd.cli.connection import CoordinatorConnection
    from herd.cli.models import cmd_add
    from herd.models.manifest import folder_manifest, model_files
    from protos.v1 import common_pb2, coordinator_pb2

    target, ids, _ = coordinator_rpc
    evil = _evil(tmp_path, sharded)
    with CoordinatorConnection(target, ids["client"]) as coord:
        for name, words in ((f"org/tiny@{'7' * 40}", "hub id's form"),
                            (ESCAPES, "control characters")):
            with pytest.raises(ConfigError, match=words):
                cmd_add(coord, _args(evil, name))
        assert _blobs_held(tmp_path) == []  # nothing left the laptop
        manifest = folder_manifest(evil)
        for path in model_files(evil):
            coord.put_blob(path, manifest.by_name()[path.name].sha256)
        files = [common_pb2.FileDigest(name=f.name, sha256=f.sha256, bytes=f.bytes)
                 for f in manifest.files]
        for name, words in ((f"org/tiny@{'7' * 40}", "hub id's form"),
                            (ESCAPES, "control characters")):
            with pytest.raises(grpc.RpcError) as refused:
                list(coord.stub.AddModel(coordinator_pb2.AddModelRequest(name=name, files=files),
                                         timeout=30))
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert words in refused.value.details()
        listed = coord.call("ListModels", coordinator_pb2.ListModelsRequest()).models
        assert list(listed) == []
        assert cmd_add(coord, _args(evil, "my-llama")) == 0  # a plain name is fine


def _with_links(tmp_path: Path, model: Path) -> tuple[Path, Path]:
    folder = shutil.copytree(model, tmp_path / "linked")
    secret = tmp_path / "home" / ".ssh" / "id_ed25519"
    secret.parent.mkdir(parents=True)
    secret.write_text("-----BEGIN OPENSSH PRIVATE KEY-----\n")
    return folder, secret


@pytest.mark.parametrize("relative", [False, True])
def test_a_link_out_of_a_model_folder_is_refused_naming_it(
        sharded, tmp_path, coordinator_rpc, relative):  # noqa: F811 (fixtures)
    """A cloned model repo can carry a link to ~/.ssh/id_ed25519 named merges.txt: `herd models
    add` uploaded the key into the store and onto every worker. Now refused on the laptop (the
    CLI) and on the coordinator (ModelStore.import_folder), naming the link and its target; a
    link that stays inside the folder is still followed."""
    from coordinator.artifacts import BlobStore
    from coordinator.models import ModelStore
    from herd.cli.connection import CoordinatorConnection
    from herd.cli.models import cmd_add
    from herd.models.manifest import model_files

    folder, secret = _with_links(tmp_path, sharded)
    link = folder / "merges.txt"
    os.symlink(os.path.relpath(secret, folder) if relative else secret, link)
    target, ids, _ = coordinator_rpc
    with CoordinatorConnection(target, ids["client"]) as coord:
        with pytest.raises(ConfigError, match=f"{link} is a link to {secret}, outside the model "
                                              f"folder {folder}"):
            cmd_add(coord, _args(folder, "innocent"))
    assert _blobs_held(tmp_path) == []
    store = ModelStore(tmp_path / "store" / "models", BlobStore(tmp_path / "store" / "blobs"))
    with pytest.raises(ConfigError, match="outside the model folder"):
        store.import_folder(folder, "innocent", 0, link=False)
    assert store.list() == []

    link.unlink()  # a link within the folder (into a subfolder) is one of its files
    (folder / "extra").mkdir()
    (folder / "extra" / "merges.txt").write_text("a b\n")
    os.symlink("extra/merges.txt", link)
    assert link in model_files(folder)
    assert "merges.txt" in store.import_folder(folder, "inside", 0, link=False).manifest.by_name()


def test_a_hub_cache_snapshot_may_link_into_its_own_blobs_only(
        sharded, tmp_path):  # noqa: F811 (a fixture)
    """A snapshot's files are links to ../../blobs/<etag> (huggingface_hub's layout): followed;
    one leading out of the repository's cache folder is refused."""
    from herd.models.manifest import model_files

    hf = tmp_path / "hf"
    commit = write_hub_cache(hf, "org/tiny", sharded)
    snapshot = hf / "hub" / "models--org--tiny" / "snapshots" / commit
    assert {p.name for p in model_files(snapshot)} == {p.name for p in sharded.iterdir()
                                                       if p.is_file()}
    # (named by its commit, which would read as a digest: it takes its repository's name)
    from herd.cli.models import default_name
    from herd.models.ref import check_folder_name

    assert check_folder_name(default_name(snapshot)) == f"org--tiny-{commit[:8]}"
    secret = tmp_path / "client.key"
    secret.write_text("-----BEGIN PRIVATE KEY-----\n")
    os.symlink(os.path.relpath(secret, snapshot), snapshot / "vocab.txt")
    with pytest.raises(ConfigError, match=f"vocab.txt is a link to {secret}"):
        model_files(snapshot)


def test_herd_models_shows_an_old_squat_as_a_folder_and_escapes_its_name(
        sharded, tmp_path, coordinator_rpc, capsys):  # noqa: F811 (fixtures)
    """A record stored before these rules (a hub-like name from a folder, a name with terminal
    escapes) lists with the escapes shown as text and the hub-like name marked as a folder's."""
    from coordinator.artifacts import BlobStore
    from coordinator.models import ModelStore
    from herd.cli.connection import CoordinatorConnection
    from herd.cli.models import cmd_list

    store = ModelStore(tmp_path / "models", BlobStore(tmp_path / "blobs"))  # the servicer's
    squat = store.import_folder(_evil(tmp_path, sharded), "evil", 0, link=False)
    record = store.root / f"{squat.digest}.json"
    squatted = f"org/tiny@{'7' * 40}"
    record.write_text(json.dumps({**json.loads(record.read_text()), "hub_ids": [],
                                  "names": [squatted, ESCAPES]}))
    target, ids, _ = coordinator_rpc
    with CoordinatorConnection(target, ids["client"]) as coord:
        cmd_list(coord, argparse.Namespace(json=False))
        table = capsys.readouterr().out
        cmd_list(coord, argparse.Namespace(json=True))
        listed = json.loads(capsys.readouterr().out)
    assert f"{squatted} (a folder, not the hub's), x\\x1b[2J" in table, table
    assert "\x1b" not in table and "\x07" not in table
    assert listed[0]["hub_ids"] == [] and listed[0]["names"] == [squatted, ESCAPES]
