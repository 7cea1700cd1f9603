"""Checkpoints: one safetensors file holding the weights, the optimizer state, the random states and,
as metadata, the model config and training progress. No pickle anywhere.

A checkpoint is written to a temporary file in the same folder, flushed to disk, then renamed
over the old one: a crash mid-write leaves the last good checkpoint in place.
"""

import json
import os
import tempfile

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from fastgpt.nn import GPT, GPTConfig

FORMAT = "fastgpt-checkpoint-1"
CHECKPOINT_NAME = "ckpt.safetensors"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, corrupt, or does not match what it is loaded into."""


def checkpoint_path(path):
    """A checkpoint file, given the file itself or the folder that holds it."""
    return os.path.join(path, CHECKPOINT_NAME) if os.path.isdir(path) else path


def save_checkpoint(path, model, optimizer=None, progress=None, random_states=None):
    """Atomically write ``model`` (and optionally optimizer state, progress dict, named RNG states)."""
    tensors = {f"model.{name}": t.detach().contiguous() for name, t in _own_state(model).items()}
    metadata = {"format": FORMAT, "config": json.dumps(model.config.to_dict()), "progress": json.dumps(progress or {})}
    if optimizer is not None:
        state = optimizer.state_dict()
        for index, per_param in state["state"].items():
            for key, value in per_param.items():
                tensors[f"optimizer.{index}.{key}"] = torch.as_tensor(value).detach().clone().contiguous()
        metadata["optimizer_param_groups"] = json.dumps(state["param_groups"])
    for name, t in (random_states or {}).items():
        tensors[f"rng.{name}"] = t.contiguous()

    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".ckpt-", suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        save_file({k: v.cpu() for k, v in tensors.items()}, tmp, metadata=metadata)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _own_state(model):
    """The state dict without the output layer when it is tied to the embedding (safetensors stores no aliases)."""
    state = model.state_dict()
    if model.config.tie_weights:
        state.pop("lm_head.weight", None)
    return state


def load_checkpoint(path):
    """``{"config", "model_state", "optimizer_state", "progress", "random_states"}`` from a checkpoint."""
    path = checkpoint_path(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path} is not a readable checkpoint ({exc})") from exc
    if metadata.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a fastgpt checkpoint (format {metadata.get('format')!r})")
    try:
        config = GPTConfig.from_dict(json.loads(metadata["config"]))
        progress = json.loads(metadata.get("progress", "{}"))
        param_groups = json.loads(metadata["optimizer_param_groups"]) if "optimizer_param_groups" in metadata else None
    except (KeyError, ValueError, TypeError) as exc:
        raise CheckpointError(f"{path} has a damaged config ({exc})") from exc

    model_state, optimizer_state, random_states = {}, {}, {}
    for key, t in tensors.items():
        group, _, name = key.partition(".")
        if group == "model":
            model_state[name] = t
        elif group == "optimizer":
            index, _, field = name.partition(".")
            optimizer_state.setdefault(int(index), {})[field] = t
        elif group == "rng":
            random_states[name] = t
    return {
        "config": config,
        "model_state": model_state,
        "optimizer_state": None if param_groups is None else {"state": optimizer_state, "param_groups": param_groups},
        "progress": progress,
        "random_states": random_states,
    }


def load_model(path, device="cpu", backend="auto"):
    """A GPT rebuilt from a checkpoint (in eval mode, running on ``backend``), and the loaded checkpoint dict."""
    ckpt = load_checkpoint(path)
    model = GPT(ckpt["config"], backend=backend)
    restore_model(model, ckpt["model_state"], path)
    return model.to(device).eval(), ckpt


def restore_model(model, state, path="checkpoint"):
    """Load weights, failing with one clear line when they do not fit the model."""
    expected = _own_state(model)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong_shape = sorted(k for k in set(expected) & set(state) if expected[k].shape != state[k].shape)
    if missing or unexpected or wrong_shape:
        details = []
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong_shape)):
            if keys:
                details.append(f"{label}: {', '.join(keys[:4])}{' …' if len(keys) > 4 else ''}")
        raise CheckpointError(f"{path} does not match the model config ({'; '.join(details)})")
    model.load_state_dict(state, strict=not model.config.tie_weights)
