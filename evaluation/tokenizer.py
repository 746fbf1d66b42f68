"""The real CLIP BPE tokenizer, built offline from OpenAI's merges file.

Stable Diffusion 1.x/2.x tokenize prompts with CLIP's byte-pair encoding. The merges file
(`bpe_simple_vocab_16e6.txt.gz`, MIT, OpenAI) ships in `evaluation/data/`; from it we derive the
`vocab.json` + `merges.txt` pair that `transformers.CLIPTokenizer` reads, exactly as OpenAI's
`simple_tokenizer.py` builds its vocabulary, so token ids equal those of SD 1.5's tokenizer.
"""

from __future__ import annotations

import gzip
import json
from functools import lru_cache
from pathlib import Path

from transformers import CLIPTokenizer

BPE_FILE = Path(__file__).parent / "data" / "bpe_simple_vocab_16e6.txt.gz"
# CLIP keeps the first 49152 - 256 - 2 merges: 256 byte tokens + merges + 2 specials = 49408.
_NUM_MERGES = 49152 - 256 - 2
MAX_LENGTH = 77


@lru_cache(maxsize=1)
def _bytes_to_unicode() -> dict[int, str]:
    """OpenAI's reversible byte → printable-unicode table (GPT-2 style)."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, codes), strict=True))


def write_clip_tokenizer(directory: Path) -> CLIPTokenizer:
    """Write a `CLIPTokenizer` (vocab, merges, config) to `directory` and return it."""
    directory.mkdir(parents=True, exist_ok=True)
    lines = gzip.open(BPE_FILE, "rt", encoding="utf-8").read().split("\n")
    merges = [tuple(line.split()) for line in lines[1 : _NUM_MERGES + 1]]
    byte_tokens = list(_bytes_to_unicode().values())
    vocab = byte_tokens + [token + "</w>" for token in byte_tokens]
    vocab += ["".join(merge) for merge in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    vocab_file = directory / "vocab.json"
    merges_file = directory / "merges.txt"
    vocab_file.write_text(json.dumps({token: i for i, token in enumerate(vocab)}), encoding="utf-8")
    merges_file.write_text(
        "#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n", encoding="utf-8"
    )
    # SD 1.5's tokenizer pads with <|endoftext|> to 77 tokens.
    tokenizer = CLIPTokenizer.from_pretrained(
        directory, pad_token="<|endoftext|>", model_max_length=MAX_LENGTH
    )
    tokenizer.save_pretrained(directory)
    return tokenizer
