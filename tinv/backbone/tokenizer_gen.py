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


def _bpe(word: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    """CLIP's BPE on one word: repeatedly merge the lowest-ranked adjacent pair."""
    parts = list(word[:-1]) + [word[-1] + "</w>"]
    while len(parts) > 1:
        pairs = [(ranks.get((a, b), 1 << 30), i) for i, (a, b) in enumerate(zip(parts, parts[1:]))]
        rank, i = min(pairs)
        if rank == 1 << 30:
            break
        parts[i:i + 2] = [parts[i] + parts[i + 1]]
    return parts


def word_level_vocab_and_merges(words: list[str]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A CLIP vocabulary in which every given word is exactly one token (other text falls back to characters).

    A merge made for one word can fire inside another and leave it split ("an" inside "cyan"), so each word is run
    through BPE as built so far and gets merges for whatever is left. New merges rank below all earlier ones, so
    they never change how an earlier word splits.
    """
    symbols = _byte_symbols()
    vocab: list[str] = symbols + [s + "</w>" for s in symbols]
    seen, merges, ranks = set(vocab), [], {}
    for word in dict.fromkeys(words):
        parts = _bpe(word, ranks)
        while len(parts) > 1:
            pair = (parts[0], parts[1])
            ranks[pair] = len(merges)
            merges.append(pair)
            if pair[0] + pair[1] not in seen:
                vocab.append(pair[0] + pair[1])
                seen.add(pair[0] + pair[1])
            parts = _bpe(word, ranks)
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    return {tok: i for i, tok in enumerate(vocab)}, merges
