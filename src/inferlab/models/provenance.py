"""Where a model's checkpoint came from: the file the download stage writes beside it and every
stage reads."""

from __future__ import annotations

import json
from pathlib import Path

PROVENANCE = "inferlab-model.json"  # in models/<name>/hf/


def read_provenance(hf_dir: Path) -> dict:
    path = hf_dir / PROVENANCE
    return json.loads(path.read_text()) if path.exists() else {}
