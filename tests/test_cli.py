"""The ``fastgpt`` command on tiny configurations: train, resume, sample, info, and user errors."""

import pytest
from tiny_training import TEXT

from fastgpt.checkpoint import load_checkpoint
from fastgpt.cli import main

TINY_FLAGS = ["--preset", "tiny", "--context-length", "16", "--d-model", "32", "--batch-size", "4", "--backend", "reference"]


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_bytes(TEXT)
    return str(path)


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
