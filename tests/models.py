"""The tiny model zoo every technique is tested on, a LightningModule wrapper, and synthetic data.

Each zoo entry builds a model and a dataset whose labels a model can learn (a fixed random "teacher" maps
inputs to labels), so tests can check both mechanics and that training still works.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset


class MLP(nn.Module):
    def __init__(self, in_features: int = 16, hidden: int = 32, num_classes: int = 4) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(in_features, hidden),
            nn.ReLU(),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: Tensor) -> Tensor:  # (B, F) -> (B, C)
        return self.net(x)


class ConvNet(nn.Module):
    """Conv + BatchNorm + a residual block, for (B, 1, 8, 8) images."""

    def __init__(self, num_classes: int = 4, width: int = 8) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU())
        self.block = nn.Sequential(
            nn.Conv2d(width, width, 3, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=1, bias=False),
            nn.BatchNorm2d(width),
        )
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.head = nn.Linear(width * 4, num_classes)

    def forward(self, x: Tensor) -> Tensor:  # (B, 1, H, W) -> (B, C)
        x = self.stem(x)
        x = F.relu(x + self.block(x))
        return self.head(self.pool(x).flatten(1))


class RNNClassifier(nn.Module):
    """LSTM or GRU over (B, T, F) sequences; classifies from the last step."""

    def __init__(self, kind: str = "lstm", in_features: int = 8, hidden: int = 16, num_classes: int = 4) -> None:
        super().__init__()
        cls = {"lstm": nn.LSTM, "gru": nn.GRU}[kind]
        self.rnn = cls(in_features, hidden, num_layers=2, batch_first=True)
        self.head = nn.Linear(hidden, num_classes)

    def forward(self, x: Tensor) -> Tensor:  # (B, T, F) -> (B, C)
        out, _ = self.rnn(x)
        return self.head(out[:, -1])


class Block(nn.Module):
    """Pre-norm transformer block built on nn.MultiheadAttention (optionally causal)."""

    def __init__(self, dim: int, heads: int, causal: bool = False) -> None:
        super().__init__()
        self.causal = causal
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: Tensor) -> Tensor:  # (B, T, C)
        t = x.shape[1]
        mask = torch.triu(torch.ones(t, t, dtype=torch.bool, device=x.device), 1) if self.causal else None
        h = self.ln1(x)
        x = x + self.attn(h, h, h, attn_mask=mask, need_weights=False)[0]
        return x + self.mlp(self.ln2(x))


class TransformerClassifier(nn.Module):
    def __init__(self, in_features: int = 8, dim: int = 16, heads: int = 2, num_classes: int = 4) -> None:
        super().__init__()
        self.proj = nn.Linear(in_features, dim)
        self.blocks = nn.Sequential(Block(dim, heads), Block(dim, heads))
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: Tensor) -> Tensor:  # (B, T, F) -> (B, C)
        return self.head(self.blocks(self.proj(x)).mean(1))


class TinyGPT(nn.Module):
    """Decoder-only causal language model with a weight-tied output head."""

    def __init__(self, vocab: int = 32, dim: int = 16, heads: int = 2, layers: int = 2, context: int = 8) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, dim)
        self.pos = nn.Embedding(context, dim)
        self.blocks = nn.Sequential(*[Block(dim, heads, causal=True) for _ in range(layers)])
        self.ln = nn.LayerNorm(dim)
        self.lm_head = nn.Linear(dim, vocab, bias=False)
        self.lm_head.weight = self.tok.weight  # tied

    def forward(self, idx: Tensor) -> Tensor:  # (B, T) -> (B, T, V)
        pos = torch.arange(idx.shape[1], device=idx.device)
        return self.lm_head(self.ln(self.blocks(self.tok(idx) + self.pos(pos))))


# ---------------------------------------------------------------------------------------------- data
def _labelled(x: Tensor, num_classes: int, seed: int) -> TensorDataset:
    g = torch.Generator().manual_seed(seed + 1)
    teacher = torch.randn(x[0].numel(), num_classes, generator=g)
    y = (x.reshape(len(x), -1) @ teacher).argmax(1)
    return TensorDataset(x, y)


def classification_data(shape: tuple[int, ...], n: int = 128, num_classes: int = 4, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    return _labelled(torch.randn(n, *shape, generator=g), num_classes, seed)


def lm_data(vocab: int = 32, context: int = 8, n: int = 128, seed: int = 0) -> TensorDataset:
    """Sequences counting up modulo ``vocab`` from a random start: next token is learnable."""
    g = torch.Generator().manual_seed(seed)
    start = torch.randint(0, vocab, (n, 1), generator=g)
    seq = (start + torch.arange(context + 1)) % vocab
    return TensorDataset(seq[:, :-1], seq[:, 1:])


@dataclass
class ZooEntry:
    build: Callable[[], nn.Module]
    data: Callable[[], TensorDataset]


ZOO: dict[str, ZooEntry] = {
    "mlp": ZooEntry(MLP, lambda: classification_data((16,))),
    "cnn": ZooEntry(ConvNet, lambda: classification_data((1, 8, 8))),
    "lstm": ZooEntry(lambda: RNNClassifier("lstm"), lambda: classification_data((6, 8))),
    "gru": ZooEntry(lambda: RNNClassifier("gru"), lambda: classification_data((6, 8))),
    "transformer": ZooEntry(TransformerClassifier, lambda: classification_data((6, 8))),
    "gpt": ZooEntry(TinyGPT, lm_data),
}


# ---------------------------------------------------------------------------------------------- module
class LitClassifier(pl.LightningModule):
    """Cross-entropy over (B, C) logits or (B, T, V) token logits; SGD with momentum or Adam."""

    def __init__(self, model: nn.Module, lr: float = 0.05, optimizer: str = "sgd") -> None:
        super().__init__()
        self.model, self.lr, self.optimizer_name = model, lr, optimizer

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)

    def _loss(self, batch: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        x, y = batch
        logits = self(x)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1)), (
            logits.argmax(-1) == y
        ).float().mean()

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        loss, _ = self._loss(batch)
        self.log("train/loss", loss)
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        loss, acc = self._loss(batch)
        self.log_dict({"val/loss": loss, "val/acc": acc})

    def configure_optimizers(self) -> torch.optim.Optimizer:
        if self.optimizer_name == "adam":
            return torch.optim.Adam(self.parameters(), lr=self.lr)
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


def loaders(dataset: TensorDataset, batch_size: int = 16) -> tuple[DataLoader, DataLoader]:
    """Train (unshuffled: deterministic, resumable) and validation loaders over the same data."""
    return DataLoader(dataset, batch_size=batch_size), DataLoader(dataset, batch_size=64)


def trainer_kwargs(tmp_path, **overrides) -> dict:
    kwargs = dict(
        default_root_dir=tmp_path,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        devices=1,
        max_epochs=2,
        num_sanity_val_steps=0,
    )
    kwargs.update(overrides)
    return kwargs


class ResumableLoader:
    """Deterministic batches with Lightning's resumable-dataloader protocol, so mid-epoch resumes are exact."""

    def __init__(self, dataset: TensorDataset, batch_size: int = 16) -> None:
        self.dataset, self.batch_size = dataset, batch_size
        self._pos = 0  # batches already yielded in the current epoch
        self._resume_at = 0

    def __len__(self) -> int:
        return -(-len(self.dataset) // self.batch_size)

    def __iter__(self):
        # a state saved after the epoch's last batch means the next epoch starts from the beginning
        self._pos = self._resume_at if self._resume_at < len(self) else 0
        self._resume_at = 0
        while self._pos < len(self):
            i = self._pos * self.batch_size
            self._pos += 1
            yield tuple(t[i : i + self.batch_size] for t in self.dataset.tensors)

    def state_dict(self) -> dict:
        return {"pos": self._pos}

    def load_state_dict(self, state: dict) -> None:
        self._resume_at = state["pos"]
