"""`tinv-toy defaults`: choose settings on one set of concepts, prove them on another (a benchmark, not a test).

Two disjoint sets of in-world concepts, picked by seed so nobody chooses them: a tuning set, on which settings are
compared and chosen, and a held-out set, run once per candidate default and only reported. Each set holds every
background, shape and colour of the world. The concepts earlier tables and users already looked at (the demo concept,
the methods table's others, the "blue triangle on a gray background" a user reported) can only be tuning concepts.
Each row is a default `tinv-train` run through the real entry point, judged at its end (tinv.toy.targets.SCORING).
"""

from __future__ import annotations

import random
from pathlib import Path

from .targets import measure_methods, other_concepts
from .world import BACKGROUNDS, COLOURS, DEMO_CONCEPT, SHAPES, Concept, all_concepts

SETS = ("tuning", "held-out")
SET_SIZE = 8
# looked at before this benchmark existed: never held out
SEEN = (Concept(*DEMO_CONCEPT), *other_concepts(3, 0), Concept("triangle", "blue", "gray"))
TARGETS = {"held_out_mean_editability": 0.85, "held_out_min_editability": 0.7, "held_out_mean_accuracy": 0.9,
           "default_wall_s": 90, "tuning_vs_held_out": 0.05}


def _covers(concepts: list[Concept]) -> bool:
    return ({c.background for c in concepts} == set(BACKGROUNDS) and {c.shape for c in concepts} == set(SHAPES)
            and {c.colour for c in concepts} == set(COLOURS))


def _draw(rng: random.Random, pool: list[Concept], size: int, first: list[Concept]) -> list[Concept]:
    """`first` and then concepts of `pool` drawn by `rng` until the set covers the world (a fresh draw each try)."""
    for _ in range(100_000):
        drawn = first + rng.sample([c for c in pool if c not in first], size - len(first))
        if _covers(drawn):
            return drawn
    raise ValueError(f"no {size} concepts of the pool cover every background, shape and colour")


def concept_sets(seed: int = 0, size: int = SET_SIZE) -> dict[str, list[Concept]]:
    """{"tuning": [...], "held-out": [...]}: disjoint, each covering every background, shape and colour. The
    held-out set is drawn first, from the concepts nobody looked at; the tuning set starts with the demo concept."""
    if size < len(COLOURS):
        raise ValueError(f"--size {size}: a set needs at least {len(COLOURS)} concepts to hold every colour")
    rng = random.Random(f"defaults:{seed}")
    held_out = _draw(rng, [c for c in all_concepts() if c not in SEEN], size, [])
    tuning = _draw(rng, [c for c in all_concepts() if c not in held_out], size, [Concept(*DEMO_CONCEPT)])
    return {"tuning": tuning, "held-out": held_out}


def measure_defaults(work: Path, candidates: dict[str, list[str]], sets: tuple[str, ...] = SETS, seed: int = 0,
                     size: int = SET_SIZE) -> dict:
    """Every candidate on every concept of the chosen sets; rows already measured in `work` are kept."""
    chosen = concept_sets(seed, size)
    rows = []
    for name in sets:
        print(f"{name} set: {', '.join(c.text() for c in chosen[name])}", flush=True)
        measured = measure_methods(work, candidates, seed=seed, concepts=chosen[name])["rows"]
        rows += [{**row, "set": name} for row in measured]
    result = {"seed": seed, "size": size, "targets": TARGETS, "candidates": candidates,
              "sets": {name: [c.text() for c in chosen[name]] for name in sets}, "rows": rows}
    result["summary"] = {f"{cand}/{name}": summarise([r for r in rows if r["method"] == cand and r["set"] == name])
                         for cand in candidates for name in sets}
    return result


def summarise(rows: list[dict]) -> dict:
    """Mean and minimum of accuracy and editability, editability per asked background, wall time."""
    if not rows:
        return {}

    def mean(values):
        values = [v for v in values if v is not None]
        return sum(values) / len(values) if values else None

    return {"concepts": len(rows),
            "mean_accuracy": mean(r["concept_accuracy"] for r in rows),
            "min_accuracy": min(r["concept_accuracy"] for r in rows),
            "mean_editability": mean(r["editability"] for r in rows),
            "min_editability": min(r["editability"] for r in rows),
            **{f"edit_{b}": mean(r.get(f"edit_{b}") for r in rows) for b in BACKGROUNDS},
            "mean_wall_s": mean(r["wall_s"] for r in rows), "max_wall_s": max(r["wall_s"] for r in rows)}


def print_defaults(result: dict) -> None:
    for name, concepts in result["sets"].items():
        print(f"{name} set: {'; '.join(concepts)}")
    print(f"  {'candidate':<22} {'set':<9} {'accuracy':>8} {'(min)':>6} {'edit':>6} {'(min)':>6}  "
          + " ".join(f"{b:>5}" for b in BACKGROUNDS) + f" {'wall s':>7}")
    for key, s in result["summary"].items():
        if not s:
            continue
        cand, name = key.rsplit("/", 1)
        edits = " ".join(f"{s[f'edit_{b}']:5.2f}" if s[f"edit_{b}"] is not None else "    -" for b in BACKGROUNDS)
        print(f"  {cand:<22} {name:<9} {s['mean_accuracy']:8.3f} {s['min_accuracy']:6.2f} {s['mean_editability']:6.3f} "
              f"{s['min_editability']:6.2f}  {edits} {s['mean_wall_s']:7.1f}")
    for row in result["rows"]:
        print(f"    {row['method']:<22} {row['set']:<9} {row['concept']:<40} acc {row['concept_accuracy']:.3f} "
              f"edit {row['editability']:.3f} {row['wall_s']:6.1f} s")
    t = result["targets"]
    for cand in result["candidates"]:
        tuning, held = result["summary"].get(f"{cand}/tuning"), result["summary"].get(f"{cand}/held-out")
        if held:
            print(f"  {cand}: held-out mean editability {held['mean_editability']:.3f} (target >= "
                  f"{t['held_out_mean_editability']}), min {held['min_editability']:.3f} (>= "
                  f"{t['held_out_min_editability']}), mean accuracy {held['mean_accuracy']:.3f} (>= "
                  f"{t['held_out_mean_accuracy']}), mean wall {held['mean_wall_s']:.0f} s (<= {t['default_wall_s']})")
        if tuning and held:
            print(f"  {cand}: tuning - held-out: accuracy {tuning['mean_accuracy'] - held['mean_accuracy']:+.3f}, "
                  f"editability {tuning['mean_editability'] - held['mean_editability']:+.3f} (within "
                  f"{t['tuning_vs_held_out']})")
