"""Feature distillation in pure torch: capture intermediate outputs, adapt widths, compare.

>>> import torch
>>> from torch import nn
>>> student, teacher = nn.Sequential(nn.Linear(4, 8)), nn.Sequential(nn.Linear(4, 16))
>>> adapter = make_adapter(output_width(student[0]), output_width(teacher[0]))
>>> with capture(student, ["0"]) as s, capture(teacher, ["0"]) as t:
...     _ = student(torch.randn(2, 4)), teacher(torch.randn(2, 4))
>>> feature_loss(adapter(s["0"]), t["0"], "mse").shape
torch.Size([])
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from litcompress._calls import first_tensor
from litcompress._validation import fail, fail_state

__all__ = [
    "CHANNELS_FIRST",
    "adapter_key",
    "attention_map",
    "capture",
    "channel_dim",
    "feature_loss",
    "feature_pairs",
    "feature_terms",
    "make_adapter",
    "make_adapters",
    "output_width",
]

CHANNELS_FIRST: tuple[type[nn.Module], ...] = (
    nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d,
)
"""Layer kinds whose outputs carry their features in dimension 1 (``(B, C, ...)``); others in the last one."""


def channel_dim(module: nn.Module) -> int:
    """The dimension of ``module``'s output that holds its features."""
    return 1 if isinstance(module, CHANNELS_FIRST) else -1


def adapter_key(name: str) -> str:
    """A layer name as a ``ModuleDict`` key (which cannot contain dots)."""
    return name.replace(".", "__")


def feature_pairs(
    features: Mapping[str, str] | None, student: nn.Module, teacher: nn.Module | None
) -> dict[str, str]:
    """Check ``{"student.layer": "teacher.layer"}`` (the prefixes are optional) against both models' layer names.

    Args:
        features: student layer names mapped to teacher layer names, each optionally prefixed ``"student."`` /
            ``"teacher."``; ``None`` for no feature distillation (returns ``{}``).
        student: the student; every key must name one of its submodules.
        teacher: the teacher; every value must name one of its submodules (not checked when ``None``).

    >>> feature_pairs({"student.0": "teacher.1"}, nn.Sequential(nn.Linear(2, 2)), nn.Sequential(nn.ReLU(), nn.ReLU()))
    {'0': '1'}
    """
    if features is None:
        return {}
    if not isinstance(features, Mapping) or not all(isinstance(k, str) and isinstance(v, str)
                                                      for k, v in features.items()):
        fail("features", "a mapping from student layer names to teacher layer names", features, exc=TypeError)
    pairs = {k.removeprefix("student."): v.removeprefix("teacher.") for k, v in features.items()}
    sides: tuple[tuple[str, nn.Module | None, Iterable[str]], ...] = (
        ("student", student, pairs), ("teacher", teacher, pairs.values()))
    for side, model, names in sides:
        if model is None:
            continue
        valid = dict(model.named_modules())
        for name in names:
            if name not in valid:
                listed = ", ".join(n for n in valid if n)[:600]
                fail("features", f"names of {side} layers", name, hint=f"the {side}'s layers are: {listed}")
    return pairs


def make_adapters(pairs: Mapping[str, str], student: nn.Module, teacher: nn.Module) -> nn.ModuleDict:
    """One :func:`make_adapter` per pair, keyed by :func:`adapter_key` of the student layer.

    Args:
        pairs: student layer names mapped to teacher layer names, as :func:`feature_pairs` returns them.
        student: the student, whose layers give each adapter's input width and layout (channels first for convs).
        teacher: the teacher, whose layers give each adapter's output width.
    """
    s_modules, t_modules = dict(student.named_modules()), dict(teacher.named_modules())
    return nn.ModuleDict({
        adapter_key(s): make_adapter(output_width(s_modules[s]), output_width(t_modules[t]),
                                     channels_first=isinstance(s_modules[s], CHANNELS_FIRST))
        for s, t in pairs.items()
    })


def _output_tensor(output: object) -> Tensor:
    tensor = first_tensor(output)  # LSTM (output, state), attention (output, weights), HF blocks (hidden, ...)
    if tensor is None:
        fail_state(f"A captured feature module returned a {type(output).__name__}, which holds no tensor",
                   "litcompress.distillation.capture", "capture modules that return a tensor (or a tuple / mapping "
                   "holding one), e.g. a submodule of this one", exc=TypeError)
    return tensor


@contextlib.contextmanager
def capture(model: nn.Module, names: Sequence[str]) -> Iterator[dict[str, Tensor]]:
    """Record the outputs of the named submodules during the forwards run inside the block."""
    if not names:  # nothing to record: no module walk on the training hot path
        yield {}
        return
    modules = dict(model.named_modules())
    missing = [n for n in names if n not in modules]
    if missing:
        valid = ", ".join(n for n in modules if n)[:800]
        fail("features", "names of existing layers", missing, hint=f"valid names are: {valid}")
    found: dict[str, Tensor] = {}
    handles = [
        modules[n].register_forward_hook(lambda _m, _i, out, n=n: found.__setitem__(n, _output_tensor(out)))
        for n in names
    ]
    try:
        yield found
    finally:
        for handle in handles:
            handle.remove()


def feature_terms(pairs: Mapping[str, str], student_features: Mapping[str, Tensor],
                  teacher_features: Mapping[str, Tensor], student: nn.Module, adapters: nn.ModuleDict,
                  kind: str) -> Tensor:
    """Sum over the ``pairs`` of :func:`feature_loss` between the adapted student features (through
    ``adapters[adapter_key(name)]``, except for ``"attention"``) and the detached teacher features.

    Args:
        pairs: student layer names mapped to teacher layer names, as :func:`feature_pairs` returns them.
        student_features: the student's captured outputs by student layer name (:func:`capture`).
        teacher_features: the teacher's captured outputs by teacher layer name; no gradient flows into them.
        student: the student, whose layers give each feature's channel dimension (for ``"cosine"``).
        adapters: the adapters of :func:`make_adapters` (not used for ``"attention"``).
        kind: the feature loss, one of :data:`~litcompress.distillation.config.FEATURE_LOSSES`.
    """
    total: Tensor | None = None
    for s_name, t_name in pairs.items():
        s_feat, t_feat = student_features[s_name], teacher_features[t_name].detach()
        if kind != "attention":
            s_feat = adapters[adapter_key(s_name)](s_feat)
        term = feature_loss(s_feat, t_feat, kind, channel_dim(student.get_submodule(s_name)))
        total = term if total is None else total + term
    return total if total is not None else torch.zeros(())


def output_width(module: nn.Module) -> int | None:
    """Feature width of a layer's output for known kinds (``None`` when unknown).

    A block of another kind that holds layer norms (a transformer block or stack: Hugging Face's ``GPT2Block``,
    ``BertLayer``, ...) has the width of its last one: the width of the residual stream.

    >>> output_width(nn.Linear(4, 8)), output_width(nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6), nn.ReLU()))
    (8, 6)
    >>> output_width(nn.ReLU()) is None
    True
    """
    for attr in ("out_features", "out_channels", "hidden_size", "embed_dim", "num_features", "embedding_dim", "nf"):
        value = getattr(module, attr, None)  # `nf`: the output width of Hugging Face's GPT-2 `Conv1D`
        if isinstance(value, int):
            return value
    norms = [width for m in module.modules() if (width := _norm_width(m)) is not None]
    return norms[-1] if norms else None


def _norm_width(module: nn.Module) -> int | None:
    if isinstance(module, (nn.LayerNorm, nn.RMSNorm)) and module.normalized_shape:
        return int(module.normalized_shape[-1])
    weight = getattr(module, "weight", None)  # norms of other libraries (LlamaRMSNorm, T5LayerNorm, ...)
    if type(module).__name__.endswith(("LayerNorm", "RMSNorm")) and isinstance(weight, Tensor) and weight.dim() == 1:
        return int(weight.shape[0])
    return None


class _ChannelAdapter(nn.Module):
    """1x1 convolution over dim 1 for (B, C, ...) maps; a linear map over the last dim otherwise."""

    def __init__(self, width_in: int, width_out: int, channels_first: bool) -> None:
        super().__init__()
        self.channels_first = channels_first
        self.proj = nn.Linear(width_in, width_out, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        width = x.shape[1 if self.channels_first and x.dim() > 2 else -1]
        if width != self.proj.in_features:
            fail_state(f"a feature of width {width} reached an adapter made for width {self.proj.in_features}",
                       "features", "distil layers whose output width is known (the width was inferred from the "
                       "layer's kind or its last layer norm)", exc=ValueError)
        if self.channels_first and x.dim() > 2:
            return self.proj(x.movedim(1, -1)).movedim(-1, 1)
        return self.proj(x)


def make_adapter(width_in: int | None, width_out: int | None, channels_first: bool = False) -> nn.Module:
    """A learnable map from the student's feature width to the teacher's (identity when they match).

    Args:
        width_in: the student layer's output width (:func:`output_width`); ``None`` (unknown) is an error.
        width_out: the teacher layer's output width; ``None`` (unknown) is an error.
        channels_first: the features are in dimension 1 (``(B, C, ...)`` maps of convolutions, mapped by a 1x1
            projection); ``False``, the default, maps the last dimension.
    """
    if width_in is None or width_out is None:
        fail("features", "layers whose output width is known (Linear, Conv, RNN, attention, norms)",
              (width_in, width_out),
              hint="distil features of such layers, or use FeatureDistillation(..., loss='attention')")
    if width_in == width_out:
        return nn.Identity()
    return _ChannelAdapter(width_in, width_out, channels_first)


def attention_map(feature: Tensor, size: tuple[int, ...] | None = None) -> Tensor:
    """Zagoruyko & Komodakis' spatial attention: channel mean of squared activations, L2-normalised per sample.

    ``size`` resamples the map to another spatial size first (area interpolation: averages when shrinking), so a
    student map can be compared with a teacher map of another resolution.
    """
    if feature.dim() < 3:
        fail("features", "conv feature maps (B, C, H, W) for attention transfer", tuple(feature.shape))
    energy = feature.float().pow(2).mean(1)
    if size is not None and tuple(energy.shape[1:]) != tuple(size):
        if len(size) != energy.dim() - 1:
            fail("features", f"feature maps with {len(size)} spatial dimensions, like the teacher's",
                  tuple(feature.shape))
        energy = F.interpolate(energy.unsqueeze(1), size=tuple(size), mode="area").squeeze(1)
    return F.normalize(energy.flatten(1), dim=1)


def feature_loss(student: Tensor, teacher: Tensor, kind: str, channel_dim: int = -1) -> Tensor:
    """Distance between (adapted) student and teacher features: ``"mse"``, ``"cosine"`` (over ``channel_dim``)
    or ``"attention"`` (attention transfer; conv maps only).

    Args:
        student: the student's features, after its adapter, shaped like ``teacher`` (for ``"attention"``, conv maps
            whose channels and spatial size may differ: the student map is resampled to the teacher's size).
        teacher: the teacher's features.
        kind: ``"mse"`` (mean squared error), ``"cosine"`` (mean of one minus the cosine similarity) or
            ``"attention"`` (squared distance of the :func:`attention_map` of each, summed per sample, averaged).
        channel_dim: the dimension holding the features, for ``"cosine"`` (1 for conv maps; default the last).
    """
    if kind == "attention":
        target = attention_map(teacher)
        return (attention_map(student, tuple(teacher.shape[2:])) - target).pow(2).sum(1).mean()
    if student.shape != teacher.shape:
        fail("features", f"student features shaped like the teacher's {tuple(teacher.shape)} after the adapter",
              tuple(student.shape))
    if kind == "cosine":
        return (1 - F.cosine_similarity(student.float(), teacher.float(), dim=channel_dim)).mean()
    return F.mse_loss(student.float(), teacher.float())


