"""Quality evaluation: per-token figures (KL divergence, top-1 agreement, perplexity ratio) and text scores against
hand-computed cases, perplexity against a direct computation, the two runtimes' references against each other, the
evaluate stage end to end on the tiny model (transformers and llama.cpp), and the marking of random-weights
figures."""

from __future__ import annotations

import json
import math
import sys

import numpy as np
import pytest

from inferlab import records
from inferlab.backends import get_backend
from inferlab.config import BertScoreConfig, ConfigError, compose
from inferlab.quality import dataset, tokens
from inferlab.quality.scores import BertScorer, exact_match, first_difference, rouge, token_fidelity

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


def _lp(probs):
    return np.log(np.asarray(probs, dtype=np.float64))


def test_kl_divergence_top1_and_perplexity_ratio_against_hand_computed_cases():
    same = tokens.compare(_lp([[0.5, 0.3, 0.2], [0.1, 0.1, 0.8]]), _lp([[0.5, 0.3, 0.2], [0.1, 0.1, 0.8]]),
                          np.array([0, 2]))
    assert same.kl.tolist() == pytest.approx([0.0, 0.0], abs=1e-12) and same.agree.all()
    # reference P = (0.5, 0.5), configuration Q = (0.9, 0.1): KL(P||Q) = 0.5 ln(0.5/0.9) + 0.5 ln(0.5/0.1)
    s = tokens.compare(_lp([[0.5, 0.5], [0.8, 0.2]]), _lp([[0.9, 0.1], [0.3, 0.7]]), np.array([1, 0]))
    assert s.kl[0] == pytest.approx(0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1))
    assert s.kl[1] == pytest.approx(0.8 * math.log(0.8 / 0.3) + 0.2 * math.log(0.2 / 0.7))
    assert s.agree.tolist() == [True, False]  # argmax: 0 vs 0 (a tie goes to the first), 0 vs 1
    assert s.nll.tolist() == pytest.approx([-math.log(0.1), -math.log(0.3)])
    assert s.nll_ref.tolist() == pytest.approx([-math.log(0.5), -math.log(0.8)])
    m = tokens.summarize(s)
    # perplexity ratio: exp(mean of the per-token log-likelihood differences)
    d = [math.log(0.5 / 0.1), math.log(0.8 / 0.3)]
    assert m["ppl_ratio"] == pytest.approx(math.exp(sum(d) / 2))
    sem = abs(d[0] - d[1]) / 2  # the standard error of the mean of two values: |a - b| / 2
    assert m["ppl_ratio_ci95"] == pytest.approx([math.exp(sum(d) / 2 - tokens.Z95 * sem),
                                                 math.exp(sum(d) / 2 + tokens.Z95 * sem)])
    assert m["top1"] == 0.5 and m["top1_agree"] == 1 and m["tokens"] == 2
    assert m["kl_mean"] == pytest.approx(float(s.kl.mean())) and m["kl_max"] == pytest.approx(float(s.kl.max()))


def test_top1_agreement_interval_is_wilsons():
    # 8 of 10: the Wilson 95% interval is (0.490, 0.943) (textbook value)
    lo, hi = tokens.wilson(8, 10)
    assert (round(lo, 3), round(hi, 3)) == (0.49, 0.943)
    assert tokens.wilson(10, 10)[1] == pytest.approx(1.0) and tokens.wilson(0, 10)[0] == pytest.approx(0.0)
    lo, hi = tokens.wilson(1900, 2000)  # the interval narrows with the count and holds the rate
    assert lo < 0.95 < hi and hi - lo < 0.02


def test_windows_score_every_position_once():
    for n, w, s in ((10, 4, 2), (2486, 512, 384), (100, 200, 100), (7, 3, 1)):
        seen = [p for begin, end, first in tokens.windows(n, w, s) for p in range(first, end - 1)]
        assert seen == list(range(n - 1))
        assert all(end - begin <= w and begin <= first for begin, end, first in tokens.windows(n, w, s))


def test_reference_rows_stored_in_16_bits_change_kl_by_less_than_a_millionth(tmp_path):
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 4, size=(300, 500))
    lp = (logits - np.log(np.exp(logits).sum(1, keepdims=True))).astype(np.float32)
    store = tokens.ReferenceStore(tmp_path, "ref")
    ident = {"config": "ref", "ids": "x"}
    w = store.writer(300, 500, ident)
    w.add(0, lp[:120])
    assert store.meta() is None  # nothing that looks finished before the commit
    w.add(120, lp[120:])
    w.commit()
    assert store.matches(ident) and not store.matches({**ident, "ids": "y"})
    back = store.read(0, 300)
    assert np.abs(back - lp)[lp > lp.max(1, keepdims=True) - tokens.LOGP_RANGE].max() < 4e-4
    s = tokens.compare(back, lp, np.zeros(300, dtype=int))
    assert s.kl.max() < 1e-6 and s.agree.all()
    other = tokens.compare(back, lp + rng.normal(0, 0.3, size=lp.shape).astype(np.float32), np.zeros(300, dtype=int))
    exact = tokens.compare(lp, lp + 0 * lp, np.zeros(300, dtype=int))
    assert exact.kl.max() < 1e-9 and other.kl.mean() > 1e-3


def test_squad_exact_match():
    assert exact_match(["The Eiffel Tower.", "a cat", "Paris"], ["eiffel tower", "the cat", "London"]) == [1, 1, 0]


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
    with pytest.raises(ConfigError, match="evaluate.tokens.stride"):
        compose(["evaluate.tokens.stride=512"])
    with pytest.raises(ConfigError, match="evaluate.llama_cpp.reference: 'f32'.*add f32 to convert.outtypes"):
        compose(["convert.outtypes=[f16]"])
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
    own, _ = tokens.measure(b, ids, window=200, stride=100)  # one window: the whole passage
    assert own["tokens"] == len(ids) - 1
    assert own["perplexity"] == pytest.approx(direct, rel=1e-5)
    assert own["perplexity_ci95"][0] < own["perplexity"] < own["perplexity_ci95"][1]
    # sliding windows score every token once; with shorter context the figure moves, but not far
    own_w, _ = tokens.measure(b, ids, window=48, stride=16)
    assert own_w["tokens"] == len(ids) - 1
    assert own_w["perplexity"] == pytest.approx(direct, rel=0.2)


def test_llama_cpp_f32_and_transformers_fp32_references_agree(tiny_project, tiny_hf, tmp_path):
    """The same token ids through the F32 GGUF file and through transformers fp32: one distribution (KL under
    1e-4), the same perplexity."""
    hf = get_backend("hf")({"model_dir": str(tiny_hf), "precision": "fp32", "kv_cache": "dynamic", "threads": 2})
    hf.load()
    ll = get_backend("llama_cpp")({"model_path": str(tiny_project / "models/tiny-phi/gguf/tiny-phi-f32.gguf"),
                                   "n_threads": 2, "logits_all": True})
    ll.load()
    try:
        text = (ROOT / "data/eval/heldout.txt").read_text()
        ids = hf.tokenize(text)[:600]
        assert ll.tokenize(text)[:600] == ids
        store = tokens.ReferenceStore(tmp_path, "hf-fp32")
        own_hf, _ = tokens.measure(hf, ids, 256, 192, store.writer(len(ids) - 1, 1024, {"config": "hf-fp32"}))
        own_ll, stats = tokens.measure(ll, ids, 256, 192, against={"hf": store})
        m = tokens.summarize(stats["hf"])
        assert m["tokens"] == len(ids) - 1
        assert m["kl_mean"] < 1e-4 and m["kl_max"] < 1e-3
        assert m["top1"] > 0.99
        assert own_ll["perplexity"] == pytest.approx(own_hf["perplexity"], rel=1e-3)
        assert m["ppl_ratio"] == pytest.approx(1.0, abs=1e-3)
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
    assert gens["hf-cuda-fp32-dynamic"].status == "skipped"  # no CUDA here: recorded, not failed
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
        t = g.metrics["tokens"]
        assert t["own"]["tokens"] >= 2000 and t["own"]["perplexity"] > 1
    for ref in ("hf-cpu-fp32-dynamic", "llama-f32-kvf16"):  # a reference against itself: identical outputs
        drift = scores[ref].metrics["drift"]
        assert drift["exact_match"] == 1.0 and drift["rougeL"] == 1.0 and drift["bertscore_f1"] == 1.0
        assert gens[ref].metrics["tokens"]["is_reference"] is True
    for name, ref in (("hf-cpu-bf16-dynamic", "hf-cpu-fp32-dynamic"), ("llama-q4_0-kvf16", "llama-f32-kvf16")):
        assert scores[name].metrics["reference"] == ref
        vs = gens[name].metrics["tokens"]["vs_reference"]
        assert vs["reference"] == ref and vs["tokens"] >= 2000
        assert vs["kl_mean"] > 0 and vs["kl_ci95"][0] <= vs["kl_mean"] <= vs["kl_ci95"][1]
        assert vs["top1_ci95"][0] <= vs["top1"] <= vs["top1_ci95"][1]
    # the two references agree: llama.cpp's F32 file against transformers' fp32, same ids, same machine
    cross = gens["llama-f32-kvf16"].metrics["tokens"]["vs_transformers"]
    assert cross["kl_mean"] < 1e-4 and cross["top1"] > 0.99
    q = json.loads((tiny_project / "metrics/quality.json").read_text())
    model = next(iter(q.values()))["tiny-phi"]
    assert model["meaningful"] is False and "note" in model
    q4 = model["configs"]["llama-q4_0-kvf16"]
    assert q4["status"] == "ok" and q4["kl_ci_low"] <= q4["kl_mean"] <= q4["kl_ci_high"] and "ppl_ratio" in q4
    assert model["configs"]["llama-f32-kvf16"]["vs_transformers_kl"] < 1e-4
    # scoring alone (no generation here, e.g. outputs brought from a GPU machine): what is scored stays scored
    off = ["evaluate.cpu.enabled=false", "evaluate.gpu.enabled=false", "evaluate.llama_cpp.enabled=false"]
    r2 = run(args + off, cwd=tiny_project, env=env)
    assert "0 configuration(s) scored" in r2.stdout + r2.stderr


def test_a_decode_loop_is_scored_through_its_own_step(tiny_hf, tmp_path, monkeypatch):
    """The graph loop and the hand-written step, fed the held-out ids one position at a time (teacher forcing, no
    prefill), give fp32's forward-pass distributions; a wrong constant in one kernel of the step shows up in KL."""
    from inferlab.backends import step_kernels

    def backend(**extra):
        b = get_backend("hf")({"model_dir": str(tiny_hf), "precision": "fp32", "kv_cache": "static", "threads": 2,
                               "batch_size": 1, "tokens_window": 96, **extra})
        b.load()
        return b

    ref = get_backend("hf")({"model_dir": str(tiny_hf), "precision": "fp32", "kv_cache": "dynamic", "threads": 2})
    ref.load()
    ids = ref.tokenize((ROOT / "data/eval/heldout.txt").read_text())[:160]
    store = tokens.ReferenceStore(tmp_path, "ref")
    tokens.measure(ref, ids, 96, 64, store.writer(len(ids) - 1, 1024, {"config": "ref"}))
    for extra in ({"decode": "graph"}, {"decode": "kernels", "fuse_block": True}):
        b = backend(**extra)
        assert "teacher forcing" in b.scored_by() and extra["decode"] in b.scored_by()
        _, stats = tokens.measure(b, ids, 96, 64, against={"ref": store})
        m = tokens.summarize(stats["ref"])
        assert m["tokens"] == len(ids) - 1 and m["kl_max"] < 1e-6 and m["top1"] == 1.0, extra
    monkeypatch.setattr(step_kernels, "GELU_C", step_kernels.GELU_C * 0.9)  # a kernel computing something else
    _, stats = tokens.measure(backend(decode="kernels", fuse_block=True), ids, 96, 64, against={"ref": store})
    assert tokens.summarize(stats["ref"])["kl_mean"] > 1e-5  # the right kernels: every position under 1e-6


@pytest.mark.slow
def test_evaluate_scores_decode_loops_through_their_step(tiny_project, tmp_path):
    """evaluate.cpu.loops: each loop is a configuration of its own, named after the benchmark point it scores,
    compared with the same sweep's fp32 reference, its record naming what produced its distributions. (It scores
    its reference's outputs too: the shared project keeps no unscored generation for other tests' runs.)"""
    env = {"INFERLAB_ROOT": str(tiny_project), "MLFLOW_TRACKING_URI": f"sqlite:///{tiny_project / 'mlflow.db'}"}
    text = tmp_path / "short.txt"  # one window: each loop steps through every position on the CPU
    text.write_text((ROOT / "data/eval/heldout.txt").read_text()[:1500])
    run([sys.executable, "stages/evaluate.py", "model=tiny-phi", "evaluate.dataset.limit=1",
         f"evaluate.tokens.text={text}", "evaluate.tokens.min_tokens=200",
         "evaluate.cpu.precisions=[fp32]", "evaluate.llama_cpp.enabled=false", "evaluate.gpu.enabled=false",
         "evaluate.cpu.loops=[{precision: fp32, decode: graph},"
         "{precision: fp32, decode: kernels, fuse_block: true}]"], cwd=tiny_project, env=env)
    recs = records.read_all(sorted((tiny_project / "results/evaluate").glob("*.jsonl")))
    gens = {r.name: r for r in records.latest(recs, lambda r: r.name) if r.point.get("scenario") == "quality"}
    loops = {"hf-cpu-fp32-b1-static-sdpa-graph": "graph loop, batch 1",
             "hf-cpu-fp32-b1-static-sdpa-block-kernels": "kernels loop, fused block, batch 1"}
    for name, loop in loops.items():
        g = gens[name]
        assert g.status == "ok" and g.point["loop"] == loop and "outputs_file" not in g.metrics
        t = g.metrics["tokens"]
        assert t["scored_by"].startswith(f"the {loop} step") and "teacher forcing" in t["scored_by"]
        vs = t["vs_reference"]
        assert vs["reference"] == "hf-cpu-fp32-dynamic" and vs["tokens"] >= 200
        assert vs["kl_mean"] < 1e-6 and vs["top1"] > 0.99  # random weights: a near-tie may flip in the 7th digit
    rows = (tiny_project / "metrics/plots/quality.csv").read_text().splitlines()
    head = rows[0].split(",")
    assert "loop" in head and "scored_by" in head
    assert sum("teacher forcing" in line for line in rows) >= 2
