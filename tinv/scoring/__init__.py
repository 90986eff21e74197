"""Scoring a run on the models users train: subject fidelity (DINO and CLIP image similarity to the training images)
and prompt fidelity (CLIP similarity to the prompt), the papers' numbers, as a run's callback and as `tinv-score`.
The toy world keeps its own judge (tinv.toy)."""
