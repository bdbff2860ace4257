"""Bit-packing of integer codes into int32 word streams: the on-disk form of indices and codes, and
the layout the kernels read them in.

Layout (the same as VPTQ's ``utils/pack.py``, spec §11.4): the codes are flattened row-major and
code ``i`` occupies bits ``[i*bits, (i+1)*bits)`` of the stream, least significant bit first. Word
``w`` of the stream holds stream bits ``[32*w, 32*w + 32)``, its bit 0 being stream bit ``32*w``.
A code may straddle two words; the last word is zero-padded. Words are stored as int32 (the
bit pattern, so values >= 2**31 read back negative) because safetensors and GPU kernels both
handle int32 natively, while uint32 support in torch is partial.

Both directions are vectorized: the stream is cut into blocks of lcm(bits, 32) bits, which share
one pattern of offsets, and each of the <= 32 code positions of a block is handled for all
blocks at once (no Python loop per code).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

WORD_BITS = 32
_WORD_MASK = (1 << WORD_BITS) - 1


def _check_bits(bits: int) -> None:
    if not isinstance(bits, int) or isinstance(bits, bool) or not 1 <= bits <= WORD_BITS:
        raise ValueError(f"code width must be an integer in [1, {WORD_BITS}] bits, got {bits!r}")


def packed_words(count: int, bits: int) -> int:
    """Number of int32 words that ``count`` codes of ``bits`` bits occupy (last word padded)."""
    _check_bits(bits)
    if count < 0:
        raise ValueError(f"code count must be non-negative, got {count}")
    return -(-count * bits // WORD_BITS)


def _block(bits: int) -> tuple[int, int]:
    """(codes, words) of the smallest whole block: lcm(bits, 32) bits hold both exactly."""
    span = bits * WORD_BITS // math.gcd(bits, WORD_BITS)
    return span // bits, span // WORD_BITS


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack non-negative integer codes, each ``bits`` wide, into an int32 word stream.

    Args:
        codes: any shape, any integer dtype; flattened row-major. Every value must lie in
            ``[0, 2**bits)``.
        bits: width of one code, 1..32.

    Returns:
        [packed_words(codes.numel(), bits)] int32 on the device of ``codes``.
    """
    _check_bits(bits)
    if codes.is_floating_point() or codes.is_complex() or codes.dtype == torch.bool:
        raise ValueError(f"codes must be an integer tensor, got dtype {codes.dtype}")
    flat = codes.reshape(-1).to(torch.int64)
    n = flat.numel()
    n_words = packed_words(n, bits)
    if n == 0:
        return torch.zeros(0, dtype=torch.int32, device=codes.device)
    lo, hi = int(flat.min()), int(flat.max())
    if lo < 0 or hi >= 1 << bits:
        raise ValueError(f"codes must lie in [0, 2**{bits}) to be packed in {bits} bits; got values in [{lo}, {hi}]")
    # Every block of per_block codes fills exactly per_words words with the same bit pattern of
    # offsets, so one vectorized step per position in the block (<= 32 steps) packs all blocks.
    per_block, per_words = _block(bits)
    n_blocks = -(-n // per_block)
    x = F.pad(flat, (0, n_blocks * per_block - n)).view(n_blocks, per_block).T  # [per_block, n_blocks]
    out = torch.zeros(per_words, n_blocks, dtype=torch.int64, device=codes.device)
    for j in range(per_block):
        word, shift = divmod(j * bits, WORD_BITS)
        # code < 2**32 and shift <= 31, so the shifted value stays below 2**63: no int64 overflow.
        shifted = x[j] << shift
        out[word] |= shifted & _WORD_MASK
        if shift + bits > WORD_BITS:  # straddles into the next word, still inside the block
            out[word + 1] |= shifted >> WORD_BITS
    words = out.T.reshape(-1)[:n_words]
    # Reinterpret [0, 2**32) as the int32 bit pattern (two's complement).
    words = torch.where(words >= 1 << (WORD_BITS - 1), words - (1 << WORD_BITS), words)
    return words.to(torch.int32)


def unpack_codes(words: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """Inverse of ``pack_codes``: the first ``count`` codes of a word stream.

    Args:
        words: [n_words] int32 (any shape is flattened) as written by ``pack_codes``.
        bits: width of one code, 1..32.
        count: number of codes to read.

    Returns:
        [count] int64 on the device of ``words``, values in ``[0, 2**bits)``.

    Raises:
        ValueError: the stream holds fewer than ``packed_words(count, bits)`` words.
    """
    needed = packed_words(count, bits)
    if words.dtype != torch.int32:
        raise ValueError(f"packed words must be int32, got dtype {words.dtype}")
    flat = words.reshape(-1)
    if flat.numel() < needed:
        raise ValueError(
            f"packed stream too short: {count} codes of {bits} bits need {needed} int32 words, got {flat.numel()}"
        )
    if count == 0:
        return torch.zeros(0, dtype=torch.int64, device=words.device)
    per_block, per_words = _block(bits)
    n_blocks = -(-count // per_block)
    unsigned = flat[:needed].to(torch.int64) & _WORD_MASK  # the words' bits as non-negative values
    # [per_words, n_blocks]
    u = F.pad(unsigned, (0, n_blocks * per_words - needed)).view(n_blocks, per_words).T
    out = torch.empty(per_block, n_blocks, dtype=torch.int64, device=words.device)
    mask = (1 << bits) - 1
    for j in range(per_block):
        word, shift = divmod(j * bits, WORD_BITS)
        value = u[word] >> shift
        if shift + bits > WORD_BITS:
            # u < 2**32 shifted by <= 31 stays below 2**63: no overflow.
            value = value | (u[word + 1] << (WORD_BITS - shift))
        out[j] = value & mask
    return out.T.reshape(-1)[:count]
