"""Diagnose decode: kernels under the graph loop (a CUDA graph replayed per token) against generate() and against the
same step run eagerly: python scripts/step_graph_diag.py MODEL_DIR [NEW_TOKENS]. Prints generate()'s tokens, the
graph loop's (twice), the eager closure's and a recaptured graph's, then four steps replayed one at a time against
the eager step from the same state (logit difference, top-2 margin). Output of a run: docs/step-graph-diag-h200.txt."""

from __future__ import annotations

import sys

import torch

sys.path.insert(0, "src")

from inferlab.backends.hf import HFBackend  # noqa: E402


def main() -> None:
    model_dir = sys.argv[1]
    n = int(sys.argv[2]) if len(sys.argv) > 2 else 24
    base = {"model_dir": model_dir, "device": "cuda", "attn": "sdpa", "precision": "fp16"}
    gen = HFBackend({**base, "kv_cache": "dynamic"})
    gen.load()
    ids = gen.tokenize("The history of the printing press begins in the fifteenth century, when")
    want = gen.request([ids], n).output_ids[0]
    gen.unload()
    print("generate      ", want)
    be = HFBackend({**base, "kv_cache": "static", "decode": "kernels", "fuse_block": True})
    be.load()
    dec = be.decoder
    got = be.request([ids], n).output_ids[0]
    print("graph         ", got, got == want, "pos after", int(dec.pos), "idx", int(dec.idx))
    got = be.request([ids], n).output_ids[0]
    print("graph again   ", got, got == want)
    graph = dec.graph
    dec.graph = None
    got = be.request([ids], n).output_ids[0]
    print("eager closure ", got, got == want)
    keys = dec.cache.layers[0].keys
    print("cache", keys.shape, keys.stride(), keys.dtype, "nonzero positions",
          int((keys[0, 0].abs().sum(-1) > 0).sum()), "bound to same tensor",
          dec.kernel_step.layers[0].k_cache.data_ptr() == keys.data_ptr())
    dec.graph = graph
    # capture again, warm-up on the current stream
    g = torch.cuda.CUDAGraph()
    with torch.inference_mode():
        dec.graph_step()
        torch.cuda.synchronize()
        with torch.cuda.graph(g):
            dec.graph_step()
    dec.graph = g
    got = be.request([ids], n).output_ids[0]
    print("recaptured    ", got, got == want)
    # one replay at a time against the eager step on a copy of the state
    dec.graph = graph
    with torch.inference_mode():
        dec.cache.reset()
        first = dec.prefill(torch.tensor([ids], device="cuda"))
        dec.tok.copy_(first)
        dec.pos.fill_(len(ids))
        dec.idx.fill_(1)
        for i in range(4):
            snap = [t.clone() for t in (dec.tok, dec.pos, dec.idx)]
            kv = [(lay.keys.clone(), lay.values.clone()) for lay in dec.cache.layers]
            graph.replay()
            torch.cuda.synchronize()
            g_tok, g_logits = int(dec.tok), dec.kernel_step.logits.clone()
            for t, s in zip((dec.tok, dec.pos, dec.idx), snap):
                t.copy_(s)
            for lay, (k, v) in zip(dec.cache.layers, kv):
                lay.keys.copy_(k)
                lay.values.copy_(v)
            dec.graph_step()
            torch.cuda.synchronize()
            e_tok, e_logits = int(dec.tok), dec.kernel_step.logits.clone()
            diff = float((g_logits - e_logits).abs().max())
            top2 = e_logits.float().topk(2).values
            print(f"step {i}: replay {g_tok} eager {e_tok}, max |logit diff| {diff:.4f}, top-2 margin "
                  f"{float(top2[0] - top2[1]):.4f}", "pos", int(dec.pos))


if __name__ == "__main__":
    main()
