"""Checkpoints survive a crash mid-write, and a corrupted file is caught by its manifest."""

from __future__ import annotations

import json
import os

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import pytest

from herd.errors import StorageError
from worker.rank import checkpoint as ck


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 4)


def _trained(steps: int):
    model, opt = Tiny(), optim.Adam(learning_rate=1e-2)
    grad_fn = nn.value_and_grad(model, lambda m, x: (m.a(x) ** 2).sum())
    for _ in range(steps):
        _, g = grad_fn(model, mx.ones((2, 4)))
        opt.update(model, g)
    mx.eval(model.parameters(), opt.state)
    return model, opt


def _save(tmp_path, model, opt, it):
    return ck.save_checkpoint(tmp_path, model, opt, {"fine_tune_type": "lora"},
                              ck.TrainerState(it, 10 * it, 0, 1))


def test_round_trip_restores_weights_and_optimizer(tmp_path):
    model, opt = _trained(3)
    folder = _save(tmp_path, model, opt, 3)
    fresh, fresh_opt = Tiny(), optim.Adam(learning_rate=1e-2)
    state = ck.load_checkpoint(folder, fresh, fresh_opt)
    assert state.iteration == 3
    assert mx.array_equal(fresh.a.weight, model.a.weight).item()
    assert mx.array_equal(fresh_opt.state["a"]["weight"]["v"], opt.state["a"]["weight"]["v"]).item()
    assert fresh_opt.state["step"].item() == 3


def test_a_resumed_optimizer_keeps_the_configs_learning_rate_and_the_saved_moments(tmp_path):
    """A rollback resumes with a lower rate (cluster.lr_scale): the checkpoint's saved rate must
    not put the old one back; everything else is the checkpoint's."""
    model, opt = _trained(3)
    folder = _save(tmp_path, model, opt, 3)
    fresh, lower = Tiny(), optim.Adam(learning_rate=2.5e-3)
    ck.load_checkpoint(folder, fresh, lower)
    assert lower.learning_rate.item() == pytest.approx(2.5e-3)
    assert mx.array_equal(lower.state["a"]["weight"]["m"], opt.state["a"]["weight"]["m"]).item()
    _, g = nn.value_and_grad(fresh, lambda m, x: (m.a(x) ** 2).sum())(fresh, mx.ones((2, 4)))
    before = fresh.a.weight
    lower.update(fresh, g)
    assert lower.learning_rate.item() == pytest.approx(2.5e-3)  # and the update uses it
    same, again = Tiny(), optim.Adam(learning_rate=1e-2)
    ck.load_checkpoint(folder, same, again)
    again.update(same, g)
    moved = mx.abs(fresh.a.weight - before).max().item()
    assert moved == pytest.approx(mx.abs(same.a.weight - before).max().item() / 4, rel=1e-3)


def test_crash_mid_write_keeps_previous_latest(tmp_path, monkeypatch):
    model, opt = _trained(1)
    first = _save(tmp_path, model, opt, 1)
    before = (tmp_path / "adapters.safetensors").read_bytes()

    real_replace = os.replace

    def failing_disk(src, dst):  # the disk fails when the new checkpoint is moved into place
        if str(dst).endswith("0000002"):
            raise OSError(28, "No space left on device")
        return real_replace(src, dst)

    monkeypatch.setattr(ck.os, "replace", failing_disk)
    model2, opt2 = _trained(2)
    with pytest.raises(StorageError, match="checkpoint 2 could not be written"):  # a full disk
        _save(tmp_path, model2, opt2, 2)
    monkeypatch.undo()

    assert ck.latest_checkpoint(tmp_path) == first
    assert not (tmp_path / "checkpoints" / "0000002").exists()
    assert (tmp_path / "adapters.safetensors").read_bytes() == before
    ck.verify_manifest(first)


def test_manifest_catches_corruption(tmp_path):
    model, opt = _trained(1)
    folder = _save(tmp_path, model, opt, 1)
    manifest = json.loads((folder / "manifest.json").read_text())
    assert set(manifest["files"]) == {"adapters.safetensors", "adapter_config.json",
                                      "trainer_state.safetensors", "trainer_state.json"}
    data = bytearray((folder / "adapters.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (folder / "adapters.safetensors").write_bytes(bytes(data))
    with pytest.raises(ValueError, match="does not match its manifest"):
        ck.load_checkpoint(folder, Tiny(), optim.Adam(learning_rate=1e-2))
