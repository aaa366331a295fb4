"""Every technique under FSDP2 (`ModelParallelStrategy`, 2 gloo processes, run as a subprocess script with a
timeout) computes what the same fit computes in one process: masks identical, weights within float tolerance
(the sharded gradient is averaged by a reduce-scatter, in another order than one process's sum)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.fsdp.common import CASES, run_case, run_channel, run_export

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
ATOL = 1e-5


# quantization-aware training takes its first activation range from each process's own samples (as under DDP),
# so its reference is a DDP fit of the same samples; everything else is compared with one process
QAT_CASES = ["qat", "qat_learned", "all"]


def _launch(out: Path, strategy: str, cases: list[str]) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "tests.fsdp.fits", str(out), strategy, *cases], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return torch.load(out / f"{strategy}.pt", weights_only=False)


@pytest.fixture(scope="module")
def sharded(tmp_path_factory) -> dict:
    special = ["resume", "resume_full", "export", "unsynced", "channel", "channel_taylor", "channel_gpt2",
               "channel_qat", "dead"]  # fits.py
    return _launch(tmp_path_factory.mktemp("fsdp"), "fsdp", [*CASES, *special])


@pytest.fixture(scope="module")
def ddp(tmp_path_factory) -> dict:
    return _launch(tmp_path_factory.mktemp("ddp"), "ddp", QAT_CASES)


def _close(got: dict, want: dict, atol: float = ATOL) -> None:
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=atol, rtol=0, msg=name)


@pytest.mark.parametrize("case", list(CASES))
def test_sharded_fit_equals_one_process(sharded, ddp, case, tmp_path):
    want, got = ddp[case] if case in QAT_CASES else run_case(case, 1, tmp_path), sharded[case]
    _close(got["weights"], want["weights"])
    assert got.get("qat_ranks_agree", True)  # ranges and (learned) scales are the same on every process
    assert len(got["pruning"]) == len(want["pruning"])
    for g, w in zip(got["pruning"], want["pruning"]):
        assert g["masks"].keys() == w["masks"].keys() and g["masks"]
        for name, mask in w["masks"].items():
            assert torch.equal(g["masks"][name], mask), name
            assert g["local"][name][0] < mask.shape[0]  # each process held its rows only
        assert g["sparsity"] == w["sparsity"]
    for g, w in zip(got["qat"], want["qat"]):
        assert g["flags"] == w["flags"]
        for layer, state in w["layers"].items():
            for kind in ("weights", "inputs"):
                for key, q in state[kind].items():
                    for field, value in q.items():
                        other = g["layers"][layer][kind][key][field]
                        if isinstance(value, torch.Tensor):
                            torch.testing.assert_close(other, value, atol=ATOL, rtol=1e-5, msg=f"{layer} {key}")
                        else:
                            assert other == value, (layer, key, field)


@pytest.mark.parametrize("kind", ["resume", "resume_full"])
def test_resumed_sharded_fit_equals_uninterrupted(sharded, kind):
    """Distributed checkpoints (state on shards written with the weights' shards) and one-file checkpoints
    (gathered like the weights) both resume exactly."""
    whole, resumed = sharded[kind]["whole"], sharded[kind]["resumed"]
    for name, value in whole["weights"].items():
        assert torch.equal(resumed["weights"][name], value), name  # bit-identical
    for g, w in zip(resumed["pruning"], whole["pruning"]):
        for name, mask in w["masks"].items():
            assert torch.equal(g["masks"][name], mask), name
    assert resumed["pruning"][0]["sparsity"] == whole["pruning"][0]["sparsity"]
    assert [q["flags"] for q in resumed["qat"]] == [q["flags"] for q in whole["qat"]]
    a, b = _tensors(resumed["qat"]), _tensors(whole["qat"])
    assert len(a) == len(b) > 0 and all(torch.equal(x, y) for x, y in zip(a, b))


def _tensors(value) -> list:
    if isinstance(value, dict):
        return [t for v in value.values() for t in _tensors(v)]
    if isinstance(value, list):
        return [t for v in value for t in _tensors(v)]
    return [value] if isinstance(value, torch.Tensor) else []


def test_export_files_and_report_of_a_sharded_fit(sharded, tmp_path):
    """`export_onnx`, `save_compressed` (called on every process) and `CompressionReport` gather to rank zero: the
    files and the report equal those of the same fit in one process."""
    got, want = sharded["export"], run_export(1, tmp_path)
    assert got["written"] and got["rank"] == 0
    torch.testing.assert_close(got["y"], want["y"], atol=ATOL, rtol=0)  # the sharded model's own forward
    torch.testing.assert_close(got["y_onnx"], want["y_onnx"], atol=ATOL, rtol=0)
    torch.testing.assert_close(got["y_onnx"], got["y"], atol=1e-4, rtol=1e-4)  # ONNX Runtime runs what was trained
    _close(got["compact"], want["compact"])
    assert got["report"] == pytest.approx(want["report"])
    report = got["report"]
    assert report["quantized"] and report["bits"] < 8 and report["nonzero"] < 0.4 * report["baseline_nonzero"]


def test_parameters_left_out_of_fully_shard_are_refused(sharded):
    got = sharded["unsynced"]
    assert got["steps"] == 0
    assert got["error"] is not None and "every trainable parameter under fully_shard" in got["error"]
    assert "adapters.2.proj.weight" in got["error"]


@pytest.mark.parametrize("importance", ["magnitude", "taylor"])
def test_channel_pruning_of_a_sharded_fit(sharded, tmp_path, importance):
    """Channels traced on the whole model in `setup`, scored on shards (per-channel sums added over processes),
    masked on shards; at the end rank zero gets the smaller model, equal to the one-process fit's own."""
    got = sharded["channel" if importance == "magnitude" else "channel_taylor"]
    want = run_channel(1, tmp_path, importance=importance)
    assert got["removed"] == want["removed"] == {"model.0": (36, 18), "model.2": (27, 13)}
    _close(got["smaller"], want["smaller"])  # same shapes: the same channels were removed
    torch.testing.assert_close(got["y"], want["y"], atol=ATOL, rtol=0)
    torch.testing.assert_close(got["y_smaller"], got["y"], atol=ATOL, rtol=0)  # the masked model, computed smaller
    zero_rows = (got["full_size"]["model.0.weight"].abs().sum(1) == 0).sum()
    assert zero_rows == 18  # the sharded model itself keeps its size, its pruned channels zero


def test_gpt2_heads_and_neurons_of_a_sharded_fit(sharded, tmp_path):
    """GPT-2 under FSDP2: heads (columns of the packed c_attn, whose rows are sharded) and MLP neurons scored on
    shards; rank zero's smaller model equals the one the same fit leaves in one process."""
    got, want = sharded["channel_gpt2"], run_channel(1, tmp_path, gpt=True)
    assert got["removed"] == want["removed"]
    assert {k: v for k, v in want["removed"].items() if k.endswith("attn")} == {
        "model.transformer.h.0.attn": (2, 1), "model.transformer.h.1.attn": (2, 1)}
    _close(got["smaller"], want["smaller"])
    torch.testing.assert_close(got["y"], want["y"], atol=ATOL, rtol=0)
    torch.testing.assert_close(got["y_smaller"], got["y"], atol=ATOL, rtol=0)


def test_frozen_quantization_scales_follow_the_smaller_copy_of_a_sharded_fit(sharded):
    """Frozen per-channel weight scales: rank zero's smaller copy shrinks its own (before: the copy kept the old
    sizes and failed to run), and the sharded model, which keeps its size, keeps its scales."""
    got = sharded["channel_qat"]
    assert got["removed"] == {"model.0": (36, 18), "model.2": (27, 13)}
    assert got["smaller"]["model.0.weight"].shape == (18, 16)
    torch.testing.assert_close(got["y_smaller"], got["y"], atol=1e-4, rtol=0)


def test_dead_channels_of_a_sharded_fit(sharded, tmp_path):
    """Unstructured pruning with `remove_channels=True`: rank zero's copy loses the all-zero channels (their constant
    output folded into the next biases), as the one-process model does."""
    got, want = sharded["dead"], run_channel(1, tmp_path, dead=True)
    assert got["removed"] == want["removed"] and got["removed"]["model.0"][1] <= 28
    _close(got["smaller"], want["smaller"])
    torch.testing.assert_close(got["y_smaller"], got["y"], atol=ATOL, rtol=0)
