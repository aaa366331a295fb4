"""Which tensors a technique touches: chosen by layer kind and name pattern, written once for every callback.

Names are the canonical fully qualified parameter names of ``model.named_parameters()``. A tensor shared by
two modules (tied embeddings) is listed once, under its canonical name.

>>> from torch import nn
>>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.Linear(8, 2))
>>> [ref.name for ref in select_parameters(model)]
['0.weight', '2.weight', '3.weight']
>>> [ref.name for ref in select_parameters(model, exclude=["<first>", "<last>"])]
['2.weight']
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from torch import nn

from litcompress._validation import fail

__all__ = [
    "FIRST",
    "LAST",
    "PRUNABLE_KINDS",
    "ParameterRef",
    "check_patterns",
    "select_parameters",
    "weight_attributes",
]

FIRST = "<first>"
"""Token for ``exclude``: the first selected layer (in module registration order)."""
LAST = "<last>"
"""Token for ``exclude``: the last selected layer (in module registration order)."""

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONV_T = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
PRUNABLE_KINDS: tuple[type[nn.Module], ...] = (nn.Linear, *_CONV, nn.RNNBase, nn.MultiheadAttention)
"""Layer kinds whose weight matrices are selected by default."""

ParameterFilter = Callable[[nn.Module, str], bool]


@dataclass(frozen=True)
class ParameterRef:
    """One selected tensor: where it lives and along which dimension its inputs are summed.

    Attributes:
        name: canonical fully qualified name, as in ``model.named_parameters()``.
        module_name: fully qualified name of the module that owns it.
        attr: attribute name on that module (``"weight"``, ``"weight_hh_l0"``, ``"in_proj_weight"``).
        input_dim: the dimension a matrix product reduces over (``1`` for Linear/Conv, ``0`` for ConvTranspose).
        module: the owning module.
    """

    name: str
    module_name: str
    attr: str
    input_dim: int
    module: nn.Module = field(compare=False, repr=False)

    @property
    def tensor(self) -> nn.Parameter:
        """The live parameter (looked up each time, so a module's own re-registration is followed)."""
        return getattr(self.module, self.attr)


def weight_attributes(module: nn.Module) -> list[tuple[str, int]]:
    """The weight matrices of a known layer kind, as ``(attribute, input_dim)`` pairs; ``[]`` for others.

    >>> weight_attributes(nn.LSTM(4, 8, num_layers=2))
    [('weight_ih_l0', 1), ('weight_hh_l0', 1), ('weight_ih_l1', 1), ('weight_hh_l1', 1)]
    """
    if isinstance(module, (nn.Linear, nn.Embedding, *_CONV)):
        return [("weight", 1)]
    if isinstance(module, _CONV_T):
        return [("weight", 0)]
    if isinstance(module, nn.RNNBase):
        return [(n, 1) for n, _ in module.named_parameters(recurse=False) if n.startswith("weight")]
    if isinstance(module, nn.MultiheadAttention):
        if module.in_proj_weight is not None:
            return [("in_proj_weight", 1)]
        return [("q_proj_weight", 1), ("k_proj_weight", 1), ("v_proj_weight", 1)]
    return []


def check_patterns(name: str, value: str | Sequence[str]) -> list[str]:
    """Check that ``value`` (argument ``name``) is one regex or a sequence of them; return them as a list.

    >>> check_patterns("exclude", ["head", "<last>"])
    ['head', '<last>']
    >>> check_patterns("exclude", "(")
    Traceback (most recent call last):
    ...
    ValueError: Expected argument `exclude` to be valid regular expressions, but got '('. HINT: missing ), ...
    """
    items = [value] if isinstance(value, str) else list(value)
    for item in items:
        if not isinstance(item, str):
            fail(name, "a regex string or a sequence of them", value, exc=TypeError)
        if item in (FIRST, LAST):
            continue
        try:
            re.compile(item)
        except re.error as err:
            fail(name, "valid regular expressions", item, hint=f"{err}")
    return items


def _unmatched(name: str, pattern: str, names: Sequence[str]) -> None:
    shown = ", ".join(names[:12]) + (", ..." if len(names) > 12 else "")
    fail(name, "patterns that each match at least one parameter name", pattern, hint=f"the candidates are: {shown}")


def select_parameters(
    model: nn.Module,
    parameters: str | Sequence[str] | ParameterFilter | None = None,
    exclude: str | Sequence[str] = (),
    kinds: tuple[type[nn.Module], ...] = PRUNABLE_KINDS,
) -> list[ParameterRef]:
    """Select tensors of ``model`` by layer kind, name pattern and exclusion.

    Args:
        model: the model to search.
        parameters: ``None`` selects the weight matrices of ``kinds``. One regex or a list of regexes
            (``re.search`` on canonical parameter names) selects any parameter of 2 or more dimensions whose
            name matches. A callable ``fn(module, name) -> bool`` is asked about each such parameter.
        exclude: regexes of names to leave out; ``"<first>"`` and ``"<last>"`` leave out the first and the
            last selected layer, so ``exclude=["<first>", "<last>"]`` keeps both ends of a network intact.
        kinds: layer kinds searched when ``parameters`` is ``None``.

    Raises:
        ValueError: a pattern matches nothing (the message lists the candidates), or nothing is selected.
    """
    if not isinstance(model, nn.Module):
        fail("model", "a torch.nn.Module", type(model).__name__, exc=TypeError)
    canonical = {id(p): n for n, p in model.named_parameters()}
    candidates: list[ParameterRef] = []
    seen: set[int] = set()
    for module_name, module in model.named_modules():
        known = dict(weight_attributes(module))
        for attr, tensor in module.named_parameters(recurse=False):
            if id(tensor) in seen or tensor.dim() < 2:
                continue
            if parameters is None and not (isinstance(module, kinds) and attr in known):
                continue
            seen.add(id(tensor))
            dim = known.get(attr, 1)
            candidates.append(ParameterRef(canonical[id(tensor)], module_name, attr, dim, module))

    if parameters is not None:
        names = [ref.name for ref in candidates]
        if callable(parameters) and not isinstance(parameters, str):
            candidates = [ref for ref in candidates if parameters(ref.module, ref.name)]
        else:
            keep: set[str] = set()
            for pattern in check_patterns("parameters", parameters):
                hits = {n for n in names if re.search(pattern, n)}
                if not hits:
                    _unmatched("parameters", pattern, names)
                keep |= hits
            candidates = [ref for ref in candidates if ref.name in keep]

    exclude_items = check_patterns("exclude", exclude)
    if candidates and exclude_items:
        names = [ref.name for ref in candidates]
        drop: set[str] = set()
        for pattern in exclude_items:
            if pattern in (FIRST, LAST):
                owner = candidates[0 if pattern == FIRST else -1].module_name
                hits = {ref.name for ref in candidates if ref.module_name == owner}
            else:
                hits = {n for n in names if re.search(pattern, n)}
            if not hits:
                _unmatched("exclude", pattern, names)
            drop |= hits
        candidates = [ref for ref in candidates if ref.name not in drop]

    if not candidates:
        kinds_text = ", ".join(k.__name__ for k in kinds)
        fail(
            "model",
            f"a model with at least one selectable weight ({kinds_text} by default)",
            type(model).__name__,
            hint="pass `parameters` patterns naming the tensors to use, or loosen `exclude`",
        )
    return candidates
