"""The GPT: token embedding + positional encoding, decoder blocks, a linear layer to logits.

Attention and residual + LayerNorm go through ``fastgpt.ops``, so every backend slots in here
without touching the model. The backend is chosen when the model is built or run
(``GPT(config, backend=...)``, ``model.set_backend(...)``, ``fastgpt.use_backend(...)`` or
``FASTGPT_BACKEND``), not stored in its config: ``backend="torch"`` runs torch's own kernels,
the baseline the benchmarks compare against.
"""

import math
from dataclasses import asdict, dataclass, fields
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from fastgpt import dispatch, ops


@dataclass
class GPTConfig:
    vocab_size: int = 256  # byte-level tokens
    context_length: int = 128  # longest sequence the positional encoding covers
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: Optional[int] = None  # fewer key/value heads than query heads: GQA (None: = n_heads)
    d_model: int = 128
    d_ff: Optional[int] = None  # feed-forward width (None: 4 × d_model)
    dropout: float = 0.0
    norm_position: str = "post"  # "post": LayerNorm(x + sublayer(x)), the original; "pre": x + sublayer(LayerNorm(x))
    pos_encoding: str = "sinusoidal"  # or "learned"
    activation: str = "relu"  # or "gelu"
    tie_weights: bool = False  # share the token embedding with the output layer
    # each token attends to itself and the sliding_window - 1 tokens before it (Mistral's sliding
    # window); None: to every earlier token. Checkpoints written before the field load with None.
    sliding_window: Optional[int] = None

    def __post_init__(self):
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.d_ff is None:
            self.d_ff = 4 * self.d_model
        positive = ("vocab_size", "context_length", "n_layers", "n_heads", "n_kv_heads", "d_model", "d_ff")
        for name in positive:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"GPTConfig.{name} must be a positive integer, got {value!r}")
        if self.d_model % self.n_heads:
            raise ValueError(f"GPTConfig.d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"GPTConfig.n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})")
        if self.sliding_window is not None and (
            isinstance(self.sliding_window, bool) or not isinstance(self.sliding_window, int) or self.sliding_window < 1
        ):
            raise ValueError(f"GPTConfig.sliding_window must be a positive integer or None, got {self.sliding_window!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"GPTConfig.dropout must be in [0, 1), got {self.dropout!r}")
        for name, allowed in (
            ("norm_position", ("post", "pre")),
            ("pos_encoding", ("sinusoidal", "learned")),
            ("activation", ("relu", "gelu")),
        ):
            if getattr(self, name) not in allowed:
                raise ValueError(f"GPTConfig.{name} must be one of {allowed}, got {getattr(self, name)!r}")

    @property
    def head_dim(self):
        return self.d_model // self.n_heads

    def to_dict(self):
        return asdict(self)

    @classmethod
    def from_dict(cls, values):
        # checkpoints written before the backend left the config carry a "backend" field: the
        # backend is a run-time choice now, so it is ignored
        values = {name: value for name, value in values.items() if name not in _RETIRED_FIELDS}
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown GPTConfig fields: {', '.join(unknown)}")
        return cls(**values)


_RETIRED_FIELDS = ("backend",)


class KVCache:
    """Keys and values of every layer for the tokens seen so far, preallocated to the context length."""

    def __init__(self, config, batch_size, device, dtype):
        shape = (batch_size, config.n_kv_heads, config.context_length, config.head_dim)
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layers)]
        self.values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layers)]
        self.length = 0  # tokens stored

    def append(self, layer, k, v):
        """Store this layer's new keys/values after the cached ones; returns views of all of them."""
        end = self.length + k.shape[2]
        self.keys[layer][:, :, self.length : end] = k
        self.values[layer][:, :, self.length : end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]


class CausalSelfAttention(nn.Module):
    def __init__(self, config, layer_index=0, backend="auto"):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.n_kv_heads, config.head_dim
        self.backend = backend
        self.layer_index = layer_index
        # ops' window: (left, right) keys around each query; the right side is 0 under causal
        self.window = None if config.sliding_window is None else (config.sliding_window - 1, 0)
        self.qkv = nn.Linear(config.d_model, (config.n_heads + 2 * config.n_kv_heads) * config.head_dim)
        self.proj = nn.Linear(config.d_model, config.d_model)

    def forward(self, x, kv_cache=None):
        b, t, _ = x.shape
        # heads stay a view of the projection: (b, t, heads, d) transposed, no copy
        q, k, v = self.qkv(x).view(b, t, -1, self.head_dim).split([self.n_heads, self.n_kv_heads, self.n_kv_heads], 2)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if kv_cache is not None:
            k, v = kv_cache.append(self.layer_index, k, v)
        o = ops.attention(q, k, v, causal=True, window=self.window, backend=self.backend)
        return self.proj(o.transpose(1, 2).reshape(b, t, -1))


class AddLayerNorm(nn.Module):
    """``(y, h) = (LayerNorm(x + residual), x + residual)`` in one fused pass."""

    def __init__(self, d_model, eps=1e-5, bias=True, backend="auto"):
        super().__init__()
        self.eps, self.backend = eps, backend
        self.weight = nn.Parameter(torch.ones(d_model))
        self.bias = nn.Parameter(torch.zeros(d_model)) if bias else None

    def forward(self, x, residual):
        return ops.add_layer_norm(x, residual, self.weight, self.bias, self.eps, backend=self.backend)


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.up = nn.Linear(config.d_model, config.d_ff)
        self.down = nn.Linear(config.d_ff, config.d_model)
        self.activation = F.relu if config.activation == "relu" else F.gelu

    def forward(self, x):
        return self.down(self.activation(self.up(x)))


class Block(nn.Module):
    """A decoder block. Post-norm: ``x = LN(x + attn(x)); x = LN(x + ffn(x))``. Pre-norm carries the
    residual stream ``h`` beside the sublayer output and folds each addition into the next norm."""

    def __init__(self, config, layer_index=0, backend="auto"):
        super().__init__()
        self.pre_norm = config.norm_position == "pre"
        self.attn = CausalSelfAttention(config, layer_index, backend)
        self.mlp = MLP(config)
        self.norm1 = AddLayerNorm(config.d_model, backend=backend)
        self.norm2 = AddLayerNorm(config.d_model, backend=backend)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x, residual=None, kv_cache=None):
        if self.pre_norm:  # x: last sublayer's output, residual: the stream before it
            y, residual = self.norm1(x, residual)
            y, residual = self.norm2(self.dropout(self.attn(y, kv_cache)), residual)
            return self.dropout(self.mlp(y)), residual
        x, _ = self.norm1(self.dropout(self.attn(x, kv_cache)), x)
        x, _ = self.norm2(self.dropout(self.mlp(x)), x)
        return x, None


def sinusoidal_encoding(length, d_model):
    """The fixed encoding of "Attention Is All You Need": sin/cos at geometrically spaced frequencies."""
    position = torch.arange(length, dtype=torch.float32)[:, None]
    frequency = torch.exp(torch.arange(0, d_model, 2, dtype=torch.float32) * (-math.log(10000.0) / d_model))
    encoding = torch.zeros(length, d_model)
    encoding[:, 0::2] = torch.sin(position * frequency)
    encoding[:, 1::2] = torch.cos(position * frequency)[:, : d_model // 2]
    return encoding


class GPT(nn.Module):
    """The textbook GPT. ``backend`` picks the kernels of attention and add+LayerNorm
    (``"auto"``, or a name from ``fastgpt.backends()``); ``set_backend`` changes it later."""

    def __init__(self, config, backend="auto"):
        super().__init__()
        dispatch.check_backend_name(backend)
        self.config = config
        self.token_embedding = nn.Embedding(config.vocab_size, config.d_model)
        if config.pos_encoding == "learned":
            self.position_embedding = nn.Embedding(config.context_length, config.d_model)
        else:
            self.register_buffer(
                "position_encoding", sinusoidal_encoding(config.context_length, config.d_model), persistent=False
            )
        self.dropout = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config, i, backend) for i in range(config.n_layers))
        # pre-norm ends with a norm of the stream; post-norm blocks already end normalized
        self.final_norm = AddLayerNorm(config.d_model, backend=backend) if config.norm_position == "pre" else None
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2: keep the residual stream's variance in check
            if name.endswith(("attn.proj.weight", "mlp.down.weight")):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * config.n_layers))
        if config.tie_weights:
            self.lm_head.weight = self.token_embedding.weight

    @property
    def backend(self):
        return self.blocks[0].attn.backend

    def set_backend(self, backend):
        """Run attention and add+LayerNorm on ``backend`` from now on; returns the model."""
        dispatch.check_backend_name(backend)
        for module in self.modules():
            if isinstance(module, (CausalSelfAttention, AddLayerNorm)):
                module.backend = backend
        return self

    @staticmethod
    def _init_weights(module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def num_parameters(self):
        return sum(p.numel() for p in self.parameters())

    def forward(self, idx, targets=None, kv_cache=None, last_only=False):
        """Logits ``(batch, seq, vocab)`` and, given targets, the mean cross-entropy (else None).

        With a ``kv_cache``, ``idx`` holds only the new tokens; they attend to the cached ones too.
        ``last_only`` computes the logits of the last position only, ``(batch, 1, vocab)``: all
        that sampling needs (a 4k-token prompt's other logits cost as much as a layer's matmuls).
        """
        if last_only and targets is not None:
            raise ValueError("last_only=True gives no loss: pass targets=None with it")
        if idx.dim() != 2:
            raise ValueError(f"idx must have shape (batch, seq), got {tuple(idx.shape)}")
        start = kv_cache.length if kv_cache is not None else 0
        end = start + idx.shape[1]
        if end > self.config.context_length:
            raise ValueError(f"sequence of {end} tokens exceeds context_length {self.config.context_length}")
        x = self.token_embedding(idx)
        if self.config.pos_encoding == "learned":
            x = x + self.position_embedding(torch.arange(start, end, device=idx.device))
        else:
            x = x * math.sqrt(self.config.d_model) + self.position_encoding[start:end].to(x.dtype)
        x, residual = self.dropout(x), None
        if self.final_norm is not None:  # the stream starts at the embeddings, the first "sublayer output" at 0
            x, residual = torch.zeros_like(x), x
        for block in self.blocks:
            x, residual = block(x, residual, kv_cache)
        if self.final_norm is not None:
            x, _ = self.final_norm(x, residual)
        if kv_cache is not None:
            kv_cache.length = end
        logits = self.lm_head(x[:, -1:] if last_only else x)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
        return logits, loss

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, generator=None):
        """Sample ``max_new_tokens`` tokens after ``idx`` (batch, seq) with a KV cache.

        ``temperature=0`` picks the most likely token. Past the context length the cache is
        refilled from the last half context, so generation can run on indefinitely.
        """
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        if top_k is not None and top_k < 1:
            raise ValueError(f"top_k must be a positive integer or None, got {top_k}")
        window = self.config.context_length
        dtype = next(self.parameters()).dtype
        cache = None
        for _ in range(max_new_tokens):
            if cache is None or cache.length >= window:
                # (re)fill the cache from the most recent tokens, leaving room to go on
                keep = idx[:, -(window // 2 if cache is not None else window) :]
                cache = KVCache(self.config, idx.shape[0], idx.device, dtype)
                logits, _ = self(keep, kv_cache=cache, last_only=True)
            else:
                logits, _ = self(idx[:, -1:], kv_cache=cache)
            next_token = sample_next_token(logits[:, -1].float(), temperature, top_k, generator)
            idx = torch.cat([idx, next_token], dim=1)
        return idx


def sample_next_token(logits, temperature, top_k, generator=None):
    """One token per row from ``softmax(logits / temperature)`` restricted to the ``top_k`` best."""
    if temperature == 0:
        return logits.argmax(-1, keepdim=True)
    logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth_best = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth_best, -math.inf)
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator)
