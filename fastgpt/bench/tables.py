"""The tables: one progress line per record while a run goes, and the README's markdown table of
a finished run (rates, percent of ceiling, speed-ups against the alternatives)."""

from fastgpt.bench.records import case_key


def format_line(rec):
    """One line of the progress table."""
    keys = ("batch", "heads", "seq", "head_dim", "causal", "rows", "hidden", "n_layers", "d_model", "context_length")
    shape = ",".join(f"{k}={v}" for k, v in rec.get("shape", {}).items() if k in keys)
    head = f"{rec['op']:<14} {rec.get('pass', ''):<10} {rec.get('dtype', ''):<5} {shape:<48}"
    head += f" {rec['implementation']:<18}"
    if rec.get("status") != "ok":
        return f"{head} {rec['status']}: {rec.get('reason')}"
    rate = ""
    if rec.get("tflops") is not None:
        rate = f"{rec['tflops']:8.2f} TFLOP/s"
    elif rec.get("gbps") is not None:
        rate = f"{rec['gbps']:8.1f} GB/s"
    elif rec.get("tokens_per_s") is not None:
        rate = f"{rec['tokens_per_s']:8.0f} tok/s"
    return f"{head} {rec['median_ms']:10.3f} ms [{rec['p20_ms']:.3f}..{rec['p80_ms']:.3f}] {rate}"


def _shape_text(shape):
    if "n_layers" in shape:
        heads = f"{shape['n_heads']}/{shape['n_kv_heads']} heads, " if "n_heads" in shape else ""
        tokens = (
            f"prompt {shape['prompt']} + {shape['new_tokens']} new" if "prompt" in shape else f"context {shape['context_length']}"
        )
        return f"{shape['n_layers']} layers, d_model {shape['d_model']}, {heads}{tokens}, batch {shape['batch']}"
    keys = ("batch", "heads", "seq", "head_dim", "rows", "hidden")
    text = "×".join(str(shape[k]) for k in keys if k in shape)
    return text + (" causal" if shape.get("causal") else "") if "causal" in shape else text


def _ratio(rec, other):
    value = rec.get("speedup", {}).get(other)
    return f"{value:.2f}×" if value is not None else "–"


# a case is listed under the table when one implementation faults at least this often per call
_NOTABLE_PAGE_FAULTS = 1000


def _page_fault_lines(records):
    """Below the table: the cases where some implementation paid many page faults per call (CPU),
    with every implementation's count, since those faults can decide the ratio (see timing.page_faults)."""
    cases = {}
    for r in records:
        if r.get("status") == "ok" and r.get("page_faults_per_call") is not None:
            cases.setdefault(case_key(r), []).append(r)
    lines = []
    for rs in cases.values():
        if max(r["page_faults_per_call"] for r in rs) >= _NOTABLE_PAGE_FAULTS:
            counts = ", ".join(f"{r['implementation']} {r['page_faults_per_call']:.0f}" for r in rs)
            lines.append(f"- {rs[0]['op']} {rs[0]['pass']} {_shape_text(rs[0]['shape'])}: {counts}")
    if not lines:
        return []
    return ["", "Page faults per call (first touches of freshly mapped memory, which the OS must zero):"] + lines


def markdown_table(results, compact=False):
    """The README table: each fastgpt measurement, its rate, percent of ceiling and speed-ups
    (other's time / fastgpt's time: above 1 means fastgpt is faster) against the alternatives; the
    Hugging Face op's records in their own table (``hf.markdown_table``).
    ``compact``: only the fastest fastgpt backend of each case, and no list of what was skipped."""
    m = results["machine"]
    ceil = results.get("ceilings") or {}
    lines = [
        f"Device: {m.get('gpu_name') or m.get('cpu_model')} ({results['settings']['device']}, "
        f"{m.get('cpu_cores')} CPU cores; torch {m.get('torch')}, triton {m.get('triton')}, CUDA {m.get('cuda')}, "
        f"driver {m.get('gpu_driver')}). Ceilings measured in the same run: copy "
        f"{ceil.get('copy', {}).get('gbps', float('nan')):.1f} GB/s, {ceil.get('matmul', {}).get('dtype')} matmul "
        f"{ceil.get('matmul', {}).get('tflops', float('nan')):.2f} TFLOP/s.",
        "",
    ]
    hf_records = [r for r in results["measurements"] if r["op"] == "hf"]
    results = dict(results, measurements=[r for r in results["measurements"] if r["op"] != "hf"])
    ok = [r for r in results["measurements"] if r.get("status") == "ok" and r.get("kind") == "fastgpt"]
    kernels = [r for r in ok if r["op"] != "model"]
    if compact:
        fastest = {}
        for r in kernels:
            key = case_key(r)
            if key not in fastest or r["median_ms"] < fastest[key]["median_ms"]:
                fastest[key] = r
        kernels = [r for r in kernels if fastest[case_key(r)] is r]
    if kernels:
        lines += [
            "| op | pass | shape | dtype | backend | median ms | rate | % of ceiling "
            "| vs eager | vs torch.compile | vs SDPA | vs best alternative |",
            "|---|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in kernels:
            if r.get("tflops") is not None and r["op"] == "attention":
                rate, pct = f"{r['tflops']:.2f} TFLOP/s", r.get("pct_of_matmul_ceiling")
            else:
                rate, pct = f"{r['gbps']:.1f} GB/s", r.get("pct_of_copy_ceiling")
            best = r.get("speedup_vs_best_alternative")
            best_text = f"{best:.2f}× ({r['best_alternative']})" if best else "–"
            lines.append(
                f"| {r['op']} | {r['pass']} | {_shape_text(r['shape'])} | {r['dtype']} "
                f"| {r['implementation'].split('/')[-1]} | {r['median_ms']:.3f} | {rate} | {pct:.1f}% "
                f"| {_ratio(r, 'torch eager')} | {_ratio(r, 'torch.compile')} "
                f"| {_ratio(r, 'sdpa') if r['op'] == 'attention' else '–'} "
                f"| {best_text} |"
            )
    lines += _page_fault_lines(results["measurements"])
    model = [r for r in results["measurements"] if r["op"] == "model" and r.get("status") == "ok"]
    if model:
        lines += [
            "",
            "| GPT | pass | shape | dtype | tokens/s | peak memory | vs plain torch | vs torch.compile |",
            "|---|---|---|---|---:|---:|---:|---:|",
        ]
        for r in model:
            mem = f"{r['peak_memory_bytes'] / 2**20:.0f} MiB" if r.get("peak_memory_bytes") else "–"
            lines.append(
                f"| {r['implementation']} | {r.get('pass', 'train_step')} | {_shape_text(r['shape'])} | {r['dtype']} "
                f"| {r['tokens_per_s']:.0f} | {mem} | {_ratio(r, 'torch')} | {_ratio(r, 'torch.compile')} |"
            )
    if hf_records:  # the Hugging Face op has its own columns: its module renders them
        from fastgpt.bench import hf

        lines += ["", hf.markdown_table(dict(results, measurements=hf_records))]
    not_ok = [r for r in results["measurements"] if r.get("status") != "ok"]
    skipped = sorted({(r["implementation"], r.get("reason")) for r in not_ok})
    if skipped and not compact:
        lines += ["", "Not measured:"] + [f"- {impl}: {reason}" for impl, reason in skipped]
    return "\n".join(lines)
