"""The ``fastgpt`` command: ``train``, ``sample``, ``info``, ``build`` and ``bench``.

Errors a user can fix (a missing data file, a corrupt or mismatched checkpoint, bad flags or
environment variables, an ``--out`` that cannot be written) end with one line on stderr and exit
status 2, never a traceback; what can be checked before training starts is checked before it
starts. ``train`` holds a lock on its ``--out`` folder; SIGINT (Ctrl-C) or SIGTERM stops it after
the step under way and saves (exit status 130 or 143), a training step whose loss or gradients are
not finite stops it with exit status 2 (``--skip-nonfinite`` skips such steps). See docs/reliability.md.
Under ``torchrun`` every process is one rank of a DistributedDataParallel run, or with ``--fsdp`` of
an FSDP2 run (docs/distributed.md): rank 0 prints and holds the lock, rank 0 (DDP) or every rank
(FSDP, a sharded checkpoint) writes the checkpoint, and every message names its rank.
"""

import argparse
import json
import math
import os
import platform
import re
import sys

import torch

from fastgpt.checkpoint import (
    CHECKPOINT_NAME,
    SHARDED_NAME,
    CheckpointError,
    checkpoint_path,
    load_checkpoint,
    load_model,
    remove_interrupted_saves,
)
from fastgpt.data import ByteDataset, DataError, decode, encode, read_text_file, stdlib_corpus
from fastgpt import dispatch, distributed, registry
from fastgpt.run_lock import FolderInUse, RunLock
from fastgpt.distributed import DistributedError
from fastgpt.train import DTYPES, PRESETS, Interrupted, Trainer, TrainConfig, TrainingDiverged, build_config

# model flags: (flag, GPTConfig field, type, help)
MODEL_FLAGS = [
    ("--context-length", "context_length", int, "tokens per training window"),
    ("--n-layers", "n_layers", int, "decoder blocks"),
    ("--n-heads", "n_heads", int, "attention heads"),
    ("--n-kv-heads", "n_kv_heads", int, "key/value heads (fewer than --n-heads: grouped-query attention)"),
    ("--d-model", "d_model", int, "embedding width"),
    ("--d-ff", "d_ff", int, "feed-forward width (default 4 × d-model)"),
    ("--dropout", "dropout", float, "dropout probability"),
    ("--norm-position", "norm_position", str, "post (default) or pre"),
    ("--pos-encoding", "pos_encoding", str, "sinusoidal (default) or learned"),
    ("--activation", "activation", str, "relu (default) or gelu"),
]


class UsageError(Exception):
    """A problem the user can fix; reported as one line."""


def default_device():
    return "cuda" if torch.cuda.is_available() else "cpu"


DEVICE_TYPES = ("cpu", "cuda")  # where the model runs; torch names more (meta, mps, ...) that fastgpt does not support


def _check_device(device):
    try:
        parsed = torch.device(device)
    except RuntimeError:
        raise UsageError(f"--device {device}: expected one of {', '.join(DEVICE_TYPES)} (or cuda:N)") from None
    if parsed.type not in DEVICE_TYPES:
        raise UsageError(f"--device {device}: fastgpt runs on {' or '.join(DEVICE_TYPES)}, not {parsed.type}")
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {device}: CUDA is not available on this machine")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise UsageError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif parsed.index not in (None, 0):
        raise UsageError(f"--device {device}: there is one CPU device, cpu")
    return parsed


def _check_environment():
    """The environment variables fastgpt reads deep inside (at the first op or allocation), checked up front."""
    backend = os.environ.get("FASTGPT_BACKEND")
    if backend and backend not in registry.choices():
        raise UsageError(f"FASTGPT_BACKEND={backend}: expected one of {', '.join(registry.choices())}")
    # read by the native extension's CPU output cache (csrc/cpu/output_cache.cpp) at its first allocation
    cache_mb = os.environ.get("FASTGPT_CPU_CACHE_MB")
    if cache_mb and not re.fullmatch(r"\+?[0-9]+", cache_mb):
        raise UsageError(f"FASTGPT_CPU_CACHE_MB={cache_mb}: expected a whole number of MiB (0 turns the cache off)")


def _check_backend(backend, device, config):
    """Refuse a backend (named by --backend or FASTGPT_BACKEND) that cannot run this model on ``device``.

    Asks the backend about inputs shaped like the model's (the question ``fastgpt.ops`` asks before
    running an op), so the answer comes before training instead of at the first step.
    """
    named_by = f"--backend {backend}"
    if backend == "auto":
        backend = os.environ.get("FASTGPT_BACKEND") or "auto"
        named_by = f"FASTGPT_BACKEND={backend}"
    if backend == "auto":
        return
    head_dim = config.d_model // config.n_heads
    q = torch.zeros(1, config.n_heads, 2, head_dim, device=device)
    kv = torch.zeros(1, config.n_kv_heads or config.n_heads, 2, head_dim, device=device)
    x = torch.zeros(1, 2, config.d_model, device=device)
    weight = torch.ones(config.d_model, device=device)
    for op, inputs in (("attention", (q, kv, kv)), ("add_layer_norm", (x, x, weight, torch.zeros_like(weight)))):
        reason = dispatch.unsupported_reason(op, backend, inputs)
        if reason is not None:
            raise UsageError(f"{named_by}: cannot run this model on {device}: {reason}")


def _check_positive_finite(flag, value, allow_zero=False):
    if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        expected = "a finite number >= 0" if allow_zero else "a finite number > 0"
        raise UsageError(f"{flag} must be {expected}, got {value}")


def _lock_out(out):
    """Create the --out folder and take its run lock (which also proves a file can be written
    there), before any step is spent. Returns the held ``RunLock``."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise UsageError(f"--out {out}: is a file, expected a folder")
    try:
        os.makedirs(out, exist_ok=True)
        return RunLock(out).acquire()
    except (FileExistsError, NotADirectoryError):
        raise UsageError(f"--out {out}: part of the path is a file, expected folders") from None
    except FolderInUse as exc:
        raise UsageError(f"--out {exc}") from None
    except OSError as exc:
        raise UsageError(f"--out {out}: cannot write there ({exc.strerror or exc})") from None


# ----------------------------------------------------------------------------- train


def add_train_arguments(p):
    p.add_argument("--data", help="a text file to train on (default: the Python standard library's sources)")
    p.add_argument("--out", default="out", help="folder for the checkpoint (default: out)")
    p.add_argument("--preset", choices=tuple(PRESETS), help="model size (default: small)")
    for flag, _, kind, text in MODEL_FLAGS:
        p.add_argument(flag, type=kind, help=text)
    p.add_argument("--tie-weights", action="store_true", default=None, help="share embedding and output weights")
    p.add_argument("--max-steps", type=int, default=TrainConfig.max_steps)
    p.add_argument("--batch-size", type=int, default=TrainConfig.batch_size,
                   help="sequences per optimizer step, over all ranks and micro-batches together "
                        f"(default: {TrainConfig.batch_size})")
    p.add_argument("--grad-accum", type=int, default=1, metavar="K",
                   help="split each step's batch into K micro-batches, one forward and backward each, "
                        "summing their gradients: the same step in less memory (default: 1)")
    p.add_argument("--lr", type=float, default=TrainConfig.learning_rate, help="peak learning rate")
    p.add_argument("--eval-interval", type=int, default=TrainConfig.eval_interval)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--backend", choices=registry.choices(), default="auto", help="kernel backend (default: auto)")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out")
    p.add_argument("--seed", type=int, default=TrainConfig.seed)
    p.add_argument("--sample-tokens", type=int, default=300, help="tokens to sample at the end (0: none)")
    p.add_argument("--skip-nonfinite", action="store_true",
                   help="skip (and count) steps whose loss or gradients are NaN/inf instead of stopping")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--dist-timeout", type=float, default=distributed.DEFAULT_TIMEOUT_S, metavar="SECONDS",
                   help="under torchrun: how long a rank waits for the others at a collective before the job "
                        f"fails (default: {distributed.DEFAULT_TIMEOUT_S:g})")
    p.add_argument("--fsdp", action="store_true",
                   help="under torchrun: shard weights, gradients and optimizer state over the ranks (FSDP2) "
                        f"instead of copying them (DDP); the checkpoint is then a sharded folder, {SHARDED_NAME}")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="fp32",
                   help="bf16: mixed precision (matmuls and attention in bf16 under autocast; weights, "
                        "optimizer state and loss in fp32). Default fp32")


def _model_overrides(args):
    overrides = {field: getattr(args, field) for _, field, _, _ in MODEL_FLAGS}
    overrides["tie_weights"] = args.tie_weights
    return {k: v for k, v in overrides.items() if v is not None}


def _resumed_config(args, ckpt_config):
    """The checkpoint's config; flags given explicitly must agree with it."""
    requested = _model_overrides(args)
    if args.preset is not None:
        requested = {**PRESETS[args.preset], **requested}
    stored = ckpt_config.to_dict()
    conflicts = [f"{k}={v!r} (checkpoint has {stored[k]!r})" for k, v in requested.items() if stored[k] != v]
    if conflicts:
        raise UsageError(f"--resume: the checkpoint's model config does not match: {', '.join(conflicts)}")
    return ckpt_config


def _silent(*args, **kwargs):
    pass


def run_train(args):
    for name in ("max_steps", "batch_size", "grad_accum", "eval_interval"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(args, name)}")
    _check_positive_finite("--lr", args.lr)
    _check_positive_finite("--dist-timeout", args.dist_timeout)
    if args.sample_tokens < 0:
        raise UsageError(f"--sample-tokens must be >= 0, got {args.sample_tokens}")
    _check_environment()
    device = _check_device(args.device or default_device())
    rank, world_size, _ = distributed.environment()
    if args.fsdp and not distributed.launched():
        raise UsageError("--fsdp shards the model over the ranks of a torchrun job: start fastgpt train with "
                         "torchrun (--nproc_per_node 1 works too)")
    if args.dtype == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise UsageError(f"--dtype bf16: {torch.cuda.get_device_name(device)} does not compute in bf16")
    parts = args.grad_accum * world_size
    if args.batch_size % parts:
        raise UsageError(
            f"--batch-size {args.batch_size} must be a multiple of --grad-accum {args.grad_accum} × {world_size} "
            f"rank(s) = {parts}: it counts the sequences of one optimizer step over all ranks and micro-batches"
        )
    say = print if rank == 0 else _silent  # rank 0 speaks for the job
    text = read_text_file(args.data) if args.data else stdlib_corpus()
    ckpt_file = os.path.join(args.out, SHARDED_NAME if args.fsdp else CHECKPOINT_NAME)  # what this run writes
    if args.resume and not os.path.exists(checkpoint_path(args.out) if os.path.isdir(args.out) else ckpt_file):
        where = " (every rank reads it: --out must be a folder all machines see)" if world_size > 1 else ""
        raise CheckpointError(f"no checkpoint at {os.path.join(args.out, CHECKPOINT_NAME)} or {SHARDED_NAME}{where}")
    lock = _lock_out(args.out) if rank == 0 else None  # the one rank that writes there
    context = distributed.SINGLE
    finished = False  # every rank got through training: leaving may wait for the others
    try:
        if lock is not None:
            removed = remove_interrupted_saves(args.out)
            if removed:
                say(f"removed {len(removed)} temporary file(s) left by an interrupted save in {args.out}")
        if distributed.launched():
            context, device = distributed.init(device, args.dist_timeout)
        trainer = _trainer(args, device, text, context, say)
        try:
            trainer.run(ckpt_file, progress=not args.no_progress)
            finished = True
        except Interrupted as exc:
            return 128 + exc.signum
        except KeyboardInterrupt:
            return 130
        finally:
            if trainer.skipped:
                say(f"skipped {trainer.skipped} step(s) whose loss or gradients were not finite")
        model = trainer.model
        if args.fsdp and context.is_main and args.sample_tokens:
            # a sharded model's weights are spread over the ranks: read the checkpoint back whole while
            # --out is still locked (a later run could replace it), outside the process group (else
            # the load would wait for the other ranks)
            distributed.shutdown(context, drain=True)
            model = load_model(ckpt_file, device, args.backend)[0]
    finally:
        distributed.shutdown(context, drain=finished)
        if lock is not None:
            lock.release()
    if not context.is_main:
        return 0
    try:
        print(f"checkpoint: {ckpt_file}")
        if args.sample_tokens:
            prompt = encode("def ").long()[None].to(device)
            out = model.eval().generate(prompt, args.sample_tokens, temperature=0.8, top_k=40)
            print("sample:\n" + decode(out[0]))
    except KeyboardInterrupt:
        print("interrupted while sampling; the checkpoint is saved", file=sys.stderr)
        return 130
    return 0


def _trainer(args, device, text, context, say):
    """The Trainer for these flags: a new model, or the one resumed from the checkpoint in ``--out``, of
    either kind (looked up after rank 0 has tidied ``--out`` and all ranks have met in ``init``)."""
    checkpoint = None
    if args.resume:
        checkpoint = load_checkpoint(checkpoint_path(args.out))
        config = _resumed_config(args, checkpoint["config"])
    else:
        try:
            config = build_config(args.preset or "small", **_model_overrides(args))
        except ValueError as exc:
            raise UsageError(str(exc)) from exc
    _check_backend(args.backend, device, config)
    cfg = TrainConfig(
        max_steps=args.max_steps,
        batch_size=args.batch_size,
        grad_accum=args.grad_accum,
        learning_rate=args.lr,
        min_learning_rate=args.lr / 10,
        eval_interval=args.eval_interval,
        seed=args.seed,
        skip_nonfinite=args.skip_nonfinite,
        fsdp=args.fsdp,
        dtype=args.dtype,
    )
    dataset = ByteDataset(text, config.context_length)
    source = args.data or "the Python standard library's sources"
    say(f"data: {source}: {len(dataset.train):,} training bytes, {len(dataset.held_out):,} held out")
    trainer = Trainer(config, cfg, dataset, device, checkpoint, backend=args.backend, dist=context)
    say(
        f"model: {trainer.model.num_parameters() / 1e6:.2f}M parameters, {config.n_layers} layers, d_model "
        f"{config.d_model}, {config.norm_position}-norm, backend {args.backend} on {device}"
        + (", bf16 autocast (fp32 weights)" if args.dtype == "bf16" else "")
    )
    if context.distributed or cfg.grad_accum > 1:
        micro = cfg.batch_size // (cfg.grad_accum * context.world_size)
        engine = f"{'nccl' if device.type == 'cuda' else 'gloo'}{', FSDP' if cfg.fsdp else ''}"
        ranks = f"{context.world_size} rank(s) ({engine}), " if context.distributed else ""
        say(f"batch: {cfg.batch_size} sequences per step = {ranks}{cfg.grad_accum} micro-batch(es) of {micro} per rank")
    if args.resume:
        written_by = checkpoint["progress"].get("world_size", 1)
        say(f"resuming from step {trainer.step} of {cfg.max_steps} (checkpoint written by {written_by} rank(s))"
            if written_by != context.world_size else f"resuming from step {trainer.step} of {cfg.max_steps}")
    else:
        loss = trainer.held_out_loss()  # a collective: every rank computes its part
        say(f"step 0: held-out loss {loss:.4f}")
    return trainer


# ----------------------------------------------------------------------------- sample


def add_sample_arguments(p):
    p.add_argument("--ckpt", default="out",
                   help=f"a checkpoint ({CHECKPOINT_NAME}, or a sharded {SHARDED_NAME} folder), "
                        "or the folder holding it")
    p.add_argument("--prompt", default="def ")
    p.add_argument("--max-new-tokens", type=int, default=300)
    p.add_argument("--temperature", type=float, default=0.8, help="0 picks the most likely token")
    p.add_argument("--top-k", type=int, default=40)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--device", default=None)
    p.add_argument("--backend", choices=registry.choices(), default="auto", help="kernel backend (default: auto)")


def run_sample(args):
    if args.max_new_tokens < 0:
        raise UsageError(f"--max-new-tokens must be >= 0, got {args.max_new_tokens}")
    _check_positive_finite("--temperature", args.temperature, allow_zero=True)
    if args.top_k is not None and args.top_k < 1:
        raise UsageError(f"--top-k must be a positive integer, got {args.top_k}")
    if not args.prompt:
        raise UsageError("--prompt must not be empty")
    _check_environment()
    device = _check_device(args.device or default_device())
    model, _ = load_model(checkpoint_path(args.ckpt), device=device, backend=args.backend)
    _check_backend(args.backend, device, model.config)
    generator = None
    if args.seed is not None:
        generator = torch.Generator(device=device).manual_seed(args.seed)
    # the model reads bytes: the prompt's own bytes, also when they are not UTF-8 (Python keeps
    # such argv bytes as surrogate escapes, which os.fsencode turns back into the bytes typed)
    prompt = encode(os.fsencode(args.prompt)).long()[None].to(device)
    out = model.generate(prompt, args.max_new_tokens, args.temperature, args.top_k, generator)
    print(decode(out[0]))
    return 0


# ----------------------------------------------------------------------------- info


def run_info(args):
    import fastgpt

    info = {
        "fastgpt": fastgpt.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu ({os.cpu_count()} cores)",
        "triton": _version("triton"),
        "extension": _extension_info(),
        "backends": fastgpt.backends(),
        "auto": _auto_info(),
    }
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    for key, value in info.items():
        if key == "backends":
            print("backends:")
            for name, b in value.items():
                print(f"  {name:<10} {'available  ' if b['available'] else 'unavailable'}  {b['reason']}")
        elif key == "auto":
            print(f"auto picks (device class {value['device_class']}, table: {value['table']}):")
            for pick in value["picks"]:
                choices = "  ".join(f"{dtype}: {backend}" for dtype, backend in pick["backend"].items())
                print(f"  {pick['op']:<15} {pick['call']:<58} {choices}")
        elif isinstance(value, dict):
            print(f"{key}:")
            for name, item in value.items():
                print(f"  {name}: {item}")
        else:
            print(f"{key}: {value}")
    return 0


def _auto_info():
    """What ``auto`` picks for a few typical calls on this machine's default device, and from
    which measured table (fastgpt/auto_rule.py)."""
    from fastgpt import auto_rule

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtypes = (torch.float32, torch.bfloat16) if device == "cpu" else (torch.bfloat16, torch.float16)
    device_class = auto_rule.device_class(device)
    try:
        _, table = auto_rule.load(device_class)
        picks = {}
        for dtype in dtypes:
            for op, call, _bucket, backend in auto_rule.typical_choices(device, dtype):
                picks.setdefault((op, call), {})[str(dtype).removeprefix("torch.")] = backend
    except auto_rule.TableError as exc:
        return {"device_class": device_class, "table": f"unreadable: {exc}", "picks": []}
    return {
        "device_class": device_class,
        "table": table or "none for this device class (the registry's order)",
        "picks": [{"op": op, "call": call, "backend": backends} for (op, call), backends in picks.items()],
    }


def _version(module):
    try:
        return __import__(module).__version__
    except ImportError:
        return None


def _extension_info():
    from fastgpt import extension, native  # importing native loads (or builds) the extension

    return extension.describe(native.LOADED)


# ----------------------------------------------------------------------------- build


def run_build(args):
    from fastgpt import extension

    try:
        origin, path = extension.build()
    except (extension.BuildError, OSError) as exc:
        raise UsageError(f"building fastgpt._C failed: {exc}") from None
    print(f"fastgpt._C ({origin} build): {path}")
    return 0


# ----------------------------------------------------------------------------- main


def build_parser():
    parser = argparse.ArgumentParser(prog="fastgpt", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    add_train_arguments(sub.add_parser("train", help="train a GPT, then print a sample"))
    add_sample_arguments(sub.add_parser("sample", help="generate text from a checkpoint"))
    info = sub.add_parser("info", help="versions, device, extension and backends")
    info.add_argument("--json", action="store_true")
    sub.add_parser("build", help="build the C++/CUDA extension fastgpt._C for this torch, if it is not built yet")
    try:
        from fastgpt import bench as bench_module

        bench = sub.add_parser("bench", help="benchmark the kernels and the model", description=bench_module.DESCRIPTION)
        bench_module.add_arguments(bench)
    except ImportError as exc:  # the benchmark needs matplotlib; everything else still works
        bench = sub.add_parser("bench", help="benchmark the kernels and the model (unavailable here)")
        bench.set_defaults(bench_unavailable=str(exc))
    return parser


def main(argv=None):
    if not distributed.launched():
        return _main(argv)
    entry = _main
    if os.environ.get("TORCHELASTIC_ERROR_FILE"):  # torchrun's failure summary then shows a rank's traceback
        from torch.distributed.elastic.multiprocessing.errors import record

        entry = record(_main)
    try:
        return entry(argv)
    except Exception as exc:  # a bug or an unforeseen failure: which rank, and why, before the traceback
        reason = (str(exc).strip().splitlines() or [""])[0]
        print(f"fastgpt: {distributed.label()}failed: {type(exc).__name__}: {reason}", file=sys.stderr, flush=True)
        raise


def _main(argv):
    args = build_parser().parse_args(argv)
    try:
        if args.command == "train":
            return run_train(args)
        if args.command == "sample":
            return run_sample(args)
        if args.command == "info":
            return run_info(args)
        if args.command == "build":
            return run_build(args)
        if getattr(args, "bench_unavailable", None):
            raise UsageError(f"fastgpt bench is unavailable: {args.bench_unavailable}")
        from fastgpt import bench

        return bench.run(args)
    except (UsageError, DataError, CheckpointError, TrainingDiverged, DistributedError) as exc:
        print(f"fastgpt {args.command}: {distributed.label()}error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"fastgpt {args.command}: {distributed.label()}interrupted", file=sys.stderr)
        return 130
    except RuntimeError as exc:
        if not (args.command == "train" and distributed.launched() and distributed.is_collective_failure(exc)):
            raise
        print(f"fastgpt train: {distributed.label()}error: {distributed.explain(exc, args.dist_timeout)}",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
