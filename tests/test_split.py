"""The per-rank split: a pure function, so whole clusters are simulated in one process."""

from __future__ import annotations

import itertools
from collections import Counter

import pytest

from pipeline.split import shuffle_key, shuffled_positions, split_train, split_val

SHARD_SIZES = [37, 41, 0, 12, 40, 39, 5]  # uneven, with an empty shard and a tiny one
WORLD_SIZES = [1, 2, 3, 4, 7]


def samples_of(part) -> list[tuple[int, int]]:
    """(shard, sample) of each sample the rank reads, in its order (its picks, if it has any)."""
    samples = [(p.shard, i) for p in part.pieces for i in range(p.start, p.stop)]
    return samples if part.picks is None else [samples[k] for k in part.picks]


@pytest.mark.parametrize("world_size", WORLD_SIZES)
@pytest.mark.parametrize("batch_size", [1, 4, 8])
def test_train_epoch_reads_each_sample_at_most_once_with_equal_steps(world_size, batch_size):
    total = sum(SHARD_SIZES)
    dropped_sets = []
    for epoch in range(3):
        parts = [split_train(SHARD_SIZES, r, world_size, batch_size, epoch, seed=5) for r in range(world_size)]
        assert len({part.samples for part in parts}) == 1, "every rank takes the same number of steps"
        assert parts[0].samples % batch_size == 0
        read = Counter(s for part in parts for s in samples_of(part))
        assert max(read.values()) == 1
        assert all(0 <= i < SHARD_SIZES[shard] for shard, i in read)
        dropped = total - len(read)
        assert 0 <= dropped < world_size * batch_size
        all_samples = {(s, i) for s, n in enumerate(SHARD_SIZES) for i in range(n)}
        dropped_sets.append(frozenset(all_samples - set(read)))
    if world_size * batch_size > 1 and total % (world_size * batch_size):
        assert len(set(dropped_sets)) > 1, "the dropped samples change from epoch to epoch"


@pytest.mark.parametrize("world_size", [*WORLD_SIZES, 8])
@pytest.mark.parametrize("repeats", [2, 3, 4])
def test_repeated_augmentation_deals_each_sample_to_repeats_ranks(world_size, repeats):
    """As many samples per rank as without repeats; 1/repeats as many distinct ones, each read
    `repeats` times (the last one of the block maybe fewer), by as many ranks when there are enough;
    another block every epoch."""
    batch_size = 4
    blocks = []
    for epoch in range(3):
        plain = split_train(SHARD_SIZES, 0, world_size, batch_size, epoch, seed=5)
        parts = [split_train(SHARD_SIZES, r, world_size, batch_size, epoch, 5, repeats) for r in range(world_size)]
        assert {part.samples for part in parts} == {plain.samples}, "same steps as without repeats"
        lists = [samples_of(part) for part in parts]
        read = Counter(s for samples in lists for s in samples)
        assert read.total() == plain.samples * world_size
        assert len(read) == -(-read.total() // repeats)
        counts = sorted(read.values())
        assert counts[1:] == [repeats] * (len(read) - 1) and 1 <= counts[0] <= repeats
        if world_size >= repeats:  # the copies of a sample go to different ranks
            assert all(len(set(samples)) == len(samples) for samples in lists)
        if world_size % repeats == 0:  # ... and, in groups of `repeats` ranks, at the same position
            for rank in range(world_size):
                assert lists[rank] == lists[rank - rank % repeats]
        blocks.append(frozenset(read))
    assert len(set(blocks)) == 3


@pytest.mark.parametrize(("world_size", "repeats"), [(1, 2), (1, 4), (2, 4), (2, 3), (3, 2), (4, 2)])
def test_a_ranks_copies_of_a_sample_stay_side_by_side_in_its_shuffled_order(world_size, repeats):
    """With fewer ranks than repeats a rank reads some samples more than once: its shuffle moves
    their copies as one (each sample in one run, as RASampler leaves them in a batch), and when the
    world size divides `repeats` every rank reads the same samples in the same order. With enough
    ranks the runs are single samples: a plain shuffle."""
    batch_size = 4
    for epoch in range(2):
        parts = [split_train(SHARD_SIZES, r, world_size, batch_size, epoch, 5, repeats) for r in range(world_size)]
        orders = []
        for rank, part in enumerate(parts):
            samples = samples_of(part)
            order = [samples[i] for i in shuffled_positions(part, 5, epoch, shuffle_key(rank, repeats))]
            assert sorted(order) == sorted(samples) and order != samples, "a shuffle of the rank's part"
            runs = [(sample, len(list(copies))) for sample, copies in itertools.groupby(order)]
            assert len(runs) == len(set(order)), "each sample's copies side by side"
            if repeats % world_size == 0:
                assert {length for _, length in runs[:-1]} <= {repeats // world_size}
            elif world_size >= repeats:
                assert {length for _, length in runs} == {1}
            orders.append(order)
        if repeats % world_size == 0:
            assert all(order == orders[0] for order in orders)


def test_repeats_below_one_is_an_error():
    with pytest.raises(ValueError, match="repeats must be at least 1, got 0"):
        split_train(SHARD_SIZES, 0, 1, 4, 0, 0, repeats=0)


def test_train_order_changes_per_epoch_and_is_reproducible():
    first = split_train(SHARD_SIZES, 1, 3, 4, epoch=0, seed=1)
    assert first == split_train(SHARD_SIZES, 1, 3, 4, epoch=0, seed=1)
    assert samples_of(first) != samples_of(split_train(SHARD_SIZES, 1, 3, 4, epoch=1, seed=1))
    assert samples_of(first) != samples_of(split_train(SHARD_SIZES, 1, 3, 4, epoch=0, seed=2))


def test_train_too_small_for_one_batch_per_rank_is_an_error():
    with pytest.raises(ValueError, match="cannot fill one batch"):
        split_train([3, 2], 0, 4, 2, 0, 0)


@pytest.mark.parametrize("world_size", WORLD_SIZES + [11, 200])
@pytest.mark.parametrize("batch_size", [1, 4, 16])
def test_val_covers_every_sample_exactly_once(world_size, batch_size):
    parts = [split_val(SHARD_SIZES, r, world_size, batch_size) for r in range(world_size)]
    assert len({part.samples for part in parts}) == 1
    assert parts[0].samples % batch_size == 0
    real = Counter()
    for part in parts:
        real.update(samples_of(part)[: part.real_samples])
    assert sorted(real) == sorted((s, i) for s, n in enumerate(SHARD_SIZES) for i in range(n))
    assert set(real.values()) == {1}


def test_val_keeps_sorted_order_within_a_rank():
    part = split_val(SHARD_SIZES, 0, 1, 7)
    real = samples_of(part)[: part.real_samples]
    assert real == sorted(real)


def test_bad_rank_is_an_error():
    with pytest.raises(ValueError, match="rank 3"):
        split_val(SHARD_SIZES, 3, 3, 1)
