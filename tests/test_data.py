"""The built-in corpus."""

from fastgpt.data import stdlib_corpus


def test_builtin_corpus_is_deterministic_and_capped():
    first, second = stdlib_corpus(200_000), stdlib_corpus(200_000)
    assert first == second and len(first) == 200_000
