"""Quality evaluation: scores against hand-computed cases, perplexity against a direct computation, the evaluate
stage end to end on the tiny model (transformers and llama.cpp), and the marking of random-weights figures."""

from __future__ import annotations

import json
import math
import sys

import pytest

from inferlab import records
from inferlab.backends import get_backend
from inferlab.config import BertScoreConfig, ConfigError, compose
from inferlab.quality import dataset
from inferlab.quality.generate import perplexity
from inferlab.quality.scores import BertScorer, first_difference, rouge, token_fidelity

from .conftest import ROOT, run


def test_rouge_of_a_known_pair_and_of_identical_and_empty_texts():
    # prediction: the cat sat on the mat / reference: the cat was on the mat
    # unigrams: 5 of 6 shared (the x2, cat, on, mat) -> P = R = F = 5/6; bigrams: the-cat, on-the, the-mat shared of
    # 5 each -> 3/5; longest common subsequence "the cat on the mat" = 5 tokens -> 5/6
    s = rouge(["the cat sat on the mat"], ["the cat was on the mat"])
    assert s["rouge1"][0] == pytest.approx(5 / 6)
    assert s["rouge2"][0] == pytest.approx(3 / 5)
    assert s["rougeL"][0] == pytest.approx(5 / 6)
    # stemming is on: "cats running" matches "cat run" fully
    assert rouge(["cats running"], ["cat run"])["rouge1"][0] == pytest.approx(1.0)
    same = rouge(["A bakery replaced paper bags.", "", "def f():\n    return 1\n"],
                 ["A bakery replaced paper bags.", "", "def f():\n    return 1\n"])
    assert all(v == 1.0 for vs in same.values() for v in vs)
    assert rouge([""], ["something"])["rougeL"] == [0.0]


def test_token_fidelity_exact_match_and_first_difference():
    assert first_difference([1, 2, 3], [1, 2, 3]) == 3
    assert first_difference([1, 2, 3], [1, 5, 3]) == 1
    assert first_difference([1, 2], [1, 2, 3]) == 2
    assert first_difference([], [4]) == 0
    f = token_fidelity([[1, 2, 3], [7, 8]], [[1, 2, 3], [7, 9]])
    assert f["exact_match"] == [1.0, 0.0] and f["first_diff"] == [3.0, 1.0]


def test_bertscore_with_the_offline_model():
    bert = BertScorer(BertScoreConfig())
    assert bert.local and bert.info()["rescaled_with_baseline"] is False
    texts = ["A bakery replaced paper bags with reusable cloth bags.", "Volunteers kept floodwater out of homes."]
    # the model itself scores identical texts 1 (greedy matching of identical embeddings)
    model = bert.model_score(texts, texts)
    assert all(v == pytest.approx(1.0, abs=1e-5) for vs in model.values() for v in vs)
    s = bert.score(texts + ["", "x"], texts + ["", ""])
    assert s["bertscore_f1"][:3] == [1.0, 1.0, 1.0] and s["bertscore_f1"][3] == 0.0
    close = bert.score(["The bakery swapped paper bags for cloth ones."], [texts[0]])["bertscore_f1"][0]
    far = bert.score(["Comets are visible after sunset in March."], [texts[0]])["bertscore_f1"][0]
    assert 0 < far < close < 1


def test_bertscore_rescaling_is_reported_unavailable_for_a_local_folder(caplog):
    bert = BertScorer(BertScoreConfig(rescale_with_baseline=True))
    assert bert.info()["rescaled_with_baseline"] is False
    assert "unavailable" in caplog.text
    with pytest.raises(ValueError, match="num_layers"):
        BertScorer(BertScoreConfig(num_layers=None))


def test_the_shipped_evaluation_set():
    cfg = compose([])
    items = dataset.load_items(cfg.evaluate.dataset)
    assert len(items) >= 60 and len({i.id for i in items}) == len(items)
    assert {i.task for i in items} == {"summarization", "qa", "code"}
    assert all(i.input.strip() and i.reference.strip() for i in items)
    assert len(dataset.passage(cfg.evaluate).split()) > 300
    assert dataset.answer_text("qa", " Paris\nQuestion: next") == "Paris"
    assert dataset.answer_text("code", "    return a + b\n\ndef other():\n    pass\n") == "    return a + b\n"


def test_bad_evaluation_config_fails_naming_key_and_allowed_values():
    with pytest.raises(ConfigError, match=r"evaluate.dataset.tasks: 'translation'.*summarization, qa, code"):
        compose(["evaluate.dataset.tasks=[qa,translation]"])
    with pytest.raises(ConfigError, match="evaluate.perplexity.stride"):
        compose(["evaluate.perplexity.stride=256"])
    with pytest.raises(ConfigError, match="evaluate.gpu.reference: 'fp8'"):
        compose(["evaluate.gpu.reference=fp8"])


def test_hub_dataset_fails_clearly_when_the_hub_cannot_be_reached(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    cfg = compose(["evaluate.dataset.source=hub"])
    with pytest.raises(dataset.DatasetUnavailable, match="cannot fetch .*cnn_dailymail.*source=local"):
        dataset.load_items(cfg.evaluate.dataset)


def test_perplexity_equals_a_direct_computation(tiny_hf):
    import torch

    b = get_backend("hf")({"model_dir": str(tiny_hf), "precision": "fp32", "kv_cache": "dynamic", "threads": 2})
    b.load()
    ids = b.tokenize((ROOT / "data/eval/heldout.txt").read_text())[:120]
    with torch.inference_mode():
        direct = math.exp(b.model(input_ids=torch.tensor([ids]), labels=torch.tensor([ids])).loss.item())
    ppl, nll, scored = perplexity(b, ids, window=200, stride=100)  # one window: the whole passage
    assert scored == len(ids) - 1
    assert ppl == pytest.approx(direct, rel=1e-5)
    # sliding windows score every token once; with shorter context the figure moves, but not far
    ppl_w, _, scored_w = perplexity(b, ids, window=48, stride=16)
    assert scored_w == len(ids) - 1
    assert ppl_w == pytest.approx(direct, rel=0.2)


def test_llama_cpp_perplexity_agrees_with_transformers(tiny_project, tiny_hf):
    """The same passage through the F32 GGUF file and through transformers fp32: the same perplexity."""
    hf = get_backend("hf")({"model_dir": str(tiny_hf), "precision": "fp32", "kv_cache": "dynamic", "threads": 2})
    hf.load()
    ll = get_backend("llama_cpp")({"model_path": str(tiny_project / "models/tiny-phi/gguf/tiny-phi-f32.gguf"),
                                   "n_threads": 2, "logits_all": True})
    ll.load()
    try:
        text = (ROOT / "data/eval/heldout.txt").read_text()
        ids = hf.tokenize(text)[:300]
        assert ll.tokenize(text)[:300] == ids
        a = perplexity(hf, ids, 128, 64)[0]
        b = perplexity(ll, ids, 128, 64)[0]
        assert b == pytest.approx(a, rel=1e-3)
    finally:
        ll.unload()


@pytest.mark.slow
def test_evaluate_stage_generates_scores_and_marks_random_weights(tiny_project):
    env = {"INFERLAB_ROOT": str(tiny_project), "MLFLOW_TRACKING_URI": f"sqlite:///{tiny_project / 'mlflow.db'}"}
    args = [sys.executable, "stages/evaluate.py", "model=tiny-phi", "evaluate.dataset.limit=4",
            "evaluate.cpu.precisions=[fp32,bf16]", "evaluate.llama_cpp.quants=[f32,q4_0]",
            "evaluate.llama_cpp.reference=f32", "evaluate.llama_cpp.kv_type=[f16]"]
    r = run(args, cwd=tiny_project, env=env)
    assert "4 configuration(s) scored" in r.stdout + r.stderr
    recs = records.read_all(sorted((tiny_project / "results/evaluate").glob("*.jsonl")))
    gens = {r.name: r for r in recs if r.point.get("scenario") == "quality"}
    scores = {r.point["of"]: r for r in recs if r.point.get("scenario") == "scores"}
    assert gens["hf-cuda-fp16-dynamic"].status == "skipped"  # no CUDA here: recorded, not failed
    ran = {"hf-cpu-fp32-dynamic", "hf-cpu-bf16-dynamic", "llama-f32-kvf16", "llama-q4_0-kvf16"}
    assert {n for n, g in gens.items() if g.status == "ok"} == ran and set(scores) == ran
    for name in ran:
        g = gens[name]
        out = (tiny_project / "results/evaluate/outputs" / g.environment["hardware"]["id"] / "tiny-phi"
               / g.metrics["outputs_file"])
        rows = [json.loads(line) for line in out.read_text().splitlines()]
        assert len(rows) == 12 and {r["task"] for r in rows} == {"summarization", "qa", "code"}
        assert all(r["config"] == name and r["item_id"] and "output_ids" in r for r in rows)
        m = scores[name].metrics
        assert m["meaningful"] is False and "measure nothing about language" in m["note"]
        assert m["scorer"]["model"] == "offline-minilm" and m["scorer"]["rescaled_with_baseline"] is False
    for ref in ("hf-cpu-fp32-dynamic", "llama-f32-kvf16"):  # a reference against itself: identical outputs
        fid = scores[ref].metrics["fidelity"]
        assert fid["exact_match"] == 1.0 and fid["rougeL"] == 1.0 and fid["bertscore_f1"] == 1.0
        assert scores[ref].metrics["perplexity_delta"] == 0.0
    assert scores["hf-cpu-bf16-dynamic"].metrics["reference"] == "hf-cpu-fp32-dynamic"
    assert scores["llama-q4_0-kvf16"].metrics["reference"] == "llama-f32-kvf16"
    q = json.loads((tiny_project / "metrics/quality.json").read_text())
    model = next(iter(q.values()))["tiny-phi"]
    assert model["meaningful"] is False and "note" in model
    assert model["configs"]["llama-q4_0-kvf16"]["status"] == "ok"
    # scoring alone (no generation here, e.g. outputs brought from a GPU machine): what is scored stays scored
    off = ["evaluate.cpu.enabled=false", "evaluate.gpu.enabled=false", "evaluate.llama_cpp.enabled=false"]
    r2 = run(args + off, cwd=tiny_project, env=env)
    assert "0 configuration(s) scored" in r2.stdout + r2.stderr
