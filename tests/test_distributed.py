"""Training on two ranks with DistributedDataParallel and with FSDP2 on the CPU (gloo): the same losses
as one process with the same global batch and seed, gradient accumulation, resuming across world sizes
and checkpoint kinds, sharded checkpoints that are never loaded half-written, bf16 mixed precision, and
failures that end the job with the rank and the reason. Ranks are started by ``torch.multiprocessing``
(the Trainer) and by ``torchrun`` (the command); docs/distributed.md."""

import json
import math
import os
import shutil
import socket
import subprocess
import sys
import time

import pytest
import torch
import torch.multiprocessing
from tiny_training import TEXT

from fastgpt import distributed
from fastgpt.checkpoint import (
    MANIFEST,
    CheckpointError,
    checkpoint_path,
    load_checkpoint,
    load_model,
    remove_interrupted_saves,
    save_sharded_checkpoint,
)
from fastgpt.cli import main
from fastgpt.data import ByteDataset
from fastgpt.nn import GPTConfig
from fastgpt.train import Trainer, TrainConfig

STEPS, SAVED_AT = 20, 10
TOLERANCE = 1e-5  # per-step losses: DDP sums the ranks' gradients in another order than one process does
FSDP_STEPS, FSDP_SAVED_AT = 20, 10
FSDP_TOLERANCE = 1e-4  # FSDP reduce-scatters shards and takes the norm of DTensor shards: more roundings
LAUNCH = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


def trainer(grad_accum=1, checkpoint=None, dist=distributed.SINGLE, steps=STEPS, **options):
    """A tiny run without dropout (whose masks depend on the rows a process holds), global batch 8;
    ``options``: more TrainConfig fields (fsdp, dtype)."""
    config = GPTConfig(context_length=16, n_layers=2, n_heads=2, d_model=32)
    cfg = TrainConfig(max_steps=steps, batch_size=8, grad_accum=grad_accum, eval_interval=100, eval_batches=2,
                      warmup_steps=2, seed=3, **options)
    return Trainer(config, cfg, ByteDataset(TEXT, 16), "cpu", checkpoint, backend="reference", dist=dist)


def run(t, until, save_at=None, path=None):
    losses = []
    while t.step < until:
        losses.append(t.train_step())
        if t.step == save_at:
            t.save(path)
    return losses


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_rank_worker(rank, folder, port):
    """One rank: DDP from scratch (saving at step SAVED_AT), with 2 micro-batches, and resumed from a
    single-process checkpoint; rank 0 writes the losses (the same on every rank: they are averaged)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    context, _ = distributed.init("cpu", timeout_s=60)
    try:
        plain = trainer(dist=context)
        results = {"ddp": run(plain, STEPS, SAVED_AT, os.path.join(folder, "ddp.safetensors"))}
        results["held_out"] = plain.held_out_loss()
        results["ddp_grad_accum_2"] = run(trainer(grad_accum=2, dist=context), STEPS)
        resumed = trainer(checkpoint=load_checkpoint(os.path.join(folder, "single.safetensors")), dist=context)
        results["resumed_from_single"] = run(resumed, STEPS)
        results["all_reduces"] = {k: count_gradient_exchanges(trainer(grad_accum=k, dist=context), 3) for k in (1, 2)}
        if rank == 0:
            with open(os.path.join(folder, "results.json"), "w") as f:
                json.dump(results, f)
        distributed.shutdown(context, drain=True)
    finally:
        distributed.shutdown(context)


def count_gradient_exchanges(t, steps):
    """How many gradient all-reduces DDP starts over ``steps`` optimizer steps (a comm hook counts them)."""
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    calls = 0

    def counting_hook(process_group, bucket):
        nonlocal calls
        calls += 1
        return allreduce_hook(process_group, bucket)

    t.train_model.register_comm_hook(None, counting_hook)
    for _ in range(steps):
        t.train_step()
    return calls


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """The single-process losses (saving at step SAVED_AT), and what two ranks gave."""
    folder = str(tmp_path_factory.mktemp("ddp"))
    single = trainer()
    reference = run(single, STEPS, SAVED_AT, os.path.join(folder, "single.safetensors"))
    torch.multiprocessing.spawn(two_rank_worker, args=(folder, free_port()), nprocs=2)
    with open(os.path.join(folder, "results.json")) as f:
        return folder, reference, single.held_out_loss(), json.load(f)


def assert_same_losses(got, expected, tolerance=TOLERANCE):
    assert len(got) == len(expected)
    worst = max(abs(a - b) for a, b in zip(got, expected))
    assert worst <= tolerance, f"largest per-step difference {worst:.3g}: {got} vs {expected}"


def test_two_ranks_give_the_losses_of_one_process_with_the_same_global_batch(two_ranks):
    _, reference, held_out, results = two_ranks
    assert_same_losses(results["ddp"], reference)
    assert abs(results["held_out"] - held_out) <= TOLERANCE


def test_two_ranks_with_two_micro_batches_give_the_same_losses(two_ranks):
    _, reference, _, results = two_ranks
    assert_same_losses(results["ddp_grad_accum_2"], reference)


def test_grad_accum_exchanges_gradients_once_per_step(two_ranks):
    """--grad-accum 2 under DDP all-reduces after the last micro-batch only (no_sync on the first):
    as many exchanges per optimizer step as without accumulation, not twice as many."""
    exchanges = two_ranks[3]["all_reduces"]
    assert exchanges["1"] == exchanges["2"] > 0, exchanges


def test_a_single_process_checkpoint_resumes_on_two_ranks(two_ranks):
    _, reference, _, results = two_ranks
    assert_same_losses(results["resumed_from_single"], reference[SAVED_AT:])


def test_a_two_rank_checkpoint_resumes_in_one_process(two_ranks):
    folder, reference, _, _ = two_ranks
    ckpt = load_checkpoint(os.path.join(folder, "ddp.safetensors"))
    assert ckpt["progress"]["world_size"] == 2 and ckpt["progress"]["step"] == SAVED_AT
    assert_same_losses(run(trainer(checkpoint=ckpt), STEPS), reference[SAVED_AT:])


def test_grad_accum_2_equals_one_batch_of_twice_the_micro_batch():
    assert_same_losses(run(trainer(grad_accum=2), 6), run(trainer(grad_accum=1), 6))


def test_a_batch_that_does_not_split_evenly_is_refused():
    with pytest.raises(ValueError, match=r"batch_size 8 must be a multiple of grad_accum 3 × 1 rank\(s\) = 3"):
        trainer(grad_accum=3)


# ----------------------------------------------------------------------------- FSDP2 and sharded checkpoints


def fsdp_worker(rank, folder, port):
    """One rank of FSDP2 runs: from scratch (saving a sharded checkpoint at FSDP_SAVED_AT), with 2
    micro-batches, and resumed from the single process's sharded checkpoint and from its file; and a
    DDP run resumed from the FSDP checkpoint."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    context, _ = distributed.init("cpu", timeout_s=60)
    try:
        results = {}
        for name, source in (("from_single_sharded", "single.dcp"), ("from_single_file", "single.safetensors")):
            resumed = trainer(checkpoint=load_checkpoint(os.path.join(folder, source)), dist=context,
                              steps=FSDP_STEPS, fsdp=True)
            results[name] = run(resumed, FSDP_STEPS)
        sharded = trainer(dist=context, steps=FSDP_STEPS, fsdp=True)
        results["fsdp"] = run(sharded, FSDP_STEPS, FSDP_SAVED_AT, os.path.join(folder, "fsdp", "ckpt.dcp"))
        # each rank holds half of every weight and of its optimizer state
        weights = list(sharded.model.parameters())
        held = sum(p.to_local().numel() for p in weights)
        moments = sum(sharded.optimizer.state[p]["exp_avg"].to_local().numel() for p in weights)
        assert held == moments and abs(held - sum(p.numel() for p in weights) / 2) <= len(weights), held
        results["fsdp_grad_accum_2"] = run(trainer(grad_accum=2, dist=context, steps=FSDP_STEPS, fsdp=True), 6)
        ddp = trainer(checkpoint=load_checkpoint(os.path.join(folder, "fsdp")), dist=context, steps=FSDP_STEPS)
        results["ddp_from_fsdp"] = run(ddp, FSDP_STEPS)
        if rank == 0:
            with open(os.path.join(folder, "fsdp_results.json"), "w") as f:
                json.dump(results, f)
        distributed.shutdown(context, drain=True)
    finally:
        distributed.shutdown(context)


@pytest.fixture(scope="module")
def fsdp_ranks(tmp_path_factory):
    """The single-process losses of a FSDP_STEPS run (saving both checkpoint kinds at FSDP_SAVED_AT),
    and what two FSDP ranks gave."""
    folder = str(tmp_path_factory.mktemp("fsdp"))
    single = trainer(steps=FSDP_STEPS)
    reference = run(single, FSDP_SAVED_AT, FSDP_SAVED_AT, os.path.join(folder, "single.safetensors"))
    # a sharded checkpoint written by one process (no process group: one rank of one)
    save_sharded_checkpoint(os.path.join(folder, "single.dcp"), single.model, single.optimizer,
                            {"step": single.step, "world_size": 1},
                            {"batches": single.batch_generator.get_state(), "torch": torch.get_rng_state()},
                            distributed.SINGLE)
    reference += run(single, FSDP_STEPS)
    torch.multiprocessing.spawn(fsdp_worker, args=(folder, free_port()), nprocs=2)
    with open(os.path.join(folder, "fsdp_results.json")) as f:
        return folder, reference, json.load(f)


def test_fsdp_on_two_ranks_gives_the_losses_of_one_process_with_the_same_global_batch(fsdp_ranks):
    _, reference, results = fsdp_ranks
    assert_same_losses(results["fsdp"], reference, FSDP_TOLERANCE)


def test_fsdp_with_two_micro_batches_gives_the_losses_of_one_batch(fsdp_ranks):
    _, reference, results = fsdp_ranks
    assert_same_losses(results["fsdp_grad_accum_2"], reference[:6], FSDP_TOLERANCE)


def test_single_process_checkpoints_of_both_kinds_resume_on_two_fsdp_ranks(fsdp_ranks):
    _, reference, results = fsdp_ranks
    assert_same_losses(results["from_single_sharded"], reference[FSDP_SAVED_AT:], FSDP_TOLERANCE)
    assert_same_losses(results["from_single_file"], reference[FSDP_SAVED_AT:], FSDP_TOLERANCE)


def test_an_fsdp_checkpoint_resumes_under_ddp(fsdp_ranks):
    _, reference, results = fsdp_ranks
    assert_same_losses(results["ddp_from_fsdp"], reference[FSDP_SAVED_AT:], FSDP_TOLERANCE)


def test_a_two_rank_sharded_checkpoint_resumes_and_samples_in_one_process(fsdp_ranks, capsys):
    folder, reference, _ = fsdp_ranks
    path = os.path.join(folder, "fsdp", "ckpt.dcp")
    assert checkpoint_path(os.path.dirname(path)) == path
    ckpt = load_checkpoint(path)
    assert ckpt["progress"]["world_size"] == 2 and ckpt["progress"]["step"] == FSDP_SAVED_AT
    assert_same_losses(run(trainer(checkpoint=ckpt, steps=FSDP_STEPS), FSDP_STEPS), reference[FSDP_SAVED_AT:],
                       FSDP_TOLERANCE)
    model, _ = load_model(path, backend="reference")
    assert all(p.dtype == torch.float32 and type(p) is torch.nn.Parameter for p in model.parameters())
    assert main(["sample", "--ckpt", os.path.dirname(path), "--max-new-tokens", "4", "--backend", "reference"]) == 0
    assert capsys.readouterr().out.strip()


def test_a_half_written_sharded_checkpoint_is_never_loaded(fsdp_ranks, tmp_path):
    folder, _, _ = fsdp_ranks
    complete = os.path.join(folder, "fsdp", "ckpt.dcp")
    out = tmp_path / "out"
    # a save killed before its rename: only the temporary folder, which is not a checkpoint, and goes
    shutil.copytree(complete, out / ".ckpt-0123456789abcdef.tmp")
    os.unlink(out / ".ckpt-0123456789abcdef.tmp" / MANIFEST)
    assert not os.path.exists(checkpoint_path(str(out)))
    with pytest.raises(CheckpointError, match="no checkpoint at"):
        load_checkpoint(str(out))
    assert remove_interrupted_saves(str(out)) == [str(out / ".ckpt-0123456789abcdef.tmp")]
    # a folder without its manifest, even under the checkpoint's name, is refused
    shutil.copytree(complete, out / "ckpt.dcp")
    os.unlink(out / "ckpt.dcp" / MANIFEST)
    with pytest.raises(CheckpointError, match="not a complete checkpoint"):
        load_checkpoint(str(out))
    # a flipped byte in a shard file is named
    shutil.rmtree(out / "ckpt.dcp")
    shutil.copytree(complete, out / "ckpt.dcp")
    shard = next(p for p in (out / "ckpt.dcp").iterdir() if p.suffix == ".distcp")
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 1
    shard.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=rf"is damaged: {shard.name} no longer match"):
        load_checkpoint(str(out))
    # a save killed between moving the old checkpoint aside and renaming the new one in: the old one counts
    shutil.rmtree(out / "ckpt.dcp")
    shutil.copytree(complete, out / ".ckpt.dcp.previous")
    assert load_checkpoint(str(out))["progress"]["step"] == FSDP_SAVED_AT
    remove_interrupted_saves(str(out))
    assert sorted(os.listdir(out)) == ["ckpt.dcp"]


def test_bf16_mixed_precision_keeps_fp32_weights_and_follows_the_fp32_losses():
    steps = 6
    fp32, bf16 = trainer(steps=steps), trainer(steps=steps, dtype="bf16")
    expected, got = run(fp32, steps), run(bf16, steps)
    assert all(math.isfinite(loss) for loss in got)
    # bf16 rounds the matmuls' operands to 8 significant bits (relative 4e-3), the fp32 accumulation and
    # fp32 weights keep the loss (about 5.5 here) within 4e-4 of fp32's over these steps (seen 3.7e-4)
    assert max(abs(a - b) for a, b in zip(got, expected)) < 5e-3, (got, expected)
    assert all(p.dtype == torch.float32 for p in bf16.model.parameters())
    assert all(v.dtype == torch.float32 for state in bf16.optimizer.state.values() for k, v in state.items()
               if k != "step")


# ----------------------------------------------------------------------------- the command under torchrun

TINY = ["--preset", "tiny", "--context-length", "16", "--d-model", "32", "--batch-size", "8", "--backend",
        "reference", "--no-progress"]


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_bytes(TEXT)
    return str(path)


def torchrun(*argv, timeout=120, env=None):
    """``torchrun --nproc_per_node 2 ARGV`` on the CPU; returns (status, stdout, stderr, seconds)."""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONUNBUFFERED": "1", **(env or {})}
    started = time.monotonic()
    done = subprocess.run([*LAUNCH, *argv], capture_output=True, text=True, timeout=timeout, env=env)
    return done.returncode, done.stdout, done.stderr, time.monotonic() - started


def test_torchrun_trains_with_rank_0_speaking_and_one_process_resumes_and_samples(tmp_path, corpus, capsys):
    out = str(tmp_path / "run")
    code, printed, err, _ = torchrun("-m", "fastgpt", "train", "--data", corpus, "--out", out, "--max-steps", "4",
                                     "--eval-interval", "2", "--grad-accum", "2", "--sample-tokens", "5", *TINY)
    assert code == 0, err
    for line in ("step 0: held-out loss", "step 2: held-out loss", "batch: 8 sequences per step = 2 rank(s) (gloo), "
                 "2 micro-batch(es) of 2 per rank", "checkpoint: ", "sample:"):
        assert printed.count(line) == 1, printed  # printed by rank 0 alone
    assert load_checkpoint(out)["progress"]["world_size"] == 2
    assert main(["train", "--data", corpus, "--out", out, "--resume", "--max-steps", "6", "--sample-tokens", "0",
                 "--no-progress", "--backend", "reference"]) == 0
    assert "resuming from step 4 of 6 (checkpoint written by 2 rank(s))" in capsys.readouterr().out
    progress = load_checkpoint(out)["progress"]
    assert progress["step"] == 6 and progress["world_size"] == 1
    assert main(["sample", "--ckpt", out, "--max-new-tokens", "4", "--backend", "reference"]) == 0


def test_torchrun_fsdp_bf16_writes_a_sharded_checkpoint_that_samples_and_resumes_in_one_process(tmp_path, corpus,
                                                                                                   capsys):
    out = str(tmp_path / "run")
    code, printed, err, _ = torchrun("-m", "fastgpt", "train", "--data", corpus, "--out", out, "--max-steps", "4",
                                     "--eval-interval", "2", "--fsdp", "--dtype", "bf16", "--sample-tokens", "5",
                                     *TINY)
    assert code == 0, err
    for line in ("(gloo, FSDP)", "bf16 autocast", "step 2: held-out loss", "checkpoint: ", "sample:"):
        assert printed.count(line) == 1, printed
    assert "view tensor" not in err, err
    assert sorted(os.listdir(out)) == [".fastgpt-run.lock", "ckpt.dcp"]  # no temporary folder left
    assert load_checkpoint(out)["progress"]["world_size"] == 2
    assert main(["sample", "--ckpt", out, "--max-new-tokens", "4", "--backend", "reference"]) == 0
    assert main(["train", "--data", corpus, "--out", out, "--resume", "--max-steps", "6", "--sample-tokens", "0",
                 "--no-progress", "--backend", "reference"]) == 0
    assert "resuming from step 4 of 6 (checkpoint written by 2 rank(s))" in capsys.readouterr().out
    assert sorted(os.listdir(out)) == [".fastgpt-run.lock", "ckpt.safetensors"]  # the file replaces the folder
    assert load_checkpoint(out)["progress"]["step"] == 6


def test_fsdp_without_torchrun_is_refused(capsys):
    assert main(["train", "--fsdp", "--max-steps", "1"]) == 2
    assert "--fsdp shards the model over the ranks of a torchrun job" in capsys.readouterr().err


FAULTY = """
import os, sys, time
from fastgpt import train

train_step = train.Trainer.train_step

def faulty_step(self):
    if self.dist.rank == 1 and self.step == 2:
        if os.environ["FAULT"] == "raise":
            raise RuntimeError("injected failure")
        time.sleep(float(os.environ["FAULT"]))  # hangs, as far as the other rank can tell
    return train_step(self)

train.Trainer.train_step = faulty_step
from fastgpt.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.fixture
def faulty(tmp_path):
    path = tmp_path / "faulty.py"
    path.write_text(FAULTY)
    return str(path)


def test_a_rank_that_raises_ends_the_job_naming_the_rank_and_the_reason(tmp_path, corpus, faulty):
    code, _, err, seconds = torchrun(faulty, "train", "--data", corpus, "--out", str(tmp_path / "run"),
                                     "--max-steps", "50", "--sample-tokens", "0", *TINY, env={"FAULT": "raise"})
    assert code != 0 and seconds < 60, err
    assert "fastgpt: rank 1: failed: RuntimeError: injected failure" in err, err


def test_a_rank_that_stops_answering_ends_the_job_after_the_timeout(tmp_path, corpus, faulty):
    code, _, err, seconds = torchrun(faulty, "train", "--data", corpus, "--out", str(tmp_path / "run"),
                                     "--max-steps", "50", "--sample-tokens", "0", "--dist-timeout", "3", *TINY,
                                     env={"FAULT": "8"})
    assert code != 0 and seconds < 60, err
    assert "fastgpt train: rank 0: error: another rank did not answer within the collective timeout (3 s" in err, err
