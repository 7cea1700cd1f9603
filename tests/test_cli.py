"""Training, checkpoints and the ``fastgpt`` command on tiny configurations."""

import os

import pytest
import torch

from fastgpt import checkpoint as checkpoint_module
from fastgpt.checkpoint import CheckpointError, load_checkpoint, load_model, save_checkpoint
from fastgpt.cli import main
from fastgpt.data import ByteDataset, stdlib_corpus
from fastgpt.nn import GPT, GPTConfig
from fastgpt.train import Trainer, TrainConfig

TINY_FLAGS = ["--preset", "tiny", "--context-length", "16", "--d-model", "32", "--batch-size", "4", "--backend", "reference"]
TEXT = b"def add(a, b):\n    return a + b\n\n" * 40


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_bytes(TEXT)
    return str(path)


def tiny_trainer(max_steps=4, checkpoint=None, seed=3):
    config = GPTConfig(context_length=16, n_layers=2, n_heads=2, d_model=32, dropout=0.1, backend="reference")
    cfg = TrainConfig(max_steps=max_steps, batch_size=4, eval_interval=100, eval_batches=2, warmup_steps=2, seed=seed)
    return Trainer(config, cfg, ByteDataset(TEXT, 16), "cpu", checkpoint)


def test_checkpoint_round_trip(tmp_path):
    trainer = tiny_trainer()
    trainer.train_step()
    path = str(tmp_path / "ckpt.safetensors")
    trainer.save(path)
    model, ckpt = load_model(path)
    assert ckpt["progress"]["step"] == 1
    for name, t in trainer.model.state_dict().items():
        assert torch.equal(model.state_dict()[name], t), name
    idx = torch.randint(0, 256, (2, 16))
    assert torch.equal(model(idx)[0], trainer.model.eval()(idx)[0])


def test_tied_weights_round_trip(tmp_path):
    model = GPT(GPTConfig(context_length=8, n_layers=1, n_heads=2, d_model=16, tie_weights=True, backend="reference"))
    save_checkpoint(str(tmp_path / "c.safetensors"), model)
    loaded, _ = load_model(str(tmp_path / "c.safetensors"))
    assert loaded.lm_head.weight is loaded.token_embedding.weight
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight)


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
    with pytest.raises(OSError, match="disk full"):
        trainer.save(path)
    assert open(path, "rb").read() == good
    assert os.listdir(tmp_path) == ["ckpt.safetensors"]  # no temporary file left behind


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


def test_corrupt_checkpoint_is_a_clear_error(tmp_path):
    path = tmp_path / "ckpt.safetensors"
    path.write_bytes(b"\x00" * 100)
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        load_checkpoint(str(path))
    with pytest.raises(CheckpointError, match="no checkpoint at"):
        load_checkpoint(str(tmp_path / "missing.safetensors"))


def test_train_then_sample_from_the_command_line(tmp_path, text_file, capsys):
    out = str(tmp_path / "run")
    assert main(["train", "--data", text_file, "--out", out, "--max-steps", "3", "--eval-interval", "2",
                 "--sample-tokens", "10", "--no-progress", *TINY_FLAGS]) == 0
    printed = capsys.readouterr().out
    assert "held-out loss" in printed and "sample:" in printed
    assert main(["train", "--data", text_file, "--out", out, "--max-steps", "5", "--resume", "--sample-tokens", "0",
                 "--no-progress", "--backend", "reference"]) == 0
    assert "resuming from step 3" in capsys.readouterr().out
    assert load_checkpoint(out)["progress"]["step"] == 5
    assert main(["sample", "--ckpt", out, "--prompt", "def ", "--max-new-tokens", "12", "--seed", "1"]) == 0
    assert capsys.readouterr().out.startswith("def ")


def test_info_lists_the_backends(capsys):
    assert main(["info"]) == 0
    printed = capsys.readouterr().out
    for name in ("reference", "native", "triton"):
        assert name in printed


@pytest.mark.parametrize(
    "argv, message",
    [
        (["train", "--data", "/nonexistent/file.txt"], "no such file"),
        (["train", "--data", "EMPTY"], "the file is empty"),
        (["train", "--data", "TEXT", "--context-length", "5000"], "fewer than context_length"),
        (["train", "--data", "TEXT", "--max-steps", "0"], "--max-steps must be a positive integer"),
        (["train", "--data", "TEXT", "--resume", "--out", "NOWHERE"], "no checkpoint at"),
        (["sample", "--ckpt", "NOWHERE"], "no checkpoint at"),
        (["train", "--data", "TEXT", "--d-model", "30"], "divisible by n_heads"),
    ],
)
def test_user_errors_are_one_line_and_exit_2(argv, message, tmp_path, text_file, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    replace = {"EMPTY": str(empty), "TEXT": text_file, "NOWHERE": str(tmp_path / "nowhere")}
    argv = [replace.get(a, a) for a in argv]
    assert main([*argv, "--no-progress"] if argv[0] == "train" else argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_resume_with_a_different_model_is_refused(tmp_path, text_file, capsys):
    out = str(tmp_path / "run")
    assert main(["train", "--data", text_file, "--out", out, "--max-steps", "1", "--sample-tokens", "0",
                 "--no-progress", *TINY_FLAGS]) == 0
    assert main(["train", "--data", text_file, "--out", out, "--resume", "--d-model", "64", "--no-progress"]) == 2
    assert "does not match: d_model=64 (checkpoint has 32)" in capsys.readouterr().err


def test_builtin_corpus_is_deterministic_and_capped():
    first, second = stdlib_corpus(200_000), stdlib_corpus(200_000)
    assert first == second and len(first) == 200_000
