"""The README documents every training config key (its reference table is generated from the
code's key list, so a new key without a line of documentation fails here)."""
from __future__ import annotations

from pathlib import Path

from parscale_jax import train_config

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def test_every_config_key_has_a_description():
    keys = {k for k, _, _ in train_config.all_keys()} | {"model.preset"}
    assert keys == set(train_config.KEY_DOCS), sorted(keys ^ set(train_config.KEY_DOCS))


def test_readme_holds_the_current_config_reference():
    assert train_config.reference_table() in README, \
        "README's config table is stale: regenerate it with train_config.reference_table()"


def test_every_shipped_config_loads():
    for path in sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml")):
        cfg = train_config.load(str(path))
        assert cfg.steps >= 1, path
