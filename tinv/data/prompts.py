"""Training prompts: a template filled with the token, or the image's caption with the token in it."""

from __future__ import annotations

import logging
import random

from ..errors import ConfigError
from .templates import TEMPLATES

log = logging.getLogger(__name__)


def check_one_slot(prompts: list[str], key: str, fills: str) -> None:
    """Every prompt of a list has exactly one "{}", where `fills` goes; else one line naming the first that has not."""
    bad = [p for p in prompts if p.count("{}") != 1]
    if bad:
        raise ConfigError(f"{key} entry {bad[0]!r} needs exactly one '{{}}' for {fills}")


class PromptBuilder:
    def __init__(self, kind: str, token, templates: list[str] | None = None, missing_token: str = "prepend"):
        self.missing_token = missing_token  # MissingToken: what a caption without the token gets
        self.kind = kind
        self.token = token
        self.templates = list(templates) if templates else TEMPLATES.get(kind)
        if kind != "caption":
            check_one_slot(self.templates, "template.templates", "the token")

    def __call__(self, caption: str, rng: random.Random | None = None) -> str:
        """The prompt for one sample, with the token string still unexpanded (templates: a random one)."""
        if self.kind != "caption":
            return (rng or random).choice(self.templates).format(self.token.string)
        caption = caption.strip()
        if self.token.contains_token(caption) or self.missing_token != "prepend":
            return caption
        return f"{self.token.string}, {caption}" if caption else self.token.string

    def check_captions(self, samples) -> None:
        """Caption training: captions without the token are prepended to, warned about, or refused (naming the
        first such image), before any model loads."""
        if self.kind != "caption":
            return
        missing = [s for s in samples if not self.token.contains_token(s.caption)]
        if not missing:
            return
        if self.missing_token == "error":
            raise ConfigError(f"{missing[0].path}: its caption {missing[0].caption!r} lacks the token "
                              f"{self.token.string!r} ({len(missing)} of {len(samples)} captions do); add it, or set "
                              "data.missing_token=prepend")
        action = "it is put first in those" if self.missing_token == "prepend" else \
            "those images teach the token nothing"
        log.warning("%d of %d captions do not contain the token %r; %s", len(missing), len(samples),
                    self.token.string, action)
