"""Low-rank factorization in pure torch: layers replaced by two thinner ones from a truncated SVD."""

from litcompress.factorization.lowrank import (
    Factorized,
    LowRankResult,
    choose_rank,
    factorizable,
    factorize_,
    rank_limit,
)

__all__ = ["Factorized", "LowRankResult", "choose_rank", "factorizable", "factorize_", "rank_limit"]
