"""Choice tasks built by the project: "nextline", the true next line of held-out Python source.

    python -m parscale_jax.tasks build --out tasks/nextline.jsonl [--n 400] [--seed 0]
                                      [--source stdlib] [--heldout-fraction F]

Each record takes a held-out file of the source (default: the standard library, the default
corpus; the training pipeline's held-out split, so a model trained here on that source has
never seen it), a context of the previous lines (about 200-320 bytes,
whole lines, ending with a newline) and four choices: the true next non-trivial line and
three lines drawn from *other* files, re-indented like the true line so indentation alone
gives nothing away. The answer's position is random. Everything is drawn from
``random.Random(seed)`` over sorted file lists, so a given source (for the standard library:
a given Python version) and seed always give the same file.
Records: ``{"context", "choices", "answer", "doc": "path:line"}``.

Beside the JSONL the builder writes an lm-evaluation-harness task directory (``tasks/nextline/``:
``nextline.yaml`` and the loader ``nextline_data.py``, which reads ``../nextline.jsonl``), so the
task also runs through the harness (``eval.py harness --tasks nextline --include-path tasks/nextline``)
and any model lm-eval runs can be scored on it. ``python -m parscale_jax.tasks lm-eval FILE.jsonl``
writes the same directory for any choice-task JSONL.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import sys
from typing import Iterable

from parscale_jax import data, evaluate
from parscale_jax.errors import UserError, cli_entry
from parscale_jax.fileio import atomic_file

MIN_LINE, MAX_LINE = 16, 100  # bytes of a non-trivial line, stripped
CTX_MIN, CTX_MAX, CTX_HARD_MAX = 200, 320, 400


def heldout_source_files(source: str = "stdlib", heldout_fraction: float | None = None) -> list[tuple[str, str]]:
    """(split key = relative path, absolute path) of the held-out text files of ``source`` (default:
    the default corpus, the standard library), in the training pipeline's split, sorted.

    Only whole text files count (JSONL records and ``.npy`` ids are skipped); a source whose split
    falls back to a token-level cut (e.g. one file) has no held-out *files* and is an error.
    """
    kw = {} if heldout_fraction is None else {"heldout_fraction": heldout_fraction}
    cfg = data.DataConfig(source=source, **kw)
    split = data.split_units(cfg)
    if split.by_tokens:
        raise UserError(f"{source} splits into train/held-out by tokens, not by files (too few files): "
                        f"the nextline task needs held-out files; pass a source with more files")
    return sorted((u.key, u.file.path) for u in split.heldout if u.file.format == "text")


def nontrivial(line: str) -> bool:
    """A line worth predicting: code of a reasonable length, printable ASCII, not a comment."""
    s = line.strip()
    if not (MIN_LINE <= len(s) <= MAX_LINE) or not s.isascii() or not s.isprintable():
        return False
    if s.startswith(("#", '"""', "'''")) or s in ('"""', "'''"):
        return False
    return sum(ch.isalnum() for ch in s) >= 8


def _read_lines(path: str) -> list[str]:
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError):
        return []
    return text.splitlines(keepends=True)


def _context(lines: list[str], i: int, target: int) -> str | None:
    """The whole lines before ``lines[i]`` adding up to at least ``target`` bytes (at most CTX_HARD_MAX)."""
    ctx, size = [], 0
    for j in range(i - 1, -1, -1):
        n = len(lines[j].encode("utf-8"))
        if size + n > CTX_HARD_MAX:
            break
        ctx.append(lines[j])
        size += n
        if size >= target:
            return "".join(reversed(ctx))
    return None


def build_nextline(files: Iterable[tuple[str, str]], n: int = 400, seed: int = 0,
                   per_file: int = 8) -> list[dict]:
    """Build ``n`` nextline records from ``files`` [(relative path, absolute path)]."""
    rng = random.Random(seed)
    docs = []
    for rel, path in sorted(files):
        lines = _read_lines(path)
        if any(not ln.endswith("\n") for ln in lines[:-1]) or len(lines) < 8:
            continue
        before = list(itertools.accumulate((len(ln) for ln in lines), initial=0))
        good = [i for i, ln in enumerate(lines) if before[i] >= CTX_MIN and nontrivial(ln)]
        if good:
            docs.append((rel, lines, good))
    if len(docs) < 2:
        raise UserError("too few held-out source files to build the task: need at least 2 with code lines")
    pool = [(d, ln.strip()) for d, (_, lines, _) in enumerate(docs) for ln in lines if nontrivial(ln)]
    records, used = [], set()
    for _ in range(per_file):  # rounds over the files in a fresh random order, one record each
        order = list(range(len(docs)))
        rng.shuffle(order)
        for d in order:
            if len(records) == n:
                break
            rel, lines, good = docs[d]
            i = rng.choice(good)
            ctx = _context(lines, i, rng.randint(CTX_MIN, CTX_MAX))
            if (d, i) in used or ctx is None:
                continue
            true = lines[i].rstrip()
            indent = true[: len(true) - len(true.lstrip())]
            seen, distract = {true.strip()}, []
            for _ in range(1000):  # 3 distinct lines from other files (a pool that small gives up)
                od, s = pool[rng.randrange(len(pool))]
                if od != d and s not in seen:
                    seen.add(s)
                    distract.append(indent + s)
                    if len(distract) == 3:
                        break
            if len(distract) < 3:
                continue
            answer = rng.randrange(4)
            used.add((d, i))
            records.append({"context": ctx, "choices": distract[:answer] + [true] + distract[answer:],
                            "answer": answer, "doc": f"{rel}:{i + 1}"})
    if len(records) < n:
        raise UserError(f"could only build {len(records)} of {n} records: lower --n")
    return records


def write_jsonl(records: list[dict], out: str) -> None:
    with atomic_file(out, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=True) + "\n")


_TASK_YAML = """\
# lm-evaluation-harness task for {jsonl}, written by `python -m parscale_jax.tasks`.
# Run: python eval.py harness --checkpoint CKPT --tasks {name} --include-path {folder}
task: {name}
custom_dataset: !function {name}_data.load
output_type: multiple_choice
test_split: test
doc_to_text: context
doc_to_choice: choices
doc_to_target: answer
target_delimiter: ""
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""

_TASK_LOADER = '''"""Reads ../{jsonl} for the lm-eval task {name} (written by `python -m parscale_jax.tasks`)."""
import json
import os

import datasets


def load(**kwargs):
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "{jsonl}")
    with open(path, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    keep = ("context", "choices", "answer")
    return datasets.DatasetDict({{"test": datasets.Dataset.from_list([{{k: r[k] for k in keep}} for r in rows])}})
'''


def write_task_dir(jsonl: str) -> str:
    """Write the lm-eval task directory of a choice-task JSONL beside it (``tasks/x.jsonl`` ->
    ``tasks/x/x.yaml`` + ``tasks/x/x_data.py``; task name ``x``). The context and the choice are
    joined with no delimiter (``target_delimiter: ""``), as the JSONL's choices carry their own
    leading space when they need one. Returns the directory."""
    stem = os.path.splitext(os.path.basename(jsonl))[0]
    name = "".join(ch if ch.isalnum() or ch == "_" else "_" for ch in stem)
    folder = os.path.join(os.path.dirname(os.path.abspath(jsonl)), stem)
    os.makedirs(folder, exist_ok=True)
    fmt = dict(name=name, jsonl=os.path.basename(jsonl), folder=os.path.relpath(folder))
    with atomic_file(os.path.join(folder, f"{name}.yaml"), "w", encoding="utf-8") as f:
        f.write(_TASK_YAML.format(**fmt))
    with atomic_file(os.path.join(folder, f"{name}_data.py"), "w", encoding="utf-8") as f:
        f.write(_TASK_LOADER.format(**fmt))
    return folder


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m parscale_jax.tasks", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="build the nextline task from the held-out split of the default corpus")
    b.add_argument("--out", default="tasks/nextline.jsonl")
    b.add_argument("--n", type=int, default=400, help="number of records")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--source", default="stdlib",
                   help="text source (the training pipeline's data.source): its held-out files are used")
    b.add_argument("--heldout-fraction", type=float, default=None,
                   help="the training run's data.heldout_fraction (default: the pipeline's default)")
    w = sub.add_parser("lm-eval", help="write the lm-evaluation-harness task directory of a choice-task JSONL")
    w.add_argument("jsonl", help="a JSONL of {context, choices, answer} records")
    return ap


@cli_entry
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.cmd == "lm-eval":
        evaluate.load_tasks(args.jsonl)  # a malformed record is reported here, not inside the harness
        print(f"wrote {write_task_dir(args.jsonl)} (lm-eval task {os.path.splitext(os.path.basename(args.jsonl))[0]})")
        return 0
    if args.n < 1:
        raise UserError(f"--n {args.n} is invalid: use a positive number of records")
    records = build_nextline(heldout_source_files(args.source, args.heldout_fraction), args.n, args.seed)
    write_jsonl(records, args.out)
    folder = write_task_dir(args.out)
    what = f"Python {sys.version.split()[0]} stdlib" if args.source == "stdlib" else args.source
    print(f"wrote {len(records)} records to {args.out} ({os.path.getsize(args.out) / 1024:.0f} KiB, "
          f"{what} held-out split, seed {args.seed}) and the lm-eval task directory {folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
