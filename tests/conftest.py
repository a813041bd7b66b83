"""Shared fixtures: a throw-away copy of the study folder, and the tiny model built once per test session."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
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


def default_params(path: Path) -> None:
    """params.yaml as DVC composes it from conf/ with no overrides (main's own records the last study made)."""
    from dvc.utils.hydra import compose_and_dump

    compose_and_dump(path, str(ROOT / "conf"), None, "config", str(ROOT / ".dvc"), [])


def copy_project(dst: Path) -> Path:
    """The study's files (no models, results or MLflow store) in a new folder; params.yaml the default one."""
    dst.mkdir(parents=True, exist_ok=True)
    for name in PROJECT_FILES:
        src = ROOT / name
        if name == "params.yaml":
            default_params(dst / name)
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


@contextmanager
def mlflow_server(folder: Path, db: Path | None = None, port: int | None = None) -> Iterator[str]:
    """A real `mlflow server` on 127.0.0.1 (its store and artifacts under `folder`, or the SQLite file `db`), as a
    site shares one; its URI, once /health answers."""
    import httpx

    from inferlab.serve.loadtest import free_port

    port = port or free_port()
    uri = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
        [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port), "--backend-store-uri",
         f"sqlite:///{db or folder / 'server.db'}", "--artifacts-destination", str(folder / "artifacts"),
         "--workers", "1"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while True:
            try:
                if httpx.get(f"{uri}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                assert server.poll() is None, f"mlflow server exited with {server.returncode}"
                assert time.time() < deadline, "mlflow server did not answer /health within 120 s"
                time.sleep(0.3)
        yield uri
    finally:
        server.terminate()
        server.wait(timeout=30)


SLURM_SCRIPT = ROOT / "scripts" / "slurm_one_node.sh"


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory) -> Iterator[Path]:
    """A one-node Slurm cluster of its own (slurmctld, slurmd; munged unless one answers), started by
    scripts/slurm_one_node.sh on free ports and stopped afterwards; its slurm.conf. Slurm is installed with
    apt-get where it is missing (as .ci/run does); a machine that cannot run one skips, saying why."""
    if os.geteuid() != 0:
        pytest.skip(f"a one-node Slurm cluster runs its daemons as root (SlurmUser=root); this is uid {os.geteuid()}")
    if shutil.which("slurmctld") is None:
        r = subprocess.run(["bash", str(SLURM_SCRIPT), "install"], capture_output=True, text=True, timeout=600)
        if r.returncode != 0:
            pytest.skip(f"Slurm is not installed and could not be: {(r.stderr or r.stdout).strip()[-500:]}")
    folder = tmp_path_factory.mktemp("slurm")
    r = subprocess.run(["bash", str(SLURM_SCRIPT), "start", str(folder)], capture_output=True, text=True,
                       timeout=300)
    try:
        if r.returncode != 0:
            pytest.skip(f"a one-node Slurm cluster did not start here: {(r.stderr or r.stdout).strip()[-800:]}")
        yield folder / "slurm.conf"
    finally:
        subprocess.run(["bash", str(SLURM_SCRIPT), "stop", str(folder)], capture_output=True, timeout=120)
