"""Train a ParScale model: ``python train.py --config configs/tiny.yaml --workdir runs/x key=value ...``.

A thin wrapper: the command line is :mod:`parscale_jax.cli.train` (also installed as
``parscale-train``); ``python train.py --help`` lists the flags.
"""
import sys

from parscale_jax.cli.train import main

if __name__ == "__main__":
    sys.exit(main())
