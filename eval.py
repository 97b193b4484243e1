"""Evaluate or sample a ParScale checkpoint: ``python eval.py --checkpoint PATH [...]`` (held-out
loss, choice tasks) and ``python eval.py generate --checkpoint PATH --prompt TEXT [...]``.

A thin wrapper: the command line is :mod:`parscale_jax.cli.eval` (also installed as
``parscale-eval``); ``python eval.py --help`` and ``python eval.py generate --help`` list the flags.
"""
import sys

from parscale_jax.cli.eval import main

if __name__ == "__main__":
    sys.exit(main())
