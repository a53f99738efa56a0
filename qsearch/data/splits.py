"""The validation carve: a stratified, seeded hold-out from a dataset's training split.

Every dataset has three splits. The search trains on ``train``, selects on ``val`` (what the
scheduler and the sampler see) and measures ``test`` once, when a trial finishes. ``val`` is
carved from the training split with :func:`stratified_carve`, seeded by ``data.split_seed`` —
never by the trial seed, so every trial of a study is trained and scored on the same images —
and stratified by class, so each class keeps its share of the training data.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from qsearch.errors import DataError


def stratified_carve(labels: torch.Tensor | Sequence[int], fraction: float,
                     seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Split positions ``0..len(labels)-1`` into (kept, carved), both sorted.

    Each class gives ``round(n_class * fraction)`` of its samples (chosen by a generator seeded
    with ``seed`` alone), so the carved part's class proportions are within one sample per
    class of the whole. With ``fraction > 0`` at least one sample is carved, from the largest
    class, so a tiny dataset still has a validation split. ``fraction == 0`` carves nothing.
    """
    y = torch.as_tensor(labels, dtype=torch.long).reshape(-1)
    empty = torch.zeros(0, dtype=torch.long)
    if fraction <= 0 or len(y) == 0:
        return torch.arange(len(y)), empty
    g = torch.Generator().manual_seed(int(seed))
    classes = torch.unique(y).tolist()  # sorted: the carve does not depend on label order
    per_class = {c: torch.nonzero(y == c).reshape(-1) for c in classes}
    take = {c: int(math.floor(len(idx) * fraction + 0.5)) for c, idx in per_class.items()}
    if sum(take.values()) == 0:
        largest = max(classes, key=lambda c: (len(per_class[c]), -c))
        take[largest] = 1
    carved = []
    for c in classes:
        idx = per_class[c]
        perm = idx[torch.randperm(len(idx), generator=g)]
        carved.append(perm[: take[c]])
    carved_idx = torch.sort(torch.cat(carved)).values if carved else empty
    mask = torch.ones(len(y), dtype=torch.bool)
    mask[carved_idx] = False
    kept = torch.nonzero(mask).reshape(-1)
    if len(kept) == 0:
        raise DataError(f"data.val_fraction: {fraction} leaves no training data "
                        f"({len(y)} samples in the training split)")
    return kept, carved_idx
