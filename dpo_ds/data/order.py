"""Which pairs a training step sees: global batch s of a seeded per-epoch permutation, sorted by length and dealt
out as micro-batches, so the data position is a function of the step (a resumed run continues the same trajectory)
and a step's pairs do not depend on the ranks, micro-batch size or accumulation."""
from __future__ import annotations

import numpy as np

from dpo_ds import dist


def global_batch(step: int, n: int, size: int, seed: int) -> np.ndarray:
    """Row indices of global batch `step`: each epoch is a fresh seeded permutation; the tail is dropped."""
    per_epoch = n // size
    epoch, k = divmod(step, per_epoch)
    return np.random.default_rng([seed, epoch]).permutation(n)[k * size:(k + 1) * size]


def rank_micro_batches(rows: np.ndarray, lengths: np.ndarray, micro: int, grad_accum: int) -> list[np.ndarray]:
    """Sort the global batch by length (little padding), cut it into D x grad_accum micro-batches and deal
    micro-batch j to data-parallel rank j % D (D = world / --sequence_parallel_size: the ranks of a sequence-
    parallel group share theirs). The step's examples do not depend on micro x accumulation."""
    rows = rows[np.argsort(-lengths[rows], kind="stable")]
    chunks = rows.reshape(dist.dp_size() * grad_accum, micro)
    return [chunks[j] for j in range(dist.dp_rank(), len(chunks), dist.dp_size())]
