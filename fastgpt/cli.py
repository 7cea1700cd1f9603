"""The ``fastgpt`` command: ``train``, ``sample``, ``info`` and ``bench``.

Errors a user can fix (a missing data file, a corrupt or mismatched checkpoint, bad flags) end
with one line on stderr and exit status 2, never a traceback.
"""

import argparse
import json
import os
import platform
import sys

import torch

from fastgpt.checkpoint import CheckpointError, checkpoint_path, load_checkpoint, load_model
from fastgpt.data import ByteDataset, DataError, decode, encode, read_text_file, stdlib_corpus
from fastgpt import registry
from fastgpt.train import PRESETS, Trainer, TrainConfig, build_config

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


def _check_device(device):
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {device}: CUDA is not available on this machine")
    try:
        return torch.device(device)
    except RuntimeError as exc:
        raise UsageError(f"--device {device}: {exc}") from exc


# ----------------------------------------------------------------------------- train


def add_train_arguments(p):
    p.add_argument("--data", help="a text file to train on (default: the Python standard library's sources)")
    p.add_argument("--out", default="out", help="folder for the checkpoint (default: out)")
    p.add_argument("--preset", choices=tuple(PRESETS), help="model size (default: small)")
    for flag, _, kind, text in MODEL_FLAGS:
        p.add_argument(flag, type=kind, help=text)
    p.add_argument("--tie-weights", action="store_true", default=None, help="share embedding and output weights")
    p.add_argument("--max-steps", type=int, default=TrainConfig.max_steps)
    p.add_argument("--batch-size", type=int, default=TrainConfig.batch_size)
    p.add_argument("--lr", type=float, default=TrainConfig.learning_rate, help="peak learning rate")
    p.add_argument("--eval-interval", type=int, default=TrainConfig.eval_interval)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--backend", choices=registry.choices(), default="auto", help="kernel backend (default: auto)")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out")
    p.add_argument("--seed", type=int, default=TrainConfig.seed)
    p.add_argument("--sample-tokens", type=int, default=300, help="tokens to sample at the end (0: none)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


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


def run_train(args):
    device = _check_device(args.device or default_device())
    for name in ("max_steps", "batch_size", "eval_interval"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(args, name)}")
    text = read_text_file(args.data) if args.data else stdlib_corpus()
    ckpt_file = os.path.join(args.out, "ckpt.safetensors")
    checkpoint = None
    if args.resume:
        checkpoint = load_checkpoint(ckpt_file)
        config = _resumed_config(args, checkpoint["config"])
    else:
        try:
            config = build_config(args.preset or "small", **_model_overrides(args))
        except ValueError as exc:
            raise UsageError(str(exc)) from exc
    cfg = TrainConfig(
        max_steps=args.max_steps,
        batch_size=args.batch_size,
        learning_rate=args.lr,
        min_learning_rate=args.lr / 10,
        eval_interval=args.eval_interval,
        seed=args.seed,
    )
    dataset = ByteDataset(text, config.context_length)
    source = args.data or "the Python standard library's sources"
    print(f"data: {source}: {len(dataset.train):,} training bytes, {len(dataset.held_out):,} held out")
    trainer = Trainer(config, cfg, dataset, device, checkpoint, backend=args.backend)
    print(
        f"model: {trainer.model.num_parameters() / 1e6:.2f}M parameters, {config.n_layers} layers, d_model "
        f"{config.d_model}, {config.norm_position}-norm, backend {args.backend} on {device}"
    )
    if args.resume:
        print(f"resuming from step {trainer.step} of {cfg.max_steps}")
    else:
        print(f"step 0: held-out loss {trainer.held_out_loss():.4f}")
    try:
        trainer.run(ckpt_file, progress=not args.no_progress)
    except KeyboardInterrupt:
        return 130
    print(f"checkpoint: {ckpt_file}")
    if args.sample_tokens:
        prompt = "def "
        model = trainer.model.eval()
        out = model.generate(encode(prompt).long()[None].to(device), args.sample_tokens, temperature=0.8, top_k=40)
        print("sample:\n" + decode(out[0]))
    return 0


# ----------------------------------------------------------------------------- sample


def add_sample_arguments(p):
    p.add_argument("--ckpt", default="out", help="checkpoint file, or the folder holding ckpt.safetensors")
    p.add_argument("--prompt", default="def ")
    p.add_argument("--max-new-tokens", type=int, default=300)
    p.add_argument("--temperature", type=float, default=0.8, help="0 picks the most likely token")
    p.add_argument("--top-k", type=int, default=40)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--device", default=None)
    p.add_argument("--backend", choices=registry.choices(), default="auto", help="kernel backend (default: auto)")


def run_sample(args):
    device = _check_device(args.device or default_device())
    if args.max_new_tokens < 0 or args.temperature < 0 or (args.top_k is not None and args.top_k < 1):
        raise UsageError("--max-new-tokens and --temperature must be >= 0, --top-k >= 1")
    if not args.prompt:
        raise UsageError("--prompt must not be empty")
    model, _ = load_model(checkpoint_path(args.ckpt), device=device, backend=args.backend)
    generator = None
    if args.seed is not None:
        generator = torch.Generator(device=device).manual_seed(args.seed)
    prompt = encode(args.prompt).long()[None].to(device)
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
    }
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    for key, value in info.items():
        if key == "backends":
            print("backends:")
            for name, b in value.items():
                print(f"  {name:<10} {'available  ' if b['available'] else 'unavailable'}  {b['reason']}")
        else:
            print(f"{key}: {value}")
    return 0


def _version(module):
    try:
        return __import__(module).__version__
    except ImportError:
        return None


def _extension_info():
    try:
        from fastgpt import _C
    except ImportError as exc:
        return f"not built ({exc})"
    return _C.build_info()


# ----------------------------------------------------------------------------- main


def build_parser():
    parser = argparse.ArgumentParser(prog="fastgpt", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    add_train_arguments(sub.add_parser("train", help="train a GPT, then print a sample"))
    add_sample_arguments(sub.add_parser("sample", help="generate text from a checkpoint"))
    info = sub.add_parser("info", help="versions, device, extension and backends")
    info.add_argument("--json", action="store_true")
    try:
        from fastgpt import bench as bench_module

        bench = sub.add_parser("bench", help="benchmark the kernels and the model", description=bench_module.DESCRIPTION)
        bench_module.add_arguments(bench)
    except ImportError as exc:  # the benchmark needs matplotlib; everything else still works
        bench = sub.add_parser("bench", help="benchmark the kernels and the model (unavailable here)")
        bench.set_defaults(bench_unavailable=str(exc))
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        if args.command == "train":
            return run_train(args)
        if args.command == "sample":
            return run_sample(args)
        if args.command == "info":
            return run_info(args)
        if getattr(args, "bench_unavailable", None):
            raise UsageError(f"fastgpt bench is unavailable: {args.bench_unavailable}")
        from fastgpt import bench

        return bench.run(args)
    except (UsageError, DataError, CheckpointError) as exc:
        print(f"fastgpt {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
