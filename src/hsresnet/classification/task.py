"""The classification task for the engine: timm model, timm transforms/mixup/losses, torchmetrics accuracy."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from ..complexity import count_complexity
from ..engine import DistInfo, make_loader, parse_kwargs
from ..engine.config import (
    BELOW_ONE,
    NON_NEGATIVE,
    NON_NEGATIVE_INT,
    POSITIVE,
    POSITIVE_INT,
    PROBABILITY,
    float_in,
    int_at_least,
)
from .data import (
    ArrayTransform,
    FashionMNIST,
    ImageFolderDataset,
    find_fashion_mnist,
    is_fashion_mnist_dir,
    scan_folder,
)

FASHION_MNIST_MEAN, FASHION_MNIST_STD = (0.2860,), (0.3530,)


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group('model')
    group.add_argument('--model', default='hs_resnet26_small', help='timm model name (hs_resnet* or any timm model).')
    group.add_argument(
        '--model-kwargs',
        nargs='*',
        default=[],
        metavar='K=V',
        help='extra model constructor arguments, values as YAML, e.g. --model-kwargs w=16 s=4 channels=[16,32,64,128]',
    )
    group.add_argument('--num-classes', type=POSITIVE_INT, help='classes (default: from the dataset).')
    group.add_argument('--in-chans', type=POSITIVE_INT, help='input channels (default: 1 Fashion-MNIST, else 3).')
    group.add_argument('--drop', type=BELOW_ONE, default=0.0, help='dropout before the classifier.')
    group.add_argument('--drop-path', type=BELOW_ONE, help='stochastic depth rate.')


def add_data_arguments(parser: argparse.ArgumentParser, training: bool = True) -> None:
    group = parser.add_argument_group('data')
    group.add_argument(
        '--data-dir',
        help='Fashion-MNIST idx folder, or an image folder with train/<class>/* and val/<class>/* '
        '(default: the Debian package dataset-fashion-mnist in /usr/share/datasets/fashion-mnist).',
    )
    group.add_argument(
        '--dataset', default='auto', choices=['auto', 'fashion_mnist', 'folder'], help='dataset kind (auto-detected).'
    )
    group.add_argument('--val-split', default='val', help='image-folder validation sub-folder (Fashion-MNIST: test).')
    group.add_argument('--img-size', type=int_at_least(8), help='input size (default: 28 Fashion-MNIST, else model).')
    group.add_argument(
        '--crop-pct', type=float_in(0, 1, low_open=True), help='eval centre-crop fraction (default: model).'
    )
    group.add_argument('--interpolation', default='bilinear', help='resize interpolation.')
    group.add_argument('--mean', type=float_in(), nargs='+', help='normalisation mean (default: dataset).')
    group.add_argument('--std', type=POSITIVE, nargs='+', help='normalisation std (default: dataset).')
    group.add_argument('--val-subset', type=POSITIVE_INT, help='use a fixed random subset of N val images.')
    if training:
        group.add_argument('--train-subset', type=POSITIVE_INT, help='use a fixed random subset of N images.')
        group.add_argument('--no-verify', action='store_true', help='skip the up-front image check of image folders.')
        aug = parser.add_argument_group('augmentation and regularisation (timm)')
        aug.add_argument(
            '--scale',
            type=float_in(0, 1, low_open=True),
            nargs=2,
            default=[0.08, 1.0],
            help='RandomResizedCrop area range.',
        )
        aug.add_argument(
            '--ratio', type=POSITIVE, nargs=2, default=[3 / 4, 4 / 3], help='RandomResizedCrop aspect range.'
        )
        aug.add_argument('--hflip', type=PROBABILITY, default=0.5, help='horizontal flip probability.')
        aug.add_argument('--vflip', type=PROBABILITY, default=0.0, help='vertical flip probability.')
        aug.add_argument('--color-jitter', type=NON_NEGATIVE, default=0.4, help='colour jitter strength (0 = off).')
        aug.add_argument('--aa', help="timm AutoAugment/RandAugment policy, e.g. 'rand-m9-mstd0.5'.")
        aug.add_argument('--reprob', type=PROBABILITY, default=0.0, help='random erasing probability.')
        aug.add_argument('--smoothing', type=BELOW_ONE, default=0.1, help='label smoothing.')
        aug.add_argument('--mixup', type=NON_NEGATIVE, default=0.0, help='mixup alpha (0 = off).')
        aug.add_argument('--cutmix', type=NON_NEGATIVE, default=0.0, help='cutmix alpha (0 = off).')
        aug.add_argument('--mixup-prob', type=PROBABILITY, default=1.0, help='probability of mixup/cutmix per batch.')
        aug.add_argument(
            '--mixup-switch-prob', type=PROBABILITY, default=0.5, help='cutmix instead of mixup probability.'
        )
        aug.add_argument(
            '--mixup-off-epoch',
            type=NON_NEGATIVE_INT,
            default=0,
            help='turn mixup/cutmix off from this epoch (0: never).',
        )


def _subset(dataset: Dataset, n: Optional[int], seed: int = 0) -> Dataset:
    """A fixed random subset of ``n`` items (same for every process and run)."""
    if not n or n >= len(dataset):
        return dataset
    idx = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:n].tolist()
    sub = Subset(dataset, idx)
    sub.classes = dataset.classes  # type: ignore[attr-defined]
    return sub


def resolve_data(cfg: argparse.Namespace) -> str:
    """'fashion_mnist' or 'folder', with a clear error when neither is there."""
    kind, data_dir = cfg.dataset, cfg.data_dir
    if kind == 'auto':
        if data_dir is None or is_fashion_mnist_dir(data_dir):
            kind = 'fashion_mnist'
        elif (Path(data_dir) / 'train').is_dir() or (Path(data_dir) / cfg.val_split).is_dir():
            kind = 'folder'
        else:
            raise ValueError(
                f'--data-dir {data_dir} is neither a Fashion-MNIST idx folder nor an image folder with '
                f'train/<class>/* and {cfg.val_split}/<class>/*.'
            )
    if kind == 'fashion_mnist':
        find_fashion_mnist(data_dir)  # raises with the install hint
    elif not data_dir:
        raise ValueError('an image-folder dataset needs --data-dir <root> with train/<class>/* and val/<class>/*.')
    return kind


def _per_channel(values: Tuple[float, ...], in_chans: int, flag: str) -> Tuple[float, ...]:
    """One value per input channel: ``in_chans`` values, or one for all."""
    if len(values) == in_chans:
        return tuple(values)
    if len(values) == 1:
        return tuple(values) * in_chans
    raise ValueError(
        f'{flag} has {len(values)} values for {in_chans}-channel input: give {in_chans} values, or one for all.'
    )


def build_model(
    model: str, num_classes: int, in_chans: int, model_kwargs: Any = (), drop: float = 0.0, drop_path=None
) -> nn.Module:
    """``timm.create_model`` with the user's kwargs; an unknown model or kwarg is a ValueError with the fix."""
    import timm

    import hsresnet  # noqa: F401  (registers hs_resnet* into timm)

    kwargs = parse_kwargs(model_kwargs)
    if drop_path is not None:
        kwargs['drop_path_rate'] = drop_path
    if not timm.is_model(model):
        close = timm.list_models(f'*{model.split("_")[0]}*')[:8]
        raise ValueError(f'unknown model {model!r}; try `timm.list_models()`, e.g. {close}.')
    try:
        return timm.create_model(model, num_classes=num_classes, in_chans=in_chans, drop_rate=drop, **kwargs)
    except TypeError as err:
        raise ValueError(f'--model-kwargs {kwargs} do not fit {model}: {err}') from None


class ClassificationTask:
    """Image classification on Fashion-MNIST or an image folder; see ``engine.task`` for the contract."""

    main_metric = 'top1'

    def __init__(
        self, cfg: argparse.Namespace, verbose: bool = True, training: bool = True, classes: Optional[List[str]] = None
    ):
        """Resolve and check the data up front (errors before any training). ``verbose``: log the files skipped as
        unreadable (rank 0 does). ``classes``: the class list of a checkpoint, for evaluating an image folder (its
        class folders must be among them)."""
        self.cfg = cfg
        self.kind = resolve_data(cfg)
        if self.kind == 'fashion_mnist':
            if cfg.in_chans not in (None, 1):
                raise ValueError(
                    f'--in-chans {cfg.in_chans}: Fashion-MNIST images have one (grey) channel; leave --in-chans out.'
                )
            in_chans = cfg.in_chans or 1
            img_size = cfg.img_size or 28
            mean, std, crop_pct = FASHION_MNIST_MEAN, FASHION_MNIST_STD, 1.0
            self.classes: List[str] = list(FashionMNIST.classes)
        else:
            from timm.data import resolve_data_config
            from timm.models import get_pretrained_cfg

            # the model's default input size, mean/std and crop_pct, without building it
            pretrained = get_pretrained_cfg(cfg.model)
            dcfg = resolve_data_config(
                pretrained_cfg=pretrained.to_dict() if pretrained else {'input_size': (3, 224, 224)}
            )
            if cfg.in_chans not in (None, 1, 3):
                raise ValueError(f'--in-chans {cfg.in_chans}: image folders are read as grey (1) or RGB (3) images.')
            in_chans = cfg.in_chans or 3
            img_size = cfg.img_size or dcfg['input_size'][-1]
            mean, std, crop_pct = dcfg['mean'], dcfg['std'], dcfg['crop_pct']
            root, verify = Path(cfg.data_dir), not getattr(cfg, 'no_verify', False)
            self.train_split = scan_folder(root / 'train', verify=verify, log=verbose) if training else None
            known = self.train_split.classes if self.train_split else classes
            self.val_split = scan_folder(root / cfg.val_split, classes=known, verify=verify, log=verbose)
            self.classes = self.val_split.classes
        self.in_chans, self.img_size = in_chans, img_size
        self.mean = _per_channel(tuple(cfg.mean or mean), in_chans, '--mean')
        self.std = _per_channel(tuple(cfg.std or std), in_chans, '--std')
        self.crop_pct = cfg.crop_pct or crop_pct
        self.num_classes = cfg.num_classes or len(self.classes)
        if self.num_classes < len(self.classes):
            raise ValueError(
                f'--num-classes {self.num_classes} is smaller than the {len(self.classes)} dataset classes.'
            )
        self.mixup_fn = None
        self.mixup_on = False
        if training:
            self._build_losses()

    # -- model and data -------------------------------------------------------------------------------------------
    def build_model(self) -> nn.Module:
        cfg = self.cfg
        return build_model(cfg.model, self.num_classes, self.in_chans, cfg.model_kwargs, cfg.drop, cfg.drop_path)

    def transforms(self, training: bool):
        from timm.data import create_transform

        cfg = self.cfg
        size = (self.in_chans, self.img_size, self.img_size)
        if self.kind == 'fashion_mnist' and (self.img_size, self.crop_pct, self.in_chans) == (28, 1.0, 1):
            # the whole image at its own size: create_transform reduces to flip, normalize and erasing: on arrays
            if not training:
                return ArrayTransform(self.mean, self.std)
            whole_crop = tuple(cfg.scale) == tuple(cfg.ratio) == (1.0, 1.0)
            if whole_crop and not (cfg.vflip or cfg.color_jitter or cfg.aa):
                return ArrayTransform(self.mean, self.std, cfg.hflip, cfg.reprob)
        common = dict(interpolation=cfg.interpolation, mean=self.mean, std=self.std)
        if not training:
            return create_transform(size, is_training=False, crop_pct=self.crop_pct, **common)
        return create_transform(
            size,
            is_training=True,
            scale=tuple(cfg.scale),
            ratio=tuple(cfg.ratio),
            hflip=cfg.hflip,
            vflip=cfg.vflip,
            color_jitter=cfg.color_jitter,
            auto_augment=cfg.aa,
            re_prob=cfg.reprob,
            re_mode='pixel',
            **common,
        )

    def datasets(self, training: bool = True) -> Tuple[Optional[Dataset], Dataset]:
        """(train, val) datasets with their transforms (train is None when ``training`` is False)."""
        cfg = self.cfg
        if self.kind == 'fashion_mnist':
            train = FashionMNIST(cfg.data_dir, 'train', self.transforms(True)) if training else None
            val: Dataset = FashionMNIST(cfg.data_dir, 'test', self.transforms(False))
        else:
            train = ImageFolderDataset(self.train_split, self.in_chans, self.transforms(True)) if training else None
            val = ImageFolderDataset(self.val_split, self.in_chans, self.transforms(False))
        if train is not None:
            train = _subset(train, getattr(cfg, 'train_subset', None), seed=1)
        return train, _subset(val, cfg.val_subset, seed=2)

    def build_loaders(self, info: DistInfo) -> Tuple[DataLoader, DataLoader]:
        cfg = self.cfg
        train, val = self.datasets(training=True)
        train_loader = make_loader(train, cfg.batch_size, True, info, cfg.workers, cfg.seed)
        val_loader = make_loader(val, cfg.batch_size, False, info, cfg.workers, cfg.seed)
        return train_loader, val_loader

    # -- loss and metrics -----------------------------------------------------------------------------------------
    def _build_losses(self) -> None:
        from timm.data import Mixup
        from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

        cfg = self.cfg
        if cfg.mixup > 0 or cfg.cutmix > 0:
            self.mixup_fn = Mixup(
                mixup_alpha=cfg.mixup,
                cutmix_alpha=cfg.cutmix,
                prob=cfg.mixup_prob,
                switch_prob=cfg.mixup_switch_prob,
                label_smoothing=cfg.smoothing,
                num_classes=self.num_classes,
            )
            self.mixup_on = True
            self.mixup_loss: nn.Module = SoftTargetCrossEntropy()
        self.loss = LabelSmoothingCrossEntropy(cfg.smoothing) if cfg.smoothing > 0 else nn.CrossEntropyLoss()

    def on_epoch_start(self, epoch: int) -> None:
        off = self.cfg.mixup_off_epoch
        self.mixup_on = self.mixup_fn is not None and not (off and epoch >= off)

    def training_step(self, model: nn.Module, batch) -> Dict[str, torch.Tensor]:
        x, y = batch
        if self.mixup_on:
            x, y = self.mixup_fn(x, y)
            return {'loss': self.mixup_loss(model(x).float(), y)}
        return {'loss': self.loss(model(x).float(), y)}

    def evaluate(self, model: nn.Module, loader: DataLoader, confmat: Optional[Any] = None) -> Dict[str, float]:
        """top-1, top-5 (top-k with k = min(5, classes)) and the cross-entropy, exact under DDP (torchmetrics).

        ``confmat``: an optional torchmetrics confusion matrix, updated on the way."""
        from torchmetrics import MeanMetric
        from torchmetrics.classification import MulticlassAccuracy

        device = next(model.parameters()).device
        top1 = MulticlassAccuracy(self.num_classes, top_k=1, average='micro').to(device)
        top5 = MulticlassAccuracy(self.num_classes, top_k=min(5, self.num_classes), average='micro').to(device)
        loss = MeanMetric().to(device)
        channels_last = getattr(self.cfg, 'channels_last', False)
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            logits = model(x).float()
            top1.update(logits, y)
            top5.update(logits, y)
            loss.update(nn.functional.cross_entropy(logits, y), weight=len(y))
            if confmat is not None:
                confmat.update(logits, y)
        return {'top1': 100 * top1.compute().item(), 'top5': 100 * top5.compute().item(), 'loss': loss.compute().item()}

    # -- records --------------------------------------------------------------------------------------------------
    def metadata(self) -> Dict[str, Any]:
        """Written into every checkpoint: enough to rebuild the model and its preprocessing without flags."""
        cfg = self.cfg
        return {
            'task': 'classification',
            'model': cfg.model,
            'model_kwargs': json.dumps(parse_kwargs(cfg.model_kwargs)),
            'num_classes': self.num_classes,
            'in_chans': self.in_chans,
            'img_size': self.img_size,
            'mean': list(self.mean),
            'std': list(self.std),
            'crop_pct': self.crop_pct,
            'interpolation': cfg.interpolation,
            'classes': self.classes,
        }

    def summary_extras(self, model: nn.Module) -> Dict[str, Any]:
        return {
            'model': self.cfg.model,
            'dataset': self.kind,
            'num_classes': self.num_classes,
            'img_size': self.img_size,
            'macs': count_complexity(model, self.img_size, self.in_chans).macs,
        }


def load_classifier(checkpoint: str) -> Tuple[nn.Module, Dict[str, Any]]:
    """Rebuild the model a checkpoint was trained as (from its metadata) and load its weights, in eval mode.

    ``checkpoint``: a ``.safetensors`` file or a run directory (its ``model_best``, else ``model``, else ``last``).
    Returns (model, metadata); the metadata holds the classes and the preprocessing (img_size, mean, std ...).
    """
    from ..engine import load_trained_model

    def build(meta: Dict[str, Any], weights: Dict[str, torch.Tensor]) -> nn.Module:
        if not meta.get('model'):
            raise ValueError(f'{checkpoint} is not a classification checkpoint written by `hsresnet train`.')
        num_classes = int(
            meta.get('num_classes') or weights[next(k for k in weights if k.endswith('fc.weight'))].shape[0]
        )
        kwargs = json.loads(meta.get('model_kwargs') or '{}')
        meta.setdefault('classes', [str(i) for i in range(num_classes)])
        return build_model(meta['model'], num_classes, int(meta.get('in_chans', 3)), [kwargs])

    return load_trained_model(checkpoint, 'classification', build, 'hsresnet train')
