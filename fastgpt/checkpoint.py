"""Checkpoints: one safetensors file holding the weights, the optimizer state, the random states and,
as metadata, the model config and training progress. No pickle anywhere.

A checkpoint is written to a temporary file in the same folder, flushed to disk, then renamed
over the old one: a crash mid-write leaves the last good checkpoint in place (and a temporary file
that ``remove_interrupted_saves`` deletes). The metadata holds a SHA-256 of every tensor, checked on
loading, so a damaged file is named instead of loaded; weights or optimizer state that are not
finite are never written.
"""

import glob
import hashlib
import json
import os
import secrets

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from fastgpt.nn import GPT, GPTConfig

FORMAT = "fastgpt-checkpoint-1"
CHECKPOINT_NAME = "ckpt.safetensors"
TEMP_PATTERN = ".ckpt-*.tmp"  # what save_checkpoint writes before the rename
CHECKSUMS = "tensor_sha256"  # metadata key: {tensor name: hex digest}; absent in older checkpoints


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
    tensors = {k: v.cpu() for k, v in tensors.items()}
    not_finite = _first_non_finite(tensors)
    if not_finite is not None:
        raise CheckpointError(f"refusing to write {path}: {not_finite} holds NaN or inf values")
    metadata[CHECKSUMS] = json.dumps({k: _sha256(t) for k, t in tensors.items()})

    folder = os.path.dirname(os.path.abspath(path))
    tmp = None
    try:
        os.makedirs(folder, exist_ok=True)
        # created here, not by tempfile.mkstemp or safetensors, whose files are private (0600): a
        # checkpoint gets the permissions the umask gives a new file
        tmp = os.path.join(folder, f".ckpt-{secrets.token_hex(8)}.tmp")
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        mode = os.stat(tmp).st_mode
        save_file(tensors, tmp, metadata=metadata)
        os.chmod(tmp, mode)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_folder(folder)  # the rename itself survives a power cut only once the folder is on disk
    except OSError as exc:
        raise CheckpointError(f"could not write {path} ({exc}); the checkpoint there before, if any, is unchanged") from exc
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)


def _fsync_folder(folder):
    """Best effort: the new checkpoint is in place already, so a failure here (or a platform that
    cannot open a folder, Windows) must not be reported as a failed save."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def remove_interrupted_saves(folder):
    """Delete the temporary files that saves killed before their rename left in ``folder``; returns them.

    Only safe while no other process is saving there (``fastgpt train`` holds the folder's run lock).
    """
    leftovers = sorted(glob.glob(os.path.join(glob.escape(folder), TEMP_PATTERN)))
    for leftover in leftovers:
        os.unlink(leftover)
    return leftovers


def _sha256(t):
    data = t.reshape(-1).view(torch.uint8) if t.numel() else t.new_empty(0, dtype=torch.uint8)
    return hashlib.sha256(data.numpy()).hexdigest()


def _first_non_finite(tensors):
    """The name of the first floating-point model or optimizer tensor holding NaN or inf, else None."""
    for name, t in tensors.items():
        if not name.startswith("rng.") and t.is_floating_point() and not torch.isfinite(t).all():
            return name
    return None


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
    _verify_checksums(path, metadata, tensors)
    try:
        config = GPTConfig.from_dict(json.loads(metadata["config"]))
        progress = json.loads(metadata.get("progress", "{}"))
        param_groups = json.loads(metadata["optimizer_param_groups"]) if "optimizer_param_groups" in metadata else None
    except (KeyError, ValueError, TypeError) as exc:
        raise CheckpointError(f"{path} has a damaged config ({exc})") from exc
    step = progress.get("step", 0) if isinstance(progress, dict) else None
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise CheckpointError(f"{path} has damaged progress (expected a dict with a step >= 0, got {progress!r})")
    if param_groups is not None and not (isinstance(param_groups, list) and all(isinstance(g, dict) for g in param_groups)):
        raise CheckpointError(f"{path} has damaged optimizer_param_groups (expected a list of dicts)")

    model_state, optimizer_state, random_states = {}, {}, {}
    for key, t in tensors.items():
        group, _, name = key.partition(".")
        if group == "model":
            model_state[name] = t
        elif group == "optimizer":
            index, _, field = name.partition(".")
            if not index.isdigit() or not field:
                raise CheckpointError(f"{path} has a damaged optimizer key {key!r} (expected optimizer.<index>.<field>)")
            optimizer_state.setdefault(int(index), {})[field] = t
        elif group == "rng":
            if t.dtype != torch.uint8 or t.dim() != 1:
                raise CheckpointError(f"{path} has a damaged random state {key!r} (expected a 1-D uint8 tensor)")
            random_states[name] = t
    not_finite = _first_non_finite(tensors)
    if not_finite is not None:
        raise CheckpointError(f"{path} holds NaN or inf values in {not_finite}")
    return {
        "config": config,
        "model_state": model_state,
        "optimizer_state": None if param_groups is None else {"state": optimizer_state, "param_groups": param_groups},
        "progress": progress,
        "random_states": random_states,
    }


def _verify_checksums(path, metadata, tensors):
    """Compare every tensor with the digest saved with it (checkpoints older than the digests pass)."""
    if CHECKSUMS not in metadata:
        return
    try:
        expected = json.loads(metadata[CHECKSUMS])
    except ValueError as exc:
        raise CheckpointError(f"{path} is damaged: its {CHECKSUMS} metadata is not JSON ({exc})") from exc
    if not isinstance(expected, dict) or set(expected) != set(tensors):
        raise CheckpointError(f"{path} is damaged: its tensors are not the ones its checksums list")
    damaged = sorted(name for name, t in tensors.items() if _sha256(t) != expected[name])
    if damaged:
        raise CheckpointError(
            f"{path} is damaged: {', '.join(damaged[:4])}{' …' if len(damaged) > 4 else ''} "
            "no longer match the checksums written with them"
        )


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
