"""One GPT training step (forward, loss, backward, AdamW) on the CPU: fastgpt's backends against
plain torch (F.scaled_dot_product_attention + F.layer_norm) and torch.compile of it."""

import itertools

import pytest
import torch
from suite import SETTINGS

from fastgpt import bench

CONFIGS = bench.model_configs("cpu", SETTINGS.sizes)
IMPLS = bench.model_impls(SETTINGS)


def config_id(config):
    cfg, batch = config
    return f"L{cfg['n_layers']}-d{cfg['d_model']}-ctx{cfg['context_length']}-b{batch}"


@pytest.mark.parametrize("impl", IMPLS, ids=[i.name for i in IMPLS])
@pytest.mark.parametrize("config", CONFIGS, ids=config_id)
def test_train_step(benchmark, config, impl):
    pytest.importorskip("fastgpt.nn")
    cfg_kwargs, batch = config
    step = bench.make_train_step(cfg_kwargs, batch, impl.backend, impl.compiled, "cpu", torch.float32)
    for i in range(SETTINGS.warmup):  # compiling, if any, stays out of the timing
        step(i)
    tokens = batch * cfg_kwargs["context_length"]
    benchmark.group = f"model train_step L{cfg_kwargs['n_layers']} d{cfg_kwargs['d_model']} tokens={tokens}"
    benchmark.extra_info.update(implementation=impl.name, tokens=tokens)
    counter = itertools.count()
    benchmark(lambda: step(next(counter)))
