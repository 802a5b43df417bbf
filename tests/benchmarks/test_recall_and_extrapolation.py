"""The task of benchmarks/associative_recall.py and the position buckets of benchmarks/length_extrapolation.py: what
their figures are computed on."""

import torch

from benchmarks.associative_recall import recall_batch
from benchmarks.length_extrapolation import bucket_means, position_buckets


def test_recall_sequences_repeat_the_pairs_and_label_only_the_second_half_values():
    input_ids, labels = recall_batch(torch.Generator().manual_seed(0), batch=16, pairs=8, key_tokens=32, value_tokens=32)
    assert input_ids.shape == labels.shape == (16, 32)
    first, second = input_ids[:, :16].view(16, 8, 2), input_ids[:, 16:].view(16, 8, 2)
    for row in range(16):
        keys = first[row, :, 0]
        assert keys.unique().numel() == 8 and (keys < 32).all()
        assert ((first[row, :, 1] >= 32) & (first[row, :, 1] < 64)).all()
        # The second half holds the same pairs in another order.
        assert sorted(map(tuple, first[row].tolist())) == sorted(map(tuple, second[row].tolist()))
    scored = labels != -100
    assert scored[:, :17].sum() == 0 and scored[:, 17::2].all() and not scored[:, 16::2].any()
    assert torch.equal(labels[scored], input_ids[scored])


def test_position_buckets_double_past_the_training_length():
    assert position_buckets(64, 512) == [(0, 64), (64, 128), (128, 256), (256, 512)]
    assert position_buckets(64, 256) == [(0, 64), (64, 128), (128, 256)]
    # Two rows whose token at position i costs i; position 0 is never predicted (NaN).
    losses = torch.arange(256.0).repeat(2, 1)
    losses[:, 0] = float("nan")
    assert bucket_means(losses, [(0, 64), (64, 128), (128, 256)]) == [32.0, 95.5, 191.5]
