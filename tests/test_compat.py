"""One test per private torch internal that litcompress relies on (litcompress/_compat.py): an upgrade that breaks
one of them fails here, by name."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from litcompress import _compat


def test_qdq_ops_round_trip_per_tensor_and_per_channel():
    ops = _compat.qdq_ops()
    x = torch.tensor([[-1.0, 0.0, 0.26, 2.0]])
    q = ops.quantize_per_tensor(x, 0.1, 3, 0, 255, torch.uint8)
    assert q.dtype == torch.uint8 and q.tolist() == [[0, 3, 6, 23]]
    assert torch.allclose(ops.dequantize_per_tensor(q, 0.1, 3, 0, 255, torch.uint8), torch.tensor([[-0.3, 0, 0.3, 2]]))
    ints = torch.tensor([[1, -2], [3, 4]], dtype=torch.int8)
    scale, zeros = torch.tensor([0.5, 2.0]), torch.zeros(2, dtype=torch.int64)
    out = ops.dequantize_per_channel(ints, scale, zeros, 0, -127, 127, torch.int8)
    assert out.tolist() == [[0.5, -1.0], [6.0, 8.0]]


def test_attention_out_proj_class_is_a_linear_subclass():
    assert issubclass(_compat.ATTENTION_OUT_PROJ, nn.Linear) and _compat.ATTENTION_OUT_PROJ is not nn.Linear
    assert type(nn.MultiheadAttention(8, 2).out_proj) is _compat.ATTENTION_OUT_PROJ


@pytest.mark.parametrize("padding_mode", ["zeros", "reflect", "circular"])
def test_conv_forward_uses_the_given_weight_and_the_layer_padding(padding_mode):
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 3, 3, padding=1, padding_mode=padding_mode)
    x, w = torch.randn(2, 2, 5, 5), torch.randn(3, 2, 3, 3)
    expected = conv(x)
    with torch.no_grad():
        conv.weight.copy_(w)
        reference = conv(x)
    assert torch.allclose(_compat.conv_forward(conv, x, w), reference)
    assert not torch.allclose(reference, expected)


@pytest.mark.parametrize("kind", [nn.LSTM, nn.GRU, nn.RNN])
def test_rnn_forward_runs_the_kernel_on_substituted_weights_and_restores_them(kind):
    torch.manual_seed(0)
    rnn = kind(4, 6, num_layers=2)
    x = torch.randn(5, 3, 4)
    halved = {n: p * 0.5 for n, p in rnn.named_parameters() if n.startswith("weight")}
    original = rnn(x)[0]
    out = _compat.rnn_forward(rnn, rnn.forward, halved, x)[0]
    reference = torch.func.functional_call(rnn, halved, (x,))[0]
    assert torch.allclose(out, reference) and not torch.allclose(out, original)
    assert torch.equal(rnn(x)[0], original)  # the layer's own weights are back


def test_foreach_helpers_match_loops():
    torch.manual_seed(0)
    a, b = [torch.randn(3), torch.randn(2, 2)], [torch.randn(3), torch.randn(2, 2)]
    products = _compat.foreach_mul(a, b)
    assert all(torch.equal(p, x * y) for p, x, y in zip(products, a, b))
    norms = _compat.foreach_norm(a)
    assert all(torch.allclose(n, x.norm()) for n, x in zip(norms, a))
    pairs = ((_compat.foreach_mul_, torch.mul), (_compat.foreach_add_, torch.add), (_compat.foreach_sub_, torch.sub))
    for fn, ref in pairs:
        targets = [t.clone() for t in a]
        fn(targets, b)
        assert all(torch.equal(t, ref(x, y)) for t, x, y in zip(targets, a, b)), fn.__name__
    targets = [t.clone() for t in a]
    _compat.foreach_abs_(targets)
    assert all(torch.equal(t, x.abs()) for t, x in zip(targets, a))
    masks = [torch.rand(3) > 0.5]  # the pruner multiplies by uint8 views of bool masks
    values = [torch.randn(3)]
    expected = values[0] * masks[0]
    _compat.foreach_mul_(values, [masks[0].view(torch.uint8)])
    assert torch.equal(values[0], expected)


def test_conv_padding_reference_is_functional():  # the public path that `conv_forward` must agree with
    conv = nn.Conv1d(2, 2, 3, padding=1)
    x = torch.randn(1, 2, 7)
    assert torch.allclose(_compat.conv_forward(conv, x, conv.weight), F.conv1d(x, conv.weight, conv.bias, padding=1))


def test_foreach_fallbacks_when_torch_drops_the_kernels(monkeypatch):
    for name in ("mul_", "mul", "add_", "sub_", "abs_", "norm"):
        monkeypatch.delattr(torch, f"_foreach_{name}")
    test_foreach_helpers_match_loops()


class _Compiled(nn.Module):  # user code: `Module.compile()` of a torch.nn class alone traces nothing
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(x)


def test_eager_calls_bypasses_both_compiled_entry_points_and_restores_them():
    runs = []

    def backend(gm, example_inputs):
        def run(*args):
            runs.append(1)
            return gm.forward(*args)

        return run

    torch._dynamo.reset()
    by_method = _Compiled()
    by_method.compile(backend=backend)  # `Module._compiled_call_impl`
    wrapped = torch.compile(_Compiled(), backend=backend)  # an `OptimizedModule`'s `forward`
    by_forward = _Compiled()
    by_forward.forward = torch.compile(by_forward.forward, backend=backend)  # a compiled `forward` attribute
    x = torch.randn(3, 4)
    with _compat.eager_calls(by_method), _compat.eager_calls(wrapped), _compat.eager_calls(by_forward):
        for model, fc in ((by_method, by_method.fc), (wrapped, wrapped._orig_mod.fc), (by_forward, by_forward.fc)):
            assert torch.equal(model(x), fc(x))
    assert not runs
    by_method(x), wrapped(x), by_forward(x)
    assert len(runs) == 3  # compiled again after the block


def _unwrap_worker(rank: int, port: int, out: str) -> None:
    import os

    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from litcompress.distributed import gather_model

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=1)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    seen = []
    model[2].register_forward_hook(lambda *_: seen.append(1))  # a user's own hook survives
    x = torch.randn(3, 4)
    expected = model(x).detach()
    mesh = init_device_mesh("cpu", (1,))
    fully_shard(model[0], mesh=mesh)
    fully_shard(model, mesh=mesh)
    cls, attrs = _compat.without_fsdp(model)
    copy = gather_model(model)
    seen.clear()
    y = copy(x)
    torch.save({"cls": cls.__name__, "keys": sorted(attrs), "types": [type(m).__name__ for m in copy.modules()],
                "equal": torch.equal(y, expected), "hooked": len(seen),
                "plain": all(type(p) is nn.Parameter for p in copy.parameters()),
                "pre_hooks": [len(m._forward_pre_hooks) for m in copy.modules()]}, f"{out}/unwrap.pt")
    dist.destroy_process_group()


def test_without_fsdp_gives_back_the_plain_module(tmp_path):
    """FSDP2's generated class, private state attributes and hooks (gather_model's plain copy depends on them)."""
    import torch.multiprocessing as mp

    from tests.helpers import free_port

    mp.spawn(_unwrap_worker, args=(free_port(), str(tmp_path)), nprocs=1, join=True)
    got = torch.load(tmp_path / "unwrap.pt")
    assert got["cls"] == "Sequential" and not any(k.startswith(("__composable", "_fsdp")) for k in got["keys"])
    assert got["types"] == ["Sequential", "Linear", "ReLU", "Linear"]  # no FSDP classes left
    assert got["equal"] and got["plain"] and got["hooked"] == 1 and got["pre_hooks"] == [0, 0, 0, 0]

