"""Test markers (registered in pyproject.toml): ``slow`` (training runs, subprocesses, fixtures of
10 s and more; ``make test-fast`` leaves them out), ``torch`` (needs the dev extra's PyTorch /
transformers), ``multiprocess`` (several JAX processes, a multi-device subprocess, grain workers).
Test modules mark their own tests.
"""
