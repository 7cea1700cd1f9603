"""The ``fastgpt`` command on tiny configurations: train, resume, sample, info, build, and user errors
(found before training starts). Faults that need a separate process: tests/test_reliability_cli.py."""

import json
import re
import sys

import pytest
from tiny_training import TEXT

from fastgpt import extension
from fastgpt.checkpoint import load_checkpoint
from fastgpt.cli import main
from fastgpt.nn import GPT

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


def test_info_lists_the_backends_and_describes_the_extension(capsys):
    assert main(["info"]) == 0
    printed = capsys.readouterr().out
    for name in ("reference", "native", "triton"):
        assert name in printed
    assert "\nextension:\n  origin: " in printed and "  cache: " in printed
    assert "auto picks (device class cpu-" in printed and "decode, GQA 32/8 heads" in printed


def test_info_json_says_what_auto_picks(capsys):
    from fastgpt import registry

    assert main(["info", "--json"]) == 0
    auto = json.loads(capsys.readouterr().out)["auto"]
    assert auto["device_class"].startswith("cpu-") and auto["picks"]
    for pick in auto["picks"]:
        assert set(pick["backend"]) == {"float32", "bfloat16"}
        assert set(pick["backend"].values()) <= set(registry.names())


def test_build_says_where_the_extension_is(capsys, monkeypatch):
    monkeypatch.setattr(extension, "build", lambda: ("install-time", "/somewhere/_C.so"))
    assert main(["build"]) == 0
    assert capsys.readouterr().out == "fastgpt._C (install-time build): /somewhere/_C.so\n"

    def fail():
        raise extension.BuildError("compiling fastgpt._C failed (full log: /x/build.log)")

    monkeypatch.setattr(extension, "build", fail)
    assert main(["build"]) == 2
    assert capsys.readouterr().err == (
        "fastgpt build: error: building fastgpt._C failed: compiling fastgpt._C failed (full log: /x/build.log)\n"
    )


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
        (["train", "--data", "TEXT", "--out", "FILE"], "--out FILE: is a file, expected a folder"),
        (["train", "--data", "TEXT", "--out", "FILE/run"], "--out FILE/run: part of the path is a file"),
        (["train", "--data", "TEXT", "--out", "/proc/fastgpt-run"], "--out /proc/fastgpt-run: cannot write there"),
        (["train", "--data", "TEXT", "--device", "meta"], "--device meta: fastgpt runs on cpu or cuda, not meta"),
        (["train", "--data", "TEXT", "--device", "mps"], "--device mps: fastgpt runs on cpu or cuda, not mps"),
        (["train", "--data", "TEXT", "--device", "gpu"], "--device gpu: expected one of cpu, cuda"),
        (["train", "--data", "TEXT", "--device", "cpu:1"], "--device cpu:1: there is one CPU device"),
        (["train", "--data", "TEXT", "--lr", "nan"], "--lr must be a finite number > 0, got nan"),
        (["train", "--data", "TEXT", "--lr", "inf"], "--lr must be a finite number > 0, got inf"),
        (["train", "--data", "TEXT", "--lr", "0"], "--lr must be a finite number > 0, got 0.0"),
        (["train", "--data", "TEXT", "--sample-tokens", "-5"], "--sample-tokens must be >= 0, got -5"),
        (["train", "--data", "TEXT", "--grad-accum", "0"], "--grad-accum must be a positive integer, got 0"),
        (["train", "--data", "TEXT", "--batch-size", "6", "--grad-accum", "4"],
         "--batch-size 6 must be a multiple of --grad-accum 4 × 1 rank(s) = 4"),
        (["train", "--data", "TEXT", "--dist-timeout", "0"], "--dist-timeout must be a finite number > 0, got 0.0"),
        (["train", "--data", "TEXT", "WORLD_SIZE=2"], "WORLD_SIZE is set but RANK is not: start fastgpt train with"),
        (["train", "--data", "TEXT", "WORLD_SIZE=2", "RANK=2", "LOCAL_RANK=0"],
         "rank 2: error: RANK=2, WORLD_SIZE=2: expected 0 <= RANK < WORLD_SIZE"),
        (["train", "--data", "TEXT", "FASTGPT_BACKEND=fast"], "FASTGPT_BACKEND=fast: expected one of auto, "),
        (["train", "--data", "TEXT", "FASTGPT_CPU_CACHE_MB=1.5"], "FASTGPT_CPU_CACHE_MB=1.5: expected a whole number"),
        (["sample", "--ckpt", "NOWHERE", "--temperature", "nan"], "--temperature must be a finite number >= 0, got"),
        (["sample", "--ckpt", "NOWHERE", "--temperature", "-1"], "--temperature must be a finite number >= 0"),
        (["sample", "--ckpt", "NOWHERE", "--max-new-tokens", "-1"], "--max-new-tokens must be >= 0, got -1"),
        (["sample", "--ckpt", "NOWHERE", "--top-k", "0"], "--top-k must be a positive integer, got 0"),
        (["sample", "--ckpt", "NOWHERE", "--device", "meta"], "--device meta: fastgpt runs on cpu or cuda"),
        (["sample", "--ckpt", "NOWHERE", "FASTGPT_CPU_CACHE_MB=-1"], "FASTGPT_CPU_CACHE_MB=-1: expected a whole"),
    ],
)
def test_user_errors_are_one_line_and_exit_2(argv, message, tmp_path, text_file, capsys, monkeypatch):
    if "/proc/" in message and not sys.platform.startswith("linux"):
        pytest.skip("/proc is a folder nothing can be created in on Linux only")
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    (tmp_path / "file").write_bytes(b"")
    replace = {"EMPTY": str(empty), "TEXT": text_file, "NOWHERE": str(tmp_path / "nowhere")}
    argv = list(argv)
    for setting in [a for a in argv if "=" in a]:  # environment variables
        monkeypatch.setenv(*setting.split("=", 1))
        argv.remove(setting)
    argv = [replace.get(a, a.replace("FILE", str(tmp_path / "file"))) for a in argv]
    if argv[0] == "train":
        argv += ["--no-progress", "--out", str(tmp_path / "run")] if "--out" not in argv else ["--no-progress"]
    assert main(argv) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert message.replace("FILE", str(tmp_path / "file")) in err and len(err.splitlines()) == 1
    assert captured.out == ""  # refused before any data is read or step is spent


def test_ctrl_c_while_sampling_is_a_message_and_exit_130(tmp_path, text_file, capsys, monkeypatch):
    out = str(tmp_path / "run")
    assert main(["train", "--data", text_file, "--out", out, "--max-steps", "1", "--sample-tokens", "0",
                 "--no-progress", *TINY_FLAGS]) == 0

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(GPT, "generate", interrupted)
    capsys.readouterr()
    assert main(["sample", "--ckpt", out, "--backend", "reference"]) == 130
    assert capsys.readouterr().err == "fastgpt sample: interrupted\n"


def test_divergence_is_a_message_naming_the_step_and_exit_2(tmp_path, text_file, capsys):
    out = str(tmp_path / "run")
    assert main(["train", "--data", text_file, "--out", out, "--max-steps", "100", "--lr", "1e6",
                 "--no-progress", *TINY_FLAGS]) == 2
    captured = capsys.readouterr()
    assert re.fullmatch(r"fastgpt train: error: training diverged at step \d+: (loss|gradient norm) (nan|inf) at "
                        r"learning rate \S+; no checkpoint was written \(try a lower learning rate\)\n", captured.err)
    assert "checkpoint:" not in captured.out and "sample:" not in captured.out
    assert main(["train", "--data", text_file, "--out", out, "--max-steps", "30", "--lr", "1e6", "--skip-nonfinite",
                 "--sample-tokens", "0", "--no-progress", *TINY_FLAGS]) == 0
    assert re.search(r"skipped \d+ step\(s\) whose loss or gradients were not finite", capsys.readouterr().out)


def test_resume_with_a_different_model_is_refused(tmp_path, text_file, capsys):
    out = str(tmp_path / "run")
    assert main(["train", "--data", text_file, "--out", out, "--max-steps", "1", "--sample-tokens", "0",
                 "--no-progress", *TINY_FLAGS]) == 0
    assert main(["train", "--data", text_file, "--out", out, "--resume", "--d-model", "64", "--no-progress"]) == 2
    assert "does not match: d_model=64 (checkpoint has 32)" in capsys.readouterr().err
