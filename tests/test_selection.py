import pytest
import torch
from torch import nn

from litcompress.layers import HFConv1D
from litcompress.selection import select_parameters
from tests.models import MLP, ZOO, RNNClassifier, TinyGPT, TransformerClassifier


def names(model, **kwargs):
    return [ref.name for ref in select_parameters(model, **kwargs)]


def test_default_kinds_cover_linear_conv_rnn_attention():
    assert names(MLP()) == ["net.0.weight", "net.2.weight", "net.4.weight"]
    assert names(RNNClassifier("lstm")) == [
        "rnn.weight_ih_l0", "rnn.weight_hh_l0", "rnn.weight_ih_l1", "rnn.weight_hh_l1", "head.weight",
    ]
    transformer = names(TransformerClassifier())
    assert "blocks.0.attn.in_proj_weight" in transformer and "blocks.0.attn.out_proj.weight" in transformer
    assert not any("ln" in n or "bias" in n for n in transformer)
    assert ZOO["cnn"].build and names(ZOO["cnn"].build())[:1] == ["stem.0.weight"]


def test_separate_qkv_attention_weights_are_selected():
    attn = nn.MultiheadAttention(8, 2, kdim=4, vdim=4)
    assert names(attn) == ["q_proj_weight", "k_proj_weight", "v_proj_weight", "out_proj.weight"]


def test_tied_weight_counted_once_under_canonical_name():
    got = names(TinyGPT())
    assert got.count("tok.weight") == 1 and "lm_head.weight" not in got


def test_input_dims():
    refs = {r.name: r.input_dim for r in select_parameters(nn.Sequential(nn.Linear(4, 4), nn.ConvTranspose2d(4, 4, 3)),
                                                           parameters=".")}
    assert refs == {"0.weight": 1, "1.weight": 0}


def test_patterns_callable_and_exclude():
    model = MLP()
    assert names(model, parameters=r"net\.[02]\.") == ["net.0.weight", "net.2.weight"]
    assert names(model, parameters=lambda module, name: name.endswith("4.weight")) == ["net.4.weight"]
    assert names(model, exclude=["<first>", "<last>"]) == ["net.2.weight"]
    assert names(model, exclude=r"net\.2") == ["net.0.weight", "net.4.weight"]
    # first/last work on layers: all tensors of the first LSTM are left out together
    assert names(RNNClassifier("lstm"), exclude=["<first>"]) == ["head.weight"]


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        (dict(parameters="nothing_like_this"), ValueError, "Expected argument `parameters` to be patterns that each"),
        (dict(exclude=["net.0", "nope"]), ValueError, "Expected argument `exclude` .* but got 'nope'"),
        (dict(parameters="("), ValueError, "valid regular expressions"),
        (dict(parameters=[3]), TypeError, "`parameters`"),
        (dict(exclude=["."]), ValueError, "at least one selectable weight"),
    ],
)
def test_selection_misconfiguration(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        select_parameters(MLP(), **kwargs)


def test_model_with_nothing_to_prune():
    with pytest.raises(ValueError, match=r"Expected argument `model` to be a model with at least one"):
        select_parameters(nn.Sequential(nn.LayerNorm(4), nn.ReLU()))
    with pytest.raises(TypeError, match=r"torch\.nn\.Module"):
        select_parameters("model")


class Conv1D(nn.Module):
    """Stands in for transformers.pytorch_utils.Conv1D (found by name and module, transformers never imported)."""

    __module__ = "transformers.pytorch_utils"

    def __init__(self, nf: int, nx: int) -> None:
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf))
        self.bias = nn.Parameter(torch.zeros(nf))


def test_hf_conv1d_is_a_default_kind_with_inputs_along_dim_0():
    model = nn.Sequential(Conv1D(8, 4), nn.ReLU(), nn.Linear(8, 2))
    assert isinstance(model[0], HFConv1D) and not isinstance(model[2], HFConv1D)
    refs = select_parameters(model)
    assert [(r.name, r.input_dim, r.output_dim) for r in refs] == [("0.weight", 0, 1), ("2.weight", 1, 0)]
    assert [(r.name, r.input_dim) for r in select_parameters(model, parameters=r"0\.")] == [("0.weight", 0)]


def test_tied_tensor_has_aliases_and_any_of_its_names_selects_it():
    model = TinyGPT()  # tok (Embedding) and lm_head (Linear) share one weight
    (tied,) = [r for r in select_parameters(model) if r.name == "tok.weight"]
    assert tied.module_name == "lm_head" and [(a.module_name, a.name) for a in tied.aliases] == [("tok", "tok.weight")]
    assert tied.owners == (tied, *tied.aliases)
    assert names(model, parameters="lm_head") == ["tok.weight"]
    assert "tok.weight" not in names(model, exclude="lm_head")
    # <first> / <last> are layers: the tied tensor is the last layer (lm_head), wherever it was first registered
    assert "tok.weight" not in names(model, exclude="<last>")
    assert "tok.weight" in names(model, exclude="<first>")


class Dense(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.in_features, self.out_features = 4, 3
        self.weight = nn.Parameter(torch.randn(3, 4))


def test_linear_like_layer_of_no_known_kind_is_named_not_skipped():
    model = nn.Sequential(nn.Linear(4, 4), Dense())
    with pytest.raises(ValueError, match=r"with a Linear's interface .* but got '1\.weight \(Dense\)'"):
        select_parameters(model)
    assert names(model, exclude=r"^1\.") == ["0.weight"]  # kept as it is, on purpose
    assert names(model, parameters=".") == ["0.weight", "1.weight"]  # or selected by name
