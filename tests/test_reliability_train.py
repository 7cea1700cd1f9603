"""Faults during ``fastgpt train``, in a separate process: SIGINT and SIGTERM at chosen moments (while
training, and again while the checkpoint is written), ``kill -9`` in the middle of a save, and two
runs on one ``--out``. The child is ``fastgpt train`` with two seams patched in (DRIVER below): it
says when training runs and when a checkpoint file is written but not yet renamed into place, and
it can hold the save at that moment for a while so a signal lands inside it."""

import os
import signal
import subprocess
import sys

import pytest
from tiny_training import TEXT

from fastgpt.checkpoint import load_checkpoint
from fastgpt.cli import main

DRIVER = """
import os, sys, time
from fastgpt import checkpoint, train

save_file, train_step = checkpoint.save_file, train.Trainer.train_step

def held_save(tensors, filename, metadata=None):
    save_file(tensors, filename, metadata=metadata)  # the temporary file is complete, not yet renamed
    print("writing", file=sys.stderr, flush=True)
    time.sleep(float(os.environ.get("HOLD_SAVE_S", "0")))

def announced_step(self):
    loss = train_step(self)
    if not hasattr(self, "announced"):
        self.announced = print("training", file=sys.stderr, flush=True)
    return loss

checkpoint.save_file, train.Trainer.train_step = held_save, announced_step
from fastgpt.cli import main
sys.exit(main(sys.argv[1:]))
"""

TINY = ["--preset", "tiny", "--context-length", "16", "--d-model", "32", "--batch-size", "4", "--no-progress",
        "--backend", "reference", "--sample-tokens", "0"]


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_bytes(TEXT)
    return str(path)


def start_training(corpus, out, *argv, hold_save_s=0.0):
    """``fastgpt train`` in a child process that trains until it is stopped (the only save is the last one)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HOLD_SAVE_S": str(hold_save_s), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-c", DRIVER, "train", "--data", corpus, "--out", out, "--max-steps", "1000000",
         "--eval-interval", "1000000", *TINY, *argv],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )


def wait_for(process, marker):
    """Read the child's stderr up to a line equal to ``marker``; returns the lines read."""
    lines = []
    for line in process.stderr:
        lines.append(line.decode(errors="replace"))
        if line.rstrip(b"\n") == marker.encode():
            return lines
    process.wait()
    raise AssertionError(f"the child ended (status {process.returncode}) before saying {marker!r}: {''.join(lines)}")


def finish(process, timeout=120):
    out, err = process.communicate(timeout=timeout)
    err = err.decode(errors="replace")
    assert "Traceback" not in err, err
    return process.returncode, out.decode(), err


def temporary_files(folder):
    return sorted(name for name in os.listdir(folder) if name.endswith(".tmp"))


@pytest.mark.parametrize("first, second", [(signal.SIGINT, signal.SIGINT), (signal.SIGTERM, signal.SIGINT)],
                         ids=["int-int", "term-int"])
def test_a_signal_saves_and_a_second_one_does_not_abort_the_save(tmp_path, corpus, first, second):
    out = str(tmp_path / "run")
    child = start_training(corpus, out, hold_save_s=2.0)
    wait_for(child, "training")
    child.send_signal(first)
    said = wait_for(child, "writing")  # the checkpoint is written to its temporary file, not yet renamed
    child.send_signal(second)
    child.send_signal(signal.SIGTERM)
    code, printed, err = finish(child)
    err = "".join(said) + err
    assert code == 128 + first, err
    name = signal.Signals(first).name
    assert f"{name}: stopping after this step, then saving a checkpoint" in err
    assert "already stopping: the checkpoint is being saved" in err
    step = int(printed.split("interrupted at step ")[1].split(";")[0])
    assert step >= 1 and load_checkpoint(out)["progress"]["step"] == step
    assert temporary_files(out) == []


def test_kill_9_during_a_save_keeps_the_old_checkpoint_and_the_next_run_cleans_up(tmp_path, corpus, capsys):
    out = str(tmp_path / "run")
    assert main(["train", "--data", corpus, "--out", out, "--max-steps", "2", *TINY]) == 0
    child = start_training(corpus, out, "--resume", hold_save_s=60)
    wait_for(child, "training")
    child.send_signal(signal.SIGINT)
    wait_for(child, "writing")
    child.kill()
    child.communicate()
    assert len(temporary_files(out)) == 1  # the killed save's complete but unrenamed file
    assert load_checkpoint(out)["progress"]["step"] == 2  # the old checkpoint, intact

    capsys.readouterr()
    assert main(["train", "--data", corpus, "--out", out, "--max-steps", "3", "--resume", *TINY]) == 0
    assert "removed 1 temporary file(s) left by an interrupted save" in capsys.readouterr().out
    assert temporary_files(out) == [] and load_checkpoint(out)["progress"]["step"] == 3


def test_a_second_run_on_the_same_out_fails_at_once_naming_the_first(tmp_path, corpus, capsys):
    out = str(tmp_path / "run")
    first = start_training(corpus, out)
    wait_for(first, "training")
    second = subprocess.run([sys.executable, "-m", "fastgpt", "train", "--data", corpus, "--out", out, *TINY],
                            capture_output=True, timeout=120)
    assert second.returncode == 2 and second.stdout == b""
    assert second.stderr.decode() == (
        f"fastgpt train: error: --out {out} is in use by another fastgpt run (pid {first.pid}); "
        "wait for it to end or choose another --out\n"
    )
    first.send_signal(signal.SIGTERM)
    code, _, err = finish(first)
    assert code == 128 + signal.SIGTERM, err
    # the lock ended with its process: the folder is free again
    assert main(["train", "--data", corpus, "--out", out, "--max-steps", "2", *TINY]) == 0
