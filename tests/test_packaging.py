"""The README's two commands, CI calling the test command, and what the package installs."""

import importlib
import importlib.metadata
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def readme_commands():
    blocks = re.findall(r"```bash\n(.*?)\n```", (ROOT / "README.md").read_text(), flags=re.S)
    return blocks[0].strip(), blocks[1].strip()


def test_readme_opens_with_the_train_and_test_commands():
    train, test = readme_commands()
    assert "\n" not in train and "\n" not in test
    assert train.endswith("python -m fastgpt train")
    assert test.endswith("python -m pytest")


def test_ci_runs_the_readme_test_command():
    _, test = readme_commands()
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert test in ci, ".ci/run must run the README's test command verbatim"


def test_ci_runs_the_hugging_face_tests_and_the_downstream_install():
    ci = (ROOT / ".ci" / "run").read_text()
    (hf,) = [r.split(";")[0].strip() for r in importlib.metadata.requires("fastgpt") if 'extra == "hf"' in r]
    assert f'pip install --quiet "{hf}"' in ci, "CI installs the hf extra's transformers, so those tests run"
    assert "bash .ci/package_check" in ci


def test_kernels_install_as_a_subpackage():
    kernels = importlib.import_module("fastgpt.kernels")
    assert Path(kernels.__file__).parent == ROOT / "kernels"
    top_level = importlib.metadata.distribution("fastgpt").read_text("top_level.txt")
    assert top_level.split() == ["fastgpt"], "nothing called plain `kernels` may land in site-packages"


def test_backends_report_every_backend():
    import fastgpt
    from fastgpt import registry

    report = fastgpt.backends()
    assert set(report) == set(registry.names()) >= {"triton", "native", "torch", "reference"}
    for info in report.values():
        assert isinstance(info["available"], bool) and info["reason"]
    assert report["reference"]["available"]
