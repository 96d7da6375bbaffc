"""Poisson-sampled training loaders with resumable random streams, augmentation multiplicity, micro-batches.

Privacy assumption: the accountants assume each training example joins each batch independently with probability
``q`` (Poisson sampling), **fresh at every step**. Two things here keep that true:

* every DDP rank has its own stream (a shared stream, e.g. the global RNG that ``seed_everything`` makes equal on
  all ranks, would correlate the inclusion decisions across ranks);
* every pass over the data (epoch) draws from a stream seeded by ``(seed, rank, pass index)``, and the loader's
  state (:meth:`LogicalBatchSampler.state_dict`: the seed, the pass being consumed and how many of its batches were
  consumed) travels with checkpoints, so a resumed run continues with the very batches the uninterrupted run would
  have drawn next, never with a replay of earlier ones.
"""

from __future__ import annotations

import math
from collections import deque

import torch
from opacus.data_loader import dtype_safe, shape_safe, wrap_collate_with_empty
from torch.utils.data import DataLoader, Sampler


def stream_seed(seed: int, *keys: int) -> int:
    """A 63-bit seed for the stream named by ``keys`` (rank, pass, ...), derived from ``seed`` (SplitMix64 mixing,
    so that nearby keys give unrelated streams)."""
    x = int(seed) & (2**64 - 1)
    for key in keys:
        x = (x ^ (int(key) + 0x9E3779B97F4A7C15 + (x << 6) + (x >> 2))) & (2**64 - 1)
        x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & (2**64 - 1)
        x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & (2**64 - 1)
        x ^= x >> 31
    return x % 2**63


class PoissonSampler(Sampler):
    """``steps`` batches per pass; each example of this rank's shard joins each batch with probability ``q``.

    Under DDP rank ``r`` of ``world_size`` samples the examples ``r, r + world_size, ...`` (the global batch is the
    union over ranks, each example included with probability ``q``, as a single process would). Pass ``p`` draws
    from a generator seeded by ``(seed, rank, p)``.
    """

    def __init__(self, num_samples: int, sample_rate: float, steps: int, seed: int, rank: int = 0,
                 world_size: int = 1):
        if not 0 < sample_rate <= 1:
            raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate!r}")
        self.num_samples, self.sample_rate, self.steps = int(num_samples), float(sample_rate), int(steps)
        self.seed, self.rank, self.world_size = int(seed), int(rank), int(world_size)
        self.shard = torch.arange(self.rank, self.num_samples, self.world_size)
        self.passes = 0  # passes drawn by direct iteration (LogicalBatchSampler keeps its own count)

    def batches(self, pass_index: int):
        generator = torch.Generator().manual_seed(stream_seed(self.seed, self.rank, pass_index))
        for _ in range(self.steps):
            mask = torch.rand(len(self.shard), generator=generator) < self.sample_rate
            yield self.shard[mask].tolist()

    def __iter__(self):
        """The next pass (each call draws a new one: iterating twice never repeats the batches)."""
        pass_index, self.passes = self.passes, self.passes + 1
        return self.batches(pass_index)

    def __len__(self) -> int:
        return self.steps


class LogicalBatchSampler(Sampler):
    """The batch sampler of the private loader: Poisson batches (logical batches, one optimizer step each), with
    each index repeated ``views`` times (augmentation multiplicity, the views of a sample adjacent) and split into
    physical batches of at most ``max_physical`` samples.

    The sampler runs in the main process, ahead of training when workers prefetch, so it records in order whether
    each physical batch ends its logical batch; the privacy callback reads those flags as batches arrive (the
    DataLoader keeps their order) with :meth:`pop_end`, which also counts what training consumed: the resumable
    state (:meth:`state_dict`) is about consumed batches, not prefetched ones.
    """

    def __init__(self, sampler: PoissonSampler | Sampler, views: int = 1, max_physical: int | None = None):
        self.sampler, self.views, self.max_physical = sampler, int(views), max_physical
        self.ends: deque = deque()
        self.next_pass, self._skip = 0, 0
        self.current_pass, self.consumed, self.consumed_logical = -1, 0, 0
        self._last_end = True

    def _logical_batches(self, pass_index: int):
        if isinstance(self.sampler, PoissonSampler):
            return self.sampler.batches(pass_index)
        return iter(self.sampler)

    def __iter__(self):
        self.ends.clear()  # a new pass starts only after the previous one was consumed or abandoned
        self.current_pass, self.next_pass = self.next_pass, self.next_pass + 1
        skip, self._skip = self._skip, 0
        self.consumed, self.consumed_logical = skip, 0
        physical = 0
        for batch in self._logical_batches(self.current_pass):
            batch = list(batch)
            if self.max_physical is None or len(batch) <= self.max_physical:
                chunks = [batch]
            else:
                n = math.ceil(len(batch) / self.max_physical)
                size = math.ceil(len(batch) / n)
                chunks = [batch[i:i + size] for i in range(0, len(batch), size)]
            for i, chunk in enumerate(chunks):
                physical += 1
                end = i == len(chunks) - 1
                if physical <= skip:  # consumed before the checkpoint this run resumed from
                    self.consumed_logical += end
                    continue
                self.ends.append(end)
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
        """Whether the next physical batch (in training order) ends its logical batch; counts it as consumed."""
        end = self.ends.popleft() if self.ends else True
        self._last_end = end
        self.consumed += 1
        self.consumed_logical += end
        return end

    @property
    def mid_logical_batch(self) -> bool:
        """Whether training stands between the physical batches of one logical batch (the DP optimizer then holds
        a partial sum that no checkpoint stores)."""
        return not self._last_end

    def state_dict(self) -> dict:
        """Where the streams stand: the pass to draw next and how many of its physical batches to skip."""
        seed = getattr(self.sampler, "seed", None)
        if self.current_pass < 0:
            return {"seed": seed, "next_pass": self.next_pass, "skip": self._skip}
        if self.consumed_logical >= len(self.sampler):  # the pass was consumed in full
            return {"seed": seed, "next_pass": self.current_pass + 1, "skip": 0}
        return {"seed": seed, "next_pass": self.current_pass, "skip": self.consumed}

    def load_state_dict(self, state: dict) -> None:
        if isinstance(self.sampler, PoissonSampler) and state.get("seed") is not None:
            self.sampler.seed = int(state["seed"])
        self.next_pass, self._skip = int(state["next_pass"]), int(state["skip"])
        self.current_pass, self.consumed, self.consumed_logical = -1, 0, 0
        self.ends.clear()


class PrivateDataLoader(DataLoader):
    """A DataLoader whose batch sampler is a :class:`LogicalBatchSampler`; resumable (Lightning saves and restores
    its ``state_dict`` with the loops' state, so a run resumed mid-epoch continues the same epoch's batches)."""

    def state_dict(self) -> dict:
        return self.batch_sampler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.batch_sampler.load_state_dict(state)


def _population(sampler) -> int:
    shard = getattr(sampler, "shard", None)
    return len(shard) if shard is not None else getattr(sampler, "num_samples", 0)


def poisson_loader(loader: DataLoader, *, seed: int, rank: int = 0, world_size: int = 1, views: int = 1,
                   max_physical: int | None = None) -> tuple[PrivateDataLoader, float]:
    """A loader over ``loader.dataset`` with Poisson sampling at rate ``q = 1 / len(loader)``.

    Keeps the collate function (and so its augmentations), workers and pinning; empty batches come out as tensors
    of batch size 0. Under DDP each rank samples its shard at the same ``q`` (global expected batch
    ``q * len(dataset)``). Returns ``(loader, q)``.
    """
    dataset = loader.dataset
    sample_rate = 1.0 / len(loader)
    sampler = PoissonSampler(len(dataset), sample_rate, steps=len(loader), seed=seed, rank=rank,
                             world_size=world_size)
    batch_sampler = LogicalBatchSampler(sampler, views=views, max_physical=max_physical)
    return _rebuild(loader, batch_sampler, empty_batches=True), sample_rate


def shuffled_loader(loader: DataLoader, *, views: int = 1, max_physical: int | None = None) -> PrivateDataLoader:
    """The non-Poisson variant (``poisson_sampling=False``): the loader's own batches, with views and
    micro-batches. Its epsilon is not a formal guarantee."""
    return _rebuild(loader, LogicalBatchSampler(loader.batch_sampler, views, max_physical), empty_batches=False)


def _rebuild(loader: DataLoader, batch_sampler: LogicalBatchSampler, empty_batches: bool) -> PrivateDataLoader:
    collate = loader.collate_fn
    if empty_batches:
        first = loader.dataset[0]
        collate = wrap_collate_with_empty(collate_fn=collate, sample_empty_shapes=[(0, *shape_safe(x)) for x in first],
                                          dtypes=[dtype_safe(x) for x in first])
    workers = loader.num_workers
    return PrivateDataLoader(loader.dataset, batch_sampler=batch_sampler, collate_fn=collate, num_workers=workers,
                             pin_memory=loader.pin_memory, timeout=loader.timeout,
                             worker_init_fn=loader.worker_init_fn,
                             multiprocessing_context=loader.multiprocessing_context if workers else None,
                             prefetch_factor=loader.prefetch_factor if workers else None,
                             persistent_workers=loader.persistent_workers if workers else False)
