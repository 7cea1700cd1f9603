"""The Triton attention kernels compile for real GPUs (sm_80, sm_90) with no GPU present, and
every configuration the launchers can pick fits the device's shared memory by its compiled size.

The launchers choose configurations from a table of compiled resources
(``fastgpt.kernels.attention_resources``, written by ``benchmarks/aot_table.py``): registers, stack
and shared memory per (kernel, generation, bytes per element, padded head dim, tile). These tests
check the table three ways: the selection (pure Python) only ever returns configurations whose
compiled shared memory fits sm_80 (164 KB), sm_86/sm_89 (99 KB) and sm_90 (227 KB); CI recompiles
the configurations that matter most (head dims 64 and 128 in 16-bit, the head-dim-256 fit edge,
sm_86/sm_89 against sm_80, fp32 at head dim 128) and compares them with the table, so a change
that adds a stack frame (spills) or shared memory fails; with FASTGPT_AOT_FULL=1 the whole table is
recompiled (280 compiles). On Hopper the large forward tiles must reach wgmma (HGMMA in the SASS);
fp32 must multiply on the tensor cores in every kernel (HMMA/HGMMA, no unrolled FFMA products).

The window, soft-cap and packed-sequence specializations have a table of their own
(``fastgpt.kernels.attention_variant_resources``, ``benchmarks/aot_table.py --variants``): their
stack bytes in every tile a variant call can be offered, bf16 (standing for fp16) and fp32, head
dims <= 128 (``attention_configs.VARIANT_HEAD_DIMS``; at head dim 256 the plain kernels' stack
stands for the variants'), from which the selection offers such a call only tiles that compile
without spills for it. It is checked the same three ways: offline (every tile offered is listed
and clean), a CI sample, and the whole table under FASTGPT_AOT_FULL=1.
"""

import os

import pytest

from triton_aot import ARCHS, run_aot

pytest.importorskip("triton")

from fastgpt.kernels import attention as triton_attention  # noqa: E402
from fastgpt.kernels import attention_configs  # noqa: E402
from fastgpt.kernels.attention_configs import (  # noqa: E402
    CONFIGS, SHARED_MEMORY_LIMITS, VARIANT_HEAD_DIMS, decode_blocks, decode_candidates, decode_max_rows, decode_tile,
    resources, select_blocks, unsupported_reason,
)
from fastgpt.kernels.attention_resources import RESOURCES  # noqa: E402
from fastgpt.kernels.attention_variant_resources import VARIANT_STACK  # noqa: E402

PADDED_HEAD_DIMS = (16, 32, 64, 128, 256)
ITEMSIZES = (2, 4)
ARCH_OF_PART = {"sm_80": "ampere", "sm_86": "ampere", "sm_89": "ampere", "sm_90": "hopper"}


def _candidates(kernel, arch, itemsize, padded):
    if kernel == "decode":
        return decode_candidates(itemsize, padded)
    return CONFIGS[kernel][arch, itemsize]


KERNELS = (*CONFIGS, "decode")


# ----------------------------------------------------------------------------- the table and the selection


def test_table_lists_every_configuration_a_launcher_can_pick():
    missing = [
        (kernel, arch, itemsize, padded, blocks)
        for kernel in KERNELS for arch in ("ampere", "hopper") for itemsize in ITEMSIZES for padded in PADDED_HEAD_DIMS
        for blocks in _candidates(kernel, arch, itemsize, padded)
        if resources(kernel, arch, itemsize, padded, blocks) is None
    ]
    assert not missing, f"not in attention_resources (run benchmarks/aot_table.py): {missing}"


@pytest.mark.parametrize("part", sorted(SHARED_MEMORY_LIMITS))
def test_selected_configurations_fit_by_compiled_shared_memory(part):
    """Whatever the autotuner may try (any sequence lengths), and the decode tile, fit this part's
    shared memory; where nothing fits, the inputs are unsupported with a reason naming the kernel."""
    arch, limit = ARCH_OF_PART[part], SHARED_MEMORY_LIMITS[part]
    for itemsize in ITEMSIZES:
        for padded in PADDED_HEAD_DIMS:
            reason = unsupported_reason(arch, limit, padded, itemsize)
            for kernel in CONFIGS:
                for seq_q, seq_k in ((1, 1), (17, 300), (4096, 4096)):
                    chosen = select_blocks(kernel, arch, limit, padded, itemsize, seq_q, seq_k)
                    if not chosen:  # then the inputs are unsupported (the reason names the first such kernel)
                        assert reason is not None, (part, kernel, padded, itemsize)
                    elif reason is not None:
                        assert f"no {kernel} tile" not in reason
                    too_big = [b for b in chosen if resources(kernel, arch, itemsize, padded, b)["shared"] > limit]
                    assert not too_big, f"{part} {kernel} d={padded} {itemsize} B: {too_big} exceed {limit} B"
            tile = decode_tile(arch, limit, padded, itemsize)
            if tile is None:
                assert reason is not None
            else:
                blocks = decode_blocks(itemsize, padded, *tile)
                assert resources("decode", arch, itemsize, padded, blocks)["shared"] <= limit
            if reason is not None:
                assert f"{limit} B of shared memory" in reason and "smallest tile needs" in reason


@pytest.mark.parametrize("part", sorted(SHARED_MEMORY_LIMITS))
def test_16_bit_attention_runs_at_every_head_dim(part):
    """fp16/bf16 attention is supported up to head dim 256 on every part (the small tiles fit)."""
    arch, limit = ARCH_OF_PART[part], SHARED_MEMORY_LIMITS[part]
    unsupported = {padded: unsupported_reason(arch, limit, padded, 2) for padded in PADDED_HEAD_DIMS}
    assert not any(unsupported.values()), unsupported


def test_the_largest_tile_fitting_nowhere_is_unsupported_with_a_reason():
    reason = unsupported_reason("ampere", 48 * 1024, 256, 4)  # a 48 KB part, fp32, head dim 256
    assert reason is not None and "head dim 256" in reason and "49152 B" in reason


@pytest.mark.parametrize("itemsize", ITEMSIZES)
@pytest.mark.parametrize("part", ["sm_80", "sm_90"])
def test_selected_configurations_do_not_spill_up_to_head_dim_128(part, itemsize):
    """At head dims <= 128 every configuration the launchers can pick on sm_80 and sm_90 compiled
    without a stack frame (no spills): the selection prefers such configurations, and each kernel
    has one. Known exceptions are listed here with their stack bytes, so that a new one fails."""
    arch, limit = ARCH_OF_PART[part], SHARED_MEMORY_LIMITS[part]
    spilling = {}
    for padded in (16, 32, 64, 128):
        for kernel in CONFIGS:
            for blocks in select_blocks(kernel, arch, limit, padded, itemsize, 4096, 4096):
                stack = resources(kernel, arch, itemsize, padded, blocks)["stack"]
                if stack:
                    spilling[kernel, padded, blocks] = stack
        tile = decode_tile(arch, limit, padded, itemsize)
        blocks = decode_blocks(itemsize, padded, *tile)
        stack = resources("decode", arch, itemsize, padded, blocks)["stack"]
        if stack:
            spilling["decode", padded, blocks] = stack
    assert spilling == KNOWN_SPILLS.get((part, itemsize), {})


# (part, bytes per element) -> {(kernel, padded head dim, blocks): stack bytes} of the selectable
# configurations that still spill at head dims <= 128: none. In 16-bit, on sm_90 the 16x128 dK/dV
# tile at head dim 128 compiles without a stack frame since the variants' rewrite (16 B before), so
# the spilling larger ones are no longer picked. In fp32 ("tf32x3", its tiles chosen for no stack
# frame) the decode at head dim 128 takes at most 16 rows (DECODE_FEWER_ROWS): its 64-row tiles
# spilled in every key tile (sm_80 616-13,560 B, sm_90 104-552 B), its 16-row ones compile clean
# in every key tile.
KNOWN_SPILLS = {}


def test_fp32_decode_at_head_dim_128_takes_at_most_16_rows():
    """Where 64 decode rows spill (fp32, head dim 128 padded) a token of a GQA group of up to 16
    query heads decodes in a 16-row tile and larger groups go to the forward kernel; elsewhere the
    decode takes up to 64 rows."""
    import torch

    from fastgpt.kernels import interpreting
    from fastgpt.kernels.attention_decode import decode_plan

    if not interpreting():
        pytest.skip("the split count on a GPU depends on its multiprocessor count")
    fp32, bf16 = torch.empty(0), torch.empty(0, dtype=torch.bfloat16)
    assert decode_plan(1, 2, 16, 1, 500, 128, fp32).block_m == 16
    assert decode_plan(1, 2, 8, 2, 500, 128, fp32).block_m == 16
    assert decode_plan(1, 2, 32, 1, 500, 128, fp32) is None
    assert decode_plan(1, 2, 32, 1, 500, 96, fp32) is None  # padded to 128
    assert decode_plan(1, 2, 32, 1, 500, 64, fp32).block_m == 32
    assert decode_plan(1, 2, 64, 1, 500, 256, fp32).block_m == 64
    assert decode_plan(1, 2, 64, 1, 500, 128, bf16).block_m == 64


@pytest.mark.parametrize("itemsize", sorted(VARIANT_HEAD_DIMS))
@pytest.mark.parametrize("part", sorted(SHARED_MEMORY_LIMITS))
def test_variant_calls_are_offered_only_tiles_that_compile_clean_for_them(part, itemsize):
    """For every variant combination at the head dims the variant table covers (all padded ones
    <= 128, bf16 and fp32), each tile the selection offers (any sequence lengths) and the decode
    tile are in the variant table, with no stack: a tile list or kernel change that the sweep did
    not compile fails here rather than being offered."""
    arch, limit = ARCH_OF_PART[part], SHARED_MEMORY_LIMITS[part]
    missing, spilling = [], {}
    for combo, variant in triton_attention.VARIANT_CALLS.items():
        for padded in VARIANT_HEAD_DIMS[itemsize]:
            offered = {(kernel, b) for kernel in CONFIGS for seq_q, seq_k in ((1, 1), (17, 300), (4096, 4096))
                       for b in select_blocks(kernel, arch, limit, padded, itemsize, seq_q, seq_k, combo)}
            if not variant.varlen:
                tile = decode_tile(arch, limit, padded, itemsize, combo)
                offered.add(("decode", decode_blocks(itemsize, padded, *tile)))
            for kernel, blocks in offered:
                stack = VARIANT_STACK.get((kernel, arch, itemsize, padded, blocks, combo))
                if stack is None:
                    missing.append((kernel, arch, padded, blocks, combo))
                elif stack:
                    spilling[kernel, padded, blocks, combo] = stack
    assert not missing, f"not in attention_variant_resources (run benchmarks/aot_table.py --variants): {missing}"
    assert spilling == KNOWN_VARIANT_SPILLS.get((arch, itemsize), {})


def test_variant_table_covers_head_dims_up_to_128_in_both_element_sizes():
    """The coverage the selection and the docs state: every padded head dim <= 128, 2- and 4-byte."""
    assert VARIANT_HEAD_DIMS == {2: (16, 32, 64, 128), 4: (16, 32, 64, 128)}
    listed = {(key[2], key[3]) for key in VARIANT_STACK}
    assert listed == {(itemsize, padded) for itemsize, dims in VARIANT_HEAD_DIMS.items() for padded in dims}


# (generation, bytes per element) -> {(kernel, padded head dim, blocks, combination): stack bytes} of
# the tiles offered to a variant call that spill: where no tile of a kernel compiles clean for the
# combination, or where no decode tile does. None: every kernel has a clean tile for every
# combination, bf16 and fp32, head dims <= 128. (The fp32 decode at head dim 128 spilled 96-120 B
# on sm_90 and 576-624 B on sm_80 in every variant in 64 rows, before DECODE_FEWER_ROWS; in 16 rows
# sm_90's 16x64 tile spills 32 B with a window and no mask, so decode_tile picks 16x32 there.)
KNOWN_VARIANT_SPILLS = {}


def test_variant_table_lists_only_configurations_of_the_tile_lists():
    """No stale entries: each is a tile of its kernel's list (or a decode tile) at a covered head dim."""
    stale = [key for key in VARIANT_STACK
             if key[2] not in VARIANT_HEAD_DIMS or key[3] not in VARIANT_HEAD_DIMS[key[2]]
             or key[5] not in triton_attention.VARIANT_CALLS or key[4] not in _candidates(*key[:4])]
    assert VARIANT_STACK and not stale, stale


@pytest.mark.parametrize("dtype_name", ["bfloat16", "float32"])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("flags", [{}, {"WINDOW": True}, {"SOFTCAP": True}, {"VARLEN": True},
                                   {"WINDOW": True, "SOFTCAP": True, "VARLEN": True}], ids=str)
def test_the_pruner_offers_a_call_the_tiles_clean_for_its_combination(monkeypatch, flags, causal, dtype_name):
    """The autotuner's pruner (an sm_90 at head dim 128) offers a variant call exactly the
    selection for its combination, all clean in the variant table, and a plain call the plain one;
    the plain call's tiles a variant call is not offered are those that spill for it."""
    import torch

    monkeypatch.setattr(attention_configs, "device_limits", lambda device: ("hopper", SHARED_MEMORY_LIMITS["sm_90"]))
    combo = attention_configs.combination(causal, {name.lower() for name in flags})
    q = torch.empty(0, dtype=getattr(torch, dtype_name))
    itemsize = q.element_size()
    dropped = set()
    for kernel in CONFIGS:
        configs = [attention_configs._as_config(b) for b in attention_configs.all_blocks(CONFIGS[kernel])]
        named_args = {"q_ptr": q, "seq_q": 4096, "seq_k": 4096}
        pruned = attention_configs._pruner(kernel)(configs, named_args, HEAD_DIM_PADDED=128, CAUSAL=causal,
                                                   **{"WINDOW": False, "SOFTCAP": False, "VARLEN": False, **flags})
        offered = {attention_configs._blocks_of(c) for c in pruned}
        assert offered and offered == set(select_blocks(kernel, "hopper", SHARED_MEMORY_LIMITS["sm_90"], 128,
                                                        itemsize, 4096, 4096, combo)), (kernel, offered)
        if flags:
            assert all(VARIANT_STACK[kernel, "hopper", itemsize, 128, b, combo] == 0 for b in offered), offered
        plain = select_blocks(kernel, "hopper", SHARED_MEMORY_LIMITS["sm_90"], 128, itemsize, 4096, 4096)
        dropped |= {(kernel, b) for b in plain if b not in offered}
    assert all(VARIANT_STACK[kernel, "hopper", itemsize, 128, b, combo] for kernel, b in dropped), dropped
    if combo == "causal+varlen" and itemsize == 2:
        # stack: 24 B in the 16x128 dK/dV, 56 B in the 64x64 dQ (the 128x128 forward's 8 B went with
        # its masked loop)
        assert dropped == {("backward_dkdv", (16, 128, 8, 2)), ("backward_dq", (64, 64, 4, 2))}


# ----------------------------------------------------------------------------- ahead-of-time compiles


@pytest.fixture(scope="module")
def records():
    return run_aot("fastgpt.kernels.attention")


def test_every_spec_compiles_for_its_targets(records):
    compiled = {(r["name"], r["arch"]) for r in records}
    expected = {(spec["name"], target) for spec in triton_attention.aot_compile_specs()
                for target in spec.get("targets", ARCHS)}
    assert expected and expected == compiled
    kinds = {name.split()[0] for name, _ in compiled}
    assert {"forward", "decode", "decode_combine", "backward_preprocess", "backward_dkdv", "backward_dq"} <= kinds


def test_hopper_forward_uses_wgmma(records):
    """Every sm_90 forward tile of at least 64 rows per warpgroup (4 warps) lowers to wgmma/HGMMA."""
    forward = [r for r in records if r["key"] and r["key"][0] == "forward" and r["arch"] == 90
               and r["key"][4][0] >= 16 * r["key"][4][2]]
    assert forward
    without = [r["name"] for r in forward if not (r["wgmma_in_ptx"] and r["hgmma_in_sass"])]
    assert not without, f"sm_90 forward configurations without wgmma/HGMMA: {without}"


def test_forward_streams_its_keys_in_one_pipelined_loop(records):
    """The 16-bit forward and decode (causal at head dim 128, unmasked at 64) run their unmasked key
    tiles in one software-pipelined loop and their masked ones (the diagonal, the end of the keys)
    as straight-line steps before it: one loop in the SASS, and one pipeline prologue. LDGDEPBAR
    closes a group of cp.async copies: num_stages - 1 for K and as many for V in the prologue, one
    each in the loop. The kernel with a second, masked loop had two loops and twice the groups
    (12 in the 128x64 tile with 3 stages)."""
    streams = [r for r in records if r["key"] and r["key"][0] in ("forward", "decode")]
    assert {r["key"][0] for r in streams} == {"forward", "decode"}
    wrong = [f"{r['name']} sm_{r['arch']}: {len(r['loop_sass_counts'])} loops, {r['sass_counts']['LDGDEPBAR']} "
             f"LDGDEPBAR" for r in streams
             if len(r["loop_sass_counts"]) != 1 or r["sass_counts"]["LDGDEPBAR"] != 2 * r["key"][4][3]]
    assert not wrong, "\n".join(wrong)


# FMULs of the head-dim-128 bf16 causal forward: (in its key loop's body, i.e. per key tile; in its
# whole SASS). Per tile, 64 of the 66 rescale the accumulator (128 x 128 fp32 over 256 threads):
# with the scale folded into exp2's argument, in the masked tiles too (-inf masks the unscaled
# score), no multiply per score is left (the whole SASS of the kernel with two loops: 397 and 461
# before, 337 after). The whole SASS grew to 605 and 473 when the masked tiles left their loop:
# each peeled step repeats the tile's code (6 half-width steps in the 128x64 tile, 4 in the
# 128x128). A count above these means a multiply per score came back.
FORWARD_FMUL = {(80, (128, 64, 8, 3)): (66, 605), (90, (128, 128, 8, 2)): (66, 473)}


def test_forward_folds_the_scale_into_exp2(records):
    counts = {(r["arch"], tuple(r["key"][4])): (max(loop["FMUL"] for loop in r["loop_sass_counts"]),
                                                r["sass_counts"]["FMUL"])
              for r in records if r["name"].startswith("forward d=128 bf16 causal M=")}  # not the variants
    over = {config: (counts[config], most) for config, most in FORWARD_FMUL.items()
            if any(count > limit for count, limit in zip(counts[config], most))}
    assert not over, f"(arch, tile): ((FMULs per tile, in all), at most): {over}"


@pytest.fixture(scope="module")
def variant_records():
    return run_aot("fastgpt.kernels.attention", "variant_sample_specs", jobs=2)


def _variant_differences(records):
    """Records of variant specializations whose stack differs from the variant table, or whose
    shared memory differs from the plain table's (which decides the fit for every specialization)."""
    wrong = []
    for r in records:
        kernel, arch, itemsize, padded, blocks, combo = r["key"]
        stack = VARIANT_STACK.get((kernel, arch, itemsize, padded, tuple(blocks), combo))
        shared = resources(kernel, arch, itemsize, padded, blocks)["shared"]
        if stack != r["stack"] or shared != r["shared"]:
            wrong.append(f"{r['name']} sm_{r['arch']}: stack {r['stack']} B (table {stack}), "
                         f"shared {r['shared']} B (plain table {shared})")
    return wrong


def test_variant_sample_recompiles_exactly(variant_records):
    """CI's sample of the variant table (``variant_sample_specs``: at head dim 128, for sm_80 and
    sm_90, each of the 14 combinations in bf16 and two of them in fp32 (every option on, with and
    without the mask: every kernel), in the first tile the selection offers each kernel: 96 + 14
    compiles, 91 s on 2 jobs from a cold Triton cache) compiles to the stack the table lists (0,
    since the tile is offered) and to the plain table's shared memory. The other head dims, combinations, tiles and spilling entries are
    recompiled with FASTGPT_AOT_FULL=1."""
    compiled = {(r["key"][0], r["arch"], r["key"][2], r["key"][5]) for r in variant_records}
    combos = {2: triton_attention.VARIANT_CALLS, 4: triton_attention.FP32_SAMPLE_COMBINATIONS}
    assert compiled == {(kernel, arch, itemsize, combo) for kernel in (*CONFIGS, "decode") for arch in ARCHS
                        for itemsize in VARIANT_HEAD_DIMS for combo in combos[itemsize]
                        if kernel != "decode" or "varlen" not in combo}
    assert {r["key"][0] for r in variant_records if r["key"][2] == 4} == {*CONFIGS, "decode"}
    wrong = _variant_differences(variant_records)
    assert not wrong, "rerun benchmarks/aot_table.py --variants, or fix the kernel:\n" + "\n".join(wrong)


def _print_table(records):
    print()
    print(f"{'kernel':<52} {'arch':>5} {'regs':>5} {'local':>6} {'stack':>6} {'shared':>7}")
    for r in records:
        print(f"{r['name']:<52} sm_{r['arch']:<3} {r['registers']:>4} {r['local']:>6} {r['stack']:>6} {r['shared']:>7}")


# (spec name, arch) -> stack bytes of decode tiles with fewer rows than the table's 64 that spill
# where the 64-row tile does not: ptxas gives the 16-row one 64 registers and 2 spilled values.
SMALL_DECODE_SPILLS = {("decode d=64 fp16 full M=16 N=64 s=2", 90): 16}


def _differences(records, exact_registers):
    """Records whose compiled shared memory differs from the table, or whose stack does (exceeds
    it, for a variant the table stands for: bf16, no mask), or registers when asked."""
    wrong = []
    for r in records:
        if not r["key"]:
            continue
        kernel, arch, itemsize, padded, blocks = r["key"]
        got = {"registers": r["registers"], "stack": r["stack"], "shared": r["shared"]}
        if kernel == "decode" and blocks[0] < decode_max_rows(itemsize, padded):
            # fewer rows than the table's decode tile: no more stack or shared memory than it
            table = resources(kernel, arch, itemsize, padded, decode_blocks(itemsize, padded, blocks[1], blocks[3]))
            allowed = table["stack"] + SMALL_DECODE_SPILLS.get((r["name"], r["arch"]), 0) if table else 0
            if table is None or got["stack"] > allowed or got["shared"] > table["shared"]:
                wrong.append(f"{r['name']} sm_{r['arch']}: compiled {got}, more than the widest tile's {table}")
            continue
        table = resources(kernel, arch, itemsize, padded, blocks)
        if table is None:
            wrong.append(f"{r['name']} sm_{r['arch']}: not in the table")
        elif exact_registers and got != table:
            wrong.append(f"{r['name']} sm_{r['arch']}: compiled {got}, table {table}")
        elif got["shared"] != table["shared"] or got["stack"] > table["stack"]:
            wrong.append(f"{r['name']} sm_{r['arch']}: compiled {got}, table {table}")
    return wrong


def test_compiled_resources_match_the_table(records):
    """Head dim 64 (fp16, no mask) and 128 (bf16, causal) compile to the shared memory the table
    (fp16, causal) lists, and to no more stack: the table stands for both 16-bit dtypes and both
    masks (without the mask dK/dV at head dim 64 needs less stack: 32 vs 40 B on sm_80, 0 vs 80 on sm_90)."""
    _print_table(records)
    wrong = _differences(records, exact_registers=False)
    assert not wrong, "rerun benchmarks/aot_table.py, or fix the kernel:\n" + "\n".join(wrong)


def test_no_spills_outside_the_table(records):
    """The decode merge and the backward preprocess (not in the table) keep everything in registers."""
    others = [f"{r['name']} sm_{r['arch']}: {r['stack']} B stack" for r in records if not r["key"] and r["stack"]]
    assert not others


def _table_sample(head_dims, itemsizes):
    return run_aot("fastgpt.kernels.attention", f"resource_table_specs:{','.join(map(str, head_dims))}:"
                   f"{','.join(map(str, itemsizes))}")


def test_head_dim_256_table_entries_recompile_exactly():
    """The head-dim-256 configurations (where the fit is decided) compile exactly as the table says."""
    records = _table_sample((256,), (2,))
    wrong = _differences(records, exact_registers=True)
    assert not wrong, "rerun benchmarks/aot_table.py, or fix the kernel:\n" + "\n".join(wrong)


def test_sm86_and_sm89_need_what_sm80_needs():
    """sm_86/sm_89 compile to the same shared memory as sm_80, so sm_80's table decides their fit
    (99 KB). Their registers and stack differ and are not pinned: ptxas gives the 128x64 forward at
    head dim 128 255 registers and 24 B of stack there, 211 and none on sm_80."""
    records = run_aot("fastgpt.kernels.attention", "ampere_variant_specs")
    assert {r["arch"] for r in records} == {86, 89}
    wrong = [f"{r['name']} sm_{r['arch']}: {r['shared']} B, sm_80 {table['shared']} B" for r in records
             if (table := resources(*r["key"][:4], r["key"][4]))["shared"] != r["shared"]]
    assert not wrong, "\n".join(wrong)


@pytest.fixture(scope="module")
def fp32_records():
    """Every fp32 configuration of every kernel at head dim 128, for sm_80 and sm_90."""
    return _table_sample((128,), (4,))


def test_fp32_attention_multiplies_on_tensor_cores(fp32_records):
    """fp32 products run as "tf32x3" on the tensor cores in the forward, both backward kernels and
    the decode: each configuration at head dim 128 has HMMA (mma.sync) or HGMMA (wgmma) and
    fewer FFMAs than one of its dots has products per thread, which "ieee" products would unroll
    into FFMAs (the sm_80 32x32 forward at head dim 64 in "ieee": 2,120 FFMAs against 512)."""
    assert {r["key"][0] for r in fp32_records} == set(KERNELS) and {r["arch"] for r in fp32_records} == set(ARCHS)
    on_fma_units = []
    for r in fp32_records:
        _, _, _, padded, (block_m, block_n, num_warps, _) = r["key"]
        counts, products_per_thread = r["sass_counts"], block_m * block_n * padded // (32 * num_warps)
        if counts["HMMA"] + counts["HGMMA"] == 0 or counts["FFMA"] >= products_per_thread:
            on_fma_units.append(f"{r['name']} sm_{r['arch']}: {counts}, {products_per_thread} products per thread")
    assert not on_fma_units, "\n".join(on_fma_units)


def test_fp32_table_entries_recompile_exactly(fp32_records):
    """The fp32 entries at head dim 128 (the no-spill edge: KNOWN_SPILLS) compile as the table says."""
    wrong = _differences(fp32_records, exact_registers=True)
    assert not wrong, "rerun benchmarks/aot_table.py, or fix the kernel:\n" + "\n".join(wrong)


@pytest.mark.skipif(not os.environ.get("FASTGPT_AOT_FULL"), reason="the whole table: 280 compiles, "
                    "the fp32 head-dim-256 ones slow; set FASTGPT_AOT_FULL=1 (after changing a kernel or a tile list)")
def test_whole_table_recompiles_exactly():
    records = _table_sample(PADDED_HEAD_DIMS, ITEMSIZES)
    assert {(tuple(r["key"][:4]) + (tuple(r["key"][4]),)) for r in records} == set(RESOURCES)
    wrong = _differences(records, exact_registers=True)
    assert not wrong, "rerun benchmarks/aot_table.py:\n" + "\n".join(wrong)


@pytest.mark.skipif(not os.environ.get("FASTGPT_AOT_FULL"), reason="the whole variant table: 1,590 compiles "
                    "(bf16 742, fp32 848), about 32 minutes on 2 jobs; set FASTGPT_AOT_FULL=1 (after changing a "
                    "kernel or a tile list)")
def test_whole_variant_table_recompiles_exactly():
    records = run_aot("fastgpt.kernels.attention", "variant_table_specs", timeout=6 * 3600, jobs=2)
    assert {(*r["key"][:4], tuple(r["key"][4]), r["key"][5]) for r in records} == set(VARIANT_STACK)
    wrong = _variant_differences(records)
    assert not wrong, "rerun benchmarks/aot_table.py --variants:\n" + "\n".join(wrong)
