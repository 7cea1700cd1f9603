"""Checkpoints: round trips, atomic writes, clear errors for damaged files; the sharded kind (FSDP's,
written here by one process; tests/test_distributed.py writes it from two ranks)."""

import hashlib
import os

import pytest
import torch
import torch.distributed.checkpoint
from tiny_training import tiny_trainer

from fastgpt import checkpoint as checkpoint_module
from fastgpt.checkpoint import (
    CheckpointError,
    load_checkpoint,
    load_model,
    load_sharded_state,
    save_checkpoint,
    save_sharded_checkpoint,
)
from fastgpt.distributed import SINGLE
from fastgpt.nn import GPT, GPTConfig


def test_checkpoint_round_trip(tmp_path):
    trainer = tiny_trainer()
    trainer.train_step()
    path = str(tmp_path / "ckpt.safetensors")
    trainer.save(path)
    model, ckpt = load_model(path, backend="reference")
    assert ckpt["progress"]["step"] == 1
    for name, t in trainer.model.state_dict().items():
        assert torch.equal(model.state_dict()[name], t), name
    idx = torch.randint(0, 256, (2, 16))
    assert torch.equal(model(idx)[0], trainer.model.eval()(idx)[0])


def test_tied_weights_round_trip(tmp_path):
    model = GPT(GPTConfig(context_length=8, n_layers=1, n_heads=2, d_model=16, tie_weights=True), backend="reference")
    save_checkpoint(str(tmp_path / "c.safetensors"), model)
    loaded, _ = load_model(str(tmp_path / "c.safetensors"))
    assert loaded.lm_head.weight is loaded.token_embedding.weight
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight)


def test_interrupted_write_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    trainer = tiny_trainer()
    path = str(tmp_path / "ckpt.safetensors")
    trainer.save(path)
    good = open(path, "rb").read()

    def crash(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint_module, "save_file", crash)
    trainer.train_step()
    with pytest.raises(CheckpointError, match="disk full.*is unchanged"):
        trainer.save(path)
    assert open(path, "rb").read() == good
    assert os.listdir(tmp_path) == ["ckpt.safetensors"]  # no temporary file left behind


def test_corrupt_checkpoint_is_a_clear_error(tmp_path):
    path = tmp_path / "ckpt.safetensors"
    path.write_bytes(b"\x00" * 100)
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        load_checkpoint(str(path))
    with pytest.raises(CheckpointError, match="no checkpoint at"):
        load_checkpoint(str(tmp_path / "missing.safetensors"))


def test_a_flipped_byte_in_the_tensors_names_the_damaged_file(tmp_path):
    path = tmp_path / "ckpt.safetensors"
    tiny_trainer().save(str(path))
    data = bytearray(path.read_bytes())
    data[-100] ^= 0x01  # inside the last tensor's bytes
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=f"{path} is damaged"):
        load_checkpoint(str(path))


def test_non_finite_weights_are_never_written(tmp_path):
    trainer = tiny_trainer()
    path = str(tmp_path / "ckpt.safetensors")
    trainer.save(path)
    good = open(path, "rb").read()
    with torch.no_grad():
        next(trainer.model.parameters())[0] = float("nan")
    with pytest.raises(CheckpointError, match="NaN or inf"):
        trainer.save(path)
    assert open(path, "rb").read() == good


def test_a_checkpoint_gets_the_permissions_of_the_umask(tmp_path):
    umask = os.umask(0o022)
    try:
        path = tmp_path / "ckpt.safetensors"
        tiny_trainer().save(str(path))
    finally:
        os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o644


def save_sharded(trainer, path):
    """What ``Trainer.save`` does under FSDP, here with one process and no process group."""
    save_sharded_checkpoint(path, trainer.model, trainer.optimizer, {"step": trainer.step},
                            {"batches": trainer.batch_generator.get_state(), "torch": torch.get_rng_state()}, SINGLE)


def test_sharded_checkpoint_round_trip_replacing_the_file_beside_it(tmp_path):
    trainer = tiny_trainer()
    trainer.train_step()
    trainer.save(str(tmp_path / "ckpt.safetensors"))
    trainer.train_step()
    save_sharded(trainer, str(tmp_path / "ckpt.dcp"))
    assert os.listdir(tmp_path) == ["ckpt.dcp"]  # one checkpoint per folder: the newer kind stays
    model, ckpt = load_model(str(tmp_path), backend="reference")
    assert ckpt["progress"]["step"] == 2 and ckpt["sharded"] == str(tmp_path / "ckpt.dcp")
    for name, t in trainer.model.state_dict().items():
        assert torch.equal(model.state_dict()[name], t), name
    resumed = tiny_trainer(checkpoint=ckpt)
    assert resumed.step == 2
    assert torch.equal(resumed.batch_generator.get_state(), trainer.batch_generator.get_state())
    for before, after in zip(trainer.optimizer.state.values(), resumed.optimizer.state.values()):
        assert all(torch.equal(before[k], after[k]) for k in before)


def test_a_failed_sharded_save_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    trainer = tiny_trainer()
    path = str(tmp_path / "ckpt.dcp")
    save_sharded(trainer, path)

    def crash(state_dict, checkpoint_id):
        os.makedirs(checkpoint_id)
        with open(os.path.join(checkpoint_id, "__0_0.distcp"), "wb") as f:
            f.write(b"half a shard")
        raise OSError("disk full")

    monkeypatch.setattr(torch.distributed.checkpoint, "save", crash)
    trainer.train_step()
    with pytest.raises(CheckpointError, match="disk full.*is unchanged"):
        save_sharded(trainer, path)
    assert os.listdir(tmp_path) == ["ckpt.dcp"]  # no temporary folder left behind
    assert load_checkpoint(path)["progress"]["step"] == 0


def test_non_finite_weights_are_never_written_sharded(tmp_path):
    trainer = tiny_trainer()
    with torch.no_grad():
        next(trainer.model.parameters())[0] = float("inf")
    with pytest.raises(CheckpointError, match="token_embedding.weight holds NaN or inf"):
        save_sharded(trainer, str(tmp_path / "ckpt.dcp"))
    assert os.listdir(tmp_path) == []


def test_a_sharded_checkpoint_replaced_while_read_is_refused(tmp_path):
    """A reader (fastgpt sample) that checked one save's checksums and then reads the shards of a
    newer save published meanwhile under the same name must not load the mixture."""
    trainer = tiny_trainer()
    path = str(tmp_path / "ckpt.dcp")
    save_sharded(trainer, path)
    ckpt = load_checkpoint(path)  # checksums checked on this save
    trainer.train_step()
    save_sharded(trainer, path)  # a running job publishes a newer one under the same name
    with pytest.raises(CheckpointError, match="replaced while being read"):
        load_sharded_state(ckpt, tiny_trainer().model)
    load_sharded_state(load_checkpoint(path), tiny_trainer().model)  # read again: fine


def test_file_checksums_are_read_in_blocks(tmp_path):
    """The manifest's SHA-256 of a file, without hashlib.file_digest (Python 3.11+; fastgpt takes 3.9)."""
    data = os.urandom(3 * (1 << 20) + 17)
    (tmp_path / "blob").write_bytes(data)
    assert checkpoint_module._file_sha256(str(tmp_path / "blob")) == hashlib.sha256(data).hexdigest()
