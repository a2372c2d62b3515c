"""``herd models``: the coordinator's model store.

    herd models                          what is stored: names, digest, files, size, jobs using it
    herd models add ID|FOLDER [--name N] a hub id (org/name[@revision]: the coordinator fetches
                                         it) or a model folder here (hashed and uploaded; files the
                                         store already holds are not sent again), under a plain
                                         name (no '/' or '@': those name hub models only)
    herd models rm NAME|DIGEST           remove it, and the files no other model holds

Jobs whose ``model`` is a hub id the coordinator fetched (or a folder with the same files) get it
from the coordinator: each worker fetches only what its rank needs, once.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
from pathlib import Path

from herd.cli.connection import CoordinatorConnection, add_connection_args, connect_from_args
from herd.digest import human_bytes
from herd.errors import HerdError
from herd.models import ref as refs
from herd.models.manifest import folder_manifest, model_files
from herd.rpc.status import rpc_errors
from herd.usage import HelpFormatter
from protos.v1 import common_pb2, coordinator_pb2

# Adding a 140 GB model from the hub can take hours on a slow link: the stream reports twice a
# second, so a dead coordinator still shows quickly (the channel's keepalive).
ADD_DEADLINE_S = 12 * 3600.0


class Bar:
    """A rich progress bar of bytes (or plain lines when not on a terminal)."""

    def __init__(self, plain: bool):
        self.plain = plain
        self._progress = None
        self._lock = threading.Lock()

    def __enter__(self) -> Bar:
        if not self.plain:
            from rich.progress import (
                BarColumn,
                DownloadColumn,
                Progress,
                TextColumn,
                TimeRemainingColumn,
                TransferSpeedColumn,
            )

            self._progress = Progress(TextColumn("{task.description}"), BarColumn(),
                                      DownloadColumn(), TransferSpeedColumn(),
                                      TimeRemainingColumn(), transient=False)
            self._progress.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self._progress is not None:
            self._progress.__exit__(*exc)

    def task(self, what: str, total: int):
        """A callable adding bytes done to a new bar named ``what``."""
        if self._progress is None:
            print(f"{what}: {human_bytes(total)}", flush=True)
            return lambda n: None
        task = self._progress.add_task(what, total=total)

        def advance(n: int) -> None:
            with self._lock:
                self._progress.update(task, advance=n)

        return advance

    def set(self, what: str, done: int, total: int) -> None:
        if self._progress is None:
            return
        tasks = {t.description: t.id for t in self._progress.tasks}
        if what not in tasks:
            tasks[what] = self._progress.add_task(what, total=total or None)
        self._progress.update(tasks[what], completed=done, total=total or None)


def _names(m: common_pb2.ModelInfo) -> str:
    """A model's names as a terminal may show them: control characters escaped (a record stored
    before herd refused them), and a hub-like name the coordinator did not fetch from the hub
    marked as the folder's it is (a job's hub id never resolves to it)."""
    def shown(name: str) -> str:
        text = name if name.isprintable() else name.encode("unicode_escape").decode()
        folder = ("/" in name or "@" in name) and name not in m.hub_ids
        return text + (" (a folder, not the hub's)" if folder else "")

    return ", ".join(shown(n) for n in m.names)


def _info_line(m: common_pb2.ModelInfo) -> str:
    return (f"stored {_names(m)} as {m.digest[:12]} ({len(m.files)} files, "
            f"{human_bytes(m.bytes)})")


def add_folder(coord: CoordinatorConnection, folder: Path, name: str,
               plain: bool) -> common_pb2.ModelInfo:
    """Hashes the folder's model files here, uploads those the store lacks, then adds it."""
    paths = model_files(folder)
    with Bar(plain) as bar:
        manifest = folder_manifest(folder, bar.task("hashing", sum(p.stat().st_size
                                                                   for p in paths)))
        missing = coord.missing([f.sha256 for f in manifest.files])
        todo = [f for f in manifest.files if f.sha256 in missing]
        sent = bar.task(f"uploading {len(todo)} of {len(manifest.files)} files",
                        sum(f.bytes for f in todo))
        for f in todo:  # (a file the coordinator kept part of, from a broken upload: the rest)
            if f.sha256 in missing:  # (two names of the same bytes: once)
                sent(missing[f.sha256])
                coord.put_blob(folder / f.name, f.sha256, sent, held=missing.pop(f.sha256))
    request = coordinator_pb2.AddModelRequest(name=name, files=[
        common_pb2.FileDigest(name=f.name, sha256=f.sha256, bytes=f.bytes)
        for f in manifest.files])
    return _add(coord, request, plain)


def _add(coord: CoordinatorConnection, request, plain: bool) -> common_pb2.ModelInfo:
    with Bar(plain) as bar, rpc_errors(coord.target):
        for m in coord.stub.AddModel(request, timeout=ADD_DEADLINE_S):
            if m.HasField("model"):
                return m.model
            bar.set(m.phase, m.bytes_done, m.bytes_total)
    raise HerdError("the coordinator ended AddModel without the stored model")


def cmd_list(coord: CoordinatorConnection, args) -> int:
    models = coord.call("ListModels", coordinator_pb2.ListModelsRequest()).models
    if args.json:
        print(json.dumps([{"names": list(m.names), "digest": m.digest, "bytes": m.bytes,
                           "files": [{"name": f.name, "sha256": f.sha256, "bytes": f.bytes}
                                     for f in m.files],
                           "added_unix_ms": m.added_unix_ms, "jobs": list(m.job_ids),
                           "hub_ids": list(m.hub_ids)}
                          for m in models], indent=2))
        return 0
    rows = [["MODEL", "DIGEST", "FILES", "SIZE", "JOBS"]]
    for m in models:
        rows.append([_names(m), m.digest[:12], str(len(m.files)), human_bytes(m.bytes),
                     ", ".join(m.job_ids) or "-"])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    print("\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows))
    return 0


def default_name(folder: Path) -> str:
    """A folder's name in the store: its own, or for a hub cache snapshot (named by its commit
    alone) its repository's and the commit's start, models--org--name/snapshots/<commit> as
    org--name-<commit[:8]>."""
    if folder.parent.name == "snapshots" and folder.parent.parent.name.startswith("models--"):
        return f"{folder.parent.parent.name.removeprefix('models--')}-{folder.name[:8]}"
    return folder.name


def cmd_add(coord: CoordinatorConnection, args) -> int:
    plain = args.plain or not sys.stdout.isatty()
    ref = refs.parse(args.model)
    if ref.is_local:  # the name's rule said here, before anything is hashed or uploaded
        name = refs.check_folder_name(args.name or default_name(ref.path.resolve()))
        info = add_folder(coord, ref.path.resolve(), name, plain)
    else:
        info = _add(coord, coordinator_pb2.AddModelRequest(hub_ref=args.model), plain)
    print(_info_line(info))
    return 0


def cmd_rm(coord: CoordinatorConnection, args) -> int:
    reply = coord.call("RemoveModel", coordinator_pb2.RemoveModelRequest(model=args.model))
    if reply.still_named:  # a name of a model that has others: its files stay
        print(f"removed the name {_names(reply.model)}; {reply.model.digest[:12]} is still "
              f"stored as {', '.join(reply.still_named)}")
        return 0
    print(f"removed {_names(reply.model)} ({reply.model.digest[:12]}); freed "
          f"{human_bytes(reply.freed_bytes)}")
    return 0


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="herd models", description=__doc__.split("\n", 1)[1].strip()
                                .replace("``", "`"), formatter_class=HelpFormatter)
    p.add_argument("action", nargs="?", choices=["list", "add", "rm"], default="list",
                   help="list the store, add a model to it, or rm one")
    p.add_argument("model", nargs="?",
                   help="add: org/name[@revision] or a model folder; rm: a name or digest")
    p.add_argument("--name", default=None,
                   help="add: a folder's name in the store (plain: no '/' or '@')")
    p.add_argument("--plain", action="store_true", help="plain lines, no progress bar")
    p.add_argument("--json", action="store_true", help="list: JSON for scripts instead of a table")
    add_connection_args(p)
    args = p.parse_args(argv[1:])
    if args.action != "list" and not args.model:
        p.error(f"`herd models {args.action}` needs a model")
    try:
        with connect_from_args(args) as coord:
            return {"list": cmd_list, "add": cmd_add, "rm": cmd_rm}[args.action](coord, args)
    except HerdError as e:
        print(f"herd models: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        return 130
