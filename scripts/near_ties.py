"""How often fp16 rounding alone can flip a greedy token of a model, on the CPU: python scripts/near_ties.py
MODEL_DIR [NEW_TOKENS]. Greedy tokens in fp32; the same sequence teacher-forced in fp32 and in fp16: per position
the top-2 logit margin over the tokenizer's vocabulary (phi-2-random masks its padding rows with a -1e4 bias) and
the fp16 logits' largest difference from fp32. Then the fp16 prefill over static caches of several lengths (does
the cache length change the prompt's keys, values or next logits?). Output of a run: docs/near-ties-cpu.txt."""

from __future__ import annotations

import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, StaticCache


def main() -> None:
    model_dir = sys.argv[1]
    new = int(sys.argv[2]) if len(sys.argv) > 2 else 128
    tok = AutoTokenizer.from_pretrained(model_dir)
    vocab = len(tok)
    ids = tok("The history of the printing press begins in the fifteenth century, when",
              add_special_tokens=False)["input_ids"]
    n = len(ids)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.inference_mode():
        seq = model.generate(torch.tensor([ids]), max_new_tokens=new, min_new_tokens=new, do_sample=False)[0]
        f32 = model(input_ids=seq[None]).logits[0, n - 1:-1, :vocab].float()
        model = model.half()
        f16 = model(input_ids=seq[None]).logits[0, n - 1:-1, :vocab].float()
    top = f32.topk(2, dim=-1).values
    margin = top[:, 0] - top[:, 1]
    noise = (f16 - f32).abs().max(-1).values

    def q(t, p):
        return float(t.quantile(p))

    print(f"{model_dir}: torch {torch.__version__}, CPU; prompt {n} tokens, {new} greedy tokens (fp32), vocabulary "
          f"{vocab}; first tokens {seq[n:n + 8].tolist()}")
    print(f"logit std over the vocabulary: median {q(f32.std(-1), .5):.3f}")
    print(f"top-2 margin: min {float(margin.min()):.4f}, 10th percentile {q(margin, .1):.4f}, median "
          f"{q(margin, .5):.4f}")
    print(f"fp16 - fp32 largest logit difference per position: median {q(noise, .5):.4f}, max "
          f"{float(noise.max()):.4f}")
    print(f"positions whose margin is below twice the fp16 difference: {int((margin < 2 * noise).sum())} of {new}; "
          f"fp16's argmax differs from fp32's at {int((f16.argmax(-1) != f32.argmax(-1)).sum())} of {new} "
          "(teacher-forced)")
    got = {}
    with torch.inference_mode():
        for length in (n + 24, n + 128, n + 129, 192):
            cache = StaticCache(config=model.config, max_cache_len=length)
            pos = torch.arange(n)[None]
            model(input_ids=torch.tensor([ids]), position_ids=pos, cache_position=pos[0], past_key_values=cache,
                  use_cache=True)
            step = model(input_ids=seq[None, n:n + 1], position_ids=torch.tensor([[n]]),
                         cache_position=torch.tensor([n]), past_key_values=cache, use_cache=True).logits[0, -1]
            got[length] = (torch.stack([layer.keys[0, :, :n] for layer in cache.layers]),
                           torch.stack([layer.values[0, :, :n] for layer in cache.layers]), step)
    first, *rest = got
    same = all(all(torch.equal(a, b) for a, b in zip(got[first], got[length])) for length in rest)
    print(f"fp16 prefill over static caches of length {', '.join(map(str, got))}: the prompt's keys and values and "
          f"the first step's logits are {'bitwise equal' if same else 'NOT bitwise equal'} across lengths")


if __name__ == "__main__":
    main()
