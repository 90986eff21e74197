"""What the vectors learned, without drawing a picture: the run's `inspect` callback, and what `tinv-inspect`
prints (tinv.commands.inspect).

Per vector and text encoder: its norm against the range of the vocabulary's row norms (a vector far outside it
dominates every prompt it is in), its cosine to where it started (near 1: it barely moved), and the vocabulary
tokens nearest to it (what the model "reads" it as)."""

from __future__ import annotations

import logging

import torch

from .callbacks import every

log = logging.getLogger(__name__)

BARELY_MOVED = 0.999  # cosine to the start above this at the end of a run: the vectors learned (almost) nothing


def _clean(token: str) -> str:
    return token.replace("</w>", "")


@torch.no_grad()
def report(vectors: dict[str, torch.Tensor], encoders, start: dict[str, torch.Tensor] | None = None,
           top: int = 5) -> list[dict]:
    """One row per (encoder, vector): norm, the vocabulary's norm range, the norm's percentile in it, cosine to the
    start and the `top` nearest vocabulary tokens by cosine."""
    rows = []
    for enc in encoders:
        if enc.key not in vectors:
            continue
        embedding = enc.model.get_input_embeddings()
        vocab = getattr(embedding, "base", embedding).weight.detach().float().cpu()
        norms = vocab.norm(dim=1)
        unit = vocab / norms.clamp_min(1e-12)[:, None]
        names = {i: t for t, i in enc.tokenizer.get_vocab().items()}
        for i, vector in enumerate(vectors[enc.key].float().cpu()):
            norm = vector.norm().item()
            cosine = unit @ (vector / max(norm, 1e-12))
            best = cosine.topk(min(top, len(cosine)))
            row = {"encoder": enc.key, "vector": i, "norm": norm,
                   "vocab_norm_min": norms.min().item(), "vocab_norm_median": norms.median().item(),
                   "vocab_norm_max": norms.max().item(), "norm_percentile": (norms < norm).float().mean().item(),
                   "nearest": [(_clean(names.get(j, str(j))), c) for j, c in zip(best.indices.tolist(),
                                                                                best.values.tolist())]}
            if start is not None and enc.key in start:
                row["cosine_to_start"] = torch.nn.functional.cosine_similarity(
                    vector, start[enc.key][i].float().cpu(), dim=0).item()
            rows.append(row)
    return rows


def format_report(rows: list[dict]) -> str:
    lines = []
    for r in rows:
        moved = f", cosine to start {r['cosine_to_start']:.3f}" if "cosine_to_start" in r else ""
        lines.append(f"{r['encoder']} vector {r['vector']}: norm {r['norm']:.3f} (vocabulary {r['vocab_norm_min']:.3f}"
                     f"-{r['vocab_norm_max']:.3f}, median {r['vocab_norm_median']:.3f}; longer than "
                     f"{r['norm_percentile']:.0%} of its rows){moved}")
        lines.append("    nearest: " + ", ".join(f"{t} {c:.2f}" for t, c in r["nearest"]))
    return "\n".join(lines)


class Inspection:
    """A run callback (`callbacks.inspect`): the report's numbers in metrics.jsonl (and a table in wandb) at every
    validation (`every_n_steps`, and the end when that is on), and a warning at the end when the vectors barely
    moved or most training prompts lack the token."""

    def __init__(self, every_n_steps: int = 0, top: int = 5):
        self.every_n_steps, self.top = every_n_steps, top
        self.dataset = None

    def on_dataset(self, dataset) -> None:
        self.dataset = dataset

    def on_step_end(self, run, step) -> None:
        if not step.skipped and every(step.step, self.every_n_steps) and step.step < run.max_steps:
            self.log(run)

    def on_end(self, run) -> None:
        # logged where validation runs (its last one is at the end); the warnings always
        rows = self.log(run) if self.every_n_steps else self.rows(run)
        moved = [r["cosine_to_start"] for r in rows if "cosine_to_start" in r]
        if moved and min(moved) > BARELY_MOVED:
            log.warning("the vectors barely moved from their start (cosine %.4f after %d steps): raise optimizer.lr "
                        "or train.max_steps", min(moved), run.step)
        lacking = self.prompts_without_token(run)
        if lacking > 0.5:
            log.warning("%.0f%% of the training prompts do not reach the token (captions without it, or cut at the "
                        "text encoder's length): it learns from the rest only - see data.missing_token", lacking * 100)

    def rows(self, run) -> list[dict]:
        return report(run.token.vectors(), run.backbone.encoders, run.token.initial, self.top)

    def log(self, run) -> list[dict]:
        rows = self.rows(run)
        metrics = {}
        for r in rows:
            key = f"inspect/{r['encoder']}/{r['vector']}"
            metrics.update({f"{key}/norm_percentile": r["norm_percentile"],
                            f"{key}/nearest": r["nearest"][0][0]})
            if "cosine_to_start" in r:
                metrics[f"{key}/cosine_to_start"] = r["cosine_to_start"]
        run.log(metrics)
        run.tracker.log_table("inspect/vectors", ["encoder", "vector", "norm", "norm_percentile", "cosine_to_start",
                                                  "nearest"],
                              [[r["encoder"], r["vector"], r["norm"], r["norm_percentile"], r.get("cosine_to_start"),
                                ", ".join(t for t, _ in r["nearest"])] for r in rows], run.step)
        return rows

    def prompts_without_token(self, run, count: int = 64) -> float:
        """The share of (the first `count`) training prompts in which no new token id survives tokenization."""
        if self.dataset is None or not len(self.dataset):
            return 0.0
        prompts = self.dataset.without_pixels()  # prompts only: no image is read
        prompts = [prompts[i]["prompt"] for i in range(min(count, len(prompts)))]
        ids = run.input_ids(prompts)[0]
        first = run.token.first_ids[run.backbone.encoders[0].key]
        return (ids >= first).any(dim=1).logical_not().float().mean().item()
