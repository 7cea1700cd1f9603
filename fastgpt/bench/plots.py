"""The plots of a run: one PNG per op, rate against size, one line per implementation."""

import math
import os


def write_plots(results, out_dir, stem):
    """One PNG per op, ``<stem>-<op>.png`` beside the JSON ``<stem>.json`` they are drawn from (so
    runs into one folder under different JSON names keep their own plots): rate against size, one
    line per implementation, the measured ceiling dotted."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        return [], [f"plots skipped: matplotlib is not installed ({exc})"]
    paths = []

    def save(fig, op):
        fig.tight_layout()
        paths.append(os.path.join(out_dir, f"{stem}-{op}.png"))
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)

    ceilings = results.get("ceilings") or {}
    plans = {
        "attention": ("seq", "tflops", "TFLOP/s", ceilings.get("matmul", {}).get("tflops"), "matmul ceiling"),
        "add_layer_norm": ("hidden", "gbps", "GB/s", ceilings.get("copy", {}).get("gbps"), "copy ceiling"),
    }
    device = results["settings"]["device"]
    gpu = results["machine"].get("gpu_name") or results["machine"].get("cpu_model")
    for op, (x_field, y_field, y_label, ceiling, ceiling_label) in plans.items():
        recs = [r for r in results["measurements"] if r["op"] == op and r.get("status") == "ok"]
        if not recs:
            continue
        panels = {}
        for r in recs:
            key = (r["dtype"], r["pass"]) + tuple((k, v) for k, v in r["shape"].items() if k not in (x_field, "batch"))
            panels.setdefault(key, []).append(r)
        ncols = min(4, len(panels))
        nrows = math.ceil(len(panels) / ncols)
        fig, axes = plt.subplots(nrows, ncols, figsize=(4.5 * ncols, 3.6 * nrows), squeeze=False)
        for ax, (key, group) in zip(axes.flat, sorted(panels.items(), key=lambda kv: str(kv[0]))):
            for impl in sorted({r["implementation"] for r in group}):
                pts = sorted((r["shape"][x_field], r[y_field]) for r in group if r["implementation"] == impl)
                style = "-" if impl.startswith("fastgpt") else "--"
                ax.plot([p[0] for p in pts], [p[1] for p in pts], style, marker="o", markersize=3, label=impl)
            if ceiling:
                ax.axhline(ceiling, color="black", linestyle=":", linewidth=1, label=f"{ceiling_label} {ceiling:.3g}")
            ax.set_xscale("log", base=2)
            ax.set_xlabel(x_field)
            ax.set_ylabel(y_label)
            ax.set_title(" ".join(f"{k[0]}={k[1]}" if isinstance(k, tuple) else str(k) for k in key), fontsize=8)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=6)
        for ax in list(axes.flat)[len(panels):]:
            ax.axis("off")
        fig.suptitle(f"fastgpt {op} on {device}: {gpu}", fontsize=10)
        save(fig, op)
    model = [r for r in results["measurements"] if r["op"] == "model" and r.get("status") == "ok"]
    if model:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.bar([r["implementation"] for r in model], [r["tokens_per_s"] for r in model])
        ax.set_ylabel("training tokens/s")
        ax.set_title(f"GPT training step on {device}: {gpu}", fontsize=9)
        save(fig, "model")
    return paths, []
