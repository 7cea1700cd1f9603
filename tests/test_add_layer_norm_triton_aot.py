"""The Triton add+LayerNorm kernels compile for sm_80 and sm_90 in the configurations the launch
heuristics pick, with no local-memory spills (registers only, up to hidden size 16384)."""

import pytest

from triton_aot import ARCHS, run_aot

pytest.importorskip("triton")


@pytest.fixture(scope="module")
def records():
    return run_aot("fastgpt.kernels.add_layer_norm")


def test_every_spec_compiles_for_ampere_and_hopper(records):
    from fastgpt.kernels.add_layer_norm import aot_compile_specs

    names = {spec["name"] for spec in aot_compile_specs()}
    assert names, "aot_compile_specs() lists no kernel"
    compiled = {(r["name"], r["arch"]) for r in records}
    missing = sorted((name, arch) for name in names for arch in ARCHS if (name, arch) not in compiled)
    assert not missing, f"not compiled: {missing}"


def test_no_local_memory_spills(records):
    spilled = [
        f"{r['name']} sm_{r['arch']}: {r['local']} B local, {r['registers']} registers" for r in records if r["local"]
    ]
    assert not spilled, "local-memory spills:\n" + "\n".join(spilled)


def test_print_resource_report(records):
    for r in records:
        print(
            f"{r['name']} sm_{r['arch']}: {r['registers']} registers, {r['local']} B local, "
            f"{r['stack']} B stack, {r['shared']} B shared"
        )
