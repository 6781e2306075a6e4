"""Bit packing of integer codes into a dense little-endian bitstream.

Code ``i`` occupies bits ``[i*b, (i+1)*b)`` of the stream, least significant bit first, and byte ``k``
holds stream bits ``[8k, 8k+8)``. Hence 2-bit: 4 codes per byte, 4-bit: 2 per byte (low nibble
first), 8-bit: 1 per byte, 3-bit: 8 codes in 3 bytes. The stream is ``ceil(numel * b / 8)`` bytes;
unused tail bits are zero.
"""
from __future__ import annotations

import torch

from speedq_core.errors import SchemeError

_CODES_PER_WORD = 8  # 8 codes of b bits make exactly b bytes, for every b


def packed_nbytes(numel: int, bits: int) -> int:
    """Bytes that :func:`pack_bits` returns for ``numel`` codes of ``bits`` bits."""
    return (numel * bits + 7) // 8


def pack_bits(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Flatten uint8 codes in ``[0, 2^b - 1]`` into a uint8 bitstream of ``ceil(numel * b / 8)`` bytes."""
    if q.dtype != torch.uint8:
        raise SchemeError(f"pack_bits needs uint8 codes, got {q.dtype}: quantize first")
    flat = q.reshape(-1)
    if flat.numel() and int(flat.max()) >= 1 << bits:
        raise SchemeError(f"code {int(flat.max())} does not fit in {bits} bits: quantize with bits={bits}")
    numel = flat.numel()
    pad = -numel % _CODES_PER_WORD
    words = torch.nn.functional.pad(flat, (0, pad)).view(-1, _CODES_PER_WORD).long()
    shifts = torch.arange(_CODES_PER_WORD, device=q.device) * bits
    word = (words << shifts).sum(dim=1)  # disjoint bit ranges: sum == bitwise or
    byte_shifts = torch.arange(bits, device=q.device) * 8
    stream = ((word.unsqueeze(1) >> byte_shifts) & 0xFF).to(torch.uint8).reshape(-1)
    return stream[: packed_nbytes(numel, bits)].contiguous()


def unpack_bits(packed: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: a flat uint8 tensor of ``numel`` codes."""
    expected = packed_nbytes(numel, bits)
    if packed.dtype != torch.uint8 or packed.numel() != expected:
        raise SchemeError(
            f"packed stream has {packed.numel()} {packed.dtype} values, expected {expected} uint8 bytes for "
            f"{numel} codes of {bits} bits: pass the numel and bits it was packed with"
        )
    n_words = -(-numel // _CODES_PER_WORD)
    stream = torch.nn.functional.pad(packed.reshape(-1), (0, n_words * bits - expected))
    byte_shifts = torch.arange(bits, device=packed.device) * 8
    word = (stream.view(n_words, bits).long() << byte_shifts).sum(dim=1)
    shifts = torch.arange(_CODES_PER_WORD, device=packed.device) * bits
    codes = (word.unsqueeze(1) >> shifts) & ((1 << bits) - 1)
    return codes.to(torch.uint8).reshape(-1)[:numel]
