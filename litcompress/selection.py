"""Which tensors a technique touches: chosen by layer kind and name pattern, written once for every callback.

Names are the canonical fully qualified parameter names of ``model.named_parameters()``. A tensor shared by
several modules (tied embeddings) is one tensor: listed once, under its canonical name, with its other owners in
:attr:`ParameterRef.aliases`; a pattern matching any of its names selects or excludes it in every owner.

Layers are recognised by what their weight does, not only by class: Hugging Face's
``transformers.pytorch_utils.Conv1D`` (GPT-2's projections, weight stored ``(in_features, out_features)``) is a
layer kind like ``nn.Linear`` (:class:`~litcompress.layers.HFConv1D`), found without importing transformers.

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
from dataclasses import dataclass, field, replace

from torch import nn

from litcompress._validation import fail
from litcompress.layers import HFConv1D

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
PRUNABLE_KINDS: tuple[type[nn.Module], ...] = (nn.Linear, HFConv1D, *_CONV, nn.RNNBase, nn.MultiheadAttention)
"""Layer kinds whose weight matrices are selected by default."""

ParameterFilter = Callable[[nn.Module, str], bool]


@dataclass(frozen=True)
class ParameterRef:
    """One selected tensor: where it lives and along which dimension its inputs are summed.

    Attributes:
        name: canonical fully qualified name, as in ``model.named_parameters()`` (an alias: its own qualified name).
        module_name: fully qualified name of the module that owns it.
        attr: attribute name on that module (``"weight"``, ``"weight_hh_l0"``, ``"in_proj_weight"``).
        input_dim: the dimension a matrix product reduces over (``1`` for Linear/Conv, ``0`` for ConvTranspose and
            Hugging Face's ``Conv1D``).
        module: the owning module.
        aliases: the other modules holding the same tensor (tied weights), as references of their own: one
            tensor, pruned and quantized once, consistently in every owner.
    """

    name: str
    module_name: str
    attr: str
    input_dim: int
    module: nn.Module = field(compare=False, repr=False)
    aliases: tuple[ParameterRef, ...] = field(default=(), compare=False, repr=False)

    @property
    def tensor(self) -> nn.Parameter:
        """The live parameter (looked up each time, so a module's own re-registration is followed)."""
        return getattr(self.module, self.attr)

    @property
    def output_dim(self) -> int:
        """The dimension of the output channels (per-channel scales lie along it): the other of the first two."""
        return 1 - self.input_dim if self.input_dim in (0, 1) else 0

    @property
    def owners(self) -> tuple[ParameterRef, ...]:
        """This reference and its aliases: every (module, attribute) the tensor lives in."""
        return (self, *self.aliases)


def weight_attributes(module: nn.Module) -> list[tuple[str, int]]:
    """The weight matrices of a known layer kind, as ``(attribute, input_dim)`` pairs; ``[]`` for others.

    >>> weight_attributes(nn.LSTM(4, 8, num_layers=2))
    [('weight_ih_l0', 1), ('weight_hh_l0', 1), ('weight_ih_l1', 1), ('weight_hh_l1', 1)]
    """
    if isinstance(module, (nn.Linear, nn.Embedding, *_CONV)):
        return [("weight", 1)]
    if isinstance(module, (HFConv1D, *_CONV_T)):
        return [("weight", 0)]
    if isinstance(module, nn.RNNBase):
        return [(n, 1) for n, _ in module.named_parameters(recurse=False) if n.startswith("weight")]
    if isinstance(module, nn.MultiheadAttention):
        if module.in_proj_weight is not None:
            return [("in_proj_weight", 1)]
        return [("q_proj_weight", 1), ("k_proj_weight", 1), ("v_proj_weight", 1)]
    return []


def _linear_like(module: nn.Module) -> bool:
    """Whether ``module`` presents a Linear's interface (``in_features``/``out_features``, or ``nx``/``nf`` as
    transformers' Conv1D) with a weight matrix of its own: a layer a technique would be expected to touch."""
    weight = dict(module.named_parameters(recurse=False)).get("weight")
    if weight is None or weight.dim() < 2:
        return False
    return any(isinstance(getattr(module, a, None), int) and isinstance(getattr(module, b, None), int)
               for a, b in (("in_features", "out_features"), ("nx", "nf")))


def check_patterns(name: str, value: str | Sequence[str]) -> list[str]:
    """Check that ``value`` (argument ``name``) is one regex or a sequence of them; return them as a list.

    >>> check_patterns("exclude", ["head", "<last>"])
    ['head', '<last>']
    >>> check_patterns("exclude", "(")
    Traceback (most recent call last):
    ...
    ValueError: Expected argument `exclude` to be valid regular expressions, but got '('. HINT: missing ), ...
    """
    if not isinstance(value, (str, list, tuple)):
        fail(name, "a regex string or a list of them", value, exc=TypeError)
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


def _matches(pattern: str, ref: ParameterRef) -> bool:
    """Whether ``pattern`` matches any name of the tensor: canonical, or qualified in one of its owners."""
    own = f"{ref.module_name}.{ref.attr}" if ref.module_name else ref.attr
    return any(re.search(pattern, name) for name in (own, *(owner.name for owner in ref.owners)))


def select_parameters(
    model: nn.Module,
    parameters: str | Sequence[str] | ParameterFilter | None = None,
    exclude: str | Sequence[str] = (),
    kinds: tuple[type[nn.Module], ...] = PRUNABLE_KINDS,
) -> list[ParameterRef]:
    """Select tensors of ``model`` by layer kind, name pattern and exclusion.

    A tensor shared by several modules (tied weights) is selected once, under its canonical name, through the
    first owner that qualifies; its other owners are its :attr:`~ParameterRef.aliases`. A pattern that matches
    any of its names (``"lm_head"`` for GPT-2's tied embedding) selects or excludes it in every owner.

    Args:
        model: the model to search.
        parameters: ``None`` selects the weight matrices of ``kinds``. One regex or a list of regexes
            (``re.search`` on parameter names) selects any parameter of 2 or more dimensions whose
            name matches. A callable ``fn(module, name) -> bool`` is asked about each such parameter.
        exclude: regexes of names to leave out; ``"<first>"`` and ``"<last>"`` leave out the first and the
            last selected layer, so ``exclude=["<first>", "<last>"]`` keeps both ends of a network intact (a tied
            tensor is a layer at the place of each of its owners of a selected kind).
        kinds: layer kinds searched when ``parameters`` is ``None``.

    Raises:
        ValueError: a pattern matches nothing (the message lists the candidates), nothing is selected, or (with
            ``parameters=None``) a layer with a Linear's interface is of none of ``kinds``, so it would silently
            be left out (the message names it; select it by pattern or ``exclude`` it).

    >>> model = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 10))
    >>> model[1].weight = model[0].weight  # tied: one tensor, selected once through the Linear
    >>> [(ref.name, ref.module_name, [a.module_name for a in ref.aliases]) for ref in select_parameters(model)]
    [('0.weight', '1', ['0'])]
    """
    if not isinstance(model, nn.Module):
        fail("model", "a torch.nn.Module", type(model).__name__, exc=TypeError)
    canonical = {id(p): n for n, p in model.named_parameters()}
    position: dict[str, int] = {}
    owners: list[tuple[int, ParameterRef, bool]] = []  # (tensor id, owner, of a kind searched) in module order
    groups: dict[int, list[ParameterRef]] = {}  # tensor id -> every owner of it
    unhandled: list[str] = []
    for index, (module_name, module) in enumerate(model.named_modules()):
        position[module_name] = index
        known = dict(weight_attributes(module))
        of_kind = isinstance(module, kinds)
        if parameters is None and not of_kind and _linear_like(module):
            unhandled.append(f"{module_name}.weight" if module_name else "weight")
        for attr, tensor in module.named_parameters(recurse=False):
            if tensor.dim() >= 2:
                full = f"{module_name}.{attr}" if module_name else attr
                ref = ParameterRef(full, module_name, attr, known.get(attr, 1), module)
                owners.append((id(tensor), ref, of_kind and attr in known))
                groups.setdefault(id(tensor), []).append(ref)
    primary: dict[int, ParameterRef] = {}
    selectable: set[str] = set()  # the layers a selected tensor counts as (for `<first>` / `<last>`)
    for tensor_id, ref, qualifies in owners:
        if qualifies or parameters is not None:
            selectable.add(ref.module_name)
            primary.setdefault(tensor_id, ref)
    candidates = [
        replace(ref, name=canonical[tensor_id], aliases=tuple(o for o in groups[tensor_id] if o is not ref))
        for tensor_id, ref, _ in owners if primary.get(tensor_id) is ref
    ]

    if parameters is not None:
        names = [ref.name for ref in candidates]
        if callable(parameters) and not isinstance(parameters, str):
            candidates = [ref for ref in candidates if parameters(ref.module, ref.name)]
        else:
            keep: set[str] = set()
            for pattern in check_patterns("parameters", parameters):
                hits = {ref.name for ref in candidates if _matches(pattern, ref)}
                if not hits:
                    _unmatched("parameters", pattern, names)
                keep |= hits
            candidates = [ref for ref in candidates if ref.name in keep]

    exclude_items = check_patterns("exclude", exclude)
    if candidates and exclude_items:
        names = [ref.name for ref in candidates]
        layers = sorted({(position[o.module_name], o.module_name) for ref in candidates for o in ref.owners
                         if o.module_name in selectable})
        drop: set[str] = set()
        for pattern in exclude_items:
            if pattern in (FIRST, LAST):
                owner = layers[0 if pattern == FIRST else -1][1]
                hits = {ref.name for ref in candidates if any(o.module_name == owner for o in ref.owners)}
            else:
                hits = {ref.name for ref in candidates if _matches(pattern, ref)}
            if not hits and not any(re.search(pattern, n) for n in unhandled):  # `<first>` always hits
                _unmatched("exclude", pattern, names + unhandled)
            drop |= hits
        candidates = [ref for ref in candidates if ref.name not in drop]

    kinds_text = ", ".join(k.__name__ for k in kinds)
    left_out = [n for n in unhandled if not any(re.search(p, n) for p in exclude_items if p not in (FIRST, LAST))]
    if left_out:
        fail("model", f"a model whose layers with a Linear's interface are of the kinds {kinds_text}",
             ", ".join(f"{n} ({type(model.get_submodule(n.rpartition('.')[0])).__name__})" for n in left_out),
             hint="these would silently stay untouched: select them with `parameters` patterns (inputs are then "
                  "taken along dimension 1, as for nn.Linear), or list them in `exclude` to leave them as they are")
    if not candidates:
        fail(
            "model",
            f"a model with at least one selectable weight ({kinds_text} by default)",
            type(model).__name__,
            hint="pass `parameters` patterns naming the tensors to use, or loosen `exclude`",
        )
    return candidates
