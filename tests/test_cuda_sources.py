"""The CUDA sources of the native backend compile without a GPU (and without CUDA torch).

No machine that runs the tests has a GPU, so these checks keep csrc/cuda honest: the .cu
files include no torch header (they must compile with plain ``nvcc -c``), they compile for
sm_80 and sm_90 with no register spills in the main kernels, and the torch-side bindings parse.
The plain-C++ rules the kernels share with the host (add_layer_norm_schedule.h,
attention_decode_plan.h) are compiled with g++ and checked, and the add+LayerNorm and decode
kernels themselves run on the CPU under tests/cuda_on_cpu against float64.
"""

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CUDA_DIR = ROOT / "csrc" / "cuda"
CU_SOURCES = sorted(CUDA_DIR.glob("*.cu"))
MAIN_KERNELS = (
    "attention_forward_kernel",
    "attention_decode_split_kernel",
    "add_layer_norm_forward_kernel",
    "add_layer_norm_backward_kernel",
    "add_layer_norm_sum_partials_kernel",
)
ARCHS = ("sm_80", "sm_90")


def test_cuda_sources_exist():
    names = {p.name for p in CU_SOURCES}
    assert {"add_layer_norm.cu", "attention.cu"} <= names
    assert (CUDA_DIR / "launchers.h").is_file() and (CUDA_DIR / "bindings.cpp").is_file()


@pytest.mark.parametrize("path", CU_SOURCES + sorted(CUDA_DIR.glob("*.h")), ids=lambda p: p.name)
def test_cuda_sources_include_no_torch_header(path):
    includes = re.findall(r'^\s*#\s*include\s*[<"]([^>"]+)[>"]', path.read_text(), flags=re.M)
    torch_headers = [h for h in includes if re.match(r"(torch|ATen|c10|caffe2)/", h)]
    assert not torch_headers, f"{path.name} includes torch headers {torch_headers}: use launchers.h only"


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """Runs check_compile.sh once: (completed process, {(arch, kernel): resources})."""
    if shutil.which("nvcc") is None:
        pytest.skip("needs nvcc")
    out_dir = tmp_path_factory.mktemp("cuda_objects")
    result = subprocess.run(
        ["bash", str(CUDA_DIR / "check_compile.sh"), str(out_dir)], capture_output=True, text=True, timeout=1800
    )
    kernels = {}
    summary = out_dir / "summary.txt"
    for line in summary.read_text().splitlines() if summary.exists() else []:
        # "sm_80 regs=96 stack=0 spill_stores=0 spill_loads=0 attention_forward_kernel<__half, 64>"
        fields = line.split(" ", 5)
        values = dict(f.split("=") for f in fields[1:5])
        kernels[(fields[0], fields[5])] = {k: int(v) for k, v in values.items()}
    return result, kernels


def test_check_compile_succeeds(compiled):
    result, kernels = compiled
    assert result.returncode == 0, f"check_compile.sh failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    for kernel in MAIN_KERNELS:
        for arch in ARCHS:
            assert any(a == arch and name.split("<")[0] == kernel for a, name in kernels), f"{kernel} for {arch}"


def test_main_kernels_do_not_spill(compiled):
    _, kernels = compiled
    spilling = {
        f"{arch} {name}": r
        for (arch, name), r in kernels.items()
        if name.split("<")[0] in MAIN_KERNELS and (r["spill_stores"] or r["spill_loads"] or r["stack"])
    }
    assert not spilling, f"kernels that use local memory (ptxas): {spilling}"


def _cuda_include_dir():
    from torch.utils.cpp_extension import CUDA_HOME

    candidates = [os.environ.get("CUDA_HOME"), CUDA_HOME, "/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(str(Path(os.path.realpath(nvcc)).parents[1]))
    for home in candidates:
        if home and (Path(home) / "include" / "cuda_runtime_api.h").is_file():
            return Path(home) / "include"
    return None


def _cxx_compiler():
    """$CXX, g++ or c++; skips the test where there is none."""
    compiler = shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++")
    if compiler is None:
        pytest.skip("needs a C++ compiler (g++)")
    return compiler


def _run_cpu_check(tmp_path, name, program):
    """Compiles ``program`` (a C++ main against csrc/cuda's plain-C++ headers) with g++ and runs it;
    fails when it does not build or exits non-zero, else returns what it printed."""
    source = tmp_path / f"{name}.cpp"
    source.write_text(program)
    binary = tmp_path / name
    build = subprocess.run(
        [_cxx_compiler(), "-std=c++17", "-O2", f"-I{CUDA_DIR}", str(source), "-o", str(binary)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert build.returncode == 0, build.stderr[-3000:]
    result = subprocess.run([str(binary)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:]
    return result.stdout


def test_bindings_parse_against_torch_headers():
    """bindings.cpp uses only c10 core headers for devices and streams, so it parses with CPU torch."""
    compiler = _cxx_compiler()
    cuda_include = _cuda_include_dir()
    if cuda_include is None:
        pytest.skip("needs the CUDA toolkit headers (cuda_runtime_api.h)")
    from torch.utils.cpp_extension import include_paths

    # C++20, as cpp_extension builds it for current torch (whose headers refuse C++17)
    command = [compiler, "-fsyntax-only", "-std=c++20", "-DFASTGPT_WITH_CUDA", f"-I{cuda_include}", f"-I{ROOT / 'csrc'}"]
    command += [f"-I{p}" for p in include_paths()]
    command.append(str(CUDA_DIR / "bindings.cpp"))
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    errors = [line for line in result.stderr.splitlines() if "error" in line]
    assert result.returncode == 0, "bindings.cpp does not parse:\n" + "\n".join(errors[:30] or [result.stderr[-3000:]])


# The add+LayerNorm backward's launch geometry and the order it adds dweight / dbias in, checked
# on the CPU: this program includes csrc/cuda/add_layer_norm_schedule.h, the header the kernels
# take row_config, the program count, lane_sum and tree_step from, and adds (rows, n) terms per
# column the way the two backward kernels do. Within a level of the second kernel's tree the lanes
# run in a random order (only barriers order them on the GPU), so a race in the order shows up as
# different bits; sums are checked against float64 with the float32 error bound of the order's depth.
SCHEDULE_CHECK = r"""
#include "add_layer_norm_schedule.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <numeric>
#include <random>
#include <vector>

using namespace fastgpt::cuda;

static int failures = 0;
#define CHECK(cond, ...)                                          \
  do {                                                            \
    if (!(cond)) {                                                \
      if (++failures <= 20) {                                     \
        std::printf("FAIL line %d (%s): ", __LINE__, #cond);      \
        std::printf(__VA_ARGS__);                                 \
        std::printf("\n");                                       \
      }                                                           \
    }                                                             \
  } while (0)

// Column sums of terms (rows, n) as the backward computes them with `programs` programs.
static std::vector<float> backward_column_sums(const std::vector<float>& terms, int64_t rows, int64_t n,
                                               int64_t programs, std::mt19937& schedule) {
  const int64_t slots = backward_rows_per_program(n);
  // kernel 1: slot s of program p adds rows gR + s for its groups g = p, p + P, ... in order;
  // the program adds its slots in slot order into its partial row
  std::vector<float> partial(programs * n);
  for (int64_t p = 0; p < programs; ++p)
    for (int64_t col = 0; col < n; ++col) {
      float program_sum = 0.0f;
      for (int64_t s = 0; s < slots; ++s) {
        float slot_sum = 0.0f;
        for (int64_t group = p; group * slots < rows; group += programs)
          if (group * slots + s < rows) slot_sum += terms[(group * slots + s) * n + col];
        program_sum += slot_sum;
      }
      partial[p * n + col] = program_sum;
    }
  // kernel 2: lanes, then the tree; lanes of one level in a random order
  std::vector<float> out(n);
  std::vector<int> order(kSumLanes);
  std::iota(order.begin(), order.end(), 0);
  for (int64_t col = 0; col < n; ++col) {
    float lanes[kSumLanes];
    std::shuffle(order.begin(), order.end(), schedule);
    for (int lane : order) lanes[lane] = lane_sum(partial.data(), programs, n, col, lane);
    for (int width = kSumLanes / 2; width > 0; width /= 2) {
      std::shuffle(order.begin(), order.end(), schedule);
      for (int lane : order) tree_step(lanes, 1, lane, width);
    }
    out[col] = lanes[0];
  }
  return out;
}

static void check_geometry() {
  const int64_t widths[] = {1, 7, 8, 100, 256, 257, 512, 513, 768, 1000, 1024, 1025, 2048, 3000, 4096, 8192, 8193, 12288, 16384};
  const int64_t row_counts[] = {0, 1, 5, 300, 1000, 4097, 100000, 10000000};
  const int multiprocessor_counts[] = {1, 108, 132};
  for (int64_t n : widths) {
    const RowConfig config = row_config(n);
    const int threads = config.threads_per_row, chunks = config.chunks;
    CHECK(threads % 32 == 0 && threads >= 32 && threads <= kMaxThreadsPerRow, "n=%lld T=%d", (long long)n, threads);
    CHECK(chunks == 1 || chunks == 2 || chunks == 4, "n=%lld K=%d", (long long)n, chunks);
    CHECK(int64_t(threads) * chunks * kChunk >= n, "n=%lld: T=%d K=%d do not cover the row", (long long)n, threads, chunks);
    const int slots = backward_rows_per_program(n);
    // the stage of the backward holds kBackwardThreads * kChunk floats per sum
    CHECK(slots >= 1 && slots * threads <= kBackwardThreads, "n=%lld: %d rows of %d threads", (long long)n, slots, threads);
    CHECK((slots + 1) * threads > kBackwardThreads, "n=%lld: room for another row", (long long)n);
    for (int sms : multiprocessor_counts)
      for (int64_t rows : row_counts) {
        const int64_t programs = add_layer_norm_backward_programs(rows, n, sms);
        const int64_t groups = (rows + slots - 1) / slots;
        // at most 2 programs (partial rows) per multiprocessor, at least 1 while there is work for it
        CHECK(programs >= 1 && programs <= 2 * int64_t(sms), "rows=%lld n=%lld sms=%d: %lld programs",
              (long long)rows, (long long)n, sms, (long long)programs);
        CHECK(programs <= std::max<int64_t>(groups, 1), "rows=%lld n=%lld: %lld programs for %lld row groups",
              (long long)rows, (long long)n, (long long)programs, (long long)groups);
        CHECK(programs >= std::min<int64_t>(groups, sms), "rows=%lld n=%lld sms=%d: %lld programs",
              (long long)rows, (long long)n, sms, (long long)programs);
        if (rows > 5000) continue;
        std::vector<int> visits(rows, 0);  // the kernel's grid-stride: every row exactly once
        for (int64_t p = 0; p < programs; ++p)
          for (int64_t group = p; group * slots < rows; group += programs)
            for (int s = 0; s < slots; ++s)
              if (group * slots + s < rows) ++visits[group * slots + s];
        CHECK(std::all_of(visits.begin(), visits.end(), [](int v) { return v == 1; }), "rows=%lld n=%lld sms=%d",
              (long long)rows, (long long)n, sms);
      }
  }
}

static void check_sums(int64_t rows, int64_t n, int64_t programs, unsigned seed) {
  std::mt19937 random(seed);
  std::normal_distribution<float> normal;
  std::uniform_real_distribution<float> exponent(-3.0f, 3.0f);
  std::vector<float> terms(rows * n);
  for (float& t : terms) t = normal(random) * std::pow(10.0f, exponent(random));
  std::mt19937 schedule_a(seed + 1), schedule_b(seed + 2);
  const std::vector<float> a = backward_column_sums(terms, rows, n, programs, schedule_a);
  const std::vector<float> b = backward_column_sums(terms, rows, n, programs, schedule_b);
  CHECK(std::memcmp(a.data(), b.data(), sizeof(float) * n) == 0, "rows=%lld n=%lld P=%lld: bits depend on the schedule",
        (long long)rows, (long long)n, (long long)programs);
  // float32 rounding bound: each sum passes through at most `depth` additions
  const int64_t slots = backward_rows_per_program(n), groups = (rows + slots - 1) / slots;
  const int64_t depth = (groups + programs - 1) / programs + slots + (programs + kSumLanes - 1) / kSumLanes + 4;
  double worst = 0.0;
  for (int64_t col = 0; col < n; ++col) {
    double exact = 0.0, magnitude = 0.0;
    for (int64_t row = 0; row < rows; ++row) {
      exact += double(terms[row * n + col]);
      magnitude += std::fabs(double(terms[row * n + col]));
    }
    const double bound = 1.01 * double(depth) * std::ldexp(1.0, -24) * magnitude;
    const double error = std::fabs(double(a[col]) - exact);
    if (magnitude > 0) worst = std::max(worst, error / (double(depth) * std::ldexp(1.0, -24) * magnitude));
    CHECK(error <= bound, "rows=%lld n=%lld P=%lld col=%lld: sum %.9g, exact %.9g, error %.3g > bound %.3g",
          (long long)rows, (long long)n, (long long)programs, (long long)col, a[col], exact, error, bound);
  }
  std::printf("sums rows=%lld n=%lld programs=%lld depth=%lld: worst error %.3f of the bound\n", (long long)rows,
              (long long)n, (long long)programs, (long long)depth, worst);
}

int main() {
  check_geometry();
  check_sums(1000, 768, add_layer_norm_backward_programs(1000, 768, 132), 1);   // 63 programs of 16 rows
  check_sums(20000, 768, add_layer_norm_backward_programs(20000, 768, 132), 2); // 264 programs, each ~5 groups
  check_sums(777, 100, 216, 3);      // ragged row and column counts
  check_sums(3, 40, 1, 4);           // one program, slots past the last row
  check_sums(10, 64, 264, 5);        // more programs than row groups: zero partial rows
  check_sums(600, 3000, 37, 6);      // T = 96 threads per row, 5 rows per program
  check_sums(300, 16384, 216, 7);    // one row per program
  std::printf("%d failures\n", failures);
  return failures == 0 ? 0 : 1;
}
"""


def test_add_layer_norm_backward_schedule_on_cpu(tmp_path):
    assert _run_cpu_check(tmp_path, "schedule_check", SCHEDULE_CHECK).strip().endswith("0 failures")


def test_add_layer_norm_backward_uses_the_schedule():
    """The kernels read their geometry and order from add_layer_norm_schedule.h, which the CPU check tests."""
    source = (CUDA_DIR / "add_layer_norm.cu").read_text()
    bindings = (CUDA_DIR / "bindings.cpp").read_text()
    assert '#include "add_layer_norm_schedule.h"' in source
    reduce_kernel = source[source.index("void __launch_bounds__(kSumColumns * kSumLanes) add_layer_norm_sum_partials_kernel") :]
    reduce_kernel = reduce_kernel[: reduce_kernel.index("\n}\n")]
    assert "lane_sum(" in reduce_kernel and "tree_step(" in reduce_kernel
    assert "atomicAdd" not in source
    assert "dim3 block(config.threads_per_row, backward_rows_per_program(n))" in source
    assert "add_layer_norm_backward_programs(rows, n, multiprocessor_count())" in bindings


# The CUDA decode's work split (csrc/cuda/attention_decode_plan.h), checked on the CPU: the query
# rows of a kv head (its GQA group's heads times the queries) share one block, so one pass over
# that head's K/V slice, up to 8 rows; every key lies in exactly one non-empty slice.
DECODE_PLAN_CHECK = r"""
#include "attention_decode_plan.h"

#include <cstdio>
#include <initializer_list>

using namespace fastgpt::cuda;

int main() {
  int failures = 0;
  const long long kv_head_counts[] = {1, 2, 8}, group_sizes[] = {1, 2, 3, 4, 7, 8, 16}, queries[] = {1, 2, 3, 4};
  const long long key_counts[] = {0, 1, 63, 64, 65, 1000, 4096, 131072}, batches[] = {1, 3, 64};
  for (long long batch : batches)
    for (long long kv_heads : kv_head_counts)
      for (long long group : group_sizes)
        for (long long seq_q : queries)
          for (long long seq_k : key_counts)
            for (int sms : {1, 132}) {
              const DecodePlan plan = decode_plan(batch, kv_heads * group, kv_heads, seq_q, seq_k, sms);
              const long long rows = group * seq_q, one_pass = rows < 8 ? rows : 8;  // groups of up to 8 rows: one pass
              const int r = plan.tile_rows;
              bool ok = (r == 1 || r == 2 || r == 4 || r == 8) && r >= one_pass && (r == 1 || r / 2 < one_pass);
              ok = ok && plan.row_tiles == (rows + r - 1) / r;  // a head's K/V slice is read once per 8 rows
              ok = ok && plan.splits >= 1 && plan.splits <= 65535 && plan.keys_per_split >= 1;
              if (seq_k > 0)  // the slices cover the keys, none empty
                ok = ok && plan.splits * plan.keys_per_split >= seq_k && (plan.splits - 1) * plan.keys_per_split < seq_k;
              if (!ok && ++failures <= 20)
                std::printf("FAIL batch=%lld kv_heads=%lld group=%lld seq_q=%lld seq_k=%lld sms=%d: R=%d tiles=%lld "
                            "splits=%lld keys=%lld\n", batch, kv_heads, group, seq_q, seq_k, sms, r,
                            (long long)plan.row_tiles, (long long)plan.splits, (long long)plan.keys_per_split);
            }
  std::printf("%d failures\n", failures);
  return failures == 0 ? 0 : 1;
}
"""


def test_attention_decode_plan_on_cpu(tmp_path):
    _run_cpu_check(tmp_path, "decode_plan_check", DECODE_PLAN_CHECK)


def test_attention_decode_reads_kv_once_per_group():
    """The split kernel takes its rows from the plan and reads K/V rows with 16-byte loads."""
    source = (CUDA_DIR / "attention_decode.cu").read_text()
    assert '#include "attention_decode_plan.h"' in source
    assert "reinterpret_cast<const uint4*>(row + first)" in source
    for rows in ("1", "2", "4", "kDecodeMaxTileRows"):
        assert f"launch_split<T, D, {rows}>" in source


# kernel<<<grid, block, smem, stream>>>(args) -> cuda_on_cpu::launch({grid, block, smem, stream}, kernel, args)
_LAUNCH = re.compile(r"([A-Za-z_][\w:]*(?:<[^<>;()]*>)?)\s*<<<(.*?)>>>\s*\(", re.S)
EMULATED_SOURCES = ("add_layer_norm.cu", "attention_decode.cu")


def test_kernels_run_on_cpu_emulation(tmp_path):
    """The add+LN backward and the decode, run by tests/cuda_on_cpu (fibers for CUDA threads, random
    order between barriers) through their launchers: float64 references and same bits across orders."""
    compiler = _cxx_compiler()
    cuda_include = _cuda_include_dir()
    if cuda_include is None:
        pytest.skip("needs the CUDA toolkit headers (cuda_fp16.h)")
    here = ROOT / "tests" / "cuda_on_cpu"
    flags = ["-std=c++17", "-O1", f"-I{cuda_include}", f"-I{here}", f"-I{CUDA_DIR}"]
    units = [here / "check_kernels.cpp"]
    for name in EMULATED_SOURCES:
        source = (CUDA_DIR / name).read_text()
        launches = len(_LAUNCH.findall(source))
        assert launches == source.count("<<<"), f"{name}: a launch the rewrite does not recognize"
        unit = tmp_path / (name + ".cpp")
        unit.write_text('#include "cuda_on_cpu.h"\n' + _LAUNCH.sub(
            lambda m: f"::cuda_on_cpu::launch(::cuda_on_cpu::LaunchConfig{{{m.group(2)}}}, {m.group(1)}, ", source))
        units.append(unit)
    objects = []
    for unit in units:
        obj = tmp_path / (unit.name + ".o")
        build = subprocess.run([compiler, *flags, "-c", str(unit), "-o", str(obj)], capture_output=True, text=True,
                               timeout=600)
        assert build.returncode == 0, f"{unit.name}:\n{build.stderr[-3000:]}"
        objects.append(str(obj))
    binary = tmp_path / "check_kernels"
    link = subprocess.run([compiler, *objects, "-o", str(binary)], capture_output=True, text=True, timeout=300)
    assert link.returncode == 0, link.stderr[-3000:]
    result = subprocess.run([str(binary)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert result.stdout.strip().endswith("0 failures")
