"""Initialise a shallower student from its teacher's weights (DistilBERT's recipe), in pure torch.

Sanh et al. (DistilBERT) keep the teacher's widths, drop every other layer, and start the student from the teacher:
student layer ``i`` is teacher layer ``2i``, and everything else (embeddings, norms, heads) is copied as it is.
:func:`init_from_teacher` does that for any pair of models whose layers sit in an ``nn.ModuleList`` of the same name
(Hugging Face's ``bert.encoder.layer``, ``transformer.h``, ``model.layers``, ...).

>>> import torch
>>> from torch import nn
>>> class Net(nn.Module):
...     def __init__(self, depth):
...         super().__init__()
...         self.embed, self.layers = nn.Embedding(10, 4), nn.ModuleList(nn.Linear(4, 4) for _ in range(depth))
>>> teacher, student = Net(4), Net(2)
>>> copied = init_from_teacher(student, teacher)
>>> copied["layers.1.weight"], torch.equal(student.layers[1].weight, teacher.layers[2].weight)
('layers.2.weight', True)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from litcompress._validation import fail

__all__ = ["init_from_teacher"]


def init_from_teacher(student: nn.Module, teacher: nn.Module,
                      layer_map: Mapping[int, int] | Sequence[int] | None = None) -> dict[str, str]:
    """Copy ``teacher``'s weights into a ``student`` with fewer layers of the same widths.

    Each ``nn.ModuleList`` the two models share by name but not by length is a stack of layers: student layer
    ``i`` copies teacher layer ``layer_map[i]``, by default ``i * (teacher layers // student layers)`` (layer
    ``2i`` for half the depth, as DistilBERT). Every other parameter and buffer is copied from the teacher's of the
    same name. Nothing is copied unless every pair has one shape: a student of other widths is refused.

    Args:
        student: the model to initialise (in place).
        teacher: the trained model it copies.
        layer_map: the teacher layer of each student layer, as a list (``[0, 2, 4]``) or a mapping
            (``{0: 0, 1: 2}``; student layers left out keep their weights); ``None`` takes every
            ``teacher // student``-th layer.

    Returns:
        ``{student name: teacher name}`` of every tensor copied (student tensors without a teacher counterpart are
        left as they are and not listed).

    Example:
        >>> tiny = nn.Sequential(nn.Linear(2, 2))
        >>> sorted(init_from_teacher(tiny, nn.Sequential(nn.Linear(2, 2))))
        ['0.bias', '0.weight']
    """
    for name, model in (("student", student), ("teacher", teacher)):
        if not isinstance(model, nn.Module):
            fail(name, "a torch.nn.Module", type(model).__name__, exc=TypeError)
    if student is teacher:
        fail("student", "a model other than the teacher", "the teacher itself")
    t_modules = dict(teacher.named_modules())
    stacks = {name: _layer_map(name, len(module), len(t_modules[name]), layer_map)
              for name, module in student.named_modules()
              if isinstance(module, nn.ModuleList) and isinstance(t_modules.get(name), nn.ModuleList)
              and len(module) != len(t_modules[name])}
    if layer_map is not None and not stacks:
        fail("layer_map", "None when no layer list of the student is shorter than the teacher's", layer_map,
              hint="the student has the teacher's depth: every layer is copied from its namesake")
    s_state, t_state = student.state_dict(keep_vars=True), teacher.state_dict(keep_vars=True)
    pairs = {key: source for key in s_state if (source := _teacher_key(key, stacks)) is not None and source in t_state}
    mismatched = [f"{key} {tuple(s_state[key].shape)} vs {source} {tuple(t_state[source].shape)}"
                  for key, source in pairs.items() if s_state[key].shape != t_state[source].shape]
    if mismatched:
        fail("student", "a model with the teacher's widths (every tensor shaped as the teacher's it copies)",
              "; ".join(mismatched[:4]) + (f" and {len(mismatched) - 4} more" if len(mismatched) > 4 else ""),
              hint="DistilBERT's recipe keeps the widths and drops layers; distil narrower students without it")
    with torch.no_grad():
        for key, source in pairs.items():
            s_state[key].copy_(t_state[source])
    return pairs


def _layer_map(name: str, n_student: int, n_teacher: int,
               layer_map: Mapping[int, int] | Sequence[int] | None) -> dict[int, int]:
    if layer_map is None:
        if n_student > n_teacher:
            fail("student", f"a model with at most the teacher's {n_teacher} layers in `{name}`", n_student,
                  hint="pass `layer_map` to say which teacher layer each student layer copies")
        return {i: i * (n_teacher // n_student) for i in range(n_student)}
    if isinstance(layer_map, Mapping):
        pairs = dict(layer_map)
    elif isinstance(layer_map, Sequence) and not isinstance(layer_map, str):
        pairs = dict(enumerate(layer_map))
    else:
        fail("layer_map", "a list or a mapping of layer indices, or None", layer_map, exc=TypeError)
    valid = all(isinstance(s, int) and isinstance(t, int) and not isinstance(s, bool) and not isinstance(t, bool)
                and 0 <= s < n_student and 0 <= t < n_teacher for s, t in pairs.items())
    if not valid:
        fail("layer_map", f"student layer indices in [0, {n_student}) mapped to teacher layer indices in "
                          f"[0, {n_teacher}) of `{name}`", layer_map)
    return pairs


def _teacher_key(key: str, stacks: Mapping[str, Mapping[int, int]]) -> str | None:
    """The teacher's name of a student tensor: renumbered inside a layer stack; ``None`` for an unmapped layer."""
    for name, pairs in stacks.items():
        if key.startswith(name + "."):
            index, _, rest = key[len(name) + 1:].partition(".")
            return f"{name}.{pairs[int(index)]}.{rest}" if int(index) in pairs else None
    return key
