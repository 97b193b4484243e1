"""The documentation stays true: docs/config.md is the generated config reference, every shipped
config loads, and every command in README.md is exercised.

README commands (the lines of its ``bash`` blocks, ``\\``-continuations joined, comments dropped)
are checked twice:

1. **Each one parses** with the real command line it names (argparse of train.py, eval.py,
   eval.py generate, convert, tasks, torch_ref; train.py's ``key=value`` overrides load into a
   TrainConfig; a ``make`` target exists). A renamed flag or key fails here.
2. **Each one is run**: cheap ones right here, in-process (``HERE``); the others by ``make demo``,
   CI
   or the test module named in ``EXERCISED``, whose source must use every flag and override
   key of the command. A command that is in README.md but not in ``HERE``/``EXERCISED`` fails:
   register a new README command in one of them (and keep the other side honest: an entry that
   no longer matches a README command fails too).
"""
from __future__ import annotations

import re
import shlex
from pathlib import Path

import jax
import pytest
import yaml

from parscale_jax import aot, convert, scaling, tasks, torch_ref, train_config
from parscale_jax.cli import eval as eval_cli
from parscale_jax.cli import generate
from parscale_jax.cli import harness as harness_cli
from parscale_jax.cli import train as train_cli
from parscale_jax.data import __main__ as data_cli

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()

# README command -> how it is exercised: "demo" (make demo runs it), "ci" (.ci/run runs it), or a
# test module that runs the same program with the same flags.
EXERCISED = {
    "make demo": "demo",
    "make test": "ci",
    "python train.py --config configs/tiny.yaml --workdir runs/tiny-p4 model.parscale_n=4": "tests/test_train.py",
    "python eval.py --checkpoint runs/tiny-p4": "tests/test_recycle.py",
    "python eval.py --checkpoint runs/tiny-p4 --tasks tasks/nextline.jsonl": "tests/test_eval.py",
    "python eval.py harness --checkpoint runs/tiny-p4 --tasks nextline --include-path tasks/nextline":
        "tests/test_harness.py",
    'python eval.py generate --checkpoint runs/tiny-p4 --prompt "def fib(n):" --max-new-tokens 64':
        "tests/test_decode.py",
    "python -m parscale_jax.convert to-hf --checkpoint runs/tiny-p4 --out export/tiny-p4": "tests/test_convert.py",
    "python -m parscale_jax.convert from-hf --hf export/tiny-p4 --out runs/tiny-p4-back": "tests/test_convert.py",
    'python -m parscale_jax.torch_ref export/tiny-p4 --prompt "def fib(n):" --max-new-tokens 16':
        "tests/test_convert.py",
    "python -m parscale_jax.aot --config configs/paper-0.5b.yaml --topology v5p:2x2x2 model.parscale_n=8 "
    "data.seq_len=2048 batch_size=8 mesh.fsdp=8 mesh.data=1": "tests/test_aot.py",
    "python -m parscale_jax.aot --config configs/paper-1.6b.yaml --topology h100:8 model.parscale_n=8 "
    "data.seq_len=2048 batch_size=8 mesh.fsdp=8 mesh.data=1": "tests/test_aot_gpu.py",
    "python -m parscale_jax.aot --config configs/paper-1.6b.yaml --topology v5e:2x2 --decode --batch 1 "
    "--max-len 2048 model.parscale_n=8 --serve-dtype bfloat16": "tests/test_aot.py",
    "python -m parscale_jax.data prepare --input corpus/ --out data/corpus --tokenizer bytes --workers 2":
        "tests/test_prepare.py",
    "python -m parscale_jax.data inspect data/corpus --verify": "tests/test_prepare.py",
    "python train.py --workdir runs/mix data.mixture=data/code:0.7,data/text:0.3": "tests/test_mixture_train.py",
    "python -m parscale_jax.scaling fit": "tests/test_scaling.py",
    "python -m parscale_jax.scaling plan --P 1 2 4 8": "tests/test_scaling.py",
}
# Run below, in-process, in a scratch directory (they are quick).
HERE = {
    "python train.py --config configs/tiny.yaml --print-config model.parscale_n=8",
    "python -m parscale_jax.tasks build --out tasks/nextline.jsonl",
}


def readme_commands(text: str = README) -> list[str]:
    cmds = []
    for block in re.findall(r"```(?:bash|sh|console)\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.strip()
            if line.startswith("$ "):
                line = line[2:]
            words = shlex.split(line, comments=True)
            if words:
                cmds.append(" ".join(shlex.quote(w) if " " in w else w for w in words).replace("'", '"'))
    return cmds


def argv_of(cmd: str) -> tuple[str, list[str]]:
    """(program, its argv) of a README command."""
    words = shlex.split(cmd)
    if words[0] == "make":
        return "make", words[1:]
    assert words[0] == "python", cmd
    if words[1] == "-m":
        return words[2], words[3:]
    return words[1], words[2:]


PARSERS = {
    "parscale_jax.convert": convert.build_parser,
    "parscale_jax.tasks": tasks.build_parser,
    "parscale_jax.torch_ref": torch_ref.build_parser,
    "parscale_jax.aot": lambda: _Parse(aot.parse_args),
    "parscale_jax.data": data_cli.build_parser,
}


class _Parse:
    """A parser-like wrapper for command lines that expose parse_args(argv) instead of a parser."""

    def __init__(self, fn):
        self.parse_args = fn


def check_parses(cmd: str, monkeypatch) -> None:
    prog, argv = argv_of(cmd)
    monkeypatch.chdir(REPO)
    if prog == "make":
        targets = re.findall(r"^([\w-]+):", (REPO / "Makefile").read_text(), flags=re.M)
        assert set(argv) <= set(targets), cmd
    elif prog == "train.py":
        args = train_cli.parse_args(argv)
        train_config.load(args.config, args.overrides)
    elif prog == "eval.py":
        if argv[:1] == ["generate"]:
            generate.build_parser().parse_args(argv[1:])
        elif argv[:1] == ["harness"]:
            harness_cli.build_parser().parse_args(argv[1:])
        else:
            eval_cli.build_parser().parse_args(argv)
    elif prog in PARSERS:
        PARSERS[prog]().parse_args(argv)
    elif prog == "parscale_jax.scaling":
        # issue 14 gives the scaling command line a public build_parser(); until then the parse is
        # checked by running the command (tests/test_scaling.py)
        parser = getattr(scaling, "build_parser", None) or getattr(getattr(scaling, "cli", None), "build_parser", None)
        if parser is not None:
            parser().parse_args(argv)
    else:
        raise AssertionError(f"README command of an unknown program: {cmd}")


def test_readme_is_short_and_its_commands_are_registered():
    assert len(README.splitlines()) <= 250
    cmds = readme_commands()
    assert len(cmds) >= 10, cmds
    unregistered = [c for c in cmds if c not in EXERCISED and c not in HERE]
    assert not unregistered, f"register these README commands in tests/test_docs.py: {unregistered}"
    stale = sorted((set(EXERCISED) | HERE) - set(cmds))
    assert not stale, f"no longer in README.md (remove them from tests/test_docs.py): {stale}"


def test_every_readme_command_parses(monkeypatch):
    for cmd in readme_commands():
        try:
            check_parses(cmd, monkeypatch)
        except SystemExit as e:  # argparse rejected it
            raise AssertionError(f"README command does not parse (exit {e.code}): {cmd}") from None


def test_the_check_can_fail(monkeypatch):
    bad = "```bash\npython eval.py --checkpoint x --no-such-flag 1\npython train.py --workdir w optim.nope=1\n```"
    for cmd in readme_commands(bad):
        with pytest.raises((SystemExit, Exception)):
            check_parses(cmd, monkeypatch)


def test_mapped_commands_use_only_what_their_tests_exercise():
    """A command run by another test: that test module uses its program and every flag and key."""
    for cmd, where in EXERCISED.items():
        if where in ("demo", "ci"):
            target = {"demo": REPO / "Makefile", "ci": REPO / ".ci" / "run"}[where]
            assert cmd.split()[-1] in target.read_text()
            continue
        src = (REPO / where).read_text()
        prog, argv = argv_of(cmd)
        words = [w for w in argv if w.startswith("--")] + [w.split("=")[0] for w in argv if "=" in w]
        words += [argv[0]] if prog in ("parscale_jax.convert", "parscale_jax.tasks") else []
        words += [argv[0]] if argv[:1] in (["generate"], ["harness"]) else []
        words.append({"train.py": "train", "eval.py": "eval"}.get(prog, prog.split(".")[-1]))
        missing = [w for w in words if w not in src]
        assert not missing, f"{where} does not exercise {missing} of README command {cmd!r}"


def test_cheap_readme_commands_run(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "configs").symlink_to(REPO / "configs")
    for cmd in sorted(HERE):
        prog, argv = argv_of(cmd)
        if prog == "train.py":
            rc = train_cli.main(argv)
            out = capsys.readouterr().out
            assert rc == 0 and train_config.from_dict(yaml.safe_load(out)).model.parscale_n == 8
        elif prog == "parscale_jax.tasks":
            assert tasks.main(argv) == 0
            assert len((tmp_path / "tasks" / "nextline.jsonl").read_text().splitlines()) == 400
            assert (tmp_path / "tasks" / "nextline" / "nextline.yaml").is_file()  # its lm-eval task directory
        else:
            raise AssertionError(f"no runner here for {cmd}")
        capsys.readouterr()


def test_readme_python_runs():
    """The README's Python (the model API) runs as written and gives the shapes its comments say.
    Traced abstractly (jax.eval_shape): every name, signature and shape is checked, nothing is
    compiled or computed."""
    blocks = re.findall(r"```python\n(.*?)```", README, flags=re.S)
    assert blocks
    env: dict = {}

    def run():
        for code in blocks:
            exec(compile(code, "README.md", "exec"), env)  # noqa: S102
        return env["logits"], env["z"], env["cache"]

    logits, z, cache = jax.eval_shape(run)
    cfg = env["cfg"]
    assert logits.shape == (2, 16, cfg.vocab_size)
    assert z.shape == (cfg.parscale_n, 2, 16, cfg.hidden_size)
    assert cache["k"].shape[:4] == (cfg.parscale_n, cfg.num_hidden_layers, 2, cfg.parscale_n_tokens + 64)


def test_config_reference_is_current():
    keys = {k for k, _, _ in train_config.all_keys()} | {"model.preset"}
    assert keys == set(train_config.KEY_DOCS), sorted(keys ^ set(train_config.KEY_DOCS))
    assert (REPO / "docs" / "config.md").read_text() == train_config.reference_markdown(), \
        "docs/config.md is stale: python -m parscale_jax.train_config > docs/config.md"


def test_every_shipped_config_loads():
    for path in sorted((REPO / "configs").glob("*.yaml")):
        cfg = train_config.load(str(path))
        assert cfg.steps >= 1, path
