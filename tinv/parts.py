"""What a run trains: a set of parts, each bringing its parameters, optimizer groups, resumable state and files.

The loop, the optimizer and the state file see parts only through this interface, so a new kind of trainable
weights is a new part and a config entry, not a change to the loop: method=pivotal adds a LoRA (tinv.lora) this way.
Parts are chosen in config: `parts.<name>._target_` (conf/train.yaml holds the default, the token's vectors).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from torch import nn

from .embedding import EmbeddingMeta, save_embedding
from .errors import ConfigError


@dataclass
class MicroBatch:
    """What a part's loss term may look at: this micro-batch's noised latents, their timesteps and the batch
    (SDXL's size conditioning)."""

    noisy: torch.Tensor
    timesteps: torch.Tensor
    batch: dict


class TrainablePart(Protocol):
    def setup(self, run) -> None:
        """After the frozen models load: create the trainable weights and put them where they act."""

    def parameters(self) -> list[nn.Parameter]:
        """Every trained tensor (gradients are averaged, clipped and checked over these)."""

    def param_groups(self) -> list[dict]:
        """Optimizer parameter groups; a group may set its own "lr"."""

    def loss_term(self, micro: MicroBatch) -> torch.Tensor | float:
        """Added to the diffusion loss of each micro-batch (a regulariser), or 0.0."""

    def after_step(self) -> None:
        """After a good optimizer step (e.g. a norm constraint)."""

    def trains(self, step: int, max_steps: int) -> bool:
        """Whether the step with this 0-based index trains the part (its phase); a part that stops gets no
        gradients, so the optimizer leaves it as it is (no update, no weight decay)."""

    def metrics(self) -> dict[str, float]:
        """Logged with the training loss."""

    def state_dict(self) -> dict[str, torch.Tensor]:
        """What a resumed run needs to continue exactly."""

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None: ...

    def write(self, run, suffix: str) -> dict[str, Path]:
        """Write this part's files for `<output_name><suffix>`; returns {summary key: path}."""


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
    """The token's N vectors per text encoder, spliced into the frozen token lookup (tinv.embedding), written as an
    embedding file every UI loads.

    Two ways to keep the token from swallowing the rest of a prompt, both text-encoder only:
    - `token.init_from=output` (the default) starts the vectors from the encoder's output for the init word instead
      of its input embedding (Cross Initialization, Pang et al. 2024); token.norm=l2_to_init pulls them back to that
      start (on the toy world even a weight of 1e-4 keeps them from learning: see the README's methods table);
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
        bad = [p for p in self.context_prompts if p.count("{}") != 1]
        if bad:
            raise ConfigError(f"token.context_prompts entry {bad[0]!r} needs exactly one '{{}}' for the token")
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
