"""A GPT-2-shaped decoder-only transformer over bytes, and the LightningModule that trains it.

The network follows GPT-2 (and nanoGPT): token and position embeddings, ``n_layer`` pre-norm blocks of
causal self-attention (``torch.nn.functional.scaled_dot_product_attention``) and a 4x MLP with GELU, a
final LayerNorm and an output head tied to the token embedding. The vocabulary is the 256 byte values,
so nothing is downloaded and the loss in bits per byte compares across corpora and tokenizers.

Sizes (``size=``; any of ``n_layer``, ``n_head``, ``d_model``, ``context`` overrides the preset's):

========  =======  ======  =======  =======  =================================================
size      n_layer  n_head  d_model  context  parameters (vocabulary 256)
========  =======  ======  =======  =======  =================================================
tiny      5        4       128      128      1.03M: the CPU size (tests, demos)
small     6        6       384      256      10.8M
gpt2      12       12      768      1024     86.0M: GPT-2 124M's shape; its 38.6M-parameter token
                                             embedding is what the byte vocabulary saves
========  =======  ======  =======  =======  =================================================

The training recipe is the usual one: AdamW with weight decay on the matrices only (not on biases,
LayerNorms or embeddings of positions), linear warm-up then cosine decay to ``min_lr_ratio`` of the peak,
gradient clipping (``trainer.gradient_clip_val``), bf16-mixed on GPU (``trainer.precision``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn

VOCAB = 256  # bytes
SIZES = {
    "tiny": dict(n_layer=5, n_head=4, d_model=128, context=128),
    "small": dict(n_layer=6, n_head=6, d_model=384, context=256),
    "gpt2": dict(n_layer=12, n_head=12, d_model=768, context=1024),
}


@dataclass(frozen=True)
class GPTShape:
    n_layer: int
    n_head: int
    d_model: int
    context: int
    vocab: int = VOCAB
    dropout: float = 0.0

    @classmethod
    def of(cls, size: str = "tiny", **overrides: Optional[float]) -> "GPTShape":
        """The preset ``size`` with every override that is not None; a bad value is one ValueError naming it."""
        if size not in SIZES:
            raise ValueError(f"size must be one of {', '.join(SIZES)}, got {size!r}")
        values = {**SIZES[size], **{k: v for k, v in overrides.items() if v is not None}}
        for key in ("n_layer", "n_head", "d_model", "context"):
            if int(values[key]) != values[key] or values[key] < 1:
                raise ValueError(f"{key} must be a positive integer, got {values[key]}")
            values[key] = int(values[key])
        if values["d_model"] % values["n_head"]:
            raise ValueError(f"n_head ({values['n_head']}) must divide d_model ({values['d_model']})")
        if not 0 <= values.get("dropout", 0.0) < 1:
            raise ValueError(f"dropout must be in [0, 1), got {values['dropout']}")
        return cls(**values)


class CausalSelfAttention(nn.Module):
    def __init__(self, shape: GPTShape) -> None:
        super().__init__()
        self.n_head, self.dropout = shape.n_head, shape.dropout
        self.qkv = nn.Linear(shape.d_model, 3 * shape.d_model)
        self.proj = nn.Linear(shape.d_model, shape.d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).split(d, dim=-1)
        q, k, v = (z.view(b, t, self.n_head, d // self.n_head).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(b, t, d))


class Block(nn.Module):
    """x + attention(LayerNorm(x)), then x + MLP(LayerNorm(x)): GPT-2's pre-norm residual block."""

    def __init__(self, shape: GPTShape) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(shape.d_model), nn.LayerNorm(shape.d_model)
        self.attn = CausalSelfAttention(shape)
        self.mlp = nn.Sequential(nn.Linear(shape.d_model, 4 * shape.d_model), nn.GELU(approximate="tanh"),
                                 nn.Linear(4 * shape.d_model, shape.d_model), nn.Dropout(shape.dropout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    """Bytes ``[B, T]`` (T <= context) -> next-byte logits ``[B, T, vocab]``."""

    def __init__(self, shape: GPTShape) -> None:
        super().__init__()
        self.shape = shape
        self.token = nn.Embedding(shape.vocab, shape.d_model)
        self.position = nn.Embedding(shape.context, shape.d_model)
        self.drop = nn.Dropout(shape.dropout)
        self.blocks = nn.Sequential(*(Block(shape) for _ in range(shape.n_layer)))
        self.ln_f = nn.LayerNorm(shape.d_model)
        self.head = nn.Linear(shape.d_model, shape.vocab, bias=False)
        self.head.weight = self.token.weight  # tied: one matrix reads bytes in and writes them out
        self.apply(self._init)
        for name, p in self.named_parameters():  # GPT-2: residual projections scaled by 1/sqrt(2 n_layer)
            if name.endswith(("attn.proj.weight", "mlp.2.weight")):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * shape.n_layer))

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        t = idx.shape[-1]
        x = self.drop(self.token(idx) + self.position.weight[:t])
        return self.head(self.ln_f(self.blocks(x)))


def decay_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW's parameter groups: the matrices (Linear weights, the tied token embedding) decay by
    ``weight_decay``; biases, LayerNorm parameters and position embeddings do not."""
    decay, keep = [], []
    for name, p in model.named_parameters():  # a tied parameter is listed once
        (decay if p.dim() >= 2 and "position" not in name else keep).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": keep, "weight_decay": 0.0}]


def warmup_cosine(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """The learning rate's factor at ``step``: ``(step + 1) / warmup`` for the first ``warmup`` steps, then
    ``min_ratio + (1 - min_ratio) * (1 + cos(pi * s)) / 2`` with ``s`` the fraction of the remaining steps
    done (1 after ``total``)."""
    if step < warmup:
        return (step + 1) / warmup
    s = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * s))


class LanguageModel(pl.LightningModule):
    """Next-byte prediction with a :class:`GPT`. Logs ``train_loss`` (nats per byte) per step, and per
    validation ``val_loss`` (nats) and ``val_bpb`` (bits per byte: ``val_loss / ln 2``); the run's summary
    adds ``val_ppl``, the per-byte perplexity ``exp(val_loss)``.

    The app passes the data module's ``input_shape`` (``[context]``) and ``num_classes`` (256); the model's
    ``context`` is the size's unless given, and the text data module cuts windows of it.
    """

    task = "language"

    def __init__(
        self,
        input_shape: Sequence[int] = (),
        num_classes: int = VOCAB,
        size: str = "tiny",
        n_layer: Optional[int] = None,
        n_head: Optional[int] = None,
        d_model: Optional[int] = None,
        context: Optional[int] = None,
        dropout: float = 0.0,
        lr: float = 1e-3,
        weight_decay: float = 0.1,
        betas: Sequence[float] = (0.9, 0.95),
        warmup_steps: int = 50,
        min_lr_ratio: float = 0.1,
    ) -> None:
        super().__init__()
        if num_classes != VOCAB:
            raise ValueError(f"model=gpt predicts bytes (256 classes) and needs data=text, not a {num_classes}-class dataset")
        if lr <= 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        if weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        if len(betas) != 2 or not all(0 <= b < 1 for b in betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {list(betas)}")
        if warmup_steps < 0 or not 0 <= min_lr_ratio <= 1:
            raise ValueError(f"warmup_steps must be >= 0 and min_lr_ratio in [0, 1], got {warmup_steps} and {min_lr_ratio}")
        self.save_hyperparameters(ignore=["input_shape", "num_classes"])
        self.shape = GPTShape.of(size, n_layer=n_layer, n_head=n_head, d_model=d_model, context=context, dropout=dropout)
        self.net = GPT(self.shape)

    @property
    def context(self) -> int:
        return self.shape.context

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.net(idx)

    def _loss(self, batch) -> torch.Tensor:
        x, y = batch
        logits = self(x)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        loss = self._loss(batch)
        self.log("train_loss", loss, prog_bar=True, on_step=True, on_epoch=False)
        self.log("train_loss_epoch", loss, on_step=False, on_epoch=True, sync_dist=True)
        return loss

    def validation_step(self, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        loss = self._loss(batch)
        log = dict(on_epoch=True, sync_dist=True, add_dataloader_idx=False)
        self.log("val_loss", loss, **log)
        self.log("val_bpb", loss / math.log(2), prog_bar=True, **log)

    def configure_optimizers(self):
        h = self.hparams
        optimizer = torch.optim.AdamW(decay_groups(self.net, h.weight_decay), lr=h.lr, betas=tuple(h.betas))
        total = self.trainer.estimated_stepping_batches
        if not math.isfinite(total):
            raise ValueError("the cosine schedule needs a run of known length: set trainer.max_steps or trainer.max_epochs")
        warmup = min(h.warmup_steps, int(total))  # a run shorter than its warm-up still reaches the peak, at its end
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: warmup_cosine(step, warmup, int(total), h.min_lr_ratio))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}
