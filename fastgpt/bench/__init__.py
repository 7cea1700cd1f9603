"""``fastgpt bench``: time fastgpt's ops and GPT against what a user would otherwise pick.

Every number is put next to two yardsticks measured in the same run, on the same machine:

- the alternatives a user would pick — eager PyTorch, ``torch.compile`` of the same expression,
  ``F.scaled_dot_product_attention`` (default dispatch and each SDPA backend on its own) and
  ``flash_attn`` when installed — as a ratio ``their time / our time`` (above 1: fastgpt is faster);
  torch's kernels are these baselines, so the registry's ``torch`` backend is not timed as one of
  fastgpt's implementations (``implementations.BASELINE_BACKEND``);
- the device's ceilings — copy bandwidth (bytes read + written) and a large matmul (bf16 on a
  GPU, fp32 on the CPU) — as a percent.

FLOP and byte conventions (docs/architecture.md): attention forward ``4·b·h·sq·sk·d``, halved when
causal, forward+backward 3.5× the forward; add+LayerNorm forward reads x, residual, weight, bias
and writes y, h; its backward reads dy, h, weight, mean, rstd and writes dx, dweight, dbias.

Timing: CUDA events around each call on a GPU, ``time.perf_counter`` on the CPU; warm-up calls
excluded; median and 20th/80th percentiles over the repetitions. Each case cycles through several
input sets so that caches do not flatter small sizes.

Output: a table on stdout, ``results.json`` (machine, ceilings, every measurement) and one PNG per
op in ``--out``. ``python -m fastgpt.bench --help`` lists the options.

Modules, one job each:

- ``timing``: timing a ``step(i)``: warm-up, repetitions within a budget, median and percentiles
- ``settings``: what a run measures (device, size set, dtypes) and how long it may spend
- ``machine``: what the run was measured on, and the device's copy and matmul ceilings
- ``records``: the ``results.json`` schema of one measurement, and the ratios between records
- ``cases``: ``Case``, one point of a kernel op's sweep
- ``implementations``: ``Impl``, fastgpt's backends (from ``fastgpt.registry``) and the baselines
- ``running``: timing every implementation on every case, interleaved, one record each
- ``attention``, ``add_layer_norm``, ``model``, ``hf``: the ops, one module each
- ``tune``: ``fastgpt bench --tune``, which measures the table ``auto`` follows (fastgpt/auto_rule.py)
- ``tables``, ``plots``: the progress lines, the markdown table and the PNGs of a run
- ``cli``: the options of ``fastgpt bench``, ``OPS`` and a whole run

Adding an op (for example an end-to-end Hugging Face model) is one module with
``run(settings, emit)`` — time the op under ``settings`` (a ``settings.Settings``) and call
``emit(record)`` for each measurement, a dict with the fields of ``records.record`` (a kernel op
builds ``Case`` and ``Impl`` lists and hands them to ``running.run_cases``; an end-to-end op times
its own step with ``timing.time_calls``, as ``model`` does) — plus one entry in ``cli.OPS``, which
gives it its ``--op`` name; ``cli.ALL_OPS`` says whether ``--op all`` runs it.
"""

from fastgpt.bench.add_layer_norm import (
    add_layer_norm_cases,
    add_layer_norm_impls,
    add_layer_norm_sizes,
    eager_add_layer_norm,
)
from fastgpt.bench.attention import SDPA_BACKENDS, attention_cases, attention_impls, attention_sizes, eager_attention
from fastgpt.bench.cases import PASSES, Case
from fastgpt.bench.cli import DESCRIPTION, OPS, add_arguments, main, run, settings_for
from fastgpt.bench.implementations import BASELINE_BACKEND, Impl, fastgpt_backends, fastgpt_impls
from fastgpt.bench.machine import (
    backend_report,
    best_ceilings,
    cpu_model,
    last_level_cache_bytes,
    machine_info,
    measure_ceilings,
)
from fastgpt.bench.model import ModelImpl, make_train_step, model_configs, model_impls, peak_training_memory
from fastgpt.bench.plots import write_plots
from fastgpt.bench.records import SCHEMA, add_ratios, case_key, first_line, record
from fastgpt.bench.running import (
    SCORE_BYTES_LIMIT,
    make_input_sets,
    run_cases,
    skip_reason,
    step_for,
)
from fastgpt.bench.settings import DTYPE_NAMES, DTYPES, Settings, default_dtypes
from fastgpt.bench.tables import format_line, markdown_table
from fastgpt.bench.timing import (
    TIMING_BLOCKS,
    Timing,
    input_set_count,
    time_calls,
    time_interleaved,
    timed_calls,
    warm_up,
)

__all__ = [
    "DESCRIPTION", "OPS", "add_arguments", "main", "run", "settings_for",
    "Settings", "DTYPES", "DTYPE_NAMES", "default_dtypes",
    "Timing", "time_calls", "time_interleaved", "timed_calls", "warm_up", "input_set_count",
    "machine_info", "cpu_model", "backend_report", "last_level_cache_bytes", "measure_ceilings", "best_ceilings",
    "SCHEMA", "record", "case_key", "add_ratios", "first_line",
    "Case", "PASSES", "Impl", "BASELINE_BACKEND", "fastgpt_backends", "fastgpt_impls",
    "run_cases", "skip_reason", "step_for", "make_input_sets", "TIMING_BLOCKS", "SCORE_BYTES_LIMIT",
    "attention_sizes", "attention_cases", "attention_impls", "eager_attention", "SDPA_BACKENDS",
    "add_layer_norm_sizes", "add_layer_norm_cases", "add_layer_norm_impls", "eager_add_layer_norm",
    "model_configs", "model_impls", "ModelImpl", "make_train_step", "peak_training_memory",
    "format_line", "markdown_table", "write_plots",
]
