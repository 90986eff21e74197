"""Seeds derived from a run's seed and a position (a micro-step, an epoch, an image, a sample), so every random
draw is a pure function of where it happens: a resumed run, a run with previews and a run over several processes
draw exactly the same."""


def derive_seed(seed: int, index: int) -> int:
    return seed * 1_000_003 + index
