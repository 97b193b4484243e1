"""The shape of the code, checked: import layering (loading below everything that uses it),
function and module sizes, no hidden imports of project modules, no edits of the import path, no
hand-written safetensors code, no DeprecationWarning filter, torch optional.

Every module of ``parscale_jax`` belongs to one layer of :data:`LAYERS`; a module may import
modules of its own layer or of lower ones, never of a higher one. A new module must be added
to a layer here (the test fails until it is).
"""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PKG = REPO / "parscale_jax"

# Lowest first. A name stands for that module and, for a package, every module inside it.
LAYERS: list[tuple[str, set[str]]] = [
    ("foundations", {"errors", "hardware", "fileio", "metrics", "lock"}),
    ("configs", {"config", "data.config"}),
    ("data, model, optimisation", {"data", "attention", "model", "loss", "flops", "params", "optim", "sharding",
                                   "train_config"}),
    ("formats and steps", {"hf", "checkpoint", "decode", "evaluate", "train_step", "torch_ref",
                           "configuration_qwen2_parscale", "modeling_qwen2_parscale"}),
    ("the loader", {"loading"}),
    ("recycling", {"recycle"}),
    ("programs", {"convert", "resume", "runner", "tasks", "scaling", "aot", "harness"}),
    ("command lines", {"cli"}),
]
LONG_FUNCTION_OK: set[tuple[str, str]] = set()
LONG_MODULE_OK: set[str] = set()
LOCAL_IMPORT_OK: set[str] = set()
MAX_FUNCTION_LINES, MAX_MODULE_LINES = 80, 650


def module_name(path: Path) -> str:
    rel = path.relative_to(PKG).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


MODULES = {module_name(p): p for p in sorted(PKG.rglob("*.py"))}
MODULES.pop("", None)  # the package's own __init__


def layer_of(name: str) -> int:
    """Index in LAYERS of the most specific entry covering ``name`` (-1: none)."""
    best, depth = -1, -1
    for i, (_, names) in enumerate(LAYERS):
        for n in names:
            if (name == n or name.startswith(n + ".")) and n.count(".") > depth:
                best, depth = i, n.count(".")
    return best


def project_imports(source: str, modules=MODULES) -> list[tuple[str, int, bool]]:
    """(imported module, line, inside a function) for every import of a parscale_jax module."""
    out = []

    def resolve(dotted: str) -> str | None:
        while dotted and dotted not in modules:
            dotted = dotted.rpartition(".")[0]
        return dotted or None

    def visit(node, in_function):
        for child in ast.iter_child_nodes(node):
            inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                for a in child.names:
                    if a.name.startswith("parscale_jax."):
                        m = resolve(a.name[len("parscale_jax."):])
                        if m:
                            out.append((m, child.lineno, in_function))
            elif isinstance(child, ast.ImportFrom) and child.level == 1:
                # Relative imports (only the remote code that exports carry, top-level modules, has them).
                for a in child.names:
                    m = resolve(f"{child.module}.{a.name}" if child.module else a.name) or resolve(child.module or "")
                    if m:
                        out.append((m, child.lineno, in_function))
            elif isinstance(child, ast.ImportFrom) and child.module and child.level == 0 \
                    and (child.module == "parscale_jax" or child.module.startswith("parscale_jax.")):
                base = child.module[len("parscale_jax"):].lstrip(".")
                for a in child.names:
                    m = resolve(f"{base}.{a.name}".lstrip(".")) or resolve(base)
                    if m:
                        out.append((m, child.lineno, in_function))
            visit(child, inner)

    visit(ast.parse(source), False)
    return out


def layering_violations(sources: dict[str, str]) -> list[str]:
    bad = []
    for name, src in sources.items():
        for dep, line, _ in project_imports(src, set(sources) | set(MODULES)):
            if layer_of(dep) > layer_of(name):
                bad.append(f"{name}:{line} imports {dep} ({LAYERS[layer_of(dep)][0]}) from "
                           f"{LAYERS[layer_of(name)][0]}")
    return bad


def test_every_module_has_a_layer():
    missing = sorted(n for n in MODULES if layer_of(n) < 0)
    assert not missing, f"add these modules to a layer of tests/test_structure.py LAYERS: {missing}"


def test_no_module_imports_a_higher_layer():
    sources = {n: p.read_text() for n, p in MODULES.items()}
    assert layering_violations(sources) == []


def test_the_layering_check_can_fail():
    """A loader that reached up into evaluation or the runner would be caught."""
    fake = {"loading": "from parscale_jax import runner\n\ndef f():\n    from parscale_jax.cli import eval\n"}
    got = layering_violations(fake)
    assert len(got) == 2 and "loading:1 imports runner" in got[0] and "imports cli.eval" in got[1], got


def test_eval_and_train_follow_the_layers_down_to_the_loader():
    """The modules eval.py and train.py reach: each import goes down (or sideways), and the loader
    sits below evaluation, conversion, recycling and training."""
    for top in ("cli.eval", "cli.train"):
        seen, todo = set(), [top]
        while todo:
            m = todo.pop()
            if m in seen:
                continue
            seen.add(m)
            for dep, line, _ in project_imports(MODULES[m].read_text()):
                assert layer_of(dep) <= layer_of(m), f"{m}:{line} climbs to {dep}"
                todo.append(dep)
        assert "loading" in seen, top
    for user in ("recycle", "convert", "runner", "cli.common"):
        assert layer_of("loading") < layer_of(user)


def test_no_function_local_imports_of_project_modules():
    hidden = [f"{n}:{line} imports {dep} inside a function" for n, p in MODULES.items() if n not in LOCAL_IMPORT_OK
              for dep, line, local in project_imports(p.read_text()) if local]
    assert hidden == []


def _functions(tree: ast.AST, prefix: str = ""):
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield prefix + node.name, node
            yield from _functions(node, prefix + node.name + ".")
        elif isinstance(node, ast.ClassDef):
            yield from _functions(node, prefix + node.name + ".")


def test_functions_and_modules_fit_on_a_screen():
    long_fn, long_mod = [], []
    for name, path in MODULES.items():
        src = path.read_text()
        if src.count("\n") > MAX_MODULE_LINES and name.split(".")[0] not in LONG_MODULE_OK:
            long_mod.append(f"{name}: {src.count(chr(10))} lines")
        if name.split(".")[0] in LONG_MODULE_OK:
            continue
        for fn, node in _functions(ast.parse(src)):
            n = node.end_lineno - node.lineno + 1
            if n > MAX_FUNCTION_LINES and (name, fn) not in LONG_FUNCTION_OK:
                long_fn.append(f"{name}.{fn}: {n} lines")
    assert long_mod == [] and long_fn == []


def _tree_files(suffix: str = ".py"):
    skip = {".venv", ".git", "runs", "__pycache__", ".pytest_cache"}
    for p in sorted(REPO.rglob(f"*{suffix}")):
        if not skip & set(p.relative_to(REPO).parts):
            yield p


def test_no_sys_path_edits_or_file_imports_of_scripts():
    needles = ["sys." + "path", "spec_from_" + "file_location"]
    hits = [f"{p.relative_to(REPO)}: {n}" for p in _tree_files() for n in needles if n in p.read_text()]
    assert hits == []


def test_safetensors_through_the_library_and_warnings_shown():
    code = "\n".join(p.read_text() for p in MODULES.values())
    assert "data_" + "offsets" not in code and "from safetensors.numpy import" in MODULES["hf"].read_text()
    config = (REPO / "pyproject.toml").read_text() + "".join(p.read_text() for p in (REPO / "tests").glob("*.py"))
    assert "ignore::" + "DeprecationWarning" not in config


def test_torch_reference_imports_without_torch():
    code = ("import sys; sys.modules['torch'] = None\n"
            "import parscale_jax.torch_ref as t\n"
            "c = t.RefConfig({'vocab_size': 7, 'hidden_size': 8, 'intermediate_size': 4, 'num_hidden_layers': 1,"
            " 'num_attention_heads': 2})\n"
            "try:\n    t.TorchParScale({})\nexcept ImportError as e:\n    print('needs torch:', e)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "needs torch: parscale_jax.torch_ref needs PyTorch" in r.stdout


@pytest.mark.parametrize("script", ["train.py", "eval.py"])
def test_top_level_scripts_are_thin_wrappers(script):
    tree = ast.parse((REPO / script).read_text())
    defs = [n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))]
    assert defs == [] and len((REPO / script).read_text().splitlines()) <= 15
