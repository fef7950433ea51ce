"""Bit packing in the GPTQ int32 layout, for 2, 3, 4 and 8 bits.

Every run of 32 values along the packed dimension is one little-endian bit stream of 32*bits bits
stored in `bits` int32 words: value j occupies bits [j*bits, (j+1)*bits) of the stream. For 2/4/8
bits this is "32/bits values per word, the first in the low bits"; for 3 bits it is GPTQ's layout
where values 10 and 21 straddle word boundaries (32 values in three words).

qweight packs along K (rows of the [K, N] transposed weight): [K_pad*bits/32, N].
qzeros  packs along N (columns of [n_groups, N]):              [n_groups, N_pad*bits/32].
K_pad / N_pad round up to a multiple of 32 with zero values; the true size is kept by the caller.
"""
from __future__ import annotations

import torch

PACK = 32  # values per packed run


def padded(n: int) -> int:
    return -(-n // PACK) * PACK


def _to_int32(words: torch.Tensor) -> torch.Tensor:
    """int64 holding uint32 bit patterns -> int32 with the same bits."""
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def pack_rows(q: torch.Tensor, bits: int) -> torch.Tensor:
    """q [R, C] ints in [0, 2**bits) -> int32 [R_pad*bits/32, C], packed along rows."""
    r, c = q.shape
    rp = padded(r)
    q = q.to(torch.int64)
    if rp != r:
        q = torch.cat([q, q.new_zeros(rp - r, c)], dim=0)
    q = q.view(rp // PACK, PACK, c)  # [runs, 32, C]
    words = q.new_zeros(rp // PACK, bits, c)
    mask = 2**bits - 1
    for j in range(PACK):
        v = q[:, j] & mask
        off = j * bits
        w, s = divmod(off, 32)
        words[:, w] |= (v << s) & 0xFFFFFFFF
        if s + bits > 32:  # straddles into the next word (3-bit layout)
            words[:, w + 1] |= v >> (32 - s)
    return _to_int32(words.view(rp // PACK * bits, c))


def unpack_rows(packed: torch.Tensor, bits: int, rows: int) -> torch.Tensor:
    """int32 [R_pad*bits/32, C] -> int32 [rows, C] values in [0, 2**bits)."""
    nw, c = packed.shape
    runs = nw // bits
    if 32 % bits == 0:  # no value straddles two words: one vectorised shift
        per = 32 // bits
        shifts = torch.arange(0, 32, bits, device=packed.device, dtype=torch.int32).view(1, per, 1)
        vals = (packed.view(nw, 1, c) >> shifts) & (2**bits - 1)  # arithmetic shift, then mask
        return vals.reshape(nw * per, c)[:rows]
    words = (packed.to(torch.int64) & 0xFFFFFFFF).view(runs, bits, c)
    out = torch.empty(runs, PACK, c, dtype=torch.int64, device=packed.device)
    mask = 2**bits - 1
    for j in range(PACK):
        off = j * bits
        w, s = divmod(off, 32)
        v = words[:, w] >> s
        if s + bits > 32:
            v = v | (words[:, w + 1] << (32 - s))
        out[:, j] = v & mask
    return out.view(runs * PACK, c)[:rows].to(torch.int32)


def pack_cols(q: torch.Tensor, bits: int) -> torch.Tensor:
    """q [R, C] -> int32 [R, C_pad*bits/32], packed along columns (qzeros)."""
    return pack_rows(q.t(), bits).t().contiguous()


def unpack_cols(packed: torch.Tensor, bits: int, cols: int) -> torch.Tensor:
    """int32 [R, C_pad*bits/32] -> int32 [R, cols]."""
    return unpack_rows(packed.t(), bits, cols).t().contiguous()
