"""The encodings of the positions of a sparse tensor (`litcompress/quantization/_positions.py`): every kind and width
gives the tensor back exactly, the smallest one is chosen (against the real length of every encoding), and the
decoder accepts only what the encoder writes."""

from __future__ import annotations

import random

import pytest
import torch

from litcompress.quantization._positions import (
    KINDS,
    MAX_WIDTH,
    BadPositions,
    decode,
    encode,
    nbytes,
    sizes,
    smallest,
)


def _at(n: int, *where: int) -> torch.Tensor:
    mask = torch.zeros(n, dtype=torch.bool)
    mask[list(where)] = True
    return mask


def _random(n: int, density: float, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, generator=torch.Generator().manual_seed(seed)) < density


def _rows(rows: int, cols: int, kept: list[int]) -> torch.Tensor:
    mask = torch.zeros(rows, cols, dtype=torch.bool)
    mask[kept] = True
    return mask


EDGES = {
    "all zeros": torch.zeros(17, dtype=torch.bool),
    "all nonzero": torch.ones(17, dtype=torch.bool),
    "one nonzero, at the last position": _at(1000, 999),
    "one nonzero, at the first position": _at(1000, 0),
    "gaps longer than a small width codes": _at(300, 0, 150, 299),  # 149 zeros: escapes up to width 7
    "one element, zero": torch.zeros(1, dtype=torch.bool),
    "one element, nonzero": torch.ones(1, dtype=torch.bool),
    "no elements": torch.zeros(0, dtype=torch.bool),
    "8% random": _random(1001, 0.08),
    "50% random": _random(1001, 0.5, seed=1),
    "95% random": _random(1001, 0.95, seed=2),
    "whole rows": _rows(12, 40, [0, 1, 5, 11]),
    "2-d, 26% random": _random(1000, 0.26, seed=3).reshape(10, 100),
}


def _every_encoding(mask: torch.Tensor) -> dict[tuple[str, int], int]:
    """The real byte length of every encoding, every width included."""
    return {(kind, width): len(encode(mask, kind, width)[0])
            for kind in KINDS for width in ([1] if kind == "mask" else range(1, MAX_WIDTH + 1))}


@pytest.mark.parametrize("case", list(EDGES))
@pytest.mark.parametrize("kind", KINDS)
def test_every_width_round_trips_exactly(case, kind):
    mask = EDGES[case]
    n = mask.numel()
    for width in [1] if kind == "mask" else range(1, MAX_WIDTH + 1):
        data, codes = encode(mask, kind, width)
        assert data.dtype == torch.uint8 and len(data) == nbytes(kind, width, codes, n), (width, codes)
        assert torch.equal(decode(kind, width, codes, data, n), mask.reshape(-1)), width


def test_long_gaps_are_cut_by_escapes():
    mask = EDGES["gaps longer than a small width codes"]  # 0 zeros, 149 zeros, 148 zeros
    for width, codes in [(1, 3 + 149 + 148), (3, 3 + 21 + 21), (7, 3 + 1 + 1), (8, 3)]:
        data, n = encode(mask, "gaps", width)
        assert n == codes, width
        assert torch.equal(decode("gaps", width, n, data, 300), mask)
    data, n = encode(mask, "gaps", 3)  # codes 0, then 7 x 21 and 2 (149 = 21 * 7 + 2), then 7 x 21 and 1
    unpacked = [(int.from_bytes(data.numpy().tobytes(), "little") >> 3 * i) & 7 for i in range(n)]
    assert unpacked == [0, *[7] * 21, 2, *[7] * 21, 1]


def test_runs_code_alternating_lengths():
    mask = _rows(3, 4, [1])  # 4 zeros, 4 nonzeros (trailing zeros are not coded)
    data, codes = encode(mask, "runs", 4)
    assert codes == 2 and data.tolist() == [4 | 4 << 4]
    data, codes = encode(_at(5, 0, 1, 3), "runs", 2)  # 0 zeros, 2 nonzeros, 1 zero, 1 nonzero
    assert codes == 4 and data.tolist() == [0 | 2 << 2 | 1 << 4 | 1 << 6]


@pytest.mark.parametrize("case", list(EDGES))
def test_the_smallest_encoding_is_chosen(case):
    mask = EDGES[case]
    real = _every_encoding(mask)
    kind, width, size = smallest(mask)
    assert size == real[(kind, width)] == min(real.values()), (kind, width, size, min(real.values()))
    assert all(real[key] == value for key, value in sizes(mask).items())  # the computed sizes are the real ones


@pytest.mark.parametrize(("mask", "kind"), [
    (_random(20_000, 0.5), "mask"),  # half the elements: one bit each is the least
    (_random(20_000, 0.08), "gaps"),  # few, scattered: gaps of a few bits
    (_random(20_000, 0.001), "gaps"),  # very few: wide gaps
    (_rows(100, 200, list(range(0, 100, 3))), "runs"),  # whole rows: two lengths per kept row
    (torch.zeros(20_000, dtype=torch.bool), "gaps"),  # nothing to code: 0 bytes
])
def test_each_encoding_wins_where_it_should(mask, kind):
    real = _every_encoding(mask)
    chosen = smallest(mask)
    assert chosen[0] == kind and chosen[2] == min(real.values()), (chosen, sorted(real.items(), key=lambda i: i[1])[:3])


def test_dense_random_masks_take_close_to_their_information_content():
    """At Han et al.'s 8% kept, gaps take about 5.4 bits per nonzero; the bound, log2 C(n, k), is 5.0."""
    mask = _random(235_200, 0.08)
    k, n = int(mask.sum()), mask.numel()
    bound = (torch.lgamma(torch.tensor(n + 1.0)) - torch.lgamma(torch.tensor(k + 1.0))
             - torch.lgamma(torch.tensor(n - k + 1.0))) / torch.log(torch.tensor(2.0)) / 8
    kind, width, size = smallest(mask)
    assert (kind, width) == ("gaps", 5) and size < 1.1 * float(bound) and size < n / 8 / 2, (size, float(bound))


# ------------------------------------------------------------------------------------------------ damaged streams
@pytest.mark.parametrize(("kind", "width", "codes", "data", "n", "match"), [
    ("mask", 1, 0, [0b1000_0001], 7, "has mask bits set in the padding after its last element"),
    ("gaps", 4, 1, [0x32], 10, "has gaps bits set in the padding after its last code"),
    ("gaps", 4, 2, [0xF2], 40, r"has gaps whose last code is an escape \(15\)"),
    ("gaps", 2, 2, [0b00_11], 3, "has gaps that cover 4 elements, past its 3"),  # an escape (3), then 0: 3 zeros
    ("gaps", 8, 1, [9], 9, "has gaps that cover 10 elements, past its 9"),
    ("runs", 4, 3, [0x21, 0x03], 40, r"has an odd number of runs \(3\)"),
    ("runs", 4, 4, [0x21, 0x30], 40, "has an empty run after the first one"),
    ("runs", 8, 2, [30, 20], 40, "has runs that cover 50 elements, past its 40"),
])
def test_streams_the_encoder_never_writes_are_rejected(kind, width, codes, data, n, match):
    with pytest.raises(BadPositions, match=match):
        decode(kind, width, codes, torch.tensor(data, dtype=torch.uint8), n)


def test_only_canonical_streams_decode():
    """Random streams and single flipped bits: a stream is either rejected or exactly what `encode` writes for the
    tensor it decodes to (so a file holds one encoding of a tensor per kind and width, and damage that still decodes
    changes the tensor, which the values' count, range and zeros then check)."""
    rng = random.Random(0)
    outcomes = {"rejected": 0, "accepted": 0}
    for i in range(3000):
        kind = rng.choice(KINDS)
        width = 1 if kind == "mask" else rng.randint(1, 9)
        n = rng.randint(0, 40)
        if i % 2:  # a valid stream with one bit flipped
            data, codes = encode(_random(n, rng.random(), seed=i), kind, width)
            if not len(data):
                continue
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        else:  # random bytes
            codes = n if kind == "mask" else rng.randint(0, 12)
            data = torch.tensor([rng.randrange(256) for _ in range(nbytes(kind, width, codes, n))], dtype=torch.uint8)
        try:
            mask = decode(kind, width, codes, data, n)
        except BadPositions:
            outcomes["rejected"] += 1
            continue
        outcomes["accepted"] += 1
        again, again_codes = encode(mask, kind, width)
        assert mask.shape == (n,) and again_codes == codes and torch.equal(again, data), (kind, width, codes, data)
    assert min(outcomes.values()) > 300, outcomes
