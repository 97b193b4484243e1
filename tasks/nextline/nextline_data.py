"""Reads ../nextline.jsonl for the lm-eval task nextline (written by `python -m parscale_jax.tasks`)."""
import json
import os

import datasets


def load(**kwargs):
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "nextline.jsonl")
    with open(path, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    keep = ("context", "choices", "answer")
    return datasets.DatasetDict({"test": datasets.Dataset.from_list([{k: r[k] for k in keep} for r in rows])})
