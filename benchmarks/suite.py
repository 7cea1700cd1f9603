"""What the pytest-benchmark suites share: the CPU settings, the issue's CPU reference points and
readable case ids."""

from fastgpt import bench

# `fastgpt bench --device cpu` settings and implementations, torch.compile included
SETTINGS = bench.Settings(
    device="cpu",
    sizes="full",
    budget_s=0.3,
    min_reps=5,
    max_reps=200,
    warmup=2,
    compile_skip_reason=None,
    rotate_bytes=4 * bench.last_level_cache_bytes("cpu"),
)

# the CPU reference points: attention (4, 8, 1024, 64) causal fp32, add+LayerNorm (8192, 1024) fp32
ATTENTION_CASES = [c for c in bench.attention_cases(SETTINGS) if c.shape["seq"] == 1024 and c.shape["causal"]]
ADD_LAYER_NORM_CASES = [c for c in bench.add_layer_norm_cases(SETTINGS) if c.shape["hidden"] == 1024]


def case_id(case):
    shape = "x".join(str(v) for k, v in case.shape.items() if k != "causal")
    causal = "-causal" if case.shape.get("causal") else ""
    return f"{case.pass_}-{shape}{causal}-{bench.DTYPE_NAMES[case.dtype]}"
