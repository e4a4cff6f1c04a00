"""The resumable endless shuffle."""
import itertools

import pytest

from afan_harness.sampler import ResumableSampler


def _take(sampler, n):
    return list(itertools.islice(iter(sampler), n))


def test_each_epoch_is_a_permutation_and_epochs_differ():
    stream = _take(ResumableSampler(10, seed=3), 30)
    epochs = [stream[i:i + 10] for i in (0, 10, 20)]
    assert all(sorted(e) == list(range(10)) for e in epochs)
    assert epochs[0] != epochs[1] != epochs[2]
    assert _take(ResumableSampler(10, seed=3), 30) == stream
    assert _take(ResumableSampler(10, seed=4), 30) != stream


@pytest.mark.parametrize("start", [0, 4, 10, 17, 33])
def test_starting_later_continues_the_same_stream(start):
    whole = _take(ResumableSampler(10, seed=1), 60)
    assert _take(ResumableSampler(10, seed=1, start=start), 60 - start) == whole[start:]


def test_no_shuffle_and_bad_arguments():
    assert _take(ResumableSampler(3, seed=0, shuffle=False, start=2), 4) == [2, 0, 1, 2]
    with pytest.raises(ValueError, match="at least one sample"):
        ResumableSampler(0, seed=0)
    with pytest.raises(ValueError, match="start must be >= 0"):
        ResumableSampler(3, seed=0, start=-1)


def test_processes_share_every_global_batch():
    whole = _take(ResumableSampler(10, seed=2, start=4), 24)
    parts = [_take(ResumableSampler(10, seed=2, start=4, rank=r, world_size=3, local_batch=2), 8) for r in range(3)]
    for g in range(4):  # global batches of 6: process r holds samples 2r, 2r + 1 of each
        assert sum((p[2 * g:2 * g + 2] for p in parts), []) == whole[6 * g:6 * g + 6]
    with pytest.raises(ValueError, match="rank=2, world_size=2"):
        ResumableSampler(10, seed=0, rank=2, world_size=2)
