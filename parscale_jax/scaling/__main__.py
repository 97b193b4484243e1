"""``python -m parscale_jax.scaling ...``"""
import sys

from parscale_jax.scaling.cli import main

sys.exit(main())
