"""Which samples each rank reads in an epoch: the replacement for DistributedSampler.

Pure functions of (shard sizes, rank, world size, batch size, epoch, seed), so every rank computes
its own part without talking to the others, and tests can check coverage for any world size in
one process. A rank's part is a list of `Piece`s: contiguous sample ranges inside shards, which
the readers turn into index files (DALI) or offset lists (PyTorch), so a rank reads only its part.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Piece:
    shard: int  # position of the shard in the manifest's list for the split
    start: int  # first sample inside that shard
    stop: int  # one past the last sample

    def __len__(self) -> int:
        return self.stop - self.start


@dataclass(frozen=True)
class RankPart:
    pieces: list[Piece]  # read in this order
    real_samples: int  # the first `real_samples` are real; the rest are padding (val only)
    # With repeated augmentation: the positions in the pieces' samples that this rank reads, in
    # order (a sample may come twice); None: all of them, once each.
    picks: tuple[int, ...] | None = None

    @property
    def samples(self) -> int:
        return len(self.picks) if self.picks is not None else sum(len(p) for p in self.pieces)


@dataclass(frozen=True)
class EarlierSplit:
    """How an interrupted run split the epoch it stopped in: enough to tell which samples it read,
    so a run resumed with another split reads the rest of that epoch (`PartLoader.set_epoch`)."""

    world_size: int
    batch_size: int  # per rank, per loader batch
    batches_read: int  # by each rank, in the epoch it stopped in
    seed: int
    repeats: int = 1


def split_train(
    shard_sizes: list[int], rank: int, world_size: int, batch_size: int, epoch: int, seed: int, repeats: int = 1
) -> RankPart:
    """This rank's training samples for `epoch`.

    The shards are put in a seeded random order for the epoch and the concatenated sequence is
    rotated by a seeded offset; each rank then takes an equal contiguous block, a whole number of
    batches long. Fewer than world_size * batch_size samples are dropped, and which ones changes
    with the epoch. Every rank gets the same number of samples, so the same number of steps.

    With `repeats` > 1 (repeated augmentation, as torchvision's RASampler and timm's `aug_repeats`),
    the ranks take as many samples as without, but only 1/repeats as many distinct ones: a block
    from the same rotated sequence, each sample of it repeated `repeats` times in a row and the
    copies dealt to the ranks in turn. So the copies of a sample go to consecutive ranks (to one
    rank more than once when there are fewer ranks than repeats), each to be cropped and augmented
    its own way; when `repeats` divides the world size, ranks r and r' with r // repeats ==
    r' // repeats read the same samples. The next epochs' blocks start elsewhere.
    """
    _check_rank(rank, world_size, batch_size)
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    total = sum(shard_sizes)
    per_rank = total // (world_size * batch_size) * batch_size
    if per_rank == 0:
        raise ValueError(
            f"{total} training samples cannot fill one batch of {batch_size} on each of {world_size} ranks"
        )
    rng = random.Random(f"{seed}-{epoch}")
    order = list(range(len(shard_sizes)))
    rng.shuffle(order)
    offset = rng.randrange(total)
    sequence = [(s, 0, shard_sizes[s]) for s in order if shard_sizes[s] > 0]
    if repeats > 1:
        distinct = -(-per_rank * world_size // repeats)
        picks = tuple((rank + step * world_size) // repeats for step in range(per_rank))
        return RankPart(_take(sequence, total, offset, distinct), per_rank, picks)
    pieces = _take(sequence, total, offset + rank * per_rank, per_rank)
    rng_rank = random.Random(f"{seed}-{epoch}-{rank}")
    rng_rank.shuffle(pieces)  # read this rank's pieces in a different order every epoch
    return RankPart(pieces, per_rank)


def split_val(shard_sizes: list[int], rank: int, world_size: int, batch_size: int) -> RankPart:
    """This rank's evaluation samples: every sample exactly once across ranks, in order.

    Ranks get contiguous blocks of ceil(N / world_size) samples (the last ones fewer), padded with
    repeats of real samples up to a common multiple of the batch size; the padding is reported in
    `real_samples` so metrics can leave it out. Works with more ranks than shards or samples.
    """
    _check_rank(rank, world_size, batch_size)
    total = sum(shard_sizes)
    if total == 0:
        raise ValueError("the validation split has no samples")
    block = -(-total // world_size)
    slots = -(-block // batch_size) * batch_size
    start = min(rank * block, total)
    real = min(block, total - start)
    sequence = [(s, 0, n) for s, n in enumerate(shard_sizes) if n > 0]
    pieces = _take(sequence, total, start, real) if real else []
    pieces += _take(sequence, total, start + real, slots - real)  # padding: the samples that follow, wrapping
    return RankPart(pieces, real)


def rank_part(
    shard_sizes: list[int],
    train: bool,
    rank: int,
    world_size: int,
    batch_size: int,
    epoch: int,
    seed: int,
    repeats: int = 1,
) -> RankPart:
    """The rank's part of `epoch`: `split_train`'s, or `split_val`'s (the same in every epoch)."""
    if train:
        return split_train(shard_sizes, rank, world_size, batch_size, epoch, seed, repeats)
    return split_val(shard_sizes, rank, world_size, batch_size)


def shuffle_key(rank: int, repeats: int = 1) -> int:
    """What seeds a rank's reading order of its train samples besides seed and epoch: the rank, or
    with repeated augmentation its group of `repeats` ranks, so that ranks given the same samples
    read them in the same order (the copies of a sample in the same step, as with RASampler)."""
    return rank // repeats


def shuffled_positions(part: RankPart, seed: int, epoch: int, shuffle_key: int) -> np.ndarray:
    """A random order of the positions of a rank's train part, seeded by (seed, epoch, shuffle_key).

    Each run of copies of one sample in the part's picks (repeated augmentation on fewer ranks than
    repeats) moves as one, so the copies stay side by side and land in one batch, as torchvision's
    RASampler leaves them; with no such runs this is a plain permutation of the positions.
    """
    rng = np.random.default_rng([seed, epoch, shuffle_key])
    if part.picks is None:
        return rng.permutation(part.samples)
    picks = np.asarray(part.picks, dtype=np.int64)
    run_starts = np.flatnonzero(np.diff(picks, prepend=-1))  # picks never decrease: a new sample
    run_lengths = np.diff(np.append(run_starts, len(picks)))
    order = rng.permutation(len(run_starts))
    lengths = run_lengths[order]
    offsets_in_run = np.arange(len(picks)) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    return np.repeat(run_starts[order], lengths) + offsets_in_run


def _take(sequence: list[tuple[int, int, int]], total: int, start: int, count: int) -> list[Piece]:
    """`count` samples of the concatenated `sequence`, from position `start`, wrapping around."""
    pieces: list[Piece] = []
    position = start % total
    while count > 0:
        consumed = 0
        for shard, first, stop in sequence:
            length = stop - first
            if position >= consumed + length:
                consumed += length
                continue
            begin = first + max(0, position - consumed)
            end = min(stop, begin + count)
            pieces.append(Piece(shard, begin, end))
            count -= end - begin
            position = consumed + (end - first)
            consumed += length
            if count == 0:
                break
        position = 0  # wrapped
    return _merge(pieces)


def _merge(pieces: list[Piece]) -> list[Piece]:
    merged: list[Piece] = []
    for piece in pieces:
        if merged and merged[-1].shard == piece.shard and merged[-1].stop == piece.start:
            merged[-1] = Piece(piece.shard, merged[-1].start, piece.stop)
        else:
            merged.append(piece)
    return merged


def _check_rank(rank: int, world_size: int, batch_size: int) -> None:
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in 0..{world_size - 1}")
    if batch_size < 1:
        raise ValueError(f"batch size must be at least 1, got {batch_size}")
