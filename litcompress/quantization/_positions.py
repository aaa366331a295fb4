"""Where the nonzeros of a pruned tensor are, in the fewest bytes measured (private: for ``compact.py``).

A compact file stores a sparse tensor as its nonzero values and their positions (in flattened order). The positions
are written in whichever of these encodings takes the fewest bytes for that tensor: :func:`sizes` computes the exact
size of every candidate and :func:`smallest` keeps the smallest (the first one listed here on a tie).

- ``"mask"``: one bit per element (the only encoding of formats 1 and 2);
- ``"gaps"``: for each nonzero, the number of zeros since the one before it (relative indices), ``width`` bits each;
- ``"runs"``: the lengths of the alternating runs of zeros and of nonzeros, zeros first (that run may be empty),
  ``width`` bits each. It wins when nonzeros come in long runs (whole rows kept, others pruned).

Gaps and runs are lengths, coded alike: a length ``L`` is ``L // top`` escape codes ``top = 2**width - 1`` ("``top``
more, and the length goes on": Deep Compression's filler entries, without a filler value), then the code
``L % top``, which ends it. Zeros after the last nonzero are not coded: the tensor's size implies them. Codes are
packed ``width`` bits each, least significant bit first; the last byte is padded with zero bits. Every code of a
tensor has the same width (no entropy coding).

Every valid stream is the only encoding of its tensor for its ``(kind, width)``: :func:`decode` rejects anything
:func:`encode` never writes (an escape at the end, padding bits set, an empty run after the first, positions past
the end), raising :class:`BadPositions` with a hint that ``compact.py`` puts in its error.

>>> nonzero = torch.zeros(64, dtype=torch.bool)
>>> nonzero[[5, 40]] = True  # 5 zeros, a nonzero, 34 zeros, a nonzero
>>> sizes(nonzero)[("mask", 1)], smallest(nonzero)  # mask: 64 bits; gaps of 4 bits: codes 5, 15, 15, 4
(8, ('gaps', 4, 2))
>>> data, codes = encode(nonzero, "gaps", 4)
>>> codes, data.tolist()
(4, [245, 79])
>>> torch.equal(decode("gaps", 4, codes, data, 64), nonzero)
True
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor

KINDS = ("mask", "gaps", "runs")  # every encoding, in the order ties are settled
MAX_WIDTH = 32  # bits of one gap or run code
_BITS = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)
_CHUNK = 1 << 16  # codes packed per step (a multiple of 8: every step starts on a byte)


class BadPositions(ValueError):
    """A positions stream that :func:`encode` never writes; the message says what is wrong with it."""


def pack_bits(bits: Tensor) -> Tensor:
    """Bits (any dtype, 0 or 1) -> bytes, bit ``i`` in bit ``i % 8`` of byte ``i // 8``; zero bits pad the end."""
    flat = bits.reshape(-1).to(torch.uint8)
    flat = torch.cat([flat, flat.new_zeros(-flat.numel() % 8)])
    return (flat.reshape(-1, 8) * _BITS).sum(1, dtype=torch.uint8)


def unpack_bits(packed: Tensor, n: int) -> Tensor:
    """The first ``n`` bits of ``packed`` (``bool``): the inverse of :func:`pack_bits`."""
    return ((packed.reshape(-1, 1) & _BITS) != 0).reshape(-1)[:n]


def nbytes(kind: str, width: int, codes: int, numel: int) -> int:
    """The bytes of a stream of ``codes`` codes (a mask: of ``numel`` bits)."""
    return -(-numel // 8) if kind == "mask" else -(-codes * width // 8)


def _runs(flat: Tensor) -> Tensor:
    """Alternating run lengths of ``flat`` (``bool``): zeros (maybe none), nonzeros, zeros, ... up to the last nonzero.

    Found from where the value changes, so a tensor with few changes costs little memory however large it is.
    """
    starts = (flat[1:] != flat[:-1]).nonzero().reshape(-1) + 1  # where each run after the first begins
    lengths = torch.diff(torch.cat([starts.new_zeros(1), starts, starts.new_full((1,), flat.numel())]))
    if flat.numel() and bool(flat[0]):
        lengths = torch.cat([lengths.new_zeros(1), lengths])  # an empty first run of zeros
    return lengths[: lengths.numel() // 2 * 2]  # zeros after the last nonzero are not coded


def _gaps(runs: Tensor) -> Tensor:
    """The number of zeros before each nonzero, since the one before it, from the runs."""
    zeros, ones = runs[0::2], runs[1::2]
    gaps = torch.zeros(int(ones.sum()), dtype=torch.long)
    gaps[torch.cumsum(ones, 0) - ones] = zeros  # the first nonzero of each run follows its run of zeros
    return gaps


def sizes(nonzero: Tensor, kinds: Iterable[str] | None = None) -> dict[tuple[str, int], int]:
    """The bytes of every candidate encoding ``(kind, width)`` of the positions of ``nonzero`` (``bool``).

    Widths past the first one that needs no escape are left out: without escapes, a wider code is only larger.
    """
    flat = nonzero.reshape(-1)
    runs = _runs(flat)
    out: dict[tuple[str, int], int] = {}
    for kind in KINDS if kinds is None else kinds:
        if kind == "mask":
            out[(kind, 1)] = nbytes(kind, 1, 0, flat.numel())
            continue
        # gaps: a run of z zeros is the gap before the first nonzero of the next run; its other nonzeros have gaps of 0
        lengths = runs[0::2] if kind == "gaps" else runs
        others = int(runs[1::2].sum()) - lengths.numel() if kind == "gaps" else 0
        widest = min(MAX_WIDTH, (int(lengths.max()) + 1).bit_length()) if lengths.numel() else 1
        for width in range(1, widest + 1):
            codes = others + lengths.numel() + int((lengths // ((1 << width) - 1)).sum())
            out[(kind, width)] = nbytes(kind, width, codes, flat.numel())
    return out


def smallest(nonzero: Tensor, kinds: Iterable[str] | None = None) -> tuple[str, int, int]:
    """The encoding of the positions of ``nonzero`` with the fewest bytes: ``(kind, width, bytes)``."""
    (kind, width), size = min(sizes(nonzero, kinds).items(), key=lambda item: item[1])
    return kind, width, size


def _pack(codes: Tensor, width: int) -> Tensor:
    shifts = torch.arange(width)
    parts = [pack_bits((chunk.unsqueeze(1) >> shifts) & 1) for chunk in codes.split(_CHUNK)]  # (C, width) bits
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.uint8)


def _unpack(data: Tensor, width: int, count: int) -> Tensor:
    weights = 1 << torch.arange(width)
    parts = []
    for start in range(0, count, _CHUNK):
        size = min(_CHUNK, count - start)
        first = start * width // 8
        bits = unpack_bits(data[first:first - (-size * width // 8)], size * width)
        parts.append((bits.reshape(size, width).long() * weights).sum(1))
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)


def encode(nonzero: Tensor, kind: str, width: int) -> tuple[Tensor, int]:
    """The positions of ``nonzero`` (``bool``) as ``kind`` codes of ``width`` bits: ``(bytes, number of codes)``.

    A mask has one code per element (``width`` is 1).
    """
    flat = nonzero.reshape(-1)
    if kind == "mask":
        return pack_bits(flat), flat.numel()
    runs = _runs(flat)
    lengths = _gaps(runs) if kind == "gaps" else runs
    top = (1 << width) - 1
    escapes = lengths // top
    ends = torch.cumsum(escapes + 1, 0) - 1  # where each length's last code goes
    codes = torch.full((int(ends[-1]) + 1 if ends.numel() else 0,), top, dtype=torch.long)
    codes[ends] = lengths - escapes * top
    return _pack(codes, width), codes.numel()


def decode(kind: str, width: int, codes: int, data: Tensor, numel: int) -> Tensor:
    """The ``bool`` tensor of ``numel`` elements whose positions ``data`` encodes (the inverse of :func:`encode`).

    ``data`` must already be ``uint8`` of :func:`nbytes` bytes.

    Raises:
        BadPositions: ``data`` is no stream :func:`encode` writes for a tensor of ``numel`` elements.
    """
    bits = numel if kind == "mask" else codes * width
    if bits % 8 and int(data[-1]) >> bits % 8:
        last = "element" if kind == "mask" else "code"
        raise BadPositions(f"has {kind} bits set in the padding after its last {last}")
    if kind == "mask":
        return unpack_bits(data, numel)
    values = _unpack(data, width, codes)
    top = (1 << width) - 1
    if codes and int(values[-1]) == top:
        raise BadPositions(f"has {kind} whose last code is an escape ({top}): a length that never ends")
    ends = values < top
    which = torch.cumsum(ends, 0) - ends.long()  # the length each code adds to
    lengths = torch.zeros(int(ends.sum()), dtype=torch.long).index_add_(0, which, values)
    total = int(lengths.sum()) + (lengths.numel() if kind == "gaps" else 0)
    if total > numel:
        raise BadPositions(f"has {kind} that cover {total} elements, past its {numel}")
    mask = torch.zeros(numel, dtype=torch.bool)
    if kind == "gaps":
        mask[torch.cumsum(lengths + 1, 0) - 1] = True
        return mask
    if lengths.numel() % 2:
        raise BadPositions(f"has an odd number of runs ({lengths.numel()}): the last one is not a run of nonzeros")
    if lengths.numel() and not bool((lengths[1:] > 0).all()):
        raise BadPositions("has an empty run after the first one (two runs of zeros or nonzeros that are one)")
    kept = torch.tensor([False, True]).repeat(lengths.numel() // 2)
    mask[:total] = kept.repeat_interleave(lengths)
    return mask
