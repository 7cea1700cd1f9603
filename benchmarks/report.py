"""Render `fastgpt bench` results as the README's markdown table; merge several runs into one JSON.

    python benchmarks/report.py benchmarks/results/cpu.json            # full table
    python benchmarks/report.py --compact a/results.json b/results.json --merge-out all.json --plots DIR

Ratios are "other implementation's median time / fastgpt's median time" measured in the same
run (above 1: fastgpt is faster); percentages are of the ceilings measured in that run.
"""

import argparse
import json
import os
import sys

from fastgpt.bench import SCHEMA, markdown_table, write_plots


def load(path):
    with open(path) as f:
        results = json.load(f)
    if results.get("schema") != SCHEMA:
        raise SystemExit(f"{path}: not a fastgpt bench result (schema {results.get('schema')!r}, expected {SCHEMA!r})")
    return results


def merge(runs):
    """One result from several runs on the same machine (e.g. one run per op): the first run's
    machine and ceilings; every run's measurements, each already rated against its own run's ceilings."""
    merged = dict(runs[0])
    merged["measurements"] = [m for r in runs for m in r["measurements"]]
    merged["settings"] = dict(runs[0]["settings"], ops=[op for r in runs for op in r["settings"]["ops"]])
    merged["notes"] = sorted({n for r in runs for n in r.get("notes", [])})
    merged["plots"] = [p for r in runs for p in r.get("plots", [])]
    merged["runs"] = [{key: r.get(key) for key in ("command", "created", "ceilings")} for r in runs]
    return merged


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", nargs="+", help="results JSON written by fastgpt bench")
    parser.add_argument("--compact", action="store_true", help="only the fastest fastgpt backend per case")
    parser.add_argument("--merge-out", help="also write the merged results to this JSON file")
    parser.add_argument(
        "--plots", metavar="DIR", help="also draw the merged results' plots into DIR, named after --merge-out"
    )
    args = parser.parse_args(argv)
    results = merge([load(p) for p in args.results])
    if args.plots:
        stem = os.path.splitext(os.path.basename(args.merge_out or "merged.json"))[0]
        paths, notes = write_plots(results, args.plots, stem)
        results["plots"] = [os.path.basename(p) for p in paths]
        results["notes"] = sorted(set(results["notes"]) | set(notes))
    if args.merge_out:
        with open(args.merge_out, "w") as f:
            json.dump(results, f, indent=1)
    print(markdown_table(results, compact=args.compact))
    return 0


if __name__ == "__main__":
    sys.exit(main())
