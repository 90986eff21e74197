"""kohya-style caption processing: prefix/suffix, wildcards, fixed and shuffled tags, tag dropout.

The token string is an ordinary word inside one tag, so shuffling moves it with its tag; it is expanded to its N
token names only after processing, which keeps the N vectors together.
"""

from __future__ import annotations

import random
import re

from .spec import SubsetSpec

_WILDCARD = re.compile(r"\{([^{}]*\|[^{}]*)\}")


def raw_caption(text: str, sub: SubsetSpec) -> str:
    """Prefix and suffix joined as plain strings, before any processing (what kohya does)."""
    return f"{sub.caption_prefix or ''}{text}{sub.caption_suffix or ''}"


class CaptionProcessor:
    def __init__(self, sub: SubsetSpec):
        self.sub = sub

    def __call__(self, caption: str, rng: random.Random) -> str:
        sub = self.sub
        lines = [line.strip() for line in caption.splitlines() if line.strip()] or [""]
        text = rng.choice(lines) if sub.enable_wildcard else lines[0]
        if sub.enable_wildcard:
            text = _WILDCARD.sub(lambda m: rng.choice(m.group(1).split("|")), text)
        sep = sub.caption_separator
        if sub.keep_tokens_separator and sub.keep_tokens_separator in text:
            parts = text.split(sub.keep_tokens_separator)
            front, middle = self._tags(parts[0]), self._tags(parts[1])
            back = self._tags(parts[2]) if len(parts) > 2 else []
        else:
            tags = self._tags(text)
            front, middle, back = tags[:sub.keep_tokens], tags[sub.keep_tokens:], []
        if sub.shuffle_caption:
            rng.shuffle(middle)
        if sub.caption_tag_dropout_rate > 0:
            middle = [t for t in middle if rng.random() >= sub.caption_tag_dropout_rate]
        tags = front + middle + back
        if sub.secondary_separator:
            tags = [t.replace(sub.secondary_separator, f"{sep} ") for t in tags]
        return f"{sep} ".join(tags)

    def _tags(self, text: str) -> list[str]:
        return [t.strip() for t in text.split(self.sub.caption_separator) if t.strip()]
