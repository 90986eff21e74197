"""Subject and prompt fidelity, the numbers TI papers report (DreamBench's protocol), and the one score a sweep
optimises on a real model.

- subject fidelity: `dino` and `clip_i`, the mean cosine between the features of samples of "a photo of <token>"
  and those of the training images (every pair);
- prompt fidelity: `clip_t`, the mean cosine between the CLIP embedding of each prompt's samples and the CLIP text
  embedding of that prompt, with the token replaced by its class word (token.init_word);
- the same three for the class word in place of the token, once per run: the floor of subject fidelity (what the
  model draws without the token) and the ceiling of prompt fidelity (the token should obey prompts as its word does);
- `fidelity`, the objective: the harmonic mean of `subject` (DINO and CLIP-I, each scaled from the class word's
  value, 0, to the training images' similarity to each other, 1) and `prompt` (CLIP-T as a share of the class
  word's). Harmonic, so that an embedding which copies its training images whatever the prompt, or obeys prompts
  but draws no subject, scores near 0: a sweep must not be able to win on one axis alone.
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
            references: dict[str, torch.Tensor]) -> dict[str, float]:
    """dino, clip_i (photo samples against the references, per scorer) and clip_t (row i of prompt_images against
    row i of prompt_texts)."""
    scores = {key: mean_cosine(photo[key], references[key]) for key in SUBJECT_KEYS}
    scores["clip_t"] = float((prompt_images * prompt_texts).sum(dim=1).mean())
    return scores


def combined(token: dict[str, float], word: dict[str, float], ceiling: dict[str, float | None]) -> dict[str, float]:
    """subject, prompt and their harmonic mean `fidelity`, each in [0, 1] (see the module's docstring)."""
    subject = []
    for key in SUBJECT_KEYS:
        top = ceiling.get(key)
        top = top if top is not None and top > word[key] else 1.0  # one image, or images less alike than the word's
        subject.append(min(1.0, max(0.0, (token[key] - word[key]) / (top - word[key]))) if top > word[key] else 0.0)
    subject_score = sum(subject) / len(subject)
    if word["clip_t"] > 0:
        prompt_score = min(1.0, max(0.0, token["clip_t"] / word["clip_t"]))
    else:  # only a random scorer gets here: the token obeys as well as the word or not
        prompt_score = float(token["clip_t"] >= word["clip_t"])
    total = subject_score + prompt_score
    return {"subject_fidelity": subject_score, "prompt_fidelity": prompt_score,
            "fidelity": 2 * subject_score * prompt_score / total if total > 0 else 0.0}
