"""Training: resuming reproduces the uninterrupted run, Ctrl-C saves, divergence stops (or is skipped)
without touching the weights or the checkpoint. Signals in a real process: tests/test_reliability_train.py."""

import os
import signal

import pytest
import torch
from tiny_training import TEXT, tiny_trainer

from fastgpt.checkpoint import load_checkpoint
from fastgpt.data import ByteDataset
from fastgpt.nn import GPTConfig
from fastgpt.train import Interrupted, Trainer, TrainConfig, TrainingDiverged


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


def test_sigterm_during_a_periodic_save_stops_after_it_without_saving_twice(tmp_path, monkeypatch):
    trainer = tiny_trainer(max_steps=10)
    trainer.cfg.eval_interval = 2
    saves = []
    original = trainer.save

    def save_and_get_sigterm(path):
        if not saves:
            os.kill(os.getpid(), signal.SIGTERM)  # handled by run(): training stops after this save
        saves.append(trainer.step)
        original(path)

    monkeypatch.setattr(trainer, "save", save_and_get_sigterm)
    path = str(tmp_path / "ckpt.safetensors")
    handler = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Interrupted) as stopped:
        trainer.run(path, progress=False, log=lambda *_: None)
    assert stopped.value.signum == signal.SIGTERM and saves == [2]
    assert load_checkpoint(path)["progress"]["step"] == 2
    assert signal.getsignal(signal.SIGTERM) == handler  # run() put it back


def poison_the_loss(trainer):
    """Make every loss NaN without touching the weights (the embedding's output turns NaN); returns the hook."""
    return trainer.model.token_embedding.register_forward_hook(lambda module, args, out: out * float("nan"))


def test_a_nan_loss_stops_training_naming_the_step_and_keeps_the_checkpoint(tmp_path):
    trainer = tiny_trainer(max_steps=10)
    path = str(tmp_path / "ckpt.safetensors")
    trainer.train_step(), trainer.train_step()
    trainer.save(path)
    good = open(path, "rb").read()
    weights = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    poison_the_loss(trainer)
    with pytest.raises(TrainingDiverged, match=r"^training diverged at step 3: loss nan at learning rate .*; "
                                               r"the checkpoint of step 2 is kept"):
        trainer.run(path, progress=False, log=lambda *_: None)
    assert trainer.step == 2 and open(path, "rb").read() == good
    for name, t in trainer.model.state_dict().items():
        assert torch.equal(t, weights[name]), name


def test_skip_nonfinite_skips_and_counts_the_steps(tmp_path):
    trainer = tiny_trainer(max_steps=4)
    trainer.cfg.skip_nonfinite = True
    hook = poison_the_loss(trainer)
    weights = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.train_step()
    assert trainer.step == 1 and trainer.skipped == 1
    for name, t in trainer.model.state_dict().items():
        assert torch.equal(t, weights[name]), name
    hook.remove()
    path = str(tmp_path / "ckpt.safetensors")
    trainer.run(path, progress=False, log=lambda *_: None)
    assert trainer.skipped == 1 and load_checkpoint(path)["progress"]["step"] == 4


@pytest.mark.parametrize("option, message", [({"fsdp": True}, "fsdp shards over the ranks of a process group"),
                                             ({"dtype": "fp16"}, "dtype must be one of \\('fp32', 'bf16'\\)")])
def test_settings_the_trainer_cannot_use_are_refused(option, message):
    config = GPTConfig(context_length=16, n_layers=1, n_heads=2, d_model=32)
    with pytest.raises(ValueError, match=message):
        Trainer(config, TrainConfig(batch_size=4, **option), ByteDataset(TEXT, 16), "cpu", backend="reference")
