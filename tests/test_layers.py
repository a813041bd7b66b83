"""Layers point down only: no module of src/inferlab imports (at the top, inside a function, or by
name in a registry) from a layer above its own. The layers, lowest first, are README's Layout."""

from __future__ import annotations

import sys

from .test_dependencies import SRC, imports_of

# module (or package: every module under it) -> layer; the longest matching name decides
LAYERS = (
    ("config and records", ("inferlab", "inferlab.config", "inferlab.records", "inferlab.fields",
                            "inferlab.aggregate", "inferlab.logs", "inferlab.hostlock")),
    ("environment, tracking, models and data", ("inferlab.environment", "inferlab.tracking", "inferlab.models",
                                                "inferlab.gguf", "inferlab.gguf.convert", "inferlab.quality",
                                                "inferlab.quality.dataset")),
    ("backends", ("inferlab.backends",)),
    ("harness", ("inferlab.stage", "inferlab.sweep")),
    ("scenarios", ("inferlab.bench", "inferlab.quality.generate", "inferlab.quality.tokens",
                   "inferlab.quality.scores")),
    ("stage logic", ("inferlab.bench.cpu", "inferlab.bench.gpu", "inferlab.quality.evaluate",
                     "inferlab.gguf.pipeline")),
    ("report and serve", ("inferlab.report", "inferlab.serve")),
    ("command line", ("inferlab.cli", "inferlab.console")),
)


def layer(module: str) -> int:
    best, level = "", None
    for i, (_, names) in enumerate(LAYERS):
        for name in names:
            if (module == name or module.startswith(name + ".")) and len(name) > len(best):
                best, level = name, i
    assert level is not None, f"{module} is in no layer: add it to LAYERS (and to README's Layout)"
    return level


def modules() -> dict[str, object]:
    out = {}
    for f in sorted((SRC / "inferlab").rglob("*.py")):
        parts = f.relative_to(SRC).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    return out


def upward_imports() -> list[str]:
    found = []
    for name, path in modules().items():
        for target in sorted(imports_of(name, path)):  # type: ignore[arg-type]
            if target != name and not name.startswith(target + ".") and layer(target) > layer(name):
                found.append(f"{name} ({LAYERS[layer(name)][0]}) imports {target} ({LAYERS[layer(target)][0]})")
    return found


def test_no_module_imports_from_a_layer_above_its_own():
    found = upward_imports()
    assert not found, "imports that point up:\n" + "\n".join(found)


def test_an_upward_import_is_found(tmp_path, monkeypatch):
    me = sys.modules[__name__]
    fake = tmp_path / "inferlab" / "backends"
    fake.mkdir(parents=True)
    (fake / "timing.py").write_text("from inferlab.sweep import run\n")
    monkeypatch.setattr(me, "modules", lambda: {"inferlab.backends.timing": fake / "timing.py"})
    assert upward_imports() == ["inferlab.backends.timing (backends) imports inferlab.sweep (harness)",
                                "inferlab.backends.timing (backends) imports inferlab.sweep.run (harness)"]


def test_the_sweep_engine_lies_below_benchmarks_and_quality():
    users = ("inferlab.bench.registry", "inferlab.bench.cpu", "inferlab.quality.generate", "inferlab.quality.evaluate")
    for user in users:
        assert layer("inferlab.sweep.run") < layer(user), user


def readability(root) -> tuple[list[str], float]:
    """Modules over 500 lines, and the share of non-blank lines of 100 characters or more."""
    long, dense, lines = [], 0, 0
    for f in sorted(root.rglob("*.py")):
        text = f.read_text().splitlines()
        if len(text) > 500:
            long.append(f"{f.relative_to(root)}: {len(text)} lines")
        kept = [x for x in text if x.strip()]
        lines += len(kept)
        dense += sum(len(x) >= 100 for x in kept)
    return long, dense / max(lines, 1)


def test_modules_stay_short_and_lines_read_at_a_glance(tmp_path):
    long, share = readability(SRC)
    assert not long, long
    assert share <= 0.08, f"{share:.1%} of src lines are 100 characters or longer (at most 8%)"
    (tmp_path / "big.py").write_text("x = 1\n" * 501 + "y = '" + "z" * 100 + "'\n")
    assert readability(tmp_path) == (["big.py: 502 lines"], 1 / 502)
