"""torchrun / DDP plumbing: process-group set-up from the environment, samplers, seeding and RNG state.

``torchrun --nproc_per_node N`` (and multi-node torchrun) sets ``RANK``, ``LOCAL_RANK`` and ``WORLD_SIZE``; without
them the run is a single process. The backend is NCCL on CUDA devices and gloo on the CPU.
"""

from __future__ import annotations

import itertools
import os
import random
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Optional

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler, get_worker_info


@dataclass
class DistInfo:
    """Where this process stands: its rank, the world size and the device it computes on."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device('cpu')

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def __bool__(self) -> bool:
        """``if info:`` reads as ``if distributed:`` (the task contract's ``build_loaders(distributed)``)."""
        return self.distributed

    @property
    def is_main(self) -> bool:
        """Rank 0 alone logs, writes files and saves checkpoints."""
        return self.rank == 0


def resolve_device(device: str = 'auto', local_rank: int = 0) -> torch.device:
    """``'auto'`` -> the local CUDA device when there is one, else the CPU."""
    if device == 'auto':
        device = 'cuda' if torch.cuda.is_available() else 'cpu'
    dev = torch.device(device)
    if dev.type == 'cuda':
        if not torch.cuda.is_available():
            raise ValueError(f'--device {device} asked for CUDA but no GPU is visible: use --device cpu.')
        dev = torch.device('cuda', local_rank if dev.index is None else dev.index)
        torch.cuda.set_device(dev)
    return dev


def init_distributed(device: str = 'auto') -> DistInfo:
    """Join the process group that torchrun describes in the environment (or stay a single process)."""
    world_size = int(os.environ.get('WORLD_SIZE', '1'))
    rank = int(os.environ.get('RANK', '0'))
    local_rank = int(os.environ.get('LOCAL_RANK', '0'))
    dev = resolve_device(device, local_rank)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend='nccl' if dev.type == 'cuda' else 'gloo')
    return DistInfo(rank=rank, local_rank=local_rank, world_size=world_size, device=dev)


def cleanup_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def all_reduce_mean(value: float, info: DistInfo) -> float:
    """The mean of a Python number over all processes."""
    if not info.distributed:
        return float(value)
    t = torch.tensor([float(value)], dtype=torch.float64)
    if dist.get_backend() == 'nccl':
        t = t.to(info.device)
    dist.all_reduce(t)
    return float(t.item()) / info.world_size


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> Dict[str, Any]:
    """All RNG states, as tensors and plain numbers (loadable with ``torch.load(weights_only=True)``)."""
    np_state = np.random.get_state()
    state: Dict[str, Any] = {
        'python': random.getstate(),
        'numpy': {
            'kind': np_state[0],
            'key': torch.from_numpy(np_state[1].astype(np.int64)),
            'pos': int(np_state[2]),
            'has_gauss': int(np_state[3]),
            'gauss': float(np_state[4]),
        },
        'torch': torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state['cuda'] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    """Restore what ``rng_state`` captured."""
    version, internal, gauss = state['python']
    random.setstate((version, tuple(internal), gauss))
    n = state['numpy']
    np.random.set_state((n['kind'], n['key'].numpy().astype(np.uint32), n['pos'], n['has_gauss'], n['gauss']))
    torch.set_rng_state(state['torch'])
    if 'cuda' in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state['cuda'])


class ShardSampler(Sampler[int]):
    """Evaluation sampler: rank r takes indices r, r + W, r + 2W ... with no padding, so every sample is counted once.

    (``DistributedSampler`` pads with repeats, which would bias metrics.) Metrics must then be reduced over ranks,
    which torchmetrics does by itself.
    """

    def __init__(self, length: int, rank: int, world_size: int):
        self.length, self.rank, self.world_size = length, rank, world_size

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.length, self.world_size))

    def __len__(self) -> int:
        return len(range(self.rank, self.length, self.world_size))


class ResumableSampler(DistributedSampler):
    """``DistributedSampler`` that can start its epoch part-way: it drops the first ``skip`` indices of the epoch's
    order (set ``skip`` before iterating), which lets a run resumed mid-epoch see exactly the remaining batches
    without loading the ones it already trained on."""

    skip: int = 0

    def __iter__(self) -> Iterator[int]:
        return itertools.islice(super().__iter__(), self.skip, None)

    def __len__(self) -> int:
        return max(super().__len__() - self.skip, 0)


class WorkerSeededDataset(Dataset):
    """A training dataset whose random augmentations in data workers depend only on the epoch and the batch.

    A worker's RNG otherwise advances with every sample it has loaded, and batches go to workers in turn, so a run
    resumed in the middle of an epoch (which starts its loader at the next batch, on worker 0, with fresh RNGs) would
    draw other augmentations for the rest of the epoch than the uninterrupted run. Here each batch reseeds Python,
    NumPy and torch in its worker from the loader's base seed of the epoch (the same after a resume: the engine
    reseeds the loader's generator every epoch) and the batch's first index. In the main process (``-j 0``) nothing
    is reseeded: the engine's per-epoch seeding already replays it.
    """

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> Any:
        self._reseed(index, 1)
        return self.dataset[index]

    def __getitems__(self, indices: List[int]) -> list:
        self._reseed(indices[0], len(indices))
        if hasattr(self.dataset, '__getitems__'):
            return self.dataset.__getitems__(indices)
        return [self.dataset[i] for i in indices]

    @staticmethod
    def _reseed(first_index: int, count: int) -> None:
        worker = get_worker_info()
        if worker is None:
            return
        base_seed = worker.seed - worker.id  # the loader draws one base seed per epoch; worker k gets base + k
        seed, numpy_seed = np.random.SeedSequence([base_seed % 2**64, first_index, count]).generate_state(2)
        random.seed(int(seed))
        np.random.seed(int(numpy_seed))
        torch.manual_seed(int(seed))


def _seed_worker(worker_id: int) -> None:
    """Give NumPy and Python ``random`` in each worker a seed derived from torch's per-worker seed."""
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def make_loader(
    dataset: Dataset,
    batch_size: int,
    train: bool,
    info: DistInfo,
    workers: int = 0,
    seed: int = 0,
    collate_fn: Optional[Callable] = None,
    drop_last: Optional[bool] = None,
) -> DataLoader:
    """A loader for this process: shuffled, rank-sharded and epoch-seeded for training; sharded in order for eval.

    Training uses a ``DistributedSampler`` even in a single process: its order depends only on (seed, epoch), which
    the engine sets each epoch with ``set_epoch``, so a resumed run replays the same order (from a mid-epoch
    checkpoint, the rest of it: ``ResumableSampler.skip``), and with data workers the same augmentations
    (``WorkerSeededDataset``, which then wraps the training dataset: ``loader.dataset.dataset`` is the original).
    """
    if train:
        if workers > 0:
            dataset = WorkerSeededDataset(dataset)
        sampler: Sampler = ResumableSampler(
            dataset,
            num_replicas=info.world_size,
            rank=info.rank,
            shuffle=True,
            seed=seed,
            drop_last=True if drop_last is None else drop_last,
        )
    else:
        sampler = ShardSampler(len(dataset), info.rank, info.world_size)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=workers,
        collate_fn=collate_fn,
        pin_memory=info.device.type == 'cuda',
        drop_last=bool(train if drop_last is None else drop_last),
        persistent_workers=False,
        worker_init_fn=_seed_worker if workers > 0 else None,
        generator=torch.Generator().manual_seed(seed),
    )
