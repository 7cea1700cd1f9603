"""Training: AdamW with warm-up and cosine decay, held-out evaluation, atomic checkpoints, resume;
in one process or, under torchrun, on several with DistributedDataParallel or, with ``fsdp``, FSDP2
(``fastgpt.distributed``); in fp32 or in bf16 mixed precision (``dtype``: autocast, fp32 weights).

A step reads one global batch of ``batch_size`` sequences, in ``grad_accum`` micro-batches each
shared out among the ranks, so the same seed gives the same batches and the same schedule whatever
the number of ranks and micro-batches; only the rounding of the sums differs.

Faults: a step whose loss or gradients are not finite stops the run (``TrainingDiverged``) before
it changes the weights, or is skipped and counted (``skip_nonfinite``); SIGINT and SIGTERM stop the
run after the step under way and save it (``Interrupted``), and further signals cannot abort that save.
"""

import contextlib
import inspect
import math
import os
import signal
import threading
import time
from dataclasses import dataclass

import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from fastgpt.checkpoint import (
    CheckpointError,
    load_sharded_state,
    restore_model,
    save_checkpoint,
    save_sharded_checkpoint,
)
from fastgpt.distributed import SINGLE, shard
from fastgpt.nn import GPT, GPTConfig

# model sizes by name; "small" is the default: trains in a few minutes on 2 CPU cores
PRESETS = {
    "tiny": dict(context_length=64, n_layers=2, n_heads=2, d_model=64),
    "small": dict(context_length=128, n_layers=4, n_heads=4, d_model=128),
    "medium": dict(context_length=256, n_layers=6, n_heads=8, d_model=256),
}


@dataclass
class TrainConfig:
    max_steps: int = 1000
    batch_size: int = 32  # sequences per optimizer step, over all ranks and micro-batches together
    grad_accum: int = 1  # micro-batches per optimizer step (their gradients are summed before the step)
    learning_rate: float = 2e-3
    min_learning_rate: float = 2e-4  # the cosine schedule ends here
    warmup_steps: int = 50
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    eval_interval: int = 250  # steps between held-out evaluations (and checkpoints)
    eval_batches: int = 8
    seed: int = 1337
    skip_nonfinite: bool = False  # skip (and count) steps with a NaN/inf loss or gradient instead of stopping
    fsdp: bool = False  # distributed: shard weights, gradients and optimizer state with FSDP2 instead of DDP
    dtype: str = "fp32"  # "bf16": matmuls under autocast; weights, optimizer state and the loss stay fp32


DTYPES = {"fp32": None, "bf16": torch.bfloat16}  # --dtype: what autocast computes in (None: no autocast)


class TrainingDiverged(RuntimeError):
    """The loss or the gradients of a step are not finite; the weights are those before that step."""


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM stopped the run after a whole step, and its checkpoint was saved."""

    def __init__(self, signum):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class _StopSignals:
    """SIGINT and SIGTERM during ``Trainer.run``: the first asks the run to stop after the step under
    way (a step cut in half would leave weights and optimizer state that do not belong together);
    later ones only say that it is stopping, so they cannot abort the checkpoint being written.
    Python runs signal handlers in the main thread only, so elsewhere nothing is installed."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, dist=SINGLE, all_ranks_save=False):
        self.signum = None
        self._previous = {}
        # distributed, a signal reaches one rank or all of them (Ctrl-C, torchrun passing one on): all stop
        self._rank = f"rank {dist.rank}: " if dist.distributed else ""
        self._saves = dist.is_main or all_ranks_save or not dist.distributed

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc):
        for s, handler in self._previous.items():
            signal.signal(s, signal.SIG_DFL if handler is None else handler)  # None: set outside Python

    def _handle(self, signum, frame):
        if self.signum is None:
            self.signum = signum
            message = "stopping after this step, then saving a checkpoint"
            if not self._saves:
                message = "stopping after this step with the other ranks; rank 0 saves the checkpoint"
        else:
            message = "already stopping: the checkpoint is being saved (kill -9 would keep the previous one)"
        # print() may be mid-write here
        os.write(2, f"\n{self._rank}{signal.Signals(signum).name}: {message}\n".encode())


# DDP's flag that turns off the buffer broadcast before every forward (renamed in torch 2.13)
_NO_BUFFER_SYNC = (
    {"forward_sync_buffers": False}
    if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
    else {"broadcast_buffers": False}
)


def _silent(*args, **kwargs):
    pass


def learning_rate(step, cfg):
    """Linear warm-up, then cosine decay to ``min_learning_rate`` at ``max_steps``."""
    if step < cfg.warmup_steps:
        return cfg.learning_rate * (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps))
    return cfg.min_learning_rate + 0.5 * (1 + math.cos(math.pi * progress)) * (cfg.learning_rate - cfg.min_learning_rate)


def autocast(cfg, device):
    """The mixed-precision context of ``cfg.dtype`` on ``device`` (a no-op for fp32). Autocast runs the
    matmuls (linear layers) in bf16 and hands fastgpt's attention bf16 q, k, v; add+LayerNorm gets a
    bf16 sublayer output and an fp32 or bf16 residual and keeps its statistics in fp32; the weights
    stay fp32 (autocast casts a copy per use), and the loss is taken on fp32 logits."""
    dtype = DTYPES[cfg.dtype]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype)


def check_batch_size(cfg, world_size):
    """Raise ValueError unless a global batch splits into ``grad_accum`` micro-batches of equal parts per rank
    (and the other settings are ones the trainer knows)."""
    if cfg.dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {tuple(DTYPES)}, got {cfg.dtype!r}")
    parts = cfg.grad_accum * world_size
    if cfg.grad_accum < 1:
        raise ValueError(f"grad_accum must be a positive integer, got {cfg.grad_accum}")
    if cfg.batch_size % parts:
        raise ValueError(
            f"batch_size {cfg.batch_size} must be a multiple of grad_accum {cfg.grad_accum} × {world_size} rank(s) "
            f"= {parts}: each rank's micro-batch holds batch_size / (grad_accum × ranks) sequences"
        )


def micro_batches(dataset, split, cfg, generator, device, dist=SINGLE):
    """This rank's parts of one global batch, as ``grad_accum`` (input, target) micro-batches.

    Every rank draws the whole global batch's windows from the same generator (a few numbers), so the
    generator stays the same on all ranks and in a checkpoint written by any number of them.
    """
    x, y = dataset.batch(split, cfg.batch_size, generator)
    for i in range(cfg.grad_accum):
        rows = dist.rows(cfg.batch_size, cfg.grad_accum, i)
        yield x[rows].to(device), y[rows].to(device)


@torch.no_grad()
def held_out_loss(model, dataset, cfg, device, dist=SINGLE):
    """Mean loss on the same ``eval_batches`` held-out batches every time (a fixed seed), each
    evaluated in the training's micro-batches and shared out among the ranks like them."""
    was_training = model.training
    model.eval()
    generator = torch.Generator().manual_seed(cfg.seed + 1)
    losses = []
    for _ in range(cfg.eval_batches):
        for x, y in micro_batches(dataset, "held_out", cfg, generator, device, dist):
            with autocast(cfg, device):
                losses.append(model(x, y)[1].item())
    model.train(was_training)
    return dist.average(torch.tensor(sum(losses) / len(losses), dtype=torch.float64)).item()


class Trainer:
    """Owns the model, optimizer and random state of one run, so it can be checkpointed and resumed."""

    def __init__(self, model_config, cfg, dataset, device, checkpoint=None, backend="auto", dist=SINGLE):
        """``dist``: this process's place in a distributed run (``fastgpt.distributed.init``); the
        model is then wrapped in DistributedDataParallel for the training steps, or sharded with FSDP2
        (``cfg.fsdp``). ``checkpoint`` (``load_checkpoint``'s dict, of either kind) resumes the run."""
        check_batch_size(cfg, dist.world_size)
        if cfg.fsdp and not dist.distributed:
            raise ValueError("fsdp shards over the ranks of a process group: start the run with torchrun")
        self.cfg, self.dataset, self.device, self.dist = cfg, dataset, device, dist
        torch.manual_seed(cfg.seed)
        self.model = GPT(model_config, backend=backend).to(device)
        self.batch_generator = torch.Generator().manual_seed(cfg.seed)
        self.step = 0
        self.skipped = 0  # steps of this run skipped for a non-finite loss or gradient (skip_nonfinite)
        self.saved_step = None  # the step of the last checkpoint this run wrote or resumed from
        self.history = []  # (step, training loss)
        self.optimizer = self._new_optimizer()
        if checkpoint is not None and checkpoint["sharded"] is None:
            self._restore_file(checkpoint)  # into the whole model, before it is sharded
        if cfg.fsdp:
            self._shard()
        if checkpoint is not None:
            if checkpoint["sharded"] is not None:  # each rank reads what it holds, sharded or whole
                load_sharded_state(checkpoint, self.model, self.optimizer)
            self._restore_progress(checkpoint)
        if dist.rank > 0:  # dropout: masks of its own on every rank (rank 0 keeps the single-process stream)
            torch.manual_seed(hash((cfg.seed, dist.rank, self.step)) % 2**63)
        self.train_model = self.model  # what the training steps call: the model (also under FSDP), or DDP around it
        if dist.distributed and not cfg.fsdp:
            # the model's only buffer (the positional encoding) is the same on every rank: no broadcasts
            device_ids = [device] if torch.device(device).type == "cuda" else None
            self.train_model = DistributedDataParallel(self.model, device_ids=device_ids, **_NO_BUFFER_SYNC)

    def _new_optimizer(self):
        return torch.optim.AdamW(
            self.model.parameters(), lr=self.cfg.learning_rate, betas=(0.9, 0.95), weight_decay=self.cfg.weight_decay
        )

    def _shard(self):
        """FSDP2 over all ranks; the optimizer is rebuilt on the sharded parameters, keeping any state
        restored from a single-file checkpoint (resharded from its full tensors)."""
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_optimizer_state_dict,
            set_optimizer_state_dict,
        )

        full = StateDictOptions(full_state_dict=True)
        restored = get_optimizer_state_dict(self.model, self.optimizer, options=full) if self.optimizer.state else None
        shard(self.model, self.dist)
        self.optimizer = self._new_optimizer()
        if restored is not None:
            set_optimizer_state_dict(self.model, self.optimizer, restored, options=full)

    def _restore_file(self, ckpt):
        restore_model(self.model, ckpt["model_state"])
        if ckpt["optimizer_state"] is None:
            raise CheckpointError("the checkpoint has no optimizer state to resume from")
        try:
            self.optimizer.load_state_dict(ckpt["optimizer_state"])
        except (ValueError, KeyError, RuntimeError) as exc:
            raise CheckpointError(f"the checkpoint's optimizer state does not fit the model ({exc})") from exc

    def _restore_progress(self, ckpt):
        self.step = self.saved_step = int(ckpt["progress"].get("step", 0))
        states = ckpt["random_states"]
        if "batches" in states:
            self.batch_generator.set_state(states["batches"])
        if "torch" in states:
            torch.set_rng_state(states["torch"])

    def held_out_loss(self):
        """The held-out loss (a collective: every rank calls it)."""
        return held_out_loss(self.model, self.dataset, self.cfg, self.device, self.dist)

    def save(self, path):
        """Write the checkpoint: under FSDP a sharded folder, every rank writing its shards; otherwise a
        file from rank 0 alone (the weights and optimizer state are the same on every rank). The batch
        generator is the same on every rank too, so either kind resumes on any number of ranks."""
        progress = {"step": self.step, "train_config": vars(self.cfg), "world_size": self.dist.world_size}
        random_states = {"batches": self.batch_generator.get_state(), "torch": torch.get_rng_state()}
        if self.cfg.fsdp:
            save_sharded_checkpoint(path, self.model, self.optimizer, progress, random_states, self.dist)
        elif self.dist.is_main:
            save_checkpoint(path, self.model, self.optimizer, progress, random_states)
        self.saved_step = self.step

    def train_step(self):
        """One optimizer step; returns the training loss (the global batch's mean).

        The gradients of the ``grad_accum`` micro-batches are summed, each micro-batch's loss scaled
        by ``1 / grad_accum``; under DDP they are averaged over the ranks once, after the last one, and
        under FSDP reduce-scattered once, after the last one (each rank keeping its shard).
        A loss or gradient that is not finite raises ``TrainingDiverged`` before the weights change
        (with ``skip_nonfinite``: the step is skipped, counted in ``skipped``, and its loss returned);
        all ranks see the same loss and gradients, so they all take the same decision.
        """
        for group in self.optimizer.param_groups:
            group["lr"] = learning_rate(self.step, self.cfg)
        self.optimizer.zero_grad(set_to_none=True)
        steps, loss = self.cfg.grad_accum, 0.0
        batches = micro_batches(self.dataset, "train", self.cfg, self.batch_generator, self.device, self.dist)
        for i, (x, y) in enumerate(batches):
            with self._gradient_sync(i == steps - 1):
                with autocast(self.cfg, self.device):
                    _, micro_loss = self.train_model(x, y)
                (micro_loss / steps if steps > 1 else micro_loss).backward()
            loss = loss + micro_loss.detach().float()
        loss = self.dist.average(loss / steps)
        parameters = [p for p in self.model.parameters() if p.grad is not None]
        norm = torch.nn.utils.get_total_norm([p.grad for p in parameters])
        if hasattr(norm, "full_tensor"):  # FSDP: a DTensor made of each rank's shards' norms
            norm = norm.full_tensor()
        loss_value, norm_value = torch.stack([loss, norm.float()]).tolist()  # one device sync
        if not (math.isfinite(loss_value) and math.isfinite(norm_value)):
            if not self.cfg.skip_nonfinite:
                what = f"loss {loss_value}" if not math.isfinite(loss_value) else f"gradient norm {norm_value}"
                rate = learning_rate(self.step, self.cfg)
                raise TrainingDiverged(f"step {self.step + 1}: {what} at learning rate {rate:.3g}")
            self.optimizer.zero_grad(set_to_none=True)
            self.skipped += 1
        else:
            if self.cfg.grad_clip:
                torch.nn.utils.clip_grads_with_norm_(parameters, self.cfg.grad_clip, norm)
            self.optimizer.step()
        self.step += 1
        return loss_value

    def _gradient_sync(self, last):
        """Around one micro-batch: exchange gradients only after the ``last`` one of a step."""
        if self.cfg.fsdp:
            self.model.set_requires_gradient_sync(last)
            return contextlib.nullcontext()
        if not self.dist.distributed or last:
            return contextlib.nullcontext()
        return self.train_model.no_sync()

    def run(self, checkpoint_file=None, progress=True, log=print):
        """Train up to ``max_steps``; evaluates and checkpoints every ``eval_interval`` steps and at the end.

        SIGINT (Ctrl-C) or SIGTERM stops training after the step under way; the checkpoint is then
        saved and ``Interrupted`` raised (a ``KeyboardInterrupt``). Divergence raises
        ``TrainingDiverged`` and writes nothing. Returns the final held-out loss.

        Distributed, every rank calls it; only rank 0 shows progress, logs and saves, and a signal
        to any rank stops all of them after the same step.
        """
        self.model.train()
        if not self.dist.is_main:
            progress, log = False, _silent
        tokens_per_step = self.cfg.batch_size * self.dataset.context_length
        bar = tqdm(
            total=self.cfg.max_steps, initial=self.step, disable=not progress, unit="step", dynamic_ncols=True
        )
        say = bar.write if self.dist.is_main else _silent  # bar.write prints also when the bar is disabled
        steps_timed, seconds_timed = 0, 0.0
        with _StopSignals(self.dist, all_ranks_save=self.cfg.fsdp) as stop:
            try:
                while self.step < self.cfg.max_steps and not self._agreed_signal(stop):
                    started, skipped = time.perf_counter(), self.skipped
                    loss = self.train_step()
                    self.history.append((self.step, loss))
                    bar.update(1)
                    seconds = time.perf_counter() - started
                    steps_timed, seconds_timed = steps_timed + 1, seconds_timed + seconds
                    bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tokens_per_step / seconds:,.0f}")
                    if self.skipped > skipped:
                        say(f"step {self.step}: skipped, loss or gradients not finite ({self.skipped} so far)")
                    if self.step % self.cfg.eval_interval == 0 and self.step < self.cfg.max_steps:
                        say(f"step {self.step}: held-out loss {self.held_out_loss():.4f}")
                        if checkpoint_file:
                            self.save(checkpoint_file)
            except KeyboardInterrupt:  # raised by code between steps; signals are handled by ``stop``
                bar.close()
                if self.cfg.fsdp:  # raised on this rank alone: a sharded save, a collective, would wait for the others
                    kept = "no checkpoint" if self.saved_step is None else f"the checkpoint of step {self.saved_step}"
                    log(f"interrupted at step {self.step}; not saved (every rank writes a sharded checkpoint), "
                        f"{kept} is kept")
                    raise
                self._save_interrupted(checkpoint_file, log)
                raise
            except TrainingDiverged as exc:
                bar.close()
                kept = "no checkpoint was written"
                if self.saved_step is not None:
                    kept = f"the checkpoint of step {self.saved_step} is kept"
                raise TrainingDiverged(f"training diverged at {exc}; {kept} (try a lower learning rate)") from None
            bar.close()
            signum = self._agreed_signal(stop)
            if signum:
                self._save_interrupted(checkpoint_file, log)
                raise Interrupted(signum)
            final = self.held_out_loss()
            log(f"step {self.step}: held-out loss {final:.4f}")
            if steps_timed:
                log(f"speed: {steps_timed * tokens_per_step / seconds_timed:,.0f} tokens/s "
                    f"({steps_timed} steps in {seconds_timed:.1f} s, evaluations and saves not counted)")
            if checkpoint_file:
                self.save(checkpoint_file)
            if stop.signum is not None:  # arrived during the final evaluation or save: the run is complete
                raise Interrupted(stop.signum)
        return final

    def _agreed_signal(self, stop):
        """The signal that stops the run (0: none yet): this process's, or, distributed, any rank's."""
        return self.dist.largest(stop.signum or 0)

    def _save_interrupted(self, checkpoint_file, log):
        if checkpoint_file:
            if self.saved_step != self.step:  # else a signal during a periodic save: it is saved already
                self.save(checkpoint_file)
            log(f"interrupted at step {self.step}; checkpoint saved to {checkpoint_file} (continue with --resume)")


def build_config(preset="small", **overrides):
    """A GPTConfig from a named preset plus explicit field overrides (None values ignored)."""
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {tuple(PRESETS)}, got {preset!r}")
    values = dict(PRESETS[preset])
    values.update({k: v for k, v in overrides.items() if v is not None})
    return GPTConfig(**values)
