"""Sequence packing (issue 19): a packed document's loss is its unpacked loss, and a packed step
that holds the same documents gives the same adapter, in one process, on 2 data-parallel ranks
and through a 2-stage pipeline."""

from __future__ import annotations

import json
import random
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from tests.conftest import (
    SAME_UPDATE,
    SAME_UPDATE_RTOL,
    herd,
    initial_adapter,
    load_adapter,
    max_abs_diff,
    start_ranks,
    update_diff,
    wait_all,
    write_job,
)
from worker.rank.batches import collate
from worker.rank.packing import (
    COUNTED,
    DOCUMENT,
    INPUTS,
    POSITION,
    TARGETS,
    DocumentRoPE,
    collate_packed,
    counted_targets,
    document_slots,
    enable_packing,
    pack,
    packed_forward,
)


def test_pack_is_best_fit_and_keeps_every_document():
    sizes = [random.Random(3).randint(1, 50) for _ in range(200)]
    rows = pack(sizes, 64)
    assert sorted(i for r in rows for i in r) == list(range(200))
    assert all(sum(sizes[i] for i in r) <= 64 for r in rows)
    # within one row of the bound: total / capacity, rounded up
    assert len(rows) <= -(-sum(sizes) // 64) + 1
    assert pack(sizes, 64) == rows  # a pure function of the sizes


def test_rope_of_one_token_at_offset_p_is_rope_at_position_p():
    """What per-document positions rest on (worker/rank/packing.py DocumentRoPE)."""
    x = mx.random.normal((2, 4, 40, 16))
    b, h, n, d = x.shape
    pos = mx.broadcast_to(mx.arange(n)[None], (b, n)).reshape(-1)
    per_token = mx.fast.rope(x.transpose(0, 2, 1, 3).reshape(b * n, h, 1, d), 16,
                             traditional=False, base=10000.0, scale=1.0, offset=pos)
    per_token = per_token.reshape(b, n, h, d).transpose(0, 2, 1, 3)
    assert mx.array_equal(per_token, nn.RoPE(16)(x)).item()


def test_positions_restart_at_every_document():
    """Each packed document's queries and keys are rotated exactly as the document alone would be
    (RoPE is relative, so the loss alone barely sees absolute positions: this checks them)."""
    docs = [(list(range(3, 3 + n)), 0) for n in (7, 12, 5)]
    _, layout = collate_packed([docs], 64)
    x = mx.random.normal((1, 2, layout.shape[-1], 16))
    rope = nn.RoPE(16)
    packed = DocumentRoPE(rope)(x, offset=layout[:, POSITION])
    document = np.array(layout[0, DOCUMENT])
    for d in range(len(docs)):
        at = mx.array(np.flatnonzero(document == d))
        assert mx.array_equal(packed[:, :, at], rope(x[:, :, at])).item(), f"document {d}"
    assert not mx.array_equal(packed, rope(x)).item()  # row positions would differ


def _documents(seed: int, n: int, vocab: int) -> list[tuple[list[int], int]]:
    """Token documents of long-tailed lengths (1 to 60 tokens), some with a prompt (mask_prompt's
    offset), a few longer than max_seq_length below."""
    rng = random.Random(seed)
    docs = []
    for _ in range(n):
        length = min(60, max(1, int(rng.paretovariate(1.2) * 4)))
        offset = rng.choice([0, 0, rng.randint(1, length)])
        docs.append(([rng.randrange(3, vocab) for _ in range(length)], offset))
    return docs


def _model(path: Path):
    from mlx_lm.utils import load

    from herd.config import parse_config
    from worker.rank.model import apply_adapters

    model, _ = load(str(path))
    apply_adapters(model, parse_config({"model": str(path), "num_layers": -1,
                                        "lora_parameters": {"rank": 4}}))
    # LoRA's B starts at zero: give it values, so the low-rank path counts in the comparison
    for name, p in nn.utils.tree_flatten(model.trainable_parameters()):
        if name.endswith("lora_b"):
            model.update(nn.utils.tree_unflatten([(name, mx.random.normal(p.shape) * 0.05)]))
    return model


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("max_seq_length", [32, 96])
def test_packed_loss_per_document_equals_unpacked(arch, max_seq_length, tiny_model, tiny_qwen2):
    """Each document's summed cross-entropy over its counted targets, packed with others into
    rows (block-diagonal attention, positions from 0 per document) vs alone as mlx-lm batches it
    (padded, mlx-lm's loss mask): equal to 1e-5 (float32), prompts masked, documents longer than
    max_seq_length truncated as mlx-lm truncates them."""
    from worker.rank.trainer import targets_mask

    model = _model(tiny_model if arch == "llama" else tiny_qwen2)
    docs = _documents(11, 40, vocab=400)
    mx.eval(model.parameters())

    unpacked = []
    for doc in docs:
        batch, lengths = collate([doc], max_seq_length)
        logits = model(batch[:, :-1])
        mask = targets_mask(lengths, batch.shape[1] - 1)
        ce = nn.losses.cross_entropy(logits, batch[:, 1:]) * mask
        unpacked.append((ce.astype(mx.float32).sum().item(), int(mask.sum().item())))

    before = model(collate([docs[0]], max_seq_length)[0][:, :-1])
    enable_packing(model, arch)
    rows = pack([document_slots(d, max_seq_length) for d in docs], max_seq_length)
    assert len(rows) < len(docs)  # several documents share rows
    batch, layout = collate_packed([[docs[i] for i in r] for r in rows], max_seq_length)
    logits = packed_forward(model, batch[:, INPUTS], layout)
    ce = nn.losses.cross_entropy(logits, batch[:, TARGETS]) * layout[:, COUNTED]
    ce = np.array(ce.astype(mx.float32))
    counted, document = np.array(layout[:, COUNTED]), np.array(layout[:, DOCUMENT])
    packed = {}
    for r, row in enumerate(rows):
        for d, i in enumerate(row):
            at = document[r] == d
            packed[i] = (float(ce[r][at].sum()), int(counted[r][at].sum()))

    assert sum(n for _, n in unpacked) == counted_targets([[docs[i] for i in r] for r in rows],
                                                          max_seq_length)
    for i, (loss, n) in enumerate(unpacked):
        assert packed[i][1] == n, f"document {i}: {packed[i][1]} targets counted, unpacked {n}"
        if n:
            assert abs(packed[i][0] / n - loss / n) <= 1e-5, (i, packed[i][0] / n, loss / n)
    # enable_packing leaves unpacked calls (validation) as they were
    after = model(collate([docs[0]], max_seq_length)[0][:, :-1])
    assert mx.array_equal(before, after).item()


# --- adapters: a packed step that holds the same documents as an unpacked one ----------------

def _same_documents_data(tmp_path: Path, tiny_model: Path, max_seq_length: int):
    """A chat dataset whose training documents pack into an even number of rows, and that
    number: one packed global batch of all rows holds exactly the documents of one unpacked
    global batch of all documents."""
    import argparse

    from mlx_lm.tuner.datasets import CacheDataset, load_dataset
    from mlx_lm.utils import load_tokenizer

    from herd.cli.tiny import make_tiny_data

    tok = load_tokenizer(tiny_model)
    for train in (24, 26, 28, 22, 20):
        data = make_tiny_data(tmp_path / f"data{train}", fmt="chat", train=train, valid=train,
                              test=4)
        ns = argparse.Namespace(data=str(data), train=True, test=False, mask_prompt=True)
        train_set = CacheDataset(load_dataset(ns, tok)[0])
        rows = pack([document_slots(train_set[i], max_seq_length)
                     for i in range(len(train_set))], max_seq_length)
        if len(rows) % 2 == 0:
            return data, train, len(rows)
    raise AssertionError("no dataset size packs into an even number of rows")


@pytest.fixture(scope="module")
def same_docs(tmp_path_factory, tiny_model):
    """The unpacked reference run (one process, batch = all documents) and its setup."""
    tmp = tmp_path_factory.mktemp("packing")
    data, docs, rows = _same_documents_data(tmp, tiny_model, 128)
    kw = dict(iters=3, save_every=3, steps_per_eval=1000, val_batches=1, mask_prompt=True,
              **SAME_UPDATE)
    ref = write_job(tmp / "unpacked.yaml", tiny_model, data, adapter_path=str(tmp / "unpacked"),
                    batch_size=docs, **kw)
    herd("train", ref, "--quiet")
    return {"data": data, "rows": rows, "kw": kw, "ref": tmp / "unpacked",
            "start": initial_adapter(ref)}


def _compare(same_docs, got: Path, what: str) -> None:
    rel = update_diff(load_adapter(got), load_adapter(same_docs["ref"]), same_docs["start"])
    print(f"{what}: update differs by {rel:.2e} of its size")
    assert rel <= SAME_UPDATE_RTOL, f"{what} differs from unpacked by {rel:.2e} of the update"


def test_packed_one_process_same_adapter(tmp_path, tiny_model, same_docs):
    cfg = write_job(tmp_path / "packed.yaml", tiny_model, same_docs["data"],
                    adapter_path=str(tmp_path / "packed"), batch_size=same_docs["rows"],
                    cluster={"packing": True}, **same_docs["kw"])
    herd("train", cfg, "--quiet")
    _compare(same_docs, tmp_path / "packed", "packed, one process")
    state = json.loads((tmp_path / "packed/checkpoints/0000003/trainer_state.json").read_text())
    assert state["packing"] is True


@pytest.mark.slow
def test_packed_two_ranks_same_adapter(tmp_path, tiny_model, same_docs):
    cfg = write_job(tmp_path / "packed.yaml", tiny_model, same_docs["data"],
                    adapter_path=str(tmp_path / "packed"), batch_size=same_docs["rows"],
                    cluster={"packing": True, "exchange": "mlx", "balance": False},
                    **same_docs["kw"])
    wait_all(start_ranks(["train", str(cfg), "--quiet"], world=2, hostfile_dir=tmp_path))
    _compare(same_docs, tmp_path / "packed", "packed, 2 data-parallel ranks")


@pytest.mark.slow
def test_packed_pipeline_same_adapter(tmp_path, tiny_model, same_docs):
    cfg = write_job(tmp_path / "packed.yaml", tiny_model, same_docs["data"],
                    adapter_path=str(tmp_path / "packed"), batch_size=same_docs["rows"],
                    cluster={"packing": True, "parallelism": {"data": 1, "pipeline": 2}},
                    **same_docs["kw"])
    wait_all(start_ranks(["train", str(cfg), "--quiet"], world=2, hostfile_dir=tmp_path))
    _compare(same_docs, tmp_path / "packed", "packed, 2-stage pipeline")


@pytest.mark.slow
def test_packed_resume_is_exact(tmp_path, tiny_model, tiny_chat_data):
    """Packing is part of the exact-resume state: a packed run stopped at a checkpoint and resumed
    ends bit-identical to the straight packed run (same rows in the same order, with
    accumulation); resuming it unpacked is refused before training."""
    kw = dict(iters=8, save_every=4, batch_size=2, grad_accumulation_steps=2, mask_prompt=True,
              steps_per_eval=1000, cluster={"packing": True})

    def job(name, **over):
        return write_job(tmp_path / f"{name}.yaml", tiny_model, tiny_chat_data,
                         adapter_path=str(tmp_path / name), **{**kw, **over})

    herd("train", job("straight"), "--quiet")
    herd("train", job("split"), "--quiet", "--iters", "4")
    herd("train", job("split"), "--quiet", "--resume", str(tmp_path / "split"))
    assert max_abs_diff(load_adapter(tmp_path / "straight"), load_adapter(tmp_path / "split")) == 0
    refused = herd("train", job("unpacked", cluster={}), "--quiet", "--resume",
                   str(tmp_path / "split"), check=False)
    assert refused.returncode != 0 and "cluster.packing" in refused.stderr + refused.stdout
