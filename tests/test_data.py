"""longmoe.data: the stdlib-source corpus every LM here trains on."""

import pytest
import torch

from longmoe import data


def test_split_is_deterministic_and_disjoint():
    files = data.stdlib_files()
    held = files[:: data.HOLDOUT_EVERY]
    assert held and set(held).isdisjoint(set(files) - set(held))
    assert files == data.stdlib_files()
    train, held_bytes, info = data.stdlib_split()
    assert info["held_out_files"] == len(held) and info["train_files"] == len(files) - len(held)
    assert info["train_bytes"] == train.numel() and held_bytes.numel() >= 32768 + 1
    assert data.held_out_tokens(16)[0, :8].tolist() == list(b"# file: ")  # starts at held[0]'s header
    assert data.held_out_tokens(16).shape == (1, 17)


def test_windows_are_slices_of_the_stream():
    stream = torch.arange(1000) % 256
    w = data.windows(stream.to(torch.uint8), 31, 5, torch.Generator().manual_seed(0))
    assert w.shape == (5, 32) and w.dtype == torch.int64
    for row in w:  # consecutive bytes of the stream, modulo the 256 wrap
        assert torch.equal((row[1:] - row[:-1]) % 256, torch.ones(31, dtype=torch.int64))


@pytest.mark.parametrize("seqlen,count", [(0, 1), (4, 0), (2000, 1)])
def test_windows_bad_input(seqlen, count):
    with pytest.raises(ValueError, match="seqlen"):
        data.windows(torch.zeros(1000, dtype=torch.uint8), seqlen, count, torch.Generator())
