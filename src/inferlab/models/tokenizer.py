"""A byte-level BPE tokenizer trained locally, saved so transformers 4.x and 5.x both load it."""

from __future__ import annotations

import json
import logging
from pathlib import Path

log = logging.getLogger(__name__)

EOS = "<|endoftext|>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
# ChatML, as SmolLM2's template writes it (without its default system prompt)
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + "
    "message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def corpus_files(corpus_dir: Path) -> list[Path]:
    files = sorted(corpus_dir.glob("*.txt"))
    if not files:
        raise FileNotFoundError(f"no .txt files in the tokenizer corpus folder {corpus_dir}")
    return files


def train_tokenizer(corpus_dir: Path, vocab_size: int, out_dir: Path, style: str = "gpt2") -> None:
    """Train a byte-level BPE on the corpus and save it as a transformers tokenizer in out_dir.

    style gpt2: GPT-2's split and one special token, <|endoftext|> (Phi-2's kind). style chatml:
    single digits split first, ChatML's special tokens and chat template (SmolLM2's kind).
    Deterministic: the same corpus, vocab_size and style give the same tokenizer.json.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    # GPT-2's regex split, as llama.cpp's "gpt-2" pre-tokenizer; digits first: its "smollm" one
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if style == "chatml":
        digits = pre_tokenizers.Digits(individual_digits=True)
        tok.pre_tokenizer = pre_tokenizers.Sequence([digits, byte_level])
        specials = [EOS, IM_START, IM_END]
    else:
        tok.pre_tokenizer = byte_level
        specials = [EOS]
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    files = corpus_files(corpus_dir)
    tok.train([str(f) for f in files], trainer)
    log.info("trained a byte-level BPE tokenizer (%s) on %d files: %d tokens", style, len(files),
             tok.get_vocab_size())

    # transformers 5 does not save a padding_side set after construction: pass it here
    if style == "chatml":  # SmolLM2's roles: a turn is <|im_start|> ... <|im_end|>
        roles = {"bos_token": IM_START, "eos_token": IM_END, "unk_token": EOS, "pad_token": IM_END}
    else:
        roles = {"bos_token": EOS, "eos_token": EOS, "unk_token": EOS, "pad_token": EOS}
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, padding_side="left", **roles)
    if style == "chatml":
        fast.chat_template = CHATML_TEMPLATE
    fast.model_max_length = 2048
    out_dir.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(out_dir))
    make_portable(out_dir)


def make_portable(out_dir: Path) -> None:
    """Write the generic fast tokenizer class, which 4.x and 5.x both load, and left padding.

    transformers 5 may write tokenizer_class "TokenizersBackend", which 4.x cannot load."""
    path = out_dir / "tokenizer_config.json"
    cfg = json.loads(path.read_text())
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg["padding_side"] = "left"
    cfg.setdefault("model_max_length", 2048)
    path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
