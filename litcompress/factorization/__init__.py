"""Low-rank factorization in pure torch: layers replaced by two thinner ones from a truncated SVD."""

from litcompress.factorization.lowrank import (
    Factorized,
    LowRankResult,
    check_rank,
    check_rank_options,
    choose_rank,
    factorizable,
    factorize_,
    may_factorize,
    rank_limit,
    tied_to,
)

__all__ = ["Factorized", "LowRankResult", "check_rank", "check_rank_options", "choose_rank", "factorizable",
           "factorize_", "may_factorize", "rank_limit", "tied_to"]
