import pytest
import torch

from llmsqueeze.quant.pack import pack_cols, pack_rows, unpack_cols, unpack_rows


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("shape", [(32, 16), (100, 7), (1, 1), (65, 33), (576, 48)])
def test_round_trip_rows_and_cols(bits, shape):
    g = torch.Generator().manual_seed(bits)
    q = torch.randint(0, 2**bits, shape, generator=g, dtype=torch.int32)
    p = pack_rows(q, bits)
    assert p.dtype == torch.int32
    assert p.shape == (-(-shape[0] // 32) * bits, shape[1])
    assert torch.equal(unpack_rows(p, bits, shape[0]), q)
    pc = pack_cols(q, bits)
    assert pc.shape == (shape[0], -(-shape[1] // 32) * bits)
    assert torch.equal(unpack_cols(pc, bits, shape[1]), q)


def _reference_pack(values, bits):
    """An independent packer: one Python int as a little-endian bit stream, cut into 32-bit words
    (the GPTQ layout, 3-bit values 10 and 21 straddling words)."""
    stream = 0
    for j, v in enumerate(values):
        stream |= int(v) << (j * bits)
    words = [(stream >> (32 * i)) & 0xFFFFFFFF for i in range(bits)]
    return [w - 2**32 if w >= 2**31 else w for w in words]


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_layout_matches_reference_bitstream(bits):
    g = torch.Generator().manual_seed(10 + bits)
    q = torch.randint(0, 2**bits, (64, 3), generator=g, dtype=torch.int32)
    p = pack_rows(q, bits)
    for col in range(3):
        for run in range(2):
            expected = _reference_pack(q[run * 32 : (run + 1) * 32, col].tolist(), bits)
            assert p[run * bits : (run + 1) * bits, col].tolist() == expected


def test_four_bit_is_eight_nibbles_low_first():
    q = torch.arange(32, dtype=torch.int32).remainder(16).view(32, 1)
    p = pack_rows(q, 4)
    assert p[0, 0].item() == 0x76543210
    assert (p[1, 0].item() & 0xFFFFFFFF) == 0xFEDCBA98
    assert p[2, 0].item() == 0x76543210


def test_three_bit_straddling_values():
    q = torch.zeros(32, 1, dtype=torch.int32)
    q[10, 0] = 7  # bits 30..32: two bits in word 0, one in word 1
    q[21, 0] = 5  # bits 63..65: one bit in word 1, two in word 2
    p = pack_rows(q, 3)
    w = [x & 0xFFFFFFFF for x in p[:, 0].tolist()]
    assert w[0] == 0b11 << 30 and w[1] == (1 | (1 << 31)) and w[2] == 0b10
    assert torch.equal(unpack_rows(p, 3, 32), q)
