"""Structure changes in pure torch: optimizers that follow replaced parameters, models reshaped to saved weights."""

from litcompress.structure.optim import Carry, keep_slices, replace_parameters
from litcompress.structure.resize import match_structure_

__all__ = ["Carry", "keep_slices", "match_structure_", "replace_parameters"]
