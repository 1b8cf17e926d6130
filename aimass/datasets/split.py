"""A stratified held-out split: every class in both parts, about the same fraction of each held out, by seed."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import numpy as np

from aimass.runtime.errors import InvalidArgument


def stratified_split(labels: Sequence[str], holdout_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(train indices, eval indices) into ``labels``, each sorted. Of each class, ``round(n * holdout_fraction)``
    examples are held out, but at least one and never all of them, so a class with two or more examples is in both
    parts (a class with one example is trained on only). The same labels, fraction and seed give the same split."""
    if not 0.0 < holdout_fraction < 1.0:
        raise InvalidArgument(f"holdout_fraction is {holdout_fraction}; it must be between 0 and 1 (exclusive)")
    by_class: defaultdict[str, list[int]] = defaultdict(list)
    for index, label in enumerate(labels):
        by_class[label].append(index)
    rng = np.random.default_rng(seed)
    train: list[int] = []
    held: list[int] = []
    for label in sorted(by_class):  # a fixed order, so each class draws the same numbers for a seed
        indices = by_class[label]
        n = len(indices)
        if n < 2:
            train.extend(indices)
            continue
        k = min(max(round(n * holdout_fraction), 1), n - 1)
        order = rng.permutation(n)
        held.extend(indices[i] for i in order[:k])
        train.extend(indices[i] for i in order[k:])
    return sorted(train), sorted(held)
