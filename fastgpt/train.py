"""Training: AdamW with warm-up and cosine decay, held-out evaluation, atomic checkpoints, resume."""

import math
import time
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from fastgpt.checkpoint import CheckpointError, restore_model, save_checkpoint
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
    batch_size: int = 32
    learning_rate: float = 2e-3
    min_learning_rate: float = 2e-4  # the cosine schedule ends here
    warmup_steps: int = 50
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    eval_interval: int = 250  # steps between held-out evaluations (and checkpoints)
    eval_batches: int = 8
    seed: int = 1337


def learning_rate(step, cfg):
    """Linear warm-up, then cosine decay to ``min_learning_rate`` at ``max_steps``."""
    if step < cfg.warmup_steps:
        return cfg.learning_rate * (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps))
    return cfg.min_learning_rate + 0.5 * (1 + math.cos(math.pi * progress)) * (cfg.learning_rate - cfg.min_learning_rate)


@torch.no_grad()
def held_out_loss(model, dataset, cfg, device):
    """Mean loss on the same ``eval_batches`` held-out batches every time (a fixed seed)."""
    was_training = model.training
    model.eval()
    generator = torch.Generator().manual_seed(cfg.seed + 1)
    losses = []
    for _ in range(cfg.eval_batches):
        x, y = dataset.batch("held_out", cfg.batch_size, generator, device)
        losses.append(model(x, y)[1].item())
    model.train(was_training)
    return sum(losses) / len(losses)


class Trainer:
    """Owns the model, optimizer and random state of one run, so it can be checkpointed and resumed."""

    def __init__(self, model_config, cfg, dataset, device, checkpoint=None, backend="auto"):
        self.cfg, self.dataset, self.device = cfg, dataset, device
        torch.manual_seed(cfg.seed)
        self.model = GPT(model_config, backend=backend).to(device)
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(), lr=cfg.learning_rate, betas=(0.9, 0.95), weight_decay=cfg.weight_decay
        )
        self.batch_generator = torch.Generator().manual_seed(cfg.seed)
        self.step = 0
        self.history = []  # (step, training loss)
        if checkpoint is not None:
            self._restore(checkpoint)

    def _restore(self, ckpt):
        restore_model(self.model, ckpt["model_state"])
        if ckpt["optimizer_state"] is None:
            raise CheckpointError("the checkpoint has no optimizer state to resume from")
        try:
            self.optimizer.load_state_dict(ckpt["optimizer_state"])
        except (ValueError, KeyError, RuntimeError) as exc:
            raise CheckpointError(f"the checkpoint's optimizer state does not fit the model ({exc})") from exc
        self.step = int(ckpt["progress"].get("step", 0))
        states = ckpt["random_states"]
        if "batches" in states:
            self.batch_generator.set_state(states["batches"])
        if "torch" in states:
            torch.set_rng_state(states["torch"])

    def held_out_loss(self):
        return held_out_loss(self.model, self.dataset, self.cfg, self.device)

    def save(self, path):
        save_checkpoint(
            path,
            self.model,
            self.optimizer,
            progress={"step": self.step, "train_config": vars(self.cfg)},
            random_states={"batches": self.batch_generator.get_state(), "torch": torch.get_rng_state()},
        )

    def train_step(self):
        """One optimizer step; returns the training loss."""
        for group in self.optimizer.param_groups:
            group["lr"] = learning_rate(self.step, self.cfg)
        x, y = self.dataset.batch("train", self.cfg.batch_size, self.batch_generator, self.device)
        _, loss = self.model(x, y)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        self.optimizer.step()
        self.step += 1
        return loss.item()

    def run(self, checkpoint_file=None, progress=True, log=print):
        """Train up to ``max_steps``; evaluates and checkpoints every ``eval_interval`` steps and at the end.

        On Ctrl-C the current state is checkpointed before ``KeyboardInterrupt`` propagates.
        Returns the final held-out loss.
        """
        self.model.train()
        tokens_per_step = self.cfg.batch_size * self.dataset.context_length
        bar = tqdm(
            total=self.cfg.max_steps, initial=self.step, disable=not progress, unit="step", dynamic_ncols=True
        )
        try:
            while self.step < self.cfg.max_steps:
                started = time.perf_counter()
                loss = self.train_step()
                self.history.append((self.step, loss))
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tokens_per_step / (time.perf_counter() - started):,.0f}")
                if self.step % self.cfg.eval_interval == 0 and self.step < self.cfg.max_steps:
                    bar.write(f"step {self.step}: held-out loss {self.held_out_loss():.4f}")
                    if checkpoint_file:
                        self.save(checkpoint_file)
        except KeyboardInterrupt:
            bar.close()
            if checkpoint_file:
                self.save(checkpoint_file)
                log(f"interrupted at step {self.step}; checkpoint saved to {checkpoint_file} (continue with --resume)")
            raise
        bar.close()
        final = self.held_out_loss()
        log(f"step {self.step}: held-out loss {final:.4f}")
        if checkpoint_file:
            self.save(checkpoint_file)
        return final


def build_config(preset="small", **overrides):
    """A GPTConfig from a named preset plus explicit field overrides (None values ignored)."""
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {tuple(PRESETS)}, got {preset!r}")
    values = dict(PRESETS[preset])
    values.update({k: v for k, v in overrides.items() if v is not None})
    return GPTConfig(**values)
