"""What a task (classification, detection, segmentation) gives the engine.

Required:
    main_metric: str                   name of the metric that ``evaluate`` returns and 'best' is chosen by
                                       (higher is better), e.g. 'top1', 'map', 'miou'.
    build_model() -> nn.Module         the model on the CPU, freshly initialised (the engine moves it, wraps it in
                                       DDP, converts it to channels_last, compiles it and loads checkpoints).
    build_loaders(info) -> (train_loader, val_loader)
                                       ``info`` is the engine's ``DistInfo``; use ``engine.make_loader`` to get the
                                       rank-sharded, epoch-seeded samplers (a plain loader works for 1 process).
    training_step(model, batch) -> dict[str, Tensor]
                                       forward + loss for one batch already on the device; must hold 'loss'
                                       (a scalar); other scalars are averaged and logged as train_<key>. The
                                       engine runs it under autocast and does backward/step/EMA itself.
    evaluate(model, loader) -> dict[str, float]
                                       metrics over the whole ``loader``; called on every rank with the unwrapped
                                       model in eval mode under ``torch.no_grad`` and autocast; must reduce over
                                       ranks (torchmetrics does so by itself) so all ranks return the same numbers.
Optional:
    batch_size(batch) -> int           samples in a batch (for images/s); default: the length of the first tensor.
    on_epoch_start(epoch: int) -> None e.g. switch mixup off for the last epochs.
    summary_extras(model) -> dict      extra fields for the final JSON summary (e.g. MACs).
    metadata() -> dict                 identity written in the checkpoint header (model name, class names...).
"""

from __future__ import annotations

from typing import Any, Dict, Protocol, Tuple, runtime_checkable

import torch
from torch import nn
from torch.utils.data import DataLoader


@runtime_checkable
class Task(Protocol):
    main_metric: str

    def build_model(self) -> nn.Module: ...

    def build_loaders(self, info: Any) -> Tuple[DataLoader, DataLoader]: ...

    def training_step(self, model: nn.Module, batch: Any) -> Dict[str, torch.Tensor]: ...

    def evaluate(self, model: nn.Module, loader: DataLoader) -> Dict[str, float]: ...
