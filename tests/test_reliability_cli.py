"""The ``fastgpt`` command as a user runs it, in its own process: real argv bytes, real environment
variables, Ctrl-C. No traceback reaches the user; refusals exit 2, Ctrl-C exits 130."""

import os
import signal
import subprocess
import sys

import pytest
import torch
from tiny_training import TEXT

TINY = ["--preset", "tiny", "--context-length", "16", "--d-model", "32", "--batch-size", "4", "--no-progress"]


def fastgpt(*argv, env=None, **kwargs):
    """``python -m fastgpt ARGV`` started (not waited for), unbuffered, with ``env`` added to the environment."""
    environment = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    environment = {k: v for k, v in environment.items() if v is not None}
    return subprocess.Popen([sys.executable, "-m", "fastgpt", *argv], env=environment,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kwargs)


def finish(process, timeout=120):
    out, err = process.communicate(timeout=timeout)
    assert b"Traceback" not in err, err.decode(errors="replace")
    return process.returncode, out, err.decode(errors="replace")


def wait_for_line(stream, starting_with):
    for line in stream:
        if line.startswith(starting_with):
            return line
    raise AssertionError(f"the process ended without printing a line starting with {starting_with!r}")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cli")
    (folder / "corpus.txt").write_bytes(TEXT)
    code, _, err = finish(fastgpt("train", "--data", str(folder / "corpus.txt"), "--out", str(folder / "run"),
                                  "--max-steps", "1", "--sample-tokens", "0", "--backend", "reference", *TINY))
    assert code == 0, err
    return folder


def test_a_prompt_that_is_not_utf8_is_sampled_from_its_bytes(checkpoint):
    prompt = os.fsdecode(b"de\xff\xfe")  # what Python makes of argv bytes that are not UTF-8
    code, out, err = finish(fastgpt("sample", "--ckpt", str(checkpoint / "run"), "--prompt", prompt,
                                    "--max-new-tokens", "3", "--seed", "1", "--backend", "reference"))
    assert code == 0, err
    assert out.startswith(b"de\xef\xbf\xbd\xef\xbf\xbd")  # the two bytes printed as U+FFFD
    assert len(out.decode().rstrip("\n")) == 4 + 3


@pytest.mark.skipif(torch.cuda.is_available(), reason="Triton runs on a CUDA machine")
@pytest.mark.parametrize("how", ["--backend", "FASTGPT_BACKEND"])
@pytest.mark.parametrize("command", ["train", "sample"])
def test_triton_without_a_gpu_is_refused_before_anything_runs(checkpoint, command, how):
    argv = {"train": ["train", "--data", str(checkpoint / "corpus.txt"), "--out", str(checkpoint / "other"), *TINY],
            "sample": ["sample", "--ckpt", str(checkpoint / "run")]}[command]
    env = {"TRITON_INTERPRET": None}  # the tests' own setting would make the CPU run Triton's interpreter
    if how == "--backend":
        argv += ["--backend", "triton"]
    else:
        env["FASTGPT_BACKEND"] = "triton"
    code, out, err = finish(fastgpt(*argv, env=env))
    named = "--backend triton" if how == "--backend" else "FASTGPT_BACKEND=triton"
    assert code == 2 and err.startswith(f"fastgpt {command}: error: {named}: cannot run this model on cpu: no CUDA")
    assert out == b"" and len(err.splitlines()) == 1


def test_ctrl_c_during_the_final_sample_exits_130_with_a_message(checkpoint):
    process = fastgpt("train", "--data", str(checkpoint / "corpus.txt"), "--out", str(checkpoint / "sampling"),
                      "--max-steps", "1", "--sample-tokens", "1000000", "--backend", "reference", *TINY)
    wait_for_line(process.stdout, b"checkpoint: ")
    process.send_signal(signal.SIGINT)
    code, _, err = finish(process)
    assert code == 130 and err == "interrupted while sampling; the checkpoint is saved\n"

