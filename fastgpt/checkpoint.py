"""Checkpoints, of two kinds. A single process or DistributedDataParallel writes one safetensors file
(``ckpt.safetensors``) holding the weights, the optimizer state, the random states and, as metadata,
the model config and training progress; no pickle. FSDP writes a *sharded* checkpoint, a folder
(``ckpt.dcp``) in which ``torch.distributed.checkpoint`` puts each rank's shards and its index
(``.metadata``, which DCP reads with pickle: load sharded checkpoints only from sources you trust),
plus a manifest (``fastgpt.json``: config, progress, random states, a SHA-256 of every file). Both
kinds load in any number of processes, with or without FSDP, and in ``fastgpt sample``.

A checkpoint is written to a temporary file in the same folder, flushed to disk, then renamed
over the old one: a crash mid-write leaves the last good checkpoint in place (and a temporary file
that ``remove_interrupted_saves`` deletes). The metadata holds a SHA-256 of every tensor, checked on
loading, so a damaged file is named instead of loaded; weights or optimizer state that are not
finite are never written. A sharded checkpoint is written the same way: every rank writes into a
temporary sibling folder, and once all have written, rank 0 adds the manifest, flushes, and renames
the folder into place; a folder without the manifest is never loaded.
"""

import glob
import hashlib
import json
import os
import secrets
import shutil
import warnings

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from fastgpt import distributed
from fastgpt.nn import GPT, GPTConfig

FORMAT = "fastgpt-checkpoint-1"
CHECKPOINT_NAME = "ckpt.safetensors"
TEMP_PATTERN = ".ckpt-*.tmp"  # what save_checkpoint writes before the rename
CHECKSUMS = "tensor_sha256"  # metadata key: {tensor name: hex digest}; absent in older checkpoints
SHARDED_FORMAT = "fastgpt-sharded-checkpoint-1"
SHARDED_NAME = "ckpt.dcp"  # a folder: torch.distributed.checkpoint's files and the MANIFEST
MANIFEST = "fastgpt.json"  # written last, into the temporary folder: a folder without it is not a checkpoint
PREVIOUS = ".ckpt.dcp.previous"  # where the old sharded checkpoint waits while the new one is renamed in


class CheckpointError(RuntimeError):
    """A checkpoint is missing, corrupt, or does not match what it is loaded into."""


def checkpoint_path(path):
    """A checkpoint, given the checkpoint itself (a file or a sharded folder) or the folder that holds it.

    A folder holding both kinds (a save of one kind removes the other, unless killed in between) gives
    the one written last; one holding neither gives the path of a missing ``ckpt.safetensors``.
    """
    if not os.path.isdir(path) or is_sharded(path):
        return path
    found = [p for p in (os.path.join(path, CHECKPOINT_NAME), _sharded_in(path)) if p is not None and os.path.exists(p)]
    return max(found, key=os.path.getmtime) if found else os.path.join(path, CHECKPOINT_NAME)


def is_sharded(path):
    """Whether ``path`` is a sharded checkpoint's folder (complete or not)."""
    return os.path.isdir(path) and (
        os.path.basename(os.path.normpath(path)) == SHARDED_NAME
        or any(os.path.exists(os.path.join(path, name)) for name in (MANIFEST, ".metadata"))
    )


def _sharded_in(folder):
    """The sharded checkpoint in ``folder``: ``ckpt.dcp`` (complete or not: loading says which), or the
    previous one when a save was killed between moving it aside and renaming the new one in; None."""
    if os.path.isdir(os.path.join(folder, SHARDED_NAME)):
        return os.path.join(folder, SHARDED_NAME)
    if os.path.isfile(os.path.join(folder, PREVIOUS, MANIFEST)):
        return os.path.join(folder, PREVIOUS)
    return None


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
        _remove_superseded(path)
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


def _remove_superseded(path):
    """After a save of one kind under its usual name, remove the other kind beside it: it is older."""
    folder, name = os.path.split(os.path.abspath(path))
    other = {CHECKPOINT_NAME: SHARDED_NAME, SHARDED_NAME: CHECKPOINT_NAME}.get(name)
    if other is None:
        return
    other = os.path.join(folder, other)
    if os.path.isdir(other):
        shutil.rmtree(other)
    elif os.path.isfile(other):
        os.unlink(other)


def remove_interrupted_saves(folder):
    """Delete what saves killed before their rename left in ``folder`` (temporary files and sharded
    folders); returns them. A sharded save killed between its two renames left the previous checkpoint
    aside: it is renamed back. Only safe while no other process is saving there (``fastgpt train``
    holds the folder's run lock).
    """
    leftovers = sorted(glob.glob(os.path.join(glob.escape(folder), TEMP_PATTERN)))
    previous, current = os.path.join(folder, PREVIOUS), os.path.join(folder, SHARDED_NAME)
    if os.path.isdir(previous):
        if os.path.isdir(current):
            leftovers.append(previous)
        else:
            os.rename(previous, current)
    for leftover in leftovers:
        if os.path.isdir(leftover):
            shutil.rmtree(leftover)
        else:
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
    """``{"config", "model_state", "optimizer_state", "progress", "random_states", "sharded"}`` from a
    checkpoint. ``sharded`` is None for a file; for a sharded checkpoint it is the folder, and the
    tensors (``model_state``, ``optimizer_state``: None) are read by ``load_sharded_state`` into the
    model and optimizer they are meant for."""
    path = checkpoint_path(path)
    if os.path.isdir(path):
        return _load_manifest(path)
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
    _check_progress(path, progress)
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
        "sharded": None,
    }


def _check_progress(path, progress):
    step = progress.get("step", 0) if isinstance(progress, dict) else None
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise CheckpointError(f"{path} has damaged progress (expected a dict with a step >= 0, got {progress!r})")


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
    """A GPT rebuilt from a checkpoint of either kind (in eval mode, running on ``backend``), and the
    loaded checkpoint dict. Needs no process group."""
    ckpt = load_checkpoint(path)
    model = GPT(ckpt["config"], backend=backend)
    if ckpt["sharded"] is not None:
        load_sharded_state(ckpt, model)
    else:
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


# ----------------------------------------------------------------------------- sharded (FSDP) checkpoints


def save_sharded_checkpoint(path, model, optimizer, progress, random_states, dist):
    """Write a sharded checkpoint folder at ``path``: a collective, every rank calls it (``dist``: the
    ``fastgpt.distributed.Context``). Each rank writes its shards of the weights and optimizer state
    with ``torch.distributed.checkpoint`` into a temporary sibling folder; when all have written, rank 0
    adds the manifest, flushes it and renames the folder into place. If any rank fails, all raise
    ``CheckpointError`` and the checkpoint there before, if any, is unchanged."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optimizer_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optimizer_state}
    not_finite = _first_non_finite_shard(state)
    if dist.largest(int(not_finite is not None)):
        where = not_finite or "a shard on another rank"
        raise CheckpointError(f"refusing to write {path}: {where} holds NaN or inf values")
    folder = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(folder, f".ckpt-{dist.from_main(secrets.token_hex(8))}.tmp")  # one name for all ranks
    error = None
    try:
        with warnings.catch_warnings():  # "assuming the intent is to save in a single process": it is
            warnings.filterwarnings("ignore", message=".*in a single process")
            # returns on every rank once all have written: rank 0 writes the index (.metadata) last
            dcp.save(state, checkpoint_id=tmp)
    except (OSError, dcp.CheckpointException) as exc:
        error = exc
    if error is None and dist.is_main:
        manifest = {
            "format": SHARDED_FORMAT,
            "config": model.config.to_dict(),
            "progress": progress,
            "random_states": {name: t.contiguous().numpy().tobytes().hex() for name, t in random_states.items()},
        }
        try:
            _publish(tmp, os.path.abspath(path), manifest)
        except OSError as exc:
            error = exc
    if dist.largest(int(error is not None)):  # also the barrier: no rank goes on before the rename
        if dist.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        reason = _first_line(error) if error is not None else "another rank could not write its shards"
        raise CheckpointError(f"could not write {path} ({reason}); the checkpoint there before, if any, is unchanged")


def _publish(tmp, path, manifest):
    """Rank 0, once every rank has written into ``tmp``: checksum the files, write the manifest, flush,
    and rename ``tmp`` to ``path``. The old checkpoint is moved aside first (a folder cannot be renamed
    over a full one) and deleted last; ``remove_interrupted_saves`` renames it back if a kill falls
    between the two renames, and ``checkpoint_path`` finds it there."""
    manifest["files"] = {name: _file_sha256(os.path.join(tmp, name)) for name in sorted(os.listdir(tmp))}
    with open(os.path.join(tmp, MANIFEST), "w") as f:
        json.dump(manifest, f)
        f.flush()
        os.fsync(f.fileno())
    _fsync_folder(tmp)
    folder = os.path.dirname(path)
    previous = os.path.join(folder, PREVIOUS)
    if os.path.exists(path):
        if os.path.exists(previous):  # left by a save killed after its second rename: older than path
            shutil.rmtree(previous)
        os.rename(path, previous)
    os.rename(tmp, path)
    _fsync_folder(folder)
    shutil.rmtree(previous, ignore_errors=True)
    _remove_superseded(path)


def _load_manifest(path):
    """The checkpoint dict of a sharded folder: its manifest read and every file's checksum checked."""
    manifest_file = os.path.join(path, MANIFEST)
    if not os.path.isfile(manifest_file):
        raise CheckpointError(
            f"{path} is not a complete checkpoint (no {MANIFEST}: the save that wrote it did not finish)"
        )
    try:
        with open(manifest_file) as f:
            manifest = json.load(f)
        if manifest.get("format") != SHARDED_FORMAT:
            raise CheckpointError(f"{path} is not a fastgpt sharded checkpoint (format {manifest.get('format')!r})")
        config = GPTConfig.from_dict(manifest["config"])
        progress, files = manifest["progress"], dict(manifest["files"])
        random_states = {name: _bytes_tensor(text) for name, text in manifest["random_states"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise CheckpointError(f"{path} has a damaged {MANIFEST} ({_first_line(exc)})") from exc
    _check_progress(path, progress)
    try:
        identity = _folder_identity(path)
        present = set(os.listdir(path)) - {MANIFEST}
        if present != set(files):
            missing, extra = sorted(set(files) - present), sorted(present - set(files))
            raise CheckpointError(f"{path} is damaged: files missing {missing}, files not in its manifest {extra}")
        damaged = sorted(name for name in files if _file_sha256(os.path.join(path, name)) != files[name])
    except OSError as exc:
        raise _replaced_while_read(path, exc) from exc
    if damaged:
        raise CheckpointError(
            f"{path} is damaged: {', '.join(damaged)} no longer match the checksums written with them"
        )
    return {"config": config, "model_state": None, "optimizer_state": None, "progress": progress,
            "random_states": random_states, "sharded": path, "sharded_identity": identity}


def _folder_identity(path):
    """What tells a folder from another renamed to the same path (a newer save published meanwhile)."""
    status = os.stat(path)
    return status.st_dev, status.st_ino


def _replaced_while_read(path, cause=None):
    """The error of a sharded checkpoint that changed under a reader: a run saving into the same
    folder published a newer one (the checksums and the shards read may then be of different saves)."""
    detail = f" ({_first_line(cause)})" if cause is not None else ""
    return CheckpointError(
        f"{path} was replaced while being read{detail}: a run is saving into this folder; read it again"
    )


def load_sharded_state(ckpt, model, optimizer=None):
    """Read a sharded checkpoint's weights (and optimizer state) into ``model`` (and ``optimizer``),
    whatever the number of ranks that wrote it and whether ``model`` is sharded with FSDP or not: each
    process reads the parts it holds. A collective when a process group is set up; without one, a
    single process reads everything."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_state_dict,
        set_model_state_dict,
        set_state_dict,
    )

    path = ckpt["sharded"]
    if optimizer is None:
        state = {"model": get_model_state_dict(model)}
    else:
        model_state, optimizer_state = get_state_dict(model, optimizer)  # the optimizer's state, initialized
        state = {"model": model_state, "optimizer": optimizer_state}
    try:
        with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
            warnings.filterwarnings("ignore", message=".*in a single process")
            dcp.load(state, checkpoint_id=path)
    except (dcp.CheckpointException, OSError, RuntimeError, ValueError, KeyError) as exc:
        if distributed.is_collective_failure(exc):  # another rank went away: not the checkpoint's fault
            raise
        if not _unchanged(path, ckpt):
            raise _replaced_while_read(path, exc) from exc
        raise CheckpointError(f"{path} does not fit the model ({_first_line(exc)})") from exc
    if not _unchanged(path, ckpt):  # the shards read may not be the ones whose checksums were checked
        raise _replaced_while_read(path)
    not_finite = _first_non_finite_shard(state)
    if not_finite is not None:
        raise CheckpointError(f"{path} holds NaN or inf values in {not_finite}")
    if optimizer is None:
        set_model_state_dict(model, state["model"])
    else:
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])


def _unchanged(path, ckpt):
    """Whether the sharded folder ``ckpt`` was read from is still the one at ``path``."""
    try:
        return _folder_identity(path) == ckpt["sharded_identity"]
    except OSError:
        return False


def _bytes_tensor(hex_text):
    """A random state written as hex text, back as the 1-D uint8 tensor torch takes."""
    data = bytearray.fromhex(hex_text)
    return torch.frombuffer(data, dtype=torch.uint8) if data else torch.zeros(0, dtype=torch.uint8)


def _file_sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _first_non_finite_shard(state, prefix=""):
    """The name of the first floating-point tensor of a nested state dict whose part on this rank holds NaN or inf."""
    items = state.items() if isinstance(state, dict) else enumerate(state) if isinstance(state, (list, tuple)) else ()
    for key, value in items:
        name = f"{prefix}{key}"
        if isinstance(value, torch.Tensor):
            local = value.to_local() if hasattr(value, "to_local") else value
            if local.is_floating_point() and not torch.isfinite(local).all():
                return name
        else:
            found = _first_non_finite_shard(value, name + ".")
            if found is not None:
                return found
    return None


def _first_line(exc):
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__
