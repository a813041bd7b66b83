"""dvc.yaml tells the truth: every stage lists as deps the inferlab code it runs, and as params the
config keys it reads, so `dvc repro` reruns a stage whenever something it depends on changed.

Code: each stage script is imported in a fresh interpreter and the `inferlab` modules it loaded are
collected (sys.modules); to those are added the modules its code imports later, inside functions or
by name (a backend of the registry, the scenario a worker runs): the imports of every module
reached, followed to the end. Each must lie under one of the stage's deps (a folder covers every
module under it).

Config: every stage of the real pipeline run (tests/test_pipeline.py) notes the keys it read
(INFERLAB_CONFIG_READS, see inferlab.stage); each must be covered by the stage's params, except the
keys that say where outputs go or are logged, which dvc.yaml's outs fix or which change no result
(NOT_PARAMS).
"""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
# keys a stage reads that are not params, and why
NOT_PARAMS = {
    "paths": "where a stage reads and writes: dvc.yaml's deps and outs name those folders",
    "tracking": "where records are logged to MLflow: it changes no result",
}
IMPORTED = """
import json, runpy, sys
sys.argv = [{script!r}]
runpy.run_path({script!r}, run_name="imported")
print(json.dumps(sorted(m for m in sys.modules if m == "inferlab" or m.startswith("inferlab."))))
"""
NAMED = re.compile(r"^(inferlab(?:\.\w+)+):\w+$")  # "inferlab.backends.hf:HFBackend" in a registry


def stages(dvc_yaml: Path = ROOT / "dvc.yaml") -> dict[str, dict]:
    return yaml.safe_load(dvc_yaml.read_text())["stages"]


def module_file(name: str) -> Path | None:
    base = SRC.joinpath(*name.split("."))
    for f in (base / "__init__.py", base.with_suffix(".py")):
        if f.is_file():
            return f
    return None


def imports_of(name: str, path: Path) -> set[str]:
    """The inferlab modules a file imports anywhere (top level, inside functions) or names in a
    string."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, *([node.module] if node.module else [])])
            out |= {base, *(f"{base}.{a.name}" for a in node.names)}
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and NAMED.match(node.value):
            out.add(NAMED.match(node.value).group(1))
    return {m for m in out if m.split(".")[0] == "inferlab" and module_file(m)}


def reachable(start: set[str]) -> set[str]:
    """Every inferlab module the given ones import, to the end (packages of each module included)."""
    seen: set[str] = set()
    todo = list(start)
    while todo:
        parts = todo.pop().split(".")
        for i in range(1, len(parts) + 1):
            name = ".".join(parts[:i])
            if name not in seen and (f := module_file(name)):
                seen.add(name)
                todo += imports_of(name, f)
    return seen


def loaded_by(script: str) -> set[str]:
    """The inferlab modules a stage script loads when imported, and those its code can import
    later."""
    r = subprocess.run([sys.executable, "-c", IMPORTED.format(script=script)], cwd=ROOT, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    loaded = set(json.loads(r.stdout.splitlines()[-1]))
    return reachable(loaded | imports_of("__main__", ROOT / script))


def covered(path: str, deps: list[str]) -> bool:
    return any(path == d or path.startswith(d.rstrip("/") + "/") for d in deps)


def modules_not_in_deps(stage: dict) -> list[str]:
    """The source files of the modules a stage runs that none of its deps covers."""
    deps = [d if isinstance(d, str) else next(iter(d)) for d in stage.get("deps", [])]
    script = next(d for d in deps if d.startswith("stages/"))
    files = sorted(module_file(m).relative_to(ROOT).as_posix() for m in loaded_by(script))  # type: ignore[union-attr]
    return [f for f in files if not covered(f, deps)]


def params_not_covered(reads: list[str], stage: dict) -> list[str]:
    """The config keys a stage read that its params (or NOT_PARAMS) do not cover."""
    params = [p for p in stage.get("params", []) if isinstance(p, str)] + list(NOT_PARAMS)
    return [k for k in reads if not any(k == p or k.startswith(p + ".") for p in params)]


@pytest.mark.parametrize("name", sorted(stages()))
def test_every_module_a_stage_runs_is_a_dep(name):
    missing = modules_not_in_deps(stages()[name])
    assert not missing, f"dvc.yaml: stage {name} runs {missing} but does not list it (or a folder above it) in deps"


def test_a_missing_dep_is_found(tmp_path):
    """The check fails when a stage's import is taken out of dvc.yaml."""
    stage = stages()["report"]
    stage["deps"] = [d for d in stage["deps"] if d != "src/inferlab/records.py"]
    assert "src/inferlab/records.py" in modules_not_in_deps(stage)


def test_a_key_read_outside_the_params_is_found():
    stage = {"params": ["model.name", "bench_cpu"]}
    assert params_not_covered(["bench_cpu.hf.precisions", "model.name", "paths.results", "model.revision",
                               "evaluate.dataset.path"], stage) == ["model.revision", "evaluate.dataset.path"]


def check_config_reads(folder: Path) -> None:
    """Called by the pipeline test with the keys each stage of its run read: every stage covered by
    its params."""
    all_stages = stages()
    found = {p.stem: json.loads(p.read_text()) for p in folder.glob("*.json")}
    assert set(found) == set(all_stages), f"stages that noted their reads: {sorted(found)}"
    problems = {name: params_not_covered(reads, all_stages[name]) for name, reads in found.items()}
    problems = {k: v for k, v in problems.items() if v}
    assert not problems, f"dvc.yaml: these stages read config keys their params do not list: {problems}"
