"""The token: its N names, the splice of trainable rows into each encoder's token lookup, their start and norm
limits (`ConceptToken`), and the part that trains them and writes the embedding file (`TokenVectors`).

Only N x width floats per text encoder train. The vocabulary matrix stays frozen and is never handed to the
optimizer: a `SplicedEmbedding` replaces each encoder's token-embedding module, looks up ordinary ids in the frozen
matrix and puts the trainable rows at the new ids.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import torch
from torch import nn

from ..data.prompts import check_one_slot
from ..errors import ConfigError
from ..formats.embedding import DIFFUSERS_FILES, EmbeddingMeta, load_embedding, save_embedding
from ..parts import MicroBatch

log = logging.getLogger(__name__)


def token_names(string: str, num_vectors: int) -> list[str]:
    """kohya's naming: `tok`, `tok1`, ..., `tok{N-1}`."""
    return [string] + [f"{string}{i}" for i in range(1, num_vectors)]


class SplicedEmbedding(nn.Module):
    """Token lookup = frozen vocabulary rows + trainable fp32 rows for ids >= first_new_id."""

    def __init__(self, base: nn.Embedding, first_new_id: int, vectors: torch.Tensor):
        super().__init__()
        self.base = base
        self.first_new_id = first_new_id
        self.vectors = nn.Parameter(vectors.detach().to(torch.float32).clone())

    @property
    def weight(self) -> torch.Tensor:  # code that inspects the embedding's dtype or device still finds it
        return self.base.weight

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        is_new = input_ids >= self.first_new_id
        out = self.base(torch.where(is_new, torch.zeros_like(input_ids), input_ids))
        rows = (input_ids - self.first_new_id).clamp(0, self.vectors.shape[0] - 1)
        new = self.vectors[rows].to(out.dtype)
        return torch.where(is_new.unsqueeze(-1), new, out)


def _vocab_hit(tokenizer, name: str) -> int | None:
    """The id under which the tokenizer already knows `name` as a whole token (word form included), else None."""
    vocab = tokenizer.get_vocab()
    for form in (name, name.lower(), name + "</w>", name.lower() + "</w>"):
        if form in vocab:
            return vocab[form]
    return None


class ConceptToken:
    """The trigger word, its N token names, and (once installed) the trainable vectors of every text encoder."""

    def __init__(self, string: str, num_vectors: int | None = 1, init_word: str | None = None,
                 weights: str | None = None, norm: str = "none", norm_weight: float = 0.01,
                 train_encoders: str = "both", init_from: str = "output"):
        string = (string or "").strip()
        if not string or re.search(r"\s", string):
            raise ConfigError(f"token.string={string!r} must be one word without spaces, e.g. token.string=mychar")
        self.string = string
        self.init_word = init_word
        self.weights_path = weights
        try:
            self.start = load_embedding(weights) if weights else None
        except ConfigError as err:
            raise ConfigError(f"token.weights: {err}") from None
        if self.start is not None:
            rows = next(iter(self.start.values())).shape[0]
            if num_vectors not in (None, rows):
                raise ConfigError(f"token.num_vectors={num_vectors} but token.weights={weights} has {rows} "
                                  f"vectors; set token.num_vectors={rows} or leave it unset")
            num_vectors = rows
        self.names = token_names(string, num_vectors or 1)
        self.splices: dict[str, SplicedEmbedding] = {}
        self.first_ids: dict[str, int] = {}  # per encoder key: the id of the first token name
        self.norm, self.norm_weight, self.train_encoders = norm, norm_weight, train_encoders
        self.init_from = init_from  # input: the init word's rows; output: given to install() by the caller
        self.initial: dict[str, torch.Tensor] = {}  # the starting vectors, for l2_to_init
        self.max_norms: dict[str, float] = {}  # the longest vocabulary row per encoder, for clamp_to_vocab_max
        self._pattern = re.compile(rf"(?<!\w){re.escape(string)}(?!\w)", re.IGNORECASE)

    @property
    def num_vectors(self) -> int:
        return len(self.names)

    def check_new(self, encoders) -> None:
        """Fail before any weights load if the vectors cannot fit in a prompt, or a token name is already known to
        any tokenizer."""
        positions = min(enc.tokenizer.model_max_length for enc in encoders)
        if self.num_vectors > positions - 2:  # past the prompt's length the rest is cut off and never trains
            raise ConfigError(f"token.num_vectors={self.num_vectors}: a prompt holds {positions} tokens, its start "
                              f"and end included, so at most {positions - 2} vectors fit and they leave no room for "
                              "the template's words; 1 to 8 is usual, up to about 16")
        for enc in encoders:
            for name in self.names:
                hit = _vocab_hit(enc.tokenizer, name)
                if hit is not None:
                    free = next(c for c in (f"my{self.string}", f"{self.string}ti", f"{self.string}_ti")
                                if all(_vocab_hit(e.tokenizer, c) is None for e in encoders))
                    raise ConfigError(
                        f"token.string={self.string!r}: {name!r} is already a word the model knows (token {hit} of "
                        f"{enc.label}), so it cannot be learned; pick a new word, e.g. token.string={free}")

    def check_start(self, encoders) -> None:
        """token.weights must fit the model: one tensor per encoder, of its width, with equal row counts."""
        if self.start is None:
            return
        rows = {k: v.shape[0] for k, v in self.start.items()}
        if len(set(rows.values())) != 1:
            raise ConfigError(f"token.weights: its tensors have different vector counts {rows}; the file is broken")
        for enc in encoders:
            if enc.key not in self.start:
                if self.weights_path and Path(self.weights_path).name.startswith(DIFFUSERS_FILES[0]):
                    raise ConfigError(f"token.weights={self.weights_path} is one file of a diffusers SDXL pair; give "
                                      "the folder holding learned_embeds.safetensors and learned_embeds_2.safetensors")
                raise ConfigError(f"token.weights holds vectors for {sorted(self.start)} but this model needs "
                                  f"{[e.key for e in encoders]} (one set per text encoder); it was trained for another "
                                  "model family")
            width = self.start[enc.key].shape[1]
            if width != enc.width:
                raise ConfigError(f"token.weights: its {enc.key} vectors are {width} wide but {enc.label} is "
                                  f"{enc.width} wide; it was trained for another model family")

    def contains_token(self, text: str) -> bool:
        return bool(self._pattern.search(text))

    def expand(self, prompt: str) -> str:
        """Every whole-word occurrence of the token string becomes all N token names, in order."""
        return self._pattern.sub(" ".join(self.names), prompt)

    def add_to_tokenizers(self, encoders) -> None:
        """Add the token names to each tokenizer (once) and check that a prompt tokenizes to the new ids."""
        from transformers import AddedToken

        if self.first_ids:
            return
        self.check_new(encoders)
        for enc in encoders:
            tok = enc.tokenizer
            first = len(tok)
            tok.add_tokens([AddedToken(n, single_word=True) for n in self.names])
            ids = tok.convert_tokens_to_ids(self.names)
            probe = tok(self.expand(self.string), add_special_tokens=False).input_ids
            if ids != list(range(first, first + self.num_vectors)) or probe != ids:
                raise ConfigError(f"token.string={self.string!r} does not come out as its own new tokens from the "
                                  f"tokenizer of {enc.label} (got ids {probe}); use a lowercase word of letters and "
                                  "digits")
            self.first_ids[enc.key] = first

    def install(self, encoders, seed: int, init_rows: dict[str, torch.Tensor] | None = None) -> None:
        """Splice trainable rows for the new ids into each encoder's token lookup. `init_rows` (per encoder key,
        one row per piece of the init word) replace the init word's token embeddings as the start."""
        self.add_to_tokenizers(encoders)
        for enc in encoders:
            base = enc.model.get_input_embeddings()
            if isinstance(base, SplicedEmbedding):
                raise ConfigError("this model already has trained tokens spliced in; load a fresh backbone")
            if init_rows is not None and self.start is None:
                rows = init_rows[enc.key].float().cpu()
                init = torch.stack([rows[i % len(rows)] for i in range(self.num_vectors)])
            else:
                init = self._initial_rows(enc, base.weight.detach(), seed)
            splice = SplicedEmbedding(base, self.first_ids[enc.key], init).to(base.weight.device)
            splice.vectors.requires_grad_(self.train_encoders in ("both", enc.key))
            enc.model.set_input_embeddings(splice)
            self.splices[enc.key] = splice
            self.initial[enc.key] = splice.vectors.detach().clone()
            self.max_norms[enc.key] = base.weight.detach().float().norm(dim=1).max().item()

    def _initial_rows(self, enc, vocab: torch.Tensor, seed: int) -> torch.Tensor:
        width = vocab.shape[1]
        if self.start is not None:
            self.check_start([enc])
            return self.start[enc.key].float()
        vocab = vocab.float().cpu()
        if self.init_word:
            ids = enc.tokenizer(self.init_word, add_special_tokens=False).input_ids
            if not ids:
                raise ConfigError(f"token.init_word={self.init_word!r} tokenizes to nothing; use a plain word")
            if len(ids) > 1:
                use = "only the first piece is used" if self.num_vectors == 1 else \
                    f"the {self.num_vectors} vectors take the pieces in turn"
                log.warning("token.init_word=%r is not one word to %s (it splits into %d pieces); %s - a word the "
                            "model knows starts the vectors closer to your concept", self.init_word, enc.label,
                            len(ids), use)
            return torch.stack([vocab[ids[i % len(ids)]] for i in range(self.num_vectors)])
        # No init word: draw each vector from the vocabulary's per-dimension mean and spread, so it starts with
        # the scale of a real word embedding but no meaning.
        gen = torch.Generator().manual_seed(seed)
        return vocab.mean(0) + vocab.std(0) * torch.randn(self.num_vectors, width, generator=gen)

    def parameters(self) -> list[nn.Parameter]:
        """The trained vectors (SDXL with token.train_encoders=clip_l|clip_g: one encoder's only)."""
        return [s.vectors for s in self.splices.values() if s.vectors.requires_grad]

    def frozen_keys(self) -> list[str]:
        return [k for k, s in self.splices.items() if not s.vectors.requires_grad]

    def regularizer(self) -> torch.Tensor | float:
        """token.norm=l2_to_init: weight x squared distance of the trained vectors from where they started."""
        if self.norm != "l2_to_init":
            return 0.0
        return self.norm_weight * sum(((s.vectors - self.initial[k].to(s.vectors.device)) ** 2).sum()
                                      for k, s in self.splices.items() if s.vectors.requires_grad)

    @torch.no_grad()
    def after_step(self) -> None:
        """token.norm=clamp_to_vocab_max: no vector grows longer than the longest word embedding."""
        if self.norm != "clamp_to_vocab_max":
            return
        for key, splice in self.splices.items():
            norms = splice.vectors.norm(dim=1, keepdim=True)
            splice.vectors.mul_(torch.clamp(self.max_norms[key] / norms.clamp_min(1e-12), max=1.0))

    @torch.no_grad()
    def load_vectors(self, vectors: dict[str, torch.Tensor]) -> None:
        for key, value in vectors.items():
            self.splices[key].vectors.copy_(value.to(self.splices[key].vectors.device))

    def vectors(self) -> dict[str, torch.Tensor]:
        """The current vectors by file key, detached fp32 on the CPU."""
        return {key: s.vectors.detach().float().cpu().clone() for key, s in self.splices.items()}


# Prompts with content besides the token, for the context regulariser ("{}" is the token).
CONTEXT_PROMPTS = ["a photo of {} on the beach", "a photo of {} in the snow", "a painting of {} in a forest",
                   "{} next to a red car", "a close-up photo of {} on a wooden table", "{} in a city street at night",
                   "a watercolor of {} on a mountain", "{} under a blue sky"]


@torch.no_grad()
def output_rows(backbone, word: str) -> dict[str, torch.Tensor]:
    """Per encoder key, the encoder's states for `word`'s pieces (what conditions the UNet), one row per piece: the
    start of token.init_from=output."""
    states = backbone.hidden_states(backbone.tokenize([word]))
    rows = {}
    for enc, state in zip(backbone.encoders, states):
        pieces = len(enc.tokenizer(word, add_special_tokens=False).input_ids)
        rows[enc.key] = state[0, 1:1 + pieces].float().cpu()
    return rows


class TokenVectors:
    """The token's N vectors per text encoder, spliced into the frozen token lookup (ConceptToken), written as an
    embedding file every UI loads.

    Two ways to keep the token from swallowing the rest of a prompt, both text-encoder only:
    - `token.init_from=output` (the default) starts the vectors from the encoder's output for the init word instead
      of its input embedding (Cross Initialization, Pang et al. 2024); token.norm=l2_to_init pulls them back to that
      start (on the toy world even a weight of 1e-4 keeps them from learning: see docs/measurements.md);
    - `context_weight` > 0 adds the mean squared difference between the encoder states of the words after the token
      (and the end token) in `context_prompts`, and the same states with the init word in the token's place (a
      context regulariser in the spirit of CoRe, 2024): the token may change what it names, not its context.
    """

    def __init__(self, context_weight: float = 0.0, context_prompts: list[str] | None = None, stop_frac: float = 1.0):
        self.token = None
        self.stop_frac = stop_frac
        self.trained: list[nn.Parameter] = []
        self.context_weight = context_weight
        self.context_prompts = list(context_prompts or CONTEXT_PROMPTS)
        check_one_slot(self.context_prompts, "token.context_prompts", "the token")
        self.context: list[tuple] = []  # per encoder: (ids with the token, [(start, count)], target states)

    def setup(self, run) -> None:
        self.token = run.token
        self.backbone = run.backbone
        crossed = self.token.init_from == "output" and self.token.init_word and self.token.start is None
        rows = output_rows(run.backbone, self.token.init_word) if crossed else None
        self.token.install(run.backbone.encoders, run.seed, rows)  # after the dtype cast: the vectors stay fp32
        self.trained = self.token.parameters()  # before any phase switches gradients off
        if self.context_weight > 0:
            self._context_setup(run)

    def _context_setup(self, run) -> None:
        if not self.token.init_word:
            raise ConfigError("token.context_weight compares the token with the word it stands for; set "
                              "token.init_word too")
        bb = run.backbone
        with_token, with_word, spans = [], [], []
        for enc in bb.encoders:
            tok = enc.tokenizer
            names = list(range(self.token.first_ids[enc.key], self.token.first_ids[enc.key] + self.token.num_vectors))
            # the word's pieces in the token's N places, as the vectors start (token.init_from=input)
            pieces = tok(self.token.init_word, add_special_tokens=False).input_ids
            word = [pieces[i % len(pieces)] for i in range(len(names))]
            a, b, span = [], [], []
            for prompt in self.context_prompts:
                prefix, suffix = (tok(part, add_special_tokens=False).input_ids for part in prompt.split("{}"))
                a.append(self._ids(tok, prefix + names + suffix))
                b.append(self._ids(tok, prefix + word + suffix))
                span.append((1 + len(prefix) + len(names), len(suffix) + 1))  # the words after the token, and EOS
            with_token.append(torch.tensor(a))
            with_word.append(torch.tensor(b))
            spans.append(span)
        with torch.no_grad():
            targets = bb.hidden_states(with_word)
        self.context = [(ids, span, [t[p, start:start + n].float() for p, (start, n) in enumerate(span)])
                        for ids, span, t in zip(with_token, spans, targets)]

    @staticmethod
    def _ids(tokenizer, ids: list[int]) -> list[int]:
        """[BOS] ids [EOS], padded to the tokenizer's length as training prompts are."""
        full = [tokenizer.bos_token_id, *ids, tokenizer.eos_token_id][:tokenizer.model_max_length]
        return full + [tokenizer.pad_token_id] * (tokenizer.model_max_length - len(full))

    def context_loss(self) -> torch.Tensor:
        states = self.backbone.hidden_states([ids for ids, _, _ in self.context])
        errors = [torch.nn.functional.mse_loss(state[p, start:start + n].float(), target[p].to(state.device))
                  for state, (_, span, target) in zip(states, self.context)
                  for p, (start, n) in enumerate(span)]
        return torch.stack(errors).mean()

    def parameters(self) -> list[nn.Parameter]:
        return list(self.trained)

    def trains(self, step: int, max_steps: int) -> bool:
        return step < self.stop_frac * max_steps

    def param_groups(self) -> list[dict]:
        return [{"params": self.parameters()}]

    def loss_term(self, micro: MicroBatch) -> torch.Tensor | float:
        term = self.token.regularizer()
        if self.context_weight > 0:
            term = term + self.context_weight * self.context_loss()
        return term

    def after_step(self) -> None:
        self.token.after_step()

    def metrics(self) -> dict[str, float]:
        return {f"embedding/{key}/norm_{i}": norm for key, vectors in self.token.vectors().items()
                for i, norm in enumerate(vectors.norm(dim=1).tolist())}

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.token.vectors()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.token.load_vectors(state)

    def write(self, run, suffix: str) -> dict[str, Path]:
        ext = "safetensors" if run.save_format == "safetensors" else "pt"
        path = run.run_dir / f"{run.output_name}{suffix}.{ext}"
        meta = EmbeddingMeta(run.output_name, run.backbone.family, run.backbone.source, run.step, run.backbone.name)
        save_embedding(path, self.token.vectors(), meta, run.save_format)
        return {"embedding": path}
