"""`fastgpt bench` on the CPU at smoke-test sizes: the JSON it writes and the plots.

Timings themselves are never checked here (DESIGN.md: a timing lives in benchmarks/, never in a
test's pass/fail) — only that every number comes with its context.
"""

import importlib.util
import json
import math
import mmap
import sys
from pathlib import Path

import pytest
import torch

from fastgpt import bench, registry

REPO = Path(__file__).resolve().parents[1]
MACHINE_FIELDS = ("cpu_model", "cpu_cores", "gpu_name", "gpu_driver", "torch", "triton", "cuda", "backends")
MEASUREMENT_FIELDS = ("op", "pass", "shape", "dtype", "device", "implementation", "kind", "status", "reason")
TIMING_FIELDS = ("median_ms", "p20_ms", "p80_ms", "reps")


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    status = bench.main(["--quick", "--sizes", "tiny", "--device", "cpu", "--op", "all", "--out", str(out)])
    with open(out / "results.json") as f:
        data = json.load(f)
    return status, out, data


def test_bench_runs_and_writes_json(results):
    status, _, data = results
    assert status == 0, [m for m in data["measurements"] if m["status"] == "error"]
    assert data["schema"] == bench.SCHEMA
    assert data["settings"]["device"] == "cpu"


def test_machine_fields(results):
    machine = results[2]["machine"]
    for name in MACHINE_FIELDS:
        assert name in machine, name
    assert machine["cpu_cores"] >= 1
    assert machine["torch"]
    assert set(machine["backends"]) == set(registry.names())


def test_ceilings_measured(results):
    ceilings = results[2]["ceilings"]
    assert ceilings["copy"]["gbps"] > 0
    assert ceilings["matmul"]["tflops"] > 0 and ceilings["matmul"]["dtype"] == "fp32"


def test_measurement_fields(results):
    measurements = results[2]["measurements"]
    ops_seen = {m["op"] for m in measurements}
    assert {"attention", "add_layer_norm"} <= ops_seen
    for m in measurements:
        if m["op"] == "model" and m["implementation"] == "all":  # fastgpt.nn missing: one skip record
            assert m["status"] == "skipped"
            continue
        for name in MEASUREMENT_FIELDS:
            assert name in m, (name, m)
        assert m["status"] in ("ok", "skipped", "error")
        if m["status"] != "ok":
            assert m["reason"], m  # every gap says why
            continue
        for name in TIMING_FIELDS:
            assert math.isfinite(m[name]) and m[name] > 0, (name, m)
        assert m["p20_ms"] <= m["median_ms"] <= m["p80_ms"]


def test_every_op_has_fastgpt_and_baseline_numbers(results):
    measurements = results[2]["measurements"]
    for op in ("attention", "add_layer_norm"):
        timed = [m for m in measurements if m["op"] == op and m["status"] == "ok"]
        assert {"fwd", "fwd+bwd"} <= {m["pass"] for m in timed}
        assert any(m["implementation"] == "fastgpt/reference" for m in timed)
        assert any(m["implementation"] == "torch eager" for m in timed)
        ours = next(m for m in timed if m["implementation"] == "fastgpt/reference")
        assert ours["speedup"]["torch eager"] > 0
        rate, pct = ("tflops", "pct_of_matmul_ceiling") if op == "attention" else ("gbps", "pct_of_copy_ceiling")
        assert ours[rate] > 0 and ours[pct] > 0
    attention = [m for m in measurements if m["op"] == "attention"]
    assert any(m["implementation"] == "sdpa" and m["status"] == "ok" for m in attention)
    # the interpreter is never benchmarked
    assert all(m["status"] == "skipped" for m in attention if m["implementation"] == "fastgpt/triton")


def test_model_tokens_per_second(results):
    model = [m for m in results[2]["measurements"] if m["op"] == "model"]
    assert model
    for m in model:
        if m["status"] == "ok":
            assert m["tokens_per_s"] > 0


def test_plots_written(results):
    pytest.importorskip("matplotlib")
    _, out, data = results
    # named after the JSON (results.json), so runs under other JSON names keep their own plots
    assert "results-attention.png" in data["plots"] and "results-add_layer_norm.png" in data["plots"]
    for name in data["plots"]:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_markdown_table(results):
    table = bench.markdown_table(results[2])
    assert "| attention | fwd |" in table
    assert "| add_layer_norm | fwd+bwd |" in table


def test_report_merges_runs(results, tmp_path, capsys):
    """benchmarks/report.py: several runs (one per op, as gpu_check.sh makes) into one JSON and table."""
    spec = importlib.util.spec_from_file_location("report", REPO / "benchmarks" / "report.py")
    report = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(report)
    _, out, data = results
    merged_path = tmp_path / "merged.json"
    assert report.main([str(out / "results.json"), str(out / "results.json"), "--merge-out", str(merged_path)]) == 0
    merged = json.loads(merged_path.read_text())
    assert len(merged["measurements"]) == 2 * len(data["measurements"])
    assert len(merged["runs"]) == 2
    assert "| attention | fwd |" in capsys.readouterr().out


def _tiny_case():
    """A forward case whose inputs are two 4-element tensors: timing it measures the harness."""
    return bench.Case("add_layer_norm", "fwd", {"rows": 1, "hidden": 4}, torch.float32, None, 16,
                      lambda: (torch.zeros(4), torch.zeros(4)))


def _six_reps_settings():
    return bench.Settings(device="cpu", sizes="tiny", budget_s=0, min_reps=6, max_reps=6, warmup=1,
                          compile_skip_reason=None, rotate_bytes=0)


def test_implementations_are_timed_in_interleaved_blocks():
    """Each implementation's repetitions come in TIMING_BLOCKS blocks taken in turn with the
    others', so a slow spell of the machine cannot land on one implementation only; one that
    raises is recorded, and the others are still timed."""
    calls = []

    def impl(name, fail=False):
        def run(x):
            if fail:
                raise RuntimeError("no kernel for this")
            calls.append(name)
            return x

        return bench.Impl(name, "baseline", run=run)

    case, settings = _tiny_case(), _six_reps_settings()
    records = []
    bench.run_cases([case], [impl("a"), impl("broken", fail=True), impl("b")], settings, records.append)

    assert [r["implementation"] for r in records] == ["a", "broken", "b"]
    assert [r["status"] for r in records] == ["ok", "skipped", "ok"]
    assert "no kernel for this" in records[1]["reason"]
    assert all(r["reps"] == 6 for r in (records[0], records[2]))
    timed = "".join(calls)[-12:]  # after each one's warm-up calls: blocks of 6 / TIMING_BLOCKS in turn
    block = 6 // bench.TIMING_BLOCKS
    assert timed == ("a" * block + "b" * block) * bench.TIMING_BLOCKS


@pytest.mark.skipif(sys.platform != "linux", reason="page faults are read from getrusage, which counts them on Linux")
def test_cpu_records_count_page_faults_per_call():
    """A CPU op that writes fresh memory on every call pays page faults that an op reusing its
    buffers does not; each record says how many it took, so the two cases can be told apart."""

    def touch_fresh_memory(x):
        with mmap.mmap(-1, 8 << 20) as fresh:  # a new anonymous mapping: every page faults on its first write
            fresh.write(b"\1" * len(fresh))
        return x

    case, settings = _tiny_case(), _six_reps_settings()
    records = []
    impls = [bench.Impl("fresh", "baseline", run=touch_fresh_memory), bench.Impl("reuse", "baseline", run=lambda x: x)]
    bench.run_cases([case], impls, settings, records.append)

    fresh, reuse = records
    assert fresh["page_faults_per_call"] >= 1
    assert reuse["page_faults_per_call"] < fresh["page_faults_per_call"]
