"""`fastgpt bench` on the CPU at smoke-test sizes: the JSON it writes and the plots.

Timings themselves are never checked here (DESIGN.md: a timing lives in benchmarks/, never in a
test's pass/fail) — only that every number comes with its context.
"""

import importlib.util
import json
import math
import mmap
import subprocess
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


def test_eager_attention_baseline_matches_float64_reference():
    """The eager baseline is timed as what a user writes; it must also compute attention: against the
    float64 reference, causal (bottom-right, fewer queries than keys) and not, odd sizes, strided
    inputs, output and the gradients autograd gives it."""
    from fastgpt import reference

    for causal, (seq_q, seq_k) in [(True, (7, 7)), (True, (5, 13)), (False, (9, 4))]:
        q = torch.randn(2, 3, 17, seq_q).transpose(-2, -1)  # (2, 3, seq_q, 17), not contiguous
        k, v = torch.randn(2, 3, seq_k, 17), torch.randn(2, 3, seq_k, 34)[..., ::2]
        q, k, v = (t.requires_grad_() for t in (q, k, v))
        out = bench.eager_attention(q, k, v, causal)
        grad = torch.randn_like(out)
        grads = torch.autograd.grad(out, (q, k, v), grad)
        q64, k64, v64, grad64 = (t.detach().double() for t in (q, k, v, grad))
        scale = 17**-0.5
        ref, lse = reference.attention_forward(q64, k64, v64, causal, scale)
        ref_grads = reference.attention_backward(grad64, q64, k64, v64, ref, lse, causal, scale)
        for name, actual, expected in zip(("out", "dq", "dk", "dv"), (out, *grads), (ref, *ref_grads)):
            error = ((actual.double() - expected).norm() / expected.norm()).item()
            assert error < 1e-5, (causal, seq_q, seq_k, name, error)


def _run_bench_cli(*args):
    """``python -m fastgpt bench ...`` in a subprocess, as a user runs it: (exit code, stderr)."""
    proc = subprocess.run(
        [sys.executable, "-m", "fastgpt", "bench", "--sizes", "tiny", "--device", "cpu", *args],
        capture_output=True, text=True, timeout=300,
    )
    return proc.returncode, proc.stderr


def test_out_that_is_a_file_is_a_clear_error(tmp_path):
    not_a_folder = tmp_path / "results"
    not_a_folder.write_text("mine")
    code, err = _run_bench_cli("--op", "hf", "--out", str(not_a_folder))
    assert code == 2, err
    assert "Traceback" not in err and "--out" in err and "is a file" in err
    assert not_a_folder.read_text() == "mine"
    # a folder under that file cannot be made either
    assert bench.main(["--sizes", "tiny", "--device", "cpu", "--out", str(not_a_folder / "sub")]) == 2


def test_existing_results_are_not_overwritten_unless_asked(tmp_path, monkeypatch, capsys):
    earlier = tmp_path / "results.json"
    earlier.write_text('{"earlier": "run"}')
    argv = ["--sizes", "tiny", "--device", "cpu", "--op", "hf", "--out", str(tmp_path)]
    assert bench.main(argv) == 2
    err = capsys.readouterr().err
    assert "results.json" in err and "--overwrite" in err and "--json-name" in err
    assert earlier.read_text() == '{"earlier": "run"}'
    # --overwrite replaces it (the op stubbed out: only the file handling is tested here)
    monkeypatch.setitem(bench.cli.OPS, "hf", lambda settings, emit: None)
    assert bench.main(argv + ["--overwrite"]) == 0
    assert json.loads(earlier.read_text())["schema"] == bench.SCHEMA
    assert not (tmp_path / "results.json.tmp").exists()


@pytest.mark.parametrize("name", ["../escape.json", "sub/results.json", "/tmp/abs.json", "..", ""])
def test_json_name_must_stay_inside_out(name, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        bench.main(["--sizes", "tiny", "--device", "cpu", "--out", str(tmp_path / "out"), "--json-name", name])
    assert exit_.value.code == 2
    assert "--json-name" in capsys.readouterr().err
    assert not (tmp_path / "escape.json").exists() and not (tmp_path / "out").exists()


def test_hf_op_without_transformers_is_skipped_with_the_reason(monkeypatch):
    from fastgpt.bench import hf
    from fastgpt.integrations import huggingface

    def missing():
        raise ImportError('attn_implementation="fastgpt" needs transformers>=4.53: No module named transformers')

    monkeypatch.setattr(huggingface, "register", missing)
    records = []
    hf.run(_six_reps_settings(), records.append)
    assert [r["implementation"] for r in records] == list(hf.IMPLEMENTATIONS)
    for r in records:
        assert r["status"] == "skipped" and "transformers" in r["reason"] and "fastgpt[hf]" in r["reason"]
        assert all(name in r for name in MEASUREMENT_FIELDS), r


def test_hf_op_tiny(tmp_path):
    """`fastgpt bench --op hf` at the tiny size: every pass, batch 1 and a left-padded batch, each
    attention implementation timed, and where fastgpt's attention ran counted honestly."""
    transformers = pytest.importorskip(
        "transformers", reason="transformers is not installed (pip install 'fastgpt[hf]')"
    )
    from fastgpt.bench import hf

    assert bench.main(["--sizes", "tiny", "--device", "cpu", "--op", "hf", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "results.json").read_text())
    records = data["measurements"]
    assert {r["op"] for r in records} == {"hf"}
    _, _, new_tokens, batches = hf.hf_sizes("cpu", "tiny")
    assert len(records) == len(hf.PASSES) * len(batches) * len(hf.IMPLEMENTATIONS)
    for r in records:
        assert r["status"] == "ok", r
        for name in MEASUREMENT_FIELDS + TIMING_FIELDS:
            assert name in r, (name, r)
        assert r["tokens_per_s"] > 0 and r["p20_ms"] <= r["median_ms"] <= r["p80_ms"]
        assert r["transformers"] == transformers.__version__
    ours = [r for r in records if r["implementation"] == "fastgpt"]
    for r in ours:
        assert r["kind"] == "fastgpt" and set(r["speedup"]) == {"sdpa", "eager"}
        calls = r["attention_calls"]
        assert calls["fastgpt"] > 0 and calls["sdpa_fallback"] == 0, r  # every layer's attention on fastgpt
        if r["shape"]["padding"] != "none":  # a padded batch: the prompts packed on varlen_attention
            assert r["shape"]["batch"] > 1 and calls["varlen"] > 0 and "varlen" in r["note"], r
        if r["pass"] == "generate":
            assert r["tokens"] == r["shape"]["batch"] * new_tokens
            assert r["same_tokens_as_sdpa"] is True  # fp32 greedy decoding: the same tokens
    table = hf.markdown_table(data)
    assert "| generate | 4 (left-padded) |" in table and "| prefill | 1 |" in table


def test_overhead_op_times_both_ops_on_tiny_inputs_against_torch(tmp_path):
    """`fastgpt bench --op overhead`: attention and add+LayerNorm at the call-overhead sizes, both
    passes, fastgpt's native backend and the torch ops it replaces timed in the same run."""
    from fastgpt.bench import overhead

    assert bench.main(["--quick", "--device", "cpu", "--op", "overhead", "--out", str(tmp_path)]) == 0
    records = json.loads((tmp_path / "results.json").read_text())["measurements"]
    timed = {(r["op"], r["pass"], r["implementation"]): r for r in records if r["status"] == "ok"}
    (b, h, s, d, causal), (rows, hidden) = overhead.ATTENTION_SIZES[0], overhead.ADD_LAYER_NORM_SIZES[0]
    for pass_ in ("fwd", "fwd+bwd"):
        attention = timed[("attention", pass_, "fastgpt/reference")]
        assert attention["shape"] == {"batch": b, "heads": h, "seq": s, "head_dim": d, "causal": causal}
        assert "sdpa" in attention["speedup"]
        norm = timed[("add_layer_norm", pass_, "fastgpt/reference")]
        assert norm["shape"] == {"rows": rows, "hidden": hidden} and "torch eager" in norm["speedup"]
        if registry.get("native").availability()[0]:
            assert ("attention", pass_, "fastgpt/native") in timed and ("add_layer_norm", pass_, "fastgpt/native") in timed
