"""A CLIP BPE tokenizer generated in code, so tiny models need no download.

The vocabulary follows CLIP's layout: the 256 byte symbols (id 0 is "!"), the same symbols as word endings
("</w>"), one entry per merge, then the start and end specials. Merges spell out a fixed list of common words, so
template prompts tokenize into a few tokens per word rather than single characters.
"""

from __future__ import annotations

from functools import lru_cache

from transformers import CLIPTokenizer

# Words of the prompt templates plus a few everyday nouns and colours (used as init words in tests and demos).
WORDS = """
a an the of in on at by with and for my one this that its photo rendering cropped clean dirty dark bright
close-up closeup rendition nice small large big weird cool good painting style art artwork picture image
illustration depiction drawing sketch cat dog toy car house tree person man woman girl boy face character
object thing shape circle square star triangle red green blue yellow orange purple pink white black gray
cyan background sky sea mountain flower bird fish statue robot cup bottle chair table book hat shirt
""".split()


@lru_cache(maxsize=1)
def _byte_symbols() -> list[str]:
    """The reversible byte -> printable-character table that byte-level BPE uses, in CLIP's order."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    codes = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return [chr(c) for c in codes]


def clip_vocab_and_merges(words: list[str] = WORDS) -> tuple[dict[str, int], list[tuple[str, str]]]:
    symbols = _byte_symbols()
    vocab: list[str] = symbols + [s + "</w>" for s in symbols]
    merges: list[tuple[str, str]] = []
    seen = set(vocab)
    for word in words:
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        current = parts[0]
        for nxt in parts[1:]:
            merged = current + nxt
            if merged not in seen:
                merges.append((current, nxt))
                vocab.append(merged)
                seen.add(merged)
            current = merged
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    return {tok: i for i, tok in enumerate(vocab)}, merges


def build_clip_tokenizer(max_length: int = 77, pad_token: str = "<|endoftext|>") -> CLIPTokenizer:
    """SD1 and SDXL's first encoder pad with the end token; SD2 and SDXL's second encoder pad with "!" (id 0)."""
    vocab, merges = clip_vocab_and_merges()
    tok = CLIPTokenizer(vocab=vocab, merges=merges, pad_token=pad_token)
    tok.model_max_length = max_length
    return tok
