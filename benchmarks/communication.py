"""Communication against compute per optimizer step, on paper, for fastgpt's presets: the table of
docs/distributed.md. Nothing is timed; the sizes come from the models themselves.

    python benchmarks/communication.py [--batch-size 32] [--grad-accum 1] [--ranks 2 8 64]

Bytes are what one rank sends (and, as much again, receives) per optimizer step with ring
collectives over W ranks, fp32 (fastgpt's bf16 autocast keeps weights and gradients fp32):

- DDP: one all-reduce of every gradient: ``2 (W-1)/W x 4 P``.
- FSDP2 (``--fsdp``: one unit per decoder block, the rest the root's): per micro-batch each block's
  weights are all-gathered for the forward, freed, and all-gathered again for the backward; the
  root's stay gathered from its forward to its backward; the gradients are reduce-scattered once per
  step: ``(W-1)/W x 4 x ((2K + 1) P_blocks + (K + 1) P_root)`` for K micro-batches.

FLOPs: ``6 x (P - embeddings) x tokens`` for the matmuls plus causal attention's
``3.5 x 2 x B x T^2 x d_model x layers`` (forward ``2 b n^2 d`` per layer, backward 2.5x that).
"""

import argparse

from fastgpt.nn import GPT
from fastgpt.train import PRESETS, build_config


def sizes(preset):
    """``(P, P_blocks, P_root, P_embeddings, config)`` of a preset, counted on the model itself."""
    config = build_config(preset)
    model = GPT(config, backend="reference")
    total = model.num_parameters()
    blocks = sum(p.numel() for p in model.blocks.parameters())
    embeddings = model.token_embedding.weight.numel()
    if config.pos_encoding == "learned":
        embeddings += model.position_embedding.weight.numel()
    return total, blocks, total - blocks, embeddings, config


def flops_per_step(preset, batch_size):
    total, _, _, embeddings, config = sizes(preset)
    tokens = batch_size * config.context_length
    attention = 3.5 * 2 * batch_size * config.context_length**2 * config.d_model * config.n_layers
    return 6 * (total - embeddings) * tokens + attention


def ddp_bytes(total, ranks):
    return 2 * (ranks - 1) / ranks * 4 * total


def fsdp_bytes(blocks, root, ranks, grad_accum):
    return (ranks - 1) / ranks * 4 * ((2 * grad_accum + 1) * blocks + (grad_accum + 1) * root)


def megabytes(n):
    return f"{n / 1e6:.2f} MB" if n < 1e8 else f"{n / 1e6:,.0f} MB"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=32, help="global batch (sequences per step)")
    parser.add_argument("--grad-accum", type=int, default=1,
                        help="micro-batches per step (FSDP gathers the weights for each)")
    parser.add_argument("--ranks", type=int, nargs="+", default=[2, 64])
    args = parser.parse_args()
    columns = ["preset", "P (blocks + root)", "tokens/step", "FLOPs/step"]
    for w in args.ranks:
        columns += [f"DDP, W={w}", f"FSDP, W={w}"]
    columns.append("FLOPs per byte (W large, DDP / FSDP)")
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for preset in PRESETS:
        total, blocks, root, _, config = sizes(preset)
        flops = flops_per_step(preset, args.batch_size)
        row = [preset, f"{total / 1e6:.2f} M ({blocks / 1e6:.2f} + {root / 1e6:.2f})",
               f"{args.batch_size * config.context_length:,}", f"{flops / 1e9:.1f} G"]
        for w in args.ranks:
            row += [megabytes(ddp_bytes(total, w)), megabytes(fsdp_bytes(blocks, root, w, args.grad_accum))]
        large = 10**9
        ddp, fsdp = ddp_bytes(total, large), fsdp_bytes(blocks, root, large, args.grad_accum)
        row.append(f"{flops / ddp:,.0f} / {flops / fsdp:,.0f}")
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
