"""What one measurement record holds (the ``results.json`` schema), and the ratios between the
records of one case: speed-ups against every alternative and percent of the device's ceilings."""

import json

from fastgpt.bench.settings import DTYPE_NAMES

SCHEMA = "fastgpt-bench/1"


def first_line(obj, limit=300):
    """The first line of ``str(obj)``, at most ``limit`` characters: a reason short enough for a table."""
    text = str(obj).strip()
    return text.splitlines()[0][:limit] if text else ""


def record(case, impl, settings, status, reason=None, timing=None, n_sets=0, page_faults=None):
    """The record of ``impl`` on ``case``: ``status`` "ok" with its ``timing`` (and the rates it
    implies), or "skipped"/"error" with the ``reason``."""
    rec = {
        "op": case.op,
        "pass": case.pass_,
        "shape": case.shape,
        "dtype": DTYPE_NAMES[case.dtype],
        "device": settings.device,
        "implementation": impl.name,
        "kind": impl.kind,
        "status": status,
        "reason": reason,
        "input_sets": n_sets,
        "flops": case.flops,
        "bytes": case.bytes,
    }
    if timing is not None:
        rec.update(timing.__dict__)
        seconds = timing.median_ms / 1e3
        rec["tflops"] = case.flops / seconds / 1e12 if case.flops else None
        rec["gbps"] = case.bytes / seconds / 1e9 if case.bytes else None
        if page_faults is not None:
            rec["page_faults_per_call"] = page_faults / timing.reps
    return rec


def case_key(rec):
    """What makes two records measurements of the same point (and so comparable)."""
    return (rec["op"], rec["pass"], json.dumps(rec["shape"], sort_keys=True), rec["dtype"], rec["device"])


def add_ratios(records, ceilings):
    """Give each timed record ``speedup`` (other's time / this time) against every alternative
    measured at the same point, ``best_alternative`` and percent of the ceilings."""
    by_case = {}
    for rec in records:
        if rec.get("status") == "ok":
            by_case.setdefault(case_key(rec), []).append(rec)
    for group in by_case.values():
        for rec in group:
            rec["speedup"] = {
                other["implementation"]: other["median_ms"] / rec["median_ms"] for other in group if other is not rec
            }
            baselines = [o for o in group if o["kind"] == "baseline"]
            if baselines and rec["kind"] == "fastgpt":
                best = min(baselines, key=lambda o: o["median_ms"])
                rec["best_alternative"] = best["implementation"]
                rec["speedup_vs_best_alternative"] = best["median_ms"] / rec["median_ms"]
            if rec.get("tflops") is not None and ceilings:
                rec["pct_of_matmul_ceiling"] = 100 * rec["tflops"] / ceilings["matmul"]["tflops"]
            if rec.get("gbps") is not None and ceilings:
                rec["pct_of_copy_ceiling"] = 100 * rec["gbps"] / ceilings["copy"]["gbps"]
    return records
