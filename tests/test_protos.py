"""The committed stubs are what protos/generate.py makes from the .proto files today."""

from __future__ import annotations

from pathlib import Path

from protos import generate


def test_committed_stubs_are_fresh(tmp_path: Path):
    protos = generate.generate(out_dir=tmp_path)
    assert protos, "no .proto files found"
    generated = sorted((tmp_path / "protos" / "v1").glob("*_pb2*.py*"))
    assert len(generated) == 3 * len(protos)
    stale = []
    for fresh in generated:
        committed = generate.PROTO_DIR / fresh.name
        if not committed.exists() or committed.read_text() != fresh.read_text():
            stale.append(fresh.name)
    assert not stale, f"stale generated stubs {stale}: run `make protos` and commit them"


def test_services_have_the_designed_rpcs():
    from protos.v1 import coordinator_pb2, worker_pb2

    coord = coordinator_pb2.DESCRIPTOR.services_by_name["CoordinatorService"]
    assert {"SubmitJob", "GetJob", "ListJobs", "WatchJob", "CancelJob", "ListWorkers",
            "PutCheckpoint", "GetAdapter"} <= set(coord.methods_by_name)
    work = worker_pb2.DESCRIPTOR.services_by_name["WorkerService"]
    assert set(work.methods_by_name) == {"Describe", "PrepareRank", "StartRank", "StopJob",
                                         "Health"}
