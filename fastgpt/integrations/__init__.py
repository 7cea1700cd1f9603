"""Bridges from other libraries to fastgpt's ops. Each submodule imports its library only when used,
so ``import fastgpt`` stays fast and needs none of them installed."""
