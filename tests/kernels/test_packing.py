"""Bit packing: exact round trips, the documented LSB-first layout, and input validation."""

from __future__ import annotations

import pytest
import torch

from kernels.packing import pack_codes, packed_words, unpack_codes


@pytest.mark.parametrize("bits", list(range(1, 25)) + [31, 32])
@pytest.mark.parametrize("count", [1, 5, 31, 32, 33, 97, 1000])
def test_round_trip_is_exact(bits: int, count: int) -> None:
    gen = torch.Generator().manual_seed(bits * 1000 + count)
    codes = torch.randint(0, 2**bits, (count,), generator=gen, dtype=torch.int64)
    codes[0] = 2**bits - 1  # the all-ones code exercises the top bit and the int32 sign bit
    words = pack_codes(codes, bits)
    assert words.dtype == torch.int32
    assert words.shape == (packed_words(count, bits),)
    assert torch.equal(unpack_codes(words, bits, count), codes)


def test_layout_is_lsb_first_and_straddles_words() -> None:
    # 1, 2, 3 in 2 bits: 0b11_10_01 = 57
    assert pack_codes(torch.tensor([1, 2, 3]), 2).tolist() == [57]
    # A 5-bit code at offset 30 straddles words 0 and 1: bits 30-31 of word 0, bits 0-2 of word 1.
    codes = torch.zeros(7, dtype=torch.int64)
    codes[6] = 0b10111
    words = pack_codes(codes, 5)
    assert words.shape == (2,)
    assert (int(words[0]) & 0xFFFFFFFF) >> 30 == 0b11
    assert int(words[1]) == 0b101
    # An all-ones 32-bit code is the int32 bit pattern -1.
    assert pack_codes(torch.tensor([2**32 - 1]), 32).tolist() == [-1]


def test_last_word_is_zero_padded() -> None:
    words = pack_codes(torch.full((3,), 7), 3)  # 9 bits used of 32
    assert int(words[0]) == 0b111111111


def test_multidimensional_codes_flatten_row_major() -> None:
    codes = torch.arange(24).reshape(2, 3, 4) % 16
    words = pack_codes(codes, 4)
    assert torch.equal(unpack_codes(words, 4, 24), codes.reshape(-1))
    assert torch.equal(words, pack_codes(codes.reshape(-1).to(torch.uint8), 4))


def test_unpack_ignores_extra_words_and_reads_prefix() -> None:
    codes = torch.randint(0, 8, (50,))
    words = pack_codes(codes, 3)
    longer = torch.cat([words, torch.tensor([-1, -1], dtype=torch.int32)])
    assert torch.equal(unpack_codes(longer, 3, 50), codes)
    assert torch.equal(unpack_codes(words, 3, 20), codes[:20])


def test_empty() -> None:
    words = pack_codes(torch.zeros(0, dtype=torch.int64), 7)
    assert words.numel() == 0
    assert unpack_codes(words, 7, 0).numel() == 0


@pytest.mark.parametrize("bad", [-1, 2**6])
def test_codes_out_of_range_are_rejected(bad: int) -> None:
    with pytest.raises(ValueError, match="lie in"):
        pack_codes(torch.tensor([0, bad, 1]), 6)


@pytest.mark.parametrize("bits", [0, 33, -2])
def test_bad_widths_are_rejected(bits: int) -> None:
    with pytest.raises(ValueError):
        pack_codes(torch.tensor([0]), bits)
    with pytest.raises(ValueError):
        unpack_codes(torch.zeros(4, dtype=torch.int32), bits, 1)


def test_float_codes_are_rejected() -> None:
    with pytest.raises(ValueError):
        pack_codes(torch.tensor([1.0, 2.0]), 4)


def test_too_few_words_is_an_error() -> None:
    words = pack_codes(torch.ones(40, dtype=torch.int64), 5)  # 200 bits -> 7 words
    assert words.numel() == 7
    with pytest.raises(ValueError, match="need 7"):
        unpack_codes(words[:6], 5, 40)
