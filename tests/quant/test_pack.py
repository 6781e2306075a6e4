import pytest
import torch

from speedq_core.errors import SchemeError
from speedq_core.quant import pack_bits, packed_nbytes, unpack_bits


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("numel", [0, 1, 5, 7, 8, 9, 31, 257])
def test_round_trip_every_width_and_length(bits, numel):
    gen = torch.Generator().manual_seed(numel * 10 + bits)
    q = torch.randint(0, 2**bits, (numel,), generator=gen, dtype=torch.uint8)
    packed = pack_bits(q, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == packed_nbytes(numel, bits) == -(-numel * bits // 8)
    assert torch.equal(unpack_bits(packed, bits, numel), q)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_all_values_survive(bits):
    q = torch.arange(2**bits, dtype=torch.uint8).repeat(3)[:-1].reshape(-1)
    assert torch.equal(unpack_bits(pack_bits(q.view(1, -1), bits), bits, q.numel()), q)


def test_layouts():
    # 2-bit: 4 per byte, first code in the lowest bits; 4-bit: low nibble first
    assert pack_bits(torch.tensor([1, 2, 3, 0, 3], dtype=torch.uint8), 2).tolist() == [0b00111001, 0b11]
    assert pack_bits(torch.tensor([0xA, 0x5, 0xF], dtype=torch.uint8), 4).tolist() == [0x5A, 0x0F]
    # 3-bit: 8 codes in 3 bytes, a dense little-endian bitstream
    codes = torch.tensor([1, 2, 3, 4, 5, 6, 7, 0], dtype=torch.uint8)
    stream = sum(int(c) << (3 * i) for i, c in enumerate(codes))
    assert pack_bits(codes, 3).tolist() == list(stream.to_bytes(3, "little"))
    assert torch.equal(pack_bits(codes, 8), codes)


def test_rejects_codes_out_of_range_and_bad_streams():
    with pytest.raises(SchemeError, match="does not fit in 2 bits"):
        pack_bits(torch.tensor([4], dtype=torch.uint8), 2)
    with pytest.raises(SchemeError, match="uint8"):
        pack_bits(torch.tensor([1]), 2)
    with pytest.raises(SchemeError, match="expected 2 uint8 bytes"):
        unpack_bits(torch.zeros(3, dtype=torch.uint8), 2, 5)
