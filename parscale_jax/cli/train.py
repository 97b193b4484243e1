"""Train a ParScale model.

    python train.py --config configs/tiny.yaml --workdir runs/tiny-p4 model.parscale_n=4 optim.lr=3e-3

Overrides are dotted ``key=value`` pairs (see docs/config.md, or --print-config).
Running again with the same workdir resumes from its newest intact checkpoint; a changed setting
that alters the run (steps, optim.*, batch_size, dtype, seed, data.*) must be accepted with
--allow-changed KEY ... (docs/training.md, "Resuming").
"""
from __future__ import annotations

import argparse
import sys

from parscale_jax import runner, train_config
from parscale_jax.errors import UserError, cli_entry
from parscale_jax.fileio import write_json


def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="train.py", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", help="YAML config (configs/NAME.yaml); defaults when omitted")
    ap.add_argument("--workdir", help="run directory: checkpoints, metrics.jsonl, tb/, config.yaml")
    ap.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    ap.add_argument("--summary-json", help="also write the run summary (losses, tokens/s, held-out loss) here")
    ap.add_argument("--quiet", action="store_true", help="no progress output")
    ap.add_argument("--allow-changed", nargs="+", metavar="KEY", default=None,
                    help="on resume, accept these changed settings (keys such as optim.lr steps, or a section "
                         "such as optim); sets the config key allow_changed")
    ap.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. model.parscale_n=4")
    return ap.parse_intermixed_args(argv)


@cli_entry
def main(argv=None) -> int:
    args = parse_args(argv)
    overrides = list(args.overrides)
    if args.allow_changed:
        overrides.append("allow_changed=" + ",".join(args.allow_changed))
    cfg = train_config.load(args.config, overrides)
    if args.print_config:
        print(cfg.to_yaml(), end="")
        return 0
    if not args.workdir:
        raise UserError("--workdir is required: pass a directory for checkpoints and metrics, e.g. --workdir runs/x")
    summary = runner.train(cfg, args.workdir, verbose=not args.quiet)
    if args.summary_json:
        write_json(args.summary_json, summary.to_dict())
    return 0


if __name__ == "__main__":
    sys.exit(main())
