"""Training text as byte-level tokens (vocabulary 256), and random batches from it.

The built-in corpus needs no download: the Python standard library's own ``.py`` sources on
this machine, read in sorted path order up to a size cap. The last tenth is held out.
"""

import os
import sysconfig

import torch

DEFAULT_CORPUS_BYTES = 4 * 1024 * 1024
HELD_OUT_FRACTION = 0.1


class DataError(ValueError):
    """The training text is missing, empty, or too short for the context length."""


def stdlib_corpus(max_bytes=DEFAULT_CORPUS_BYTES):
    """The standard library's ``.py`` files, concatenated in sorted path order, at most ``max_bytes``."""
    root = sysconfig.get_paths()["stdlib"]
    paths = []
    for folder, subfolders, files in os.walk(root):
        subfolders[:] = sorted(d for d in subfolders if d not in ("site-packages", "dist-packages", "__pycache__"))
        paths.extend(os.path.join(folder, name) for name in files if name.endswith(".py"))
    chunks, total = [], 0
    for path in sorted(paths, key=lambda p: os.path.relpath(p, root)):
        with open(path, "rb") as f:
            chunk = f.read()
        chunks.append(chunk[: max_bytes - total])
        total += len(chunks[-1])
        if total >= max_bytes:
            break
    if total == 0:
        raise DataError(f"found no Python sources under {root} for the built-in corpus; pass --data FILE")
    return b"".join(chunks)


def read_text_file(path):
    if not os.path.isfile(path):
        raise DataError(f"--data {path}: no such file")
    with open(path, "rb") as f:
        data = f.read()
    if not data:
        raise DataError(f"--data {path}: the file is empty")
    return data


def encode(text):
    """Bytes (or str, as UTF-8) to a uint8 token tensor."""
    if isinstance(text, str):
        text = text.encode("utf-8")
    return torch.frombuffer(bytearray(text), dtype=torch.uint8)


def decode(tokens):
    return bytes(tokens.to(torch.uint8).tolist()).decode("utf-8", errors="replace")


class ByteDataset:
    """A token stream split into training and held-out parts, sampled as (input, next-token) windows."""

    def __init__(self, data, context_length, held_out_fraction=HELD_OUT_FRACTION):
        tokens = encode(data)
        split = int(len(tokens) * (1 - held_out_fraction))
        self.train, self.held_out = tokens[:split], tokens[split:]
        self.context_length = context_length
        for name, part in (("training", self.train), ("held-out", self.held_out)):
            if len(part) < context_length + 1:
                raise DataError(
                    f"the {name} text has {len(part)} bytes, fewer than context_length + 1 = {context_length + 1}; "
                    "use more text or a shorter context"
                )

    def batch(self, split, batch_size, generator, device="cpu"):
        """``batch_size`` random windows: inputs and the same windows shifted by one token."""
        tokens = self.train if split == "train" else self.held_out
        starts = torch.randint(len(tokens) - self.context_length, (batch_size,), generator=generator)
        offsets = torch.arange(self.context_length + 1)
        windows = tokens[starts[:, None] + offsets].long()
        return windows[:, :-1].to(device), windows[:, 1:].to(device)
