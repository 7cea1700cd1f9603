"""``fastgpt bench`` on the command line: its options, the ops it can time, and a run from start to
finish (ceilings, every op, ceilings again, ratios, JSON, plots, table)."""

import argparse
import datetime
import json
import os
import sys
import time

import torch

from fastgpt.bench import add_layer_norm, attention, hf, model, overhead
from fastgpt.bench.machine import best_ceilings, last_level_cache_bytes, machine_info, measure_ceilings
from fastgpt.bench.plots import write_plots
from fastgpt.bench.records import SCHEMA, add_ratios
from fastgpt.bench.settings import DTYPE_NAMES, DTYPES, Settings
from fastgpt.bench.tables import format_line, markdown_table

DESCRIPTION = (
    "Time fastgpt's ops and GPT against eager PyTorch, torch.compile and SDPA, and against this "
    "machine's copy bandwidth and matmul rate, all measured in the same run."
)

# What `--op` can name, in the order `--op all` runs them (the model last: the slowest, and
# fastgpt.nn may not be importable). Each is ``run(settings, emit)``: time the op, ``emit(record)``.
OPS = {
    "attention": attention.run,
    "add_layer_norm": add_layer_norm.run,
    "model": model.run,
    "overhead": overhead.run,
    "hf": hf.run,
}
# `--op all`: fastgpt's own ops. The Hugging Face model needs the optional transformers and takes
# minutes, so it runs only when named.
ALL_OPS = ("attention", "add_layer_norm", "model")


def settings_for(device, sizes, no_compile=False, dtypes=None):
    """The ``Settings`` of ``fastgpt bench`` on ``device`` with size set ``sizes``: quick and tiny
    runs spend less time per measurement, and CPU quick runs leave torch.compile out."""
    compile_skip_reason = None
    if no_compile:
        compile_skip_reason = "torch.compile baselines turned off (--no-compile)"
    elif device == "cpu" and sizes != "full":
        compile_skip_reason = "left out of CPU --quick runs, which take seconds: compiling takes longer"
    return Settings(
        device=device,
        sizes=sizes,
        budget_s={"tiny": 0.02, "quick": 0.1 if device == "cuda" else 0.3}.get(sizes, 1.0),
        min_reps=5 if sizes == "full" or device == "cuda" else 3,
        max_reps=1000 if device == "cuda" else 200,
        warmup=3 if sizes == "full" or device == "cuda" else 1,
        compile_skip_reason=compile_skip_reason,
        # 4× the last-level cache; less for quick runs, where making the inputs would dominate
        rotate_bytes=min(4 * last_level_cache_bytes(device), (256 << 20) if sizes != "full" else (2 << 30)),
        dtypes=dtypes,
    )


def dtype_list(text):
    """The dtypes of ``--dtype``: a comma-separated list of names in DTYPES."""
    try:
        return [DTYPES[name.strip()] for name in text.split(",") if name.strip()]
    except KeyError as exc:
        message = f"--dtype takes a comma-separated list of {sorted(DTYPES)}, got {text!r}"
        raise argparse.ArgumentTypeError(message) from exc


def json_name(text):
    """The file name of ``--json-name``: a plain name, so the JSON stays inside ``--out``."""
    separators = [sep for sep in (os.sep, os.altsep, "/") if sep]
    if not text or text in (".", "..") or any(sep in text for sep in separators):
        raise argparse.ArgumentTypeError(
            f"--json-name takes a file name without a folder (the file is written inside --out), got {text!r}"
        )
    return text


def add_arguments(parser):
    """The options of ``fastgpt bench``."""
    parser.add_argument(
        "--op",
        choices=tuple(OPS) + ("all",),
        default="all",
        help=f"what to time (default: all = {', '.join(ALL_OPS)}; overhead: both ops on tiny inputs, the "
        "per-call cost; hf: a Hugging Face Llama-style model, needs transformers)",
    )
    parser.add_argument(
        "--device", choices=("cpu", "cuda"), default=None, help="default: cuda when available, else cpu"
    )
    parser.add_argument(
        "--dtype",
        type=dtype_list,
        default=None,
        help="comma-separated fp32,bf16,fp16 (default: bf16, and fp32 for add_layer_norm, on cuda; fp32 on cpu)",
    )
    parser.add_argument("--quick", action="store_true", help="a few points per sweep (CPU: seconds; GPU: 2-3 minutes)")
    parser.add_argument(
        "--sizes",
        choices=("full", "quick", "tiny"),
        default=None,
        help="size set; tiny is a smoke test (overrides --quick)",
    )
    parser.add_argument("--no-compile", action="store_true", help="leave out the torch.compile baselines")
    parser.add_argument(
        "--out", default="benchmarks/results", help="folder for the JSON and the PNGs (default: benchmarks/results)"
    )
    parser.add_argument(
        "--json-name",
        type=json_name,
        default="results.json",
        help="file name of the JSON inside --out (a name, no folder); an existing file of that name is "
        "not overwritten: the run refuses to start unless --overwrite is given",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --json-name file in --out")
    parser.add_argument(
        "--tune",
        action="store_true",
        help="instead of benchmarking, measure which backend is fastest for each kind of call on this machine "
        "and write the table backend='auto' follows (fastgpt/auto_rule.py); with --device, --dtype, --quick",
    )
    parser.add_argument(
        "--tune-out",
        default=None,
        help="where --tune writes its table (default: ~/.cache/fastgpt/auto/<device class>.json, which auto reads)",
    )


def output_problem(out, json_path, overwrite):
    """Why the run cannot write its JSON to ``json_path`` in the folder ``out`` (None: it can),
    found before anything is measured. Creates ``out`` when it is missing."""
    if os.path.exists(out) and not os.path.isdir(out):
        return f"--out {out!r} is a file, not a folder"
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as exc:
        return f"--out {out!r}: cannot create the folder: {exc.strerror or exc}"
    if not os.access(out, os.W_OK | os.X_OK):
        return f"--out {out!r}: the folder is not writable"
    if os.path.isdir(json_path):
        return f"{json_path!r} is a folder: pick another --json-name"
    if os.path.exists(json_path) and not overwrite:
        return (
            f"{json_path!r} exists (an earlier run's results): pick another --json-name or --out, "
            "or pass --overwrite to replace it"
        )
    return None


def run_tune(args, device, argv=None):
    """``fastgpt bench --tune``: measure auto's table for ``device`` and write it."""
    from fastgpt import auto_rule
    from fastgpt.bench import tune

    path = args.tune_out or auto_rule.user_table_path(auto_rule.device_class(device))
    if os.path.isdir(path):
        print(f"fastgpt bench: --tune-out {path!r} is a folder: name the table's file", file=sys.stderr)
        return 2
    sizes = args.sizes or ("quick" if args.quick else "full")
    budget_s = {"full": 1.0, "quick": 0.3}.get(sizes, 0.01)
    if argv is None:  # `fastgpt bench ...` or `python -m fastgpt.bench ...`
        argv = sys.argv[2:] if sys.argv[1:2] == ["bench"] else sys.argv[1:]
    command = " ".join(["fastgpt", "bench", *argv])
    print(f"fastgpt bench --tune: every backend auto may use on {device}, one typical call per bucket", flush=True)
    table = tune.tune(device, args.dtype, sizes, budget_s, command=command)
    try:
        tune.write_table(table, path)
    except OSError as exc:
        print(f"fastgpt bench: cannot write the table to {path!r}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    print(f"wrote {path} ({len(table['choices'])} buckets); backend='auto' reads it from now on")
    return 0


def run(args, argv=None):
    """Run ``fastgpt bench`` with parsed ``args``; returns the exit status. ``argv``: the
    command-line arguments to record in the JSON (default: ``sys.argv[1:]``)."""
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        print("fastgpt bench: --device cuda but torch sees no CUDA device", file=sys.stderr)
        return 2
    if args.tune:
        return run_tune(args, device, argv)
    json_path = os.path.join(args.out, args.json_name)
    problem = output_problem(args.out, json_path, args.overwrite)
    if problem:
        print(f"fastgpt bench: {problem}", file=sys.stderr)
        return 2
    sizes = args.sizes or ("quick" if args.quick else "full")
    settings = settings_for(device, sizes, args.no_compile, args.dtype)
    torch.manual_seed(0)
    wanted = ALL_OPS if args.op == "all" else (args.op,)
    print(f"fastgpt bench: {', '.join(wanted)} on {device} ({sizes} sizes) -> {args.out}", flush=True)
    ceilings = measure_ceilings(settings)
    print(
        f"ceilings: copy {ceilings['copy']['gbps']:.1f} GB/s, "
        f"{ceilings['matmul']['dtype']} matmul {ceilings['matmul']['tflops']:.2f} TFLOP/s",
        flush=True,
    )
    results = {
        "schema": SCHEMA,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(sys.argv if argv is None else ["fastgpt", "bench", *argv]),
        "settings": {
            "device": device,
            "sizes": sizes,
            "ops": list(wanted),
            "dtypes": [DTYPE_NAMES[d] for d in args.dtype] if args.dtype else "default",
            "compile": settings.compile_skip_reason is None,
        },
        "machine": machine_info(device),
        "ceilings": ceilings,
        "measurements": [],
        "notes": settings.notes,
        "plots": [],
    }
    last_write = [0.0]

    def write_json(force=False):
        # every few seconds and at the end, so a run stopped by a timeout keeps what it measured;
        # through a temporary file, so a run killed while writing leaves the previous JSON whole
        if force or time.perf_counter() - last_write[0] > 5:
            add_ratios(results["measurements"], ceilings)
            with open(json_path + ".tmp", "w") as f:
                json.dump(results, f, indent=1)
            os.replace(json_path + ".tmp", json_path)
            last_write[0] = time.perf_counter()

    def log(rec):
        print(format_line(rec), flush=True)
        results["measurements"].append(rec)
        write_json()

    for op, run_op in OPS.items():
        if op in wanted:
            run_op(settings, log)
    print("measuring the ceilings again at the end of the run", flush=True)
    results["ceilings_measured"] = [ceilings, measure_ceilings(settings)]
    results["ceilings"] = ceilings = best_ceilings(*results["ceilings_measured"])
    add_ratios(results["measurements"], ceilings)
    pcts = [r.get(k, 0) for r in results["measurements"] for k in ("pct_of_matmul_ceiling", "pct_of_copy_ceiling")]
    over = [p for p in pcts if p > 100]
    if over:
        settings.notes.append(
            f"{len(over)} measurements exceed 100% of a ceiling: caches (small sizes) or a ceiling measured "
            "while the machine was busy; read those percentages with care"
        )
    plots, notes = write_plots(results, args.out, os.path.splitext(args.json_name)[0])
    results["plots"] = [os.path.basename(p) for p in plots]
    results["notes"] += notes
    write_json(force=True)
    records = results["measurements"]
    print()
    print(markdown_table(results))
    for note in results["notes"]:
        print(f"note: {note}")
    failed = [r for r in records if r.get("status") == "error"]
    for rec in failed:
        print(f"ERROR {rec['op']} {rec['implementation']} {rec.get('shape')}: {rec['reason']}")
    print(f"wrote {json_path}" + "".join(f", {p}" for p in plots))
    return 1 if failed else 0


def main(argv=None):
    """``fastgpt bench`` with the command-line arguments ``argv`` (default: ``sys.argv[1:]``)."""
    parser = argparse.ArgumentParser(prog="fastgpt bench", description=DESCRIPTION)
    add_arguments(parser)
    return run(parser.parse_args(argv), argv)

