"""The rule ``auto`` follows: which backend ran fastest, measured, for each kind of call on each class
of device.

Calls are sorted into buckets (op, dtype, training or inference, and a coarse size class: see
``bucket``). A table per device class (``device_class``) names the fastest backend of each bucket;
``fastgpt bench --tune`` measures one and writes it. Tables are looked up in this order:

1. the file named by ``FASTGPT_AUTO_TABLE``;
2. the user's table for this device class, written by ``fastgpt bench --tune``
   (``$XDG_CACHE_HOME/fastgpt/auto/<class>.json``, ``~/.cache`` by default);
3. the table shipped with fastgpt for this device class (``fastgpt/auto_tables/<class>.json``).

A bucket the table does not name, or a device class without a table, gets the documented default:
the registry's order (fastgpt's kernels first, then torch's), the first backend that supports the
inputs. The chosen backend must still support the inputs; where it does not, the default applies.
"""

import functools
import json
import os

import torch

SCHEMA = "fastgpt-auto/1"
SHIPPED_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "auto_tables")
DECODE_MAX_QUERIES = 4  # a KV-cache step: at most this many new queries per sequence
SHORT_MAX_KEYS = 512
FEW_ROWS = 64  # add+LayerNorm calls this small are bound by call overhead, not memory


# ----------------------------------------------------------------------------- buckets


def _dtype_name(dtype):
    return str(dtype).removeprefix("torch.")


def _attention_kind(seq_q, seq_k):
    return "decode" if seq_q <= DECODE_MAX_QUERIES else "short" if seq_k <= SHORT_MAX_KEYS else "long"


def attention_bucket(q, k, training):
    seq_q, seq_k, head_dim = q.shape[2], k.shape[2], q.shape[3]
    kind = _attention_kind(seq_q, seq_k)
    return f"attention/{_dtype_name(q.dtype)}/{'train' if training else 'infer'}/{kind}/d{64 if head_dim <= 64 else 128}"


def add_layer_norm_bucket(x, training):
    hidden, rows = x.shape[-1], x.numel() // max(x.shape[-1], 1)
    width = "h512" if hidden <= 512 else "h2048" if hidden <= 2048 else "wide"
    size = "few" if rows <= FEW_ROWS else "many"
    return f"add_layer_norm/{_dtype_name(x.dtype)}/{'train' if training else 'infer'}/{size}/{width}"


def decision_key(op, args):
    """What a decision of ``auto`` is remembered by, besides the device and the dtypes: every size
    except the sequence lengths (attention) and the row count (add+LayerNorm), which count only
    through their bucket, so that a growing KV cache does not decide again at every token. (So a
    backend's ``*_unsupported`` must not depend on them: docs/architecture.md, the contract.)"""
    if op == "attention":
        q, k = args[0], args[1]
        batch, heads, seq_q, head_dim = q.shape
        return batch, heads, k.shape[1], head_dim, _attention_kind(seq_q, k.shape[2])
    x = args[0]
    hidden = x.shape[-1]
    return x.dim(), hidden, x.numel() <= FEW_ROWS * hidden


def bucket(op, args, training):
    """The table key of one call: ``args`` are the op's tensors as ``*_unsupported`` takes them."""
    if op == "attention":
        return attention_bucket(args[0], args[1], training)
    return add_layer_norm_bucket(args[0], training)


# ----------------------------------------------------------------------------- device classes


@functools.cache
def _cpu_flags():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


@functools.cache
def device_class(device_type, index=None):
    """A name for the kind of device that decides which kernels win: the CPU's vector units
    (``cpu-avx512-bf16``, ``cpu-avx512-amx``, ``cpu-avx2``, …), a GPU's compute capability (``cuda-sm90``)."""
    if device_type == "cuda":
        major, minor = torch.cuda.get_device_capability(index)
        return f"cuda-sm{major}{minor}"
    if device_type != "cpu":
        return device_type
    name = "cpu-" + torch.backends.cpu.get_cpu_capability().lower()
    flags = _cpu_flags()
    if "amx_tile" in flags:
        return name + "-amx"
    if "avx512_bf16" in flags:
        return name + "-bf16"
    return name


def user_table_path(device_cls):
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(cache, "fastgpt", "auto", f"{device_cls}.json")


def shipped_table_path(device_cls):
    return os.path.join(SHIPPED_DIR, f"{device_cls}.json")


def table_paths(device_cls):
    """Where a table for ``device_cls`` is looked for, in order."""
    paths = [os.environ["FASTGPT_AUTO_TABLE"]] if os.environ.get("FASTGPT_AUTO_TABLE") else []
    return paths + [user_table_path(device_cls), shipped_table_path(device_cls)]


class TableError(ValueError):
    """An auto table that cannot be read or is not a fastgpt auto table (rerun ``fastgpt bench
    --tune`` to rewrite a user table, or delete it)."""


def read_table(path):
    try:
        with open(path) as f:
            table = json.load(f)
    except (OSError, ValueError) as exc:
        raise TableError(f"{path}: not a readable auto table ({exc})") from exc
    if not isinstance(table, dict) or table.get("schema") != SCHEMA or not isinstance(table.get("choices"), dict):
        raise TableError(f"{path}: not a fastgpt auto table (expected schema {SCHEMA!r} and a 'choices' object)")
    for key, choice in table["choices"].items():
        if not isinstance(choice, dict) or not isinstance(choice.get("backend"), str):
            raise TableError(f"{path}: choice {key!r} must be an object naming a 'backend'")
    return table


@functools.cache
def load(device_cls):
    """``(table or None, path or None)``: the first table found for ``device_cls``."""
    named = os.environ.get("FASTGPT_AUTO_TABLE")
    if named and not os.path.isfile(named):
        raise TableError(f"FASTGPT_AUTO_TABLE names {named!r}, which is not a file")
    for path in table_paths(device_cls):
        if os.path.exists(path):
            return read_table(path), path
    return None, None


def preferred_backend(op, args, training):
    """The backend the table names for this call, or None (the default order applies)."""
    device = args[0].device
    table, _ = load(device_class(device.type, device.index if device.type == "cuda" else None))
    if table is None:
        return None
    choice = table["choices"].get(bucket(op, args, training))
    return None if choice is None else choice["backend"]


def forget_tables():
    """Read the tables again on the next call (after ``--tune`` wrote one, or a test changed the environment)."""
    load.cache_clear()



# ----------------------------------------------------------------------------- what info shows

# (op, description, shapes of the op's tensors, whether a backward follows)
TYPICAL_CALLS = (
    ("attention", "training, 8 heads x 1024 tokens, head dim 64", ((4, 8, 1024, 64), (4, 8, 1024, 64)), True),
    ("attention", "prefill, 8 heads x 256 tokens, head dim 64", ((1, 8, 256, 64), (1, 8, 256, 64)), False),
    ("attention", "decode, GQA 32/8 heads, 4096 cached keys, head dim 128", ((1, 32, 1, 128), (1, 8, 4096, 128)), False),
    ("add_layer_norm", "training, 4096 rows x 512", ((4096, 512),), True),
    ("add_layer_norm", "decode, 1 row x 2048", ((1, 2048),), False),
)


def typical_choices(device, dtype):
    """``[(op, description, bucket, backend)]``: what ``auto`` picks for ``TYPICAL_CALLS`` on
    ``device`` (a torch.device or string) in ``dtype``, with the table it reads (or none)."""
    from fastgpt import dispatch  # dispatch imports this module

    rows = []
    for op, description, shapes, training in TYPICAL_CALLS:
        # expanded single elements: the right shape, dtype and device, no memory
        tensors = [torch.empty(1, device=device, dtype=dtype).expand(shape) for shape in shapes]
        if op == "attention":
            args = (tensors[0], tensors[1], tensors[1])
        else:
            weight = torch.empty(1, device=device, dtype=dtype).expand(shapes[0][-1])
            args = (tensors[0], tensors[0], weight, weight)
        rows.append((op, description, bucket(op, args, training), dispatch.auto_choice(op, args, training)))
    return rows
