"""A tiny training run on a short repeated text, shared by the checkpoint, training and CLI tests."""

from fastgpt.data import ByteDataset
from fastgpt.nn import GPTConfig
from fastgpt.train import Trainer, TrainConfig

TEXT = b"def add(a, b):\n    return a + b\n\n" * 40


def tiny_trainer(max_steps=4, checkpoint=None, seed=3):
    config = GPTConfig(context_length=16, n_layers=2, n_heads=2, d_model=32, dropout=0.1)
    cfg = TrainConfig(max_steps=max_steps, batch_size=4, eval_interval=100, eval_batches=2, warmup_steps=2, seed=seed)
    return Trainer(config, cfg, ByteDataset(TEXT, 16), "cpu", checkpoint, backend="reference")
