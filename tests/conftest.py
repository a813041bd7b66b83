"""Shared fixtures: a throw-away copy of the study folder, and the tiny model built once per test session."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PROJECT_FILES = (
    "conf", "data", "stages", "src", "dvc.yaml", "params.yaml", ".dvc/config", ".dvcignore", "pyproject.toml",
)
BIN = Path(sys.executable).parent


def committed(name: str) -> str:
    """A file as committed (HEAD), not as a run in this checkout left it: the quick start's `dvc exp run` rewrites
    params.yaml for its model. Outside a git checkout, the file on disk."""
    r = subprocess.run(["git", "show", f"HEAD:{name}"], cwd=ROOT, capture_output=True, text=True)
    return r.stdout if r.returncode == 0 else (ROOT / name).read_text()


def copy_project(dst: Path) -> Path:
    """The study's files (no models, results or MLflow store) in a new folder; params.yaml as committed."""
    dst.mkdir(parents=True, exist_ok=True)
    for name in PROJECT_FILES:
        src = ROOT / name
        if name == "params.yaml":
            (dst / name).write_text(committed(name))
        elif src.is_dir():
            shutil.copytree(src, dst / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        elif src.exists():
            (dst / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / name)
    return dst


def run(cmd: list[str], cwd: Path, env: dict | None = None, check: bool = True, timeout: int = 600,
        output: Path | None = None):
    """Run a command with this virtual environment's tools first on PATH; fail with its output. output: a file
    for its output instead of pipes, for a command that leaves processes behind (`dvc queue start`'s workers):
    they inherit its stdout, and a pipe they hold open would keep this call waiting until they exit."""
    full_env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", **(env or {})}
    if output is None:
        r = subprocess.run(cmd, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout)
    else:
        with open(output, "w") as out:
            r = subprocess.run(cmd, cwd=cwd, env=full_env, stdout=out, stderr=subprocess.STDOUT, text=True,
                               timeout=timeout)
        r.stdout, r.stderr = output.read_text(), ""
    if check and r.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {r.returncode}\n--- stdout\n{r.stdout}\n--- stderr\n{r.stderr}")
    return r


@pytest.fixture
def project(tmp_path, monkeypatch) -> Path:
    """A copy of the study folder that every path of the config resolves into."""
    p = copy_project(tmp_path / "study")
    monkeypatch.setenv("INFERLAB_ROOT", str(p))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return p


@pytest.fixture(scope="session")
def tiny_project(tmp_path_factory) -> Path:
    """A study folder with tiny-phi downloaded (built) and converted once for the whole session."""
    p = copy_project(tmp_path_factory.mktemp("tiny") / "study")
    env = {"INFERLAB_ROOT": str(p), "MLFLOW_TRACKING_URI": f"sqlite:///{p / 'mlflow.db'}"}
    run([sys.executable, "stages/download.py", "model=tiny-phi"], cwd=p, env=env)
    run([sys.executable, "stages/convert.py", "model=tiny-phi", "convert.outtypes=[f32,f16]",
         "convert.quants=[q8_0,q4_k_m,q4_0]"], cwd=p, env=env)
    return p


@pytest.fixture
def tiny_hf(tiny_project) -> Path:
    return tiny_project / "models" / "tiny-phi" / "hf"


@pytest.fixture(scope="session")
def tiny_llama_hf(tmp_path_factory) -> Path:
    """tiny-llama (SmolLM2's code paths in miniature) built once for the session, in this process (seconds)."""
    from inferlab.config import compose
    from inferlab.models.acquire import acquire

    out = tmp_path_factory.mktemp("tiny-llama") / "hf"
    acquire(compose(["model=tiny-llama"]).model, out)
    return out


@pytest.fixture(scope="session")
def mlflow_template(tmp_path_factory) -> Path:
    """An empty MLflow SQLite store, made once: its schema migrations take seconds. Copy it for a fresh store."""
    from mlflow import MlflowClient

    db = tmp_path_factory.mktemp("mlflow") / "mlflow.db"
    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    client.search_experiments()
    client._tracking_client.store.engine.dispose()
    return db


@pytest.fixture
def fresh_store(mlflow_template, tmp_path) -> str:
    """The URI of a new, empty SQLite store of this test's own."""
    db = tmp_path / "mlflow.db"
    shutil.copy(mlflow_template, db)
    return f"sqlite:///{db}"
