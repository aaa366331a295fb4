"""The models users bring: Hugging Face GPT-2 (Conv1D projections, tied embeddings), BERT and Llama, with tiny
random configs (nothing is downloaded), through Pruning, QuantizationAwareTraining, ONNX Runtime and compact files."""

from __future__ import annotations

import copy
import json

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from litcompress import Pruning, QuantizationAwareTraining
from litcompress.export import export_onnx, load_compressed, save_compressed
from litcompress.quantization import QuantConfig, QuantizedLayer, convert_, quantized_layers
from litcompress.report import summarize
from litcompress.selection import select_parameters
from litcompress.sparsity import check_nm
from tests.models import trainer_kwargs
from tests.test_export import INTEGER_KERNELS, run_ort

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()  # tiny configs: the token ids of the real vocabularies do not fit

VOCAB, CONTEXT = 64, 8
PROJECTIONS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")


def gpt2(**overrides) -> nn.Module:
    config = dict(vocab_size=VOCAB, n_positions=32, n_embd=32, n_layer=2, n_head=2) | overrides
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(**config))


def bert() -> nn.Module:
    return transformers.BertForSequenceClassification(transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=32, num_labels=3))


def llama() -> nn.Module:
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=32))


BUILD = {"gpt2": gpt2, "bert": bert, "llama": llama}


class LitHF(pl.LightningModule):
    """A Hugging Face model in a LightningModule: ``forward(input_ids)`` gives logits; the loss is the model's own."""

    def __init__(self, model: nn.Module, lr: float = 1e-3) -> None:
        super().__init__()
        self.model, self.lr = model, lr

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids).logits

    def training_step(self, batch, batch_idx):
        input_ids, labels = batch
        return self.model(input_ids=input_ids, labels=labels).loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.lr)


def data(kind: str, n: int = 32) -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    ids = (torch.randint(0, VOCAB, (n, 1), generator=g) + torch.arange(CONTEXT)) % VOCAB
    labels = ids[:, 0] % 3 if kind == "bert" else ids  # causal LMs shift the labels themselves
    return TensorDataset(ids, labels)


def fit(tmp_path, kind: str, callbacks, module: LitHF | None = None, steps: int = 4) -> LitHF:
    torch.manual_seed(0)
    module = module or LitHF(BUILD[kind]())
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_epochs=1, limit_train_batches=steps), callbacks=callbacks)
    trainer.fit(module, DataLoader(data(kind), batch_size=8))
    return module.eval()


def ids(n: int = 4) -> torch.Tensor:
    return data("gpt2", n).tensors[0]


def block_projections(model: nn.Module) -> dict[str, nn.Module]:
    return {f"transformer.h.{i}.{p}": model.get_submodule(f"transformer.h.{i}.{p}")
            for i in range(len(model.transformer.h)) for p in PROJECTIONS}


# ---------------------------------------------------------------------------------------------- layer kinds
def test_default_selection_finds_conv1d_projections_and_the_tied_embedding_once():
    model = gpt2()
    refs = {ref.name: ref for ref in select_parameters(model)}
    assert set(refs) == {f"{n}.weight" for n in block_projections(model)} | {"transformer.wte.weight"}
    assert all(refs[f"{n}.weight"].input_dim == 0 for n in block_projections(model))  # W stored (in, out)
    tied = refs["transformer.wte.weight"]
    assert tied.module_name == "lm_head" and [a.name for a in tied.aliases] == ["transformer.wte.weight"]
    # a pattern naming either owner selects or excludes the one tensor
    assert [r.name for r in select_parameters(model, parameters="lm_head")] == ["transformer.wte.weight"]
    assert "transformer.wte.weight" not in [r.name for r in select_parameters(model, exclude="lm_head")]


def test_default_pruning_prunes_every_gpt2_block_projection(tmp_path):
    cb = Pruning(0.5, scope="layer", schedule="one_shot", verbose=False)
    module = fit(tmp_path, "gpt2", [cb], steps=2)
    pruned = {r.name for r in cb.pruner.refs}
    for name, layer in block_projections(module.model).items():
        assert f"model.{name}.weight" in pruned
        assert int((layer.weight == 0).sum()) == layer.weight.numel() // 2, name


def test_nm_pattern_groups_conv1d_inputs_along_dim_0(tmp_path):
    cb = Pruning(pattern="2:4", parameters=r"h\.\d+\.mlp", schedule="one_shot", verbose=False)
    module = fit(tmp_path, "gpt2", [cb], steps=2)
    assert len(cb.pruner.refs) == 4
    for i in range(2):
        for p in ("c_fc", "c_proj"):
            w = module.model.get_submodule(f"transformer.h.{i}.mlp.{p}").weight.detach()  # (in, out)
            groups = (w.reshape(w.shape[0] // 4, 4, w.shape[1]) != 0).sum(1)  # 4 consecutive inputs, per output
            assert int(groups.max()) <= 2 and check_nm(w, 2, 4, dim=0), p
            assert not check_nm(w, 2, 4, dim=1)  # not grouped along the outputs
            assert int((w == 0).sum()) == w.numel() // 2


def test_qat_selected_by_regex_converts_conv1d(tmp_path):
    cb = QuantizationAwareTraining(parameters=r"h\.\d+\.mlp", verbose=False)
    module = fit(tmp_path, "gpt2", [cb], steps=2)
    assert {type(m).__name__ for m in cb.layers.values()} == {"QATConv1D"} and len(cb.layers) == 4
    c_fc = module.model.transformer.h[0].mlp.c_fc
    q = c_fc.weight_quantizers["weight"]
    assert q.axis == 1 and q.current_scale(c_fc.weight).shape == (c_fc.nf,)  # one scale per output column


class CustomConv1D(transformers.pytorch_utils.Conv1D):
    def forward(self, x):
        return super().forward(x) * 2


class Dense(nn.Module):
    """A Linear-like layer of no known kind (not an nn.Linear)."""

    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__()
        self.in_features, self.out_features = n_in, n_out
        self.weight = nn.Parameter(torch.randn(n_out, n_in))

    def forward(self, x):
        return x @ self.weight.t()


def test_unhandled_linear_like_layers_are_named():
    model = gpt2()
    model.transformer.h[1].mlp.c_fc = CustomConv1D(128, 32)
    with pytest.raises(ValueError, match=r"transformer\.h\.1\.mlp\.c_fc \(CustomConv1D\)"):
        convert_(model, QuantConfig(), ["transformer.h.1.mlp.c_fc"])
    # Pruning can prune it: its weight is laid out as Conv1D's (inputs along dim 0)
    refs = {r.name: r for r in select_parameters(model)}
    assert refs["transformer.h.1.mlp.c_fc.weight"].input_dim == 0
    model.transformer.h[0].mlp.c_fc = Dense(32, 128)
    with pytest.raises(ValueError, match=r"a Linear's interface .*'transformer\.h\.0\.mlp\.c_fc\.weight \(Dense\)"):
        select_parameters(model)
    assert "transformer.h.0.mlp.c_fc.weight" not in [r.name for r in select_parameters(model, exclude=r"0\.mlp\.c_fc")]


# ---------------------------------------------------------------------------------------------- QAT and ONNX
def test_qat_gpt2_converts_conv1d_and_runs_on_integer_kernels(tmp_path):
    cb = QuantizationAwareTraining(verbose=False)
    module = fit(tmp_path, "gpt2", [cb])
    layers = quantized_layers(module)
    for name in block_projections(module.model):
        assert type(layers[f"model.{name}"]).__name__ == "QATConv1D"
        assert layers[f"model.{name}"].fake_quant_enabled
    assert type(layers["model.lm_head"]).__name__ == "QATLinear"  # tied to the embedding: quantized there too
    x = ids(4)
    with torch.no_grad():
        expected = module(x).numpy()
    out, ops = run_ort(export_onnx(module, x, tmp_path / "gpt2.onnx"), x, tmp_path)
    assert ops.count("MatMulIntegerToFloat") + ops.count("QGemm") >= 8 + 1, ops  # 8 projections + the LM head
    assert np.abs(out - expected).max() <= 0.02 * (np.abs(expected).max() + 1e-6)
    assert (out.argmax(-1) == expected.argmax(-1)).mean() >= 0.95


# ---------------------------------------------------------------------------------------------- tied weights
def test_tied_embedding_and_head_are_quantized_identically(tmp_path):
    qat = QuantizationAwareTraining(verbose=False)
    module = fit(tmp_path, "gpt2", [Pruning(0.5, schedule="one_shot", verbose=False), qat])
    wte, head = module.model.transformer.wte, module.model.lm_head
    assert head.weight is wte.weight and isinstance(wte, QuantizedLayer) and isinstance(head, QuantizedLayer)
    q = wte.weight_quantizers["weight"]
    assert head.weight_quantizers["weight"] is q  # one quantizer for the one tensor
    w = q(wte.weight).detach()
    assert bool((w[wte.weight == 0] == 0).all()) and int((w == 0).sum()) > 0  # pruned through the head
    x, h = ids(2), torch.randn(2, CONTEXT, 32)
    with torch.no_grad():  # what each owner computes with: the same fake-quantized weight
        assert torch.equal(wte(x), F.embedding(x, w))
        assert torch.equal(head(h), F.linear(head.input_quantizers["input"](h, False), w))
    quantizers = {id(q) for layer in qat.layers.values() for q in layer.weight_quantizers.values()}
    assert len(quantizers) == len(qat.layers) - 1  # 11 layers, 10 tensors: one quantizer to freeze, learn and save


@pytest.mark.parametrize("case", ["dense", "pruned-quantized"])
def test_compact_round_trip_of_a_tied_model_is_exact(tmp_path, case):
    if case == "dense":
        module = LitHF(gpt2()).eval()
    else:
        callbacks = [Pruning(0.5, schedule="one_shot", verbose=False),
                     QuantizationAwareTraining(weight_bits=4, activation_bits=None, verbose=False)]
        module = fit(tmp_path, "gpt2", callbacks)
    x = ids(4)
    with torch.no_grad():
        expected = module(x)
    path = save_compressed(module, tmp_path / "tied.safetensors")
    untied = copy.deepcopy(module)
    untied.model.lm_head.weight = nn.Parameter(untied.model.lm_head.weight.detach().clone())
    two_copies = save_compressed(untied, tmp_path / "untied.safetensors").stat().st_size
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        layout = json.loads(f.metadata()["layout"])
        stored = f.get_tensor("model.transformer.wte.weight:values")
        assert not any(k.startswith("model.lm_head.weight") for k in f.keys())  # noqa: SIM118
    assert layout["model.lm_head.weight"]["alias"] == "model.transformer.wte.weight"
    assert path.stat().st_size <= two_copies - stored.numel() * stored.element_size()  # stored once
    for fresh in (LitHF(gpt2()), LitHF(gpt2(tie_word_embeddings=False))):
        load_compressed(fresh, path).eval()
        assert fresh.model.lm_head.weight is fresh.model.transformer.wte.weight  # tied again on load
        with torch.no_grad():
            assert torch.equal(fresh(x), expected)  # the plain model computes exactly what was trained


def test_compact_file_of_a_qat_model_holds_the_trained_tied_weights(tmp_path):
    module = fit(tmp_path, "gpt2", [QuantizationAwareTraining(verbose=False)])
    wte = module.model.transformer.wte
    trained = wte.weight_quantizers["weight"](wte.weight).detach()
    fresh = load_compressed(LitHF(gpt2()), save_compressed(module, tmp_path / "qat.safetensors"))
    assert torch.equal(fresh.model.transformer.wte.weight, trained)
    assert fresh.model.lm_head.weight is fresh.model.transformer.wte.weight
    for name, layer in block_projections(module.model).items():  # per-column scales come back along axis 1
        expected = layer.weight_quantizers["weight"](layer.weight).detach()
        assert torch.equal(fresh.model.get_submodule(name).weight, expected), name


def test_summarize_counts_the_tied_tensor_once():
    module = LitHF(gpt2())
    s = summarize(module, ids(2), latency=False)
    unique = sum(p.numel() for p in module.parameters())  # parameters() yields a tied tensor once
    assert s.parameters == unique
    names = [layer.name for layer in s.layers]
    assert names.count("model.transformer.wte.weight") == 1 and "model.lm_head.weight" not in names
    assert s.compact_bytes < 4 * (unique + module.model.transformer.wte.weight.numel())  # below two copies


# ---------------------------------------------------------------------------------------------- BERT, Llama
@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_pruned_quantized_model_exports_and_reloads_into_the_plain_class(tmp_path, kind):
    prune, qat = Pruning(0.5, schedule="one_shot", verbose=False), QuantizationAwareTraining(verbose=False)
    module = fit(tmp_path, kind, [prune, qat])
    assert len(prune.pruner.refs) >= 14 and len(qat.layers) >= 14  # every projection of both blocks
    x = ids(4)
    with torch.no_grad():
        expected = module(x).numpy()
    out, ops = run_ort(export_onnx(module, x, tmp_path / f"{kind}.onnx"), x, tmp_path)
    assert INTEGER_KERNELS & set(ops), ops
    assert np.abs(out - expected).max() <= 0.02 * (np.abs(expected).max() + 1e-6)
    ckpt = tmp_path / "last.ckpt"
    module.trainer.save_checkpoint(ckpt)
    state = torch.load(ckpt, weights_only=True)["state_dict"]
    plain = BUILD[kind]()
    plain.load_state_dict({k.removeprefix("model."): v for k, v in state.items()}, strict=True)
    for name, p in plain.named_parameters():
        assert torch.equal(p, module.model.get_parameter(name)), name


def test_plain_hf_model_exports_with_its_kv_cache_off_for_the_export(tmp_path):
    model = gpt2().eval()
    assert model.config.use_cache  # the default: forward returns a cache object torch.export cannot trace
    x = ids()
    for example in (x, {"input_ids": x}):  # positional, and keyword inputs as the report passes them
        path = export_onnx(model, example, tmp_path / "plain.onnx")
        out, _ = run_ort(path, x, tmp_path)
        np.testing.assert_allclose(out, model(x).logits.detach().numpy(), atol=1e-4)
    assert model.config.use_cache  # restored
