"""Render `fastgpt bench` results as the README's markdown table; merge several runs into one JSON;
regenerate the README's tables from the committed JSON they cite.

    python benchmarks/report.py benchmarks/results/cpu.json            # full table
    python benchmarks/report.py --compact a/results.json b/results.json --merge-out all.json --plots DIR
    python benchmarks/report.py --update-readme                         # rewrite README.md's tables
    python benchmarks/report.py --check-readme                          # exit 1 if one is stale

A README table lies between two markers naming the JSON it is rendered from (paths relative to the
README's folder; several runs of one machine are merged into one table):

    <!-- bench-table: benchmarks/results/a.json benchmarks/results/b.json -->
    ... generated: the commands that measured, the command that rendered, the table ...
    <!-- /bench-table -->

Ratios are "other implementation's median time / fastgpt's median time" measured in the same
run (above 1: fastgpt is faster); percentages are of the ceilings measured in that run.
"""

import argparse
import json
import os
import re
import sys
from pathlib import Path

from fastgpt.bench import SCHEMA, markdown_table, write_plots

README = Path(__file__).resolve().parents[1] / "README.md"
TABLE_START = re.compile(r"^<!-- bench-table: (?P<paths>.+?) -->$", re.M)
TABLE_END = "<!-- /bench-table -->"


def load(path):
    with open(path) as f:
        results = json.load(f)
    if results.get("schema") != SCHEMA:
        raise SystemExit(f"{path}: not a fastgpt bench result (schema {results.get('schema')!r}, expected {SCHEMA!r})")
    return results


def merge(runs):
    """One result from several runs on the same machine (e.g. one run per op): the first run's
    machine and ceilings; every run's measurements, each already rated against its own run's
    ceilings, grouped by op in the order the ops first appear."""
    merged = dict(runs[0])
    measurements = [m for r in runs for m in r["measurements"]]
    op_order = {op: i for i, op in enumerate(dict.fromkeys(m["op"] for m in measurements))}
    merged["measurements"] = sorted(measurements, key=lambda m: op_order[m["op"]])
    merged["settings"] = dict(runs[0]["settings"], ops=[op for r in runs for op in r["settings"]["ops"]])
    merged["notes"] = sorted({n for r in runs for n in r.get("notes", [])})
    merged["plots"] = [p for r in runs for p in r.get("plots", [])]
    merged["runs"] = [{key: r.get(key) for key in ("command", "created", "ceilings")} for r in runs]
    return merged


def shell_command(recorded):
    """The command a reader types for a run's recorded ``sys.argv`` (``.../fastgpt/__main__.py bench``
    is ``python -m fastgpt bench``)."""
    program, _, rest = recorded.strip().partition(" ")
    modules = {
        "fastgpt/__main__.py": "python -m fastgpt",
        "fastgpt/bench/__main__.py": "python -m fastgpt.bench",
        "fastgpt/bench.py": "python -m fastgpt.bench",  # runs from before bench became a package
    }
    for suffix, module in modules.items():
        if program.endswith(suffix):
            program = module
    return f"{program} {rest}".strip()


def readme_table(paths, root):
    """The generated text of one README section: how each run was measured, how the table was
    rendered, and the compact table of the runs merged."""
    runs = [load(root / p) for p in paths]
    lines = ["Measured with:", ""]
    for run in runs:
        ceilings = run["ceilings"]
        lines.append(
            f"- `{shell_command(run['command'])}` ({run['created'].replace('T', ' ')[:16]} UTC; ceilings in that run: "
            f"copy {ceilings['copy']['gbps']:.1f} GB/s, {ceilings['matmul']['dtype']} matmul "
            f"{ceilings['matmul']['tflops']:.2f} TFLOP/s)"
        )
    lines += [
        "",
        f"Table by `python benchmarks/report.py --compact {' '.join(paths)}`"
        + (" (each row's % of ceiling is against its own run's ceilings)" if len(runs) > 1 else "")
        + ":",
        "",
        markdown_table(without_page_faults(merge(runs)), compact=True),
    ]
    return "\n".join(lines)


def without_page_faults(results):
    """``results`` without the page-fault counts, which markdown_table would list under the table:
    in the user guide they would be a lab log; the JSON keeps them and benchmarks/README.md reads them."""
    records = [{k: v for k, v in r.items() if k != "page_faults_per_call"} for r in results["measurements"]]
    return dict(results, measurements=records)


def readme_with_tables(text, root):
    """``text`` with every bench-table section regenerated from the JSON its start marker names."""
    pieces, position = [], 0
    for start in TABLE_START.finditer(text):
        if start.start() < position:
            raise ValueError(f"bench-table marker at offset {start.start()} opens inside another section")
        end = text.find(TABLE_END, start.end())
        if end < 0:
            raise ValueError(f"{start.group(0)} has no closing {TABLE_END}")
        table = readme_table(start.group("paths").split(), root)
        pieces += [text[position : start.end()], "\n", table, "\n"]
        position = end
    return "".join(pieces) + text[position:]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", nargs="*", help="results JSON written by fastgpt bench")
    parser.add_argument("--compact", action="store_true", help="only the fastest fastgpt backend per case")
    parser.add_argument("--merge-out", help="also write the merged results to this JSON file")
    parser.add_argument(
        "--plots", metavar="DIR", help="also draw the merged results' plots into DIR, named after --merge-out"
    )
    readme = parser.add_mutually_exclusive_group()
    readme.add_argument("--update-readme", action="store_true", help="regenerate README.md's bench-table sections")
    readme.add_argument(
        "--check-readme", action="store_true", help="exit 1 when a README.md bench-table section differs from its JSON"
    )
    args = parser.parse_args(argv)
    if args.update_readme or args.check_readme:
        text = README.read_text()
        updated = readme_with_tables(text, README.parent)
        if args.check_readme:
            if updated != text:
                print(f"{README}: a bench-table section is stale; run python benchmarks/report.py --update-readme")
            return int(updated != text)
        README.write_text(updated)
        return 0
    if not args.results:
        parser.error("give results JSON files, or --update-readme / --check-readme")
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
