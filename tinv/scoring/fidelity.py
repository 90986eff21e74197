"""Subject and prompt fidelity, the numbers TI papers report (DreamBench's protocol), and the one score a sweep
optimises on a real model.

- subject fidelity: `dino` and `clip_i`, the mean cosine between the features of samples of "a photo of <token>"
  and those of the training images (every pair);
- prompt fidelity: `clip_t`, the mean cosine between the CLIP embedding of each prompt's samples and the CLIP text
  embedding of that prompt, with the token replaced by its class word (token.init_word);
- the same three for the class word in place of the token, once per run: the floor of subject fidelity (what the
  model draws without the token) and the ceiling of prompt fidelity (the token should obey prompts as its word does);
- `fidelity`, the objective: the harmonic mean of `subject` (DINO and CLIP-I, each scaled from the class word's
  value, 0, to the training images' similarity to each other, 1) and `prompt` (CLIP-T scaled from what a sample
  scores against the other prompts, 0, to the class word's own value, 1). Harmonic, so that an embedding which copies
  its training images whatever the prompt, or obeys prompts but draws no subject, scores near 0: a sweep must not be
  able to win on one axis alone. An axis below its 0 (the token worse than the plain word) is kept, not cut, and
  then is the score: weak runs still rank among themselves.
"""

from __future__ import annotations

import torch

SUBJECT_KEYS = ("dino", "clip_i")


def mean_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean cosine over every pair of rows of a and b (both L2-normalised)."""
    return float((a @ b.T).mean())


def self_similarity(features: torch.Tensor) -> float | None:
    """Mean cosine between different rows (None with fewer than two): how alike the training images are."""
    n = len(features)
    if n < 2:
        return None
    sims = features @ features.T
    return float((sims.sum() - sims.diagonal().sum()) / (n * (n - 1)))


def measure(photo: dict[str, torch.Tensor], prompt_images: torch.Tensor, prompt_texts: torch.Tensor,
            references: dict[str, torch.Tensor], per_prompt: int = 1) -> dict[str, float]:
    """dino, clip_i (photo samples against the references, per scorer), clip_t (row i of prompt_images against row i
    of prompt_texts, each prompt's rows `per_prompt` in a row) and clip_t_floor (rows against the other prompts' texts:
    what CLIP-T is for an image the prompt does not describe; None with one prompt)."""
    scores = {key: mean_cosine(photo[key], references[key]) for key in SUBJECT_KEYS}
    sims = prompt_images @ prompt_texts.T
    scores["clip_t"] = float(sims.diagonal().mean())
    prompt_of = torch.arange(len(sims)) // per_prompt
    other = prompt_of[:, None] != prompt_of[None, :]
    scores["clip_t_floor"] = float(sims[other].mean()) if other.any() else None
    return scores


def _scaled(value: float, low: float, high: float) -> float:
    """value from low (0) to high (1), at most 1 and not cut below 0; a scale with no room counts reaching it."""
    if high <= low:
        return 1.0 if value >= high else 0.0
    return min(1.0, (value - low) / (high - low))


def combined(token: dict[str, float], word: dict[str, float], ceiling: dict[str, float | None]) -> dict[str, float]:
    """subject, prompt (each at most 1) and `fidelity` (see the module's docstring)."""
    subject = []
    for key in SUBJECT_KEYS:
        top = ceiling.get(key)  # None with one training image; below the word's value for a very varied set
        subject.append(_scaled(token[key], word[key], top if top is not None and top > word[key] else 1.0))
    subject_score = sum(subject) / len(subject)
    floor = word.get("clip_t_floor")
    prompt_score = _scaled(token["clip_t"], floor if floor is not None else 0.0, word["clip_t"])
    if subject_score <= 0 or prompt_score <= 0:
        fidelity = min(subject_score, prompt_score)  # the worse axis, so weak runs still rank
    else:
        fidelity = 2 * subject_score * prompt_score / (subject_score + prompt_score)
    return {"subject_fidelity": subject_score, "prompt_fidelity": prompt_score, "fidelity": fidelity}
