"""Poisson-sampled training loaders, augmentation multiplicity, and logical batches split into physical ones.

Privacy assumption: the accountants assume each training example joins each batch independently with probability
``q`` (Poisson sampling), fresh at every step. Shuffled fixed-size batches do not satisfy it, and neither do ranks
that share a random stream: with Opacus's distributed sampler and no generator, every DDP rank draws from the
global RNG, which ``seed_everything`` makes identical on all ranks, so inclusion decisions are correlated across
ranks. Each rank therefore gets its own generator here.
"""

from __future__ import annotations

import math
from collections import deque

import torch
from opacus.data_loader import dtype_safe, shape_safe, wrap_collate_with_empty
from opacus.utils.uniform_sampler import DistributedUniformWithReplacementSampler, UniformWithReplacementSampler
from torch.utils.data import DataLoader, Sampler


class LogicalBatchSampler(Sampler):
    """Wraps a Poisson batch sampler: repeats each index ``views`` times (augmentation multiplicity, the views of a
    sample adjacent) and splits each logical batch into physical batches of at most ``max_physical`` samples.

    The sampler runs in the main process, ahead of training when workers prefetch, so it records in order whether
    each physical batch ends its logical batch; the privacy callback reads those flags as batches arrive (the
    DataLoader keeps their order) and lets the optimizer step only at the end of a logical batch.
    """

    def __init__(self, sampler, views: int = 1, max_physical: int | None = None):
        self.sampler, self.views, self.max_physical = sampler, int(views), max_physical
        self.ends: deque = deque()

    def __iter__(self):
        self.ends.clear()  # a new pass starts only after the previous one was consumed or abandoned
        for batch in self.sampler:
            batch = list(batch)
            if self.max_physical is None or len(batch) <= self.max_physical:
                chunks = [batch]
            else:
                n = math.ceil(len(batch) / self.max_physical)
                size = math.ceil(len(batch) / n)
                chunks = [batch[i:i + size] for i in range(0, len(batch), size)]
            for i, chunk in enumerate(chunks):
                self.ends.append(i == len(chunks) - 1)
                yield [index for index in chunk for _ in range(self.views)]

    def __len__(self) -> int:
        """Logical batches, times the physical batches a large logical batch (mean + 4 std) would need."""
        steps = len(self.sampler)
        if self.max_physical is None:
            return steps
        expected = getattr(self.sampler, "sample_rate", 0.0) * _population(self.sampler)
        high = expected + 4 * math.sqrt(max(expected, 1.0))
        return steps * max(1, math.ceil(high / self.max_physical))

    def pop_end(self) -> bool:
        """Whether the next physical batch (in training order) ends its logical batch."""
        return self.ends.popleft() if self.ends else True


def _population(sampler) -> int:
    return getattr(sampler, "num_samples", None) or getattr(sampler, "total_size", 0) // getattr(sampler,
                                                                                                  "num_replicas", 1)


def rank_generator(seed: int, rank: int) -> torch.Generator:
    """An independent generator per rank (see the module docstring)."""
    return torch.Generator().manual_seed((int(seed) * 1_000_003 + 7919 * int(rank) + 17) % 2**63)


def poisson_loader(loader: DataLoader, *, distributed: bool, generator: torch.Generator, views: int = 1,
                   max_physical: int | None = None) -> tuple[DataLoader, float]:
    """A loader over ``loader.dataset`` with Poisson sampling at rate ``q = 1 / len(loader)``.

    Keeps the collate function (and so its augmentations), workers and pinning; empty batches come out as tensors
    of batch size 0. Under DDP each rank samples its shard at the same ``q`` (global expected batch
    ``q * len(dataset)``). Returns ``(loader, q)``.
    """
    dataset = loader.dataset
    sample_rate = 1.0 / len(loader)
    if distributed:
        sampler = DistributedUniformWithReplacementSampler(total_size=len(dataset), sample_rate=sample_rate,
                                                           generator=generator)
    else:
        sampler = UniformWithReplacementSampler(num_samples=len(dataset), sample_rate=sample_rate,
                                                generator=generator)
    batch_sampler = LogicalBatchSampler(sampler, views=views, max_physical=max_physical)
    first = dataset[0]
    collate = wrap_collate_with_empty(collate_fn=loader.collate_fn,
                                      sample_empty_shapes=[(0, *shape_safe(x)) for x in first],
                                      dtypes=[dtype_safe(x) for x in first])
    workers = loader.num_workers
    private = DataLoader(dataset, batch_sampler=batch_sampler, collate_fn=collate, num_workers=workers,
                         pin_memory=loader.pin_memory, timeout=loader.timeout, worker_init_fn=loader.worker_init_fn,
                         multiprocessing_context=loader.multiprocessing_context if workers else None,
                         prefetch_factor=loader.prefetch_factor if workers else None,
                         persistent_workers=loader.persistent_workers if workers else False)
    return private, sample_rate
