"""Configuration: every shipped config composes; bad input fails early, naming key, value and what is allowed;
DVC's Hydra composition and the stage scripts' Hydra composition give the same resolved config."""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path

import pytest
import yaml

from inferlab.config import ConfigError, compose, load, to_container

from .conftest import ROOT, run
from .conftest import committed as committed_file

MODELS = sorted(p.stem for p in (ROOT / "conf" / "model").glob("*.yaml"))


@pytest.mark.parametrize("model", MODELS)
def test_every_shipped_model_config_composes(model):
    """Every model, in the full study and in the quick preset."""
    quick = compose([f"model={model}", "preset=quick"])
    assert quick.evaluate.dataset.limit == 2 and quick.bench_cpu.llama_cpp.n_threads == [0]
    cfg = compose([f"model={model}"])
    assert cfg.model.name == model
    assert cfg.model.weights == ("real" if cfg.model.source in ("hub", "wheel") else "random")


def test_phi2_random_has_phi2_shapes():
    a = compose(["model=phi-2-random"]).model.architecture
    assert (a.hidden_size, a.num_hidden_layers, a.num_attention_heads, a.intermediate_size, a.vocab_size) == (
        2560, 32, 32, 10240, 51200)
    assert a.partial_rotary_factor == 0.4


def test_tiny_phi_shapes_suit_k_quants():
    a = compose(["model=tiny-phi"]).model.architecture
    assert a.hidden_size % 256 == 0 and a.intermediate_size == 4 * a.hidden_size


@pytest.mark.parametrize(
    "overrides, must_say",
    [
        (["model=tiny"], ["model", "'tiny'", "phi-2, phi-2-random, smollm2-135m, tiny-llama, tiny-phi",
                          "did you mean 'tiny-phi'"]),
        (["convert.quants=[q4_k_n]"], ["convert.quants", "'q4_k_n'", "q4_k_m", "q8_0"]),
        (["convert.outtypes=[f8]"], ["convert.outtypes", "'f8'", "f32, f16"]),
        (["convert.quantz=[q8_0]"], ["convert.quantz", "unknown key", "quants"]),
        (["convert.threads=many"], ["convert.threads", "'many'", "Integer"]),
        (["convert.threads=-1"], ["convert.threads", "-1", "out of range"]),
        (["model=tiny-phi", "model.path=/no/such/folder"], ["model.path", "/no/such/folder", "does not exist"]),
        (["model=tiny-phi", "model.source=ftp"], ["model.source", "'ftp'", "hub, wheel, tiny, random"]),
        (["model=smollm2-135m", "model.wheel.sha256=abc"], ["model.wheel.sha256", "'abc'", "not a sha256"]),
        (["model=smollm2-135m", "model.wheel.file_sha256=null"], ["model.wheel.file_sha256", "missing"]),
        (["model=smollm2-135m", "model.wheel.file=model.bin"], ["model.wheel.file", "'model.bin'", ".gguf"]),
        (["model=tiny-llama", "model.architecture.num_key_value_heads=3"],
         ["model.architecture.num_key_value_heads", "3", "num_attention_heads=4"]),
        (["model=tiny-llama", "model.architecture.family=gpt"], ["model.architecture.family", "'gpt'", "phi, llama"]),
        (["model=tiny-phi", "model.architecture.tie_word_embeddings=true"], ["tie_word_embeddings", "llama"]),
        (["model=tiny-llama", "model.tokenizer.style=bert"], ["model.tokenizer.style", "'bert'", "gpt2, chatml"]),
    ],
)
def test_bad_input_names_key_value_and_allowed(overrides, must_say):
    with pytest.raises(ConfigError) as e:
        compose(overrides)
    for text in must_say:
        assert text in str(e.value)


def test_params_yaml_is_validated_like_the_command_line():
    data = to_container(compose(["model=tiny-phi"]))
    data["convert"]["quants"] = ["q9_9"]
    with pytest.raises(ConfigError, match=r"convert.quants: 'q9_9' is not allowed"):
        load(data)
    data = to_container(compose(["model=tiny-phi"]))
    data["convert"]["colour"] = "blue"
    with pytest.raises(ConfigError, match="colour"):
        load(data)


def test_stage_script_rejects_bad_config_before_any_work(project):
    r = run([sys.executable, "stages/convert.py", "model=tiny-phi", "convert.quants=[q3]"], cwd=project, check=False)
    assert r.returncode != 0
    assert "convert.quants: 'q3' is not allowed" in r.stderr
    assert not (project / "models").exists() and not (project / "results").exists()


@pytest.mark.parametrize(
    "overrides",
    [[], ["model=tiny-phi"], ["model=tiny-phi", "convert.quants=[q8_0]"], ["model=phi-2-random", "convert.threads=2"],
     ["model=tiny-phi", "preset=quick"]],
)
def test_dvc_composition_equals_hydra_composition(tmp_path, overrides):
    """DVC writes params.yaml with its own Hydra compose call (`dvc exp run -S ...`); the stage then loads it.
    The same choices must resolve to the same config as `python stages/x.py <overrides>`."""
    from dvc.utils.hydra import compose_and_dump

    out = tmp_path / "params.yaml"
    compose_and_dump(out, str(ROOT / "conf"), None, "config", str(ROOT / ".dvc"), overrides)
    via_dvc = to_container(load(yaml.safe_load(out.read_text())))
    via_hydra = to_container(compose(overrides))
    assert via_dvc == via_hydra


def test_committed_params_yaml_is_what_the_committed_dvc_lock_ran_with():
    """main records its last study: params.yaml a valid composition, and every parameter dvc.lock
    says a stage read has that value in params.yaml (else `dvc status` would call the stage changed)."""
    from ruamel.yaml import YAML  # YAML 1.2, as DVC reads both files (PyYAML reads 1e-05 as a string)

    params = YAML(typ="safe").load(committed_file("params.yaml"))  # as committed: a study rewrites it
    load(params)
    lock = YAML(typ="safe").load(committed_file("dvc.lock"))
    read = 0
    for stage, entry in lock["stages"].items():
        for key, value in entry.get("params", {}).get("params.yaml", {}).items():
            here = params
            for part in key.split("."):
                here = here[part]
            assert here == value, f"dvc.lock's {stage} ran with {key}={value!r}; params.yaml has {here!r}"
            read += 1
    assert read >= len(lock["stages"])  # every stage read some


def test_schema_is_registered_for_hydra_and_dvc():
    # DVC's composition imports hydra_plugins.*; the schema is then in the ConfigStore.
    from hydra.core.config_store import ConfigStore
    from hydra.core.plugins import Plugins

    Plugins.instance()
    assert "study_schema.yaml" in ConfigStore.instance().list("")


def test_environment_override_of_tracking_uri(monkeypatch):
    from inferlab.config import TrackingConfig
    from inferlab.tracking import tracking_uri

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5999")
    assert tracking_uri(TrackingConfig()) == "http://127.0.0.1:5999"
    assert tracking_uri(TrackingConfig(uri="sqlite:///x.db")) == "sqlite:///x.db"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert tracking_uri(TrackingConfig()).endswith(os.sep + "mlflow.db")
    assert Path(tracking_uri(TrackingConfig())[len("sqlite:///"):]).is_absolute()


CORES = len(os.sched_getaffinity(0))


@pytest.mark.parametrize(
    "overrides, must_say",
    [
        (["bench_cpu.llama_cpp.n_ctx=32"],  # the 512-token prompt bucket is the longest
         ["bench_cpu.llama_cpp.extra_points[7].prompt_tokens: prompt 512 + new 128 = 640 tokens do not fit",
          "context of 32 (bench_cpu.llama_cpp.n_ctx)"]),
        (["bench_cpu.prompt_cache.prefix_tokens=4000"],
         ["bench_cpu.prompt_cache.prefix_tokens: prefix 4000 + suffix 16 + new 8", "context of 2048"]),
        (["model=tiny-phi", "bench_gpu.prefix_cache.prefix_tokens=3000"],
         ["bench_gpu.prefix_cache.prefix_tokens", "model.architecture.max_position_embeddings"]),
        (["evaluate.llama_cpp.n_ctx=128"], ["evaluate.tokens.window: window 512", "(evaluate.llama_cpp.n_ctx)"]),
        (["bench_cpu.llama_cpp.quants=[]"],
         ["bench_cpu.llama_cpp.quants: empty", "or set bench_cpu.llama_cpp.enabled=false"]),
        (["bench_cpu.hf.batch_sizes=[]"], ["bench_cpu.hf.batch_sizes: empty"]),
        (["evaluate.cpu.precisions=[]"], ["evaluate.cpu.precisions: empty"]),
        (["bench_cpu.point_timeout_s=-5"], ["bench_cpu.point_timeout_s: -5", "allowed: above 0"]),
        (["evaluate.point_timeout_s=0"], ["evaluate.point_timeout_s: 0", "allowed: above 0"]),
        (["bench_cpu.bandwidth_gib=-1"], ["bench_cpu.bandwidth_gib: -1", "allowed: above 0"]),
        (["bench_cpu.prompt_cache.n_threads=-2"], ["bench_cpu.prompt_cache.n_threads: -2 is out of range"]),
        ([f"bench_cpu.llama_cpp.n_threads=[1,{CORES + 1}]"],
         [f"bench_cpu.llama_cpp.n_threads: {CORES + 1} is above the {CORES} usable cores",
          f"allowed 0 (all) or 1 to {CORES}"]),
        ([f"bench_cpu.prompt_cache.n_threads={CORES + 3}"], ["bench_cpu.prompt_cache.n_threads", "0 (all) or 1 to"]),
        ([f"n_threads={CORES + 1}"], [f"n_threads: {CORES + 1} is above the {CORES} usable cores"]),
        (["bench_cpu.workload.prompts=data/promts"],
         ["bench_cpu.workload.prompts: 'data/promts' is not a folder", "does not exist"]),
        (["serve_bench.prompts=nowhere"], ["serve_bench.prompts: 'nowhere' is not a folder"]),
        (["evaluate.tokens.text=data/eval/missing.txt"], ["evaluate.tokens.text", "is not a file"]),
        (["tracking.timeout_s=-1"], ["tracking.timeout_s: -1", "above 0"]),
    ],
)
def test_values_that_would_fail_later_fail_at_load(overrides, must_say):
    """Finding 8 of issue 24: each of these passed validation and failed halfway through a stage (or never). The
    schema's checks run in load(), which every entry point calls (the composition is done once per model here)."""
    with pytest.raises(ConfigError) as e:
        load(_composed_with(overrides))
    for text in must_say:
        assert text in str(e.value)


@functools.cache
def _composed(model: str) -> str:
    return yaml.safe_dump(to_container(compose([f"model={model}"])))


def _composed_with(overrides: list[str]) -> dict:
    """What compose(overrides) would hand to load(): the composition of the model, with the other overrides set."""
    model = next((o.split("=", 1)[1] for o in overrides if o.startswith("model=")), "phi-2")
    data = yaml.safe_load(_composed(model))
    for o in overrides:
        key, value = o.split("=", 1)
        if key != "model":
            *parents, last = key.split(".")
            node = data
            for k in parents:
                node = node[k]
            node[last] = yaml.safe_load(value)
    return data


def test_a_wrong_models_folder_stops_a_stage_that_needs_the_model(project):
    from inferlab.stage import CannotStart, StageRun

    cfg = compose(["model=tiny-phi", "paths.models=modls"])
    with pytest.raises(CannotStart, match=r"paths.models: .*modls/tiny-phi does not exist .*Run the download stage"):
        StageRun(cfg, "bench_cpu", sections=())
    (project / "modls" / "tiny-phi" / "hf").mkdir(parents=True)  # downloaded, never converted
    assert "run the convert stage first" in cfg.missing_gguf("q8_0")
    (project / "modls" / "tiny-phi" / "gguf").mkdir()
    assert cfg.missing_gguf("q8_0").startswith("no GGUF file tiny-phi-q8_0.gguf: add q8_0 to convert.quants")


def test_inferlab_study_checks_the_config_before_dvc_runs(project):
    """An unknown key or a bad value through `inferlab study`: the schema's message, and DVC never starts (so it
    never removes the previous metrics)."""
    metrics = project / "metrics" / "bench_cpu.json"
    metrics.parent.mkdir()
    metrics.write_text('{"previous": true}\n')
    r = run([sys.executable, "-m", "inferlab.cli", "study", "model=tiny-phi", "bench_cpu.point_timeout=5"],
            cwd=project, check=False)
    assert r.returncode == 2 and "+ " not in r.stdout  # dvc exp run was never started
    assert "bench_cpu.point_timeout: unknown key" in r.stderr and "did you mean 'point_timeout_s'" in r.stderr
    r = run([sys.executable, "-m", "inferlab.cli", "study", "bench_cpu.point_timeout_s=-1"], cwd=project, check=False)
    assert r.returncode == 2 and "bench_cpu.point_timeout_s: -1" in r.stderr
    assert metrics.read_text() == '{"previous": true}\n'
