"""Training: resuming reproduces the uninterrupted run, Ctrl-C saves."""

import pytest
from tiny_training import tiny_trainer

from fastgpt.checkpoint import load_checkpoint


def test_resume_gives_the_same_next_step_loss(tmp_path):
    uninterrupted = tiny_trainer(max_steps=4)
    losses = [uninterrupted.train_step() for _ in range(4)]

    first = tiny_trainer(max_steps=4)
    first.train_step(), first.train_step()
    path = str(tmp_path / "ckpt.safetensors")
    first.save(path)
    resumed = tiny_trainer(max_steps=4, checkpoint=load_checkpoint(path), seed=99)  # state comes from the file
    assert resumed.step == 2
    assert [resumed.train_step(), resumed.train_step()] == losses[2:]


def test_ctrl_c_saves_a_checkpoint(tmp_path, monkeypatch):
    trainer = tiny_trainer(max_steps=10)
    original = trainer.train_step
    calls = []

    def interrupt_on_third():
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return original()

    monkeypatch.setattr(trainer, "train_step", interrupt_on_third)
    path = str(tmp_path / "ckpt.safetensors")
    with pytest.raises(KeyboardInterrupt):
        trainer.run(path, progress=False, log=lambda *_: None)
    assert load_checkpoint(path)["progress"]["step"] == 2
