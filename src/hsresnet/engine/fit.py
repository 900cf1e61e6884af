"""The training loop shared by every task: ``fit(task, cfg)``.

It owns distribution (torchrun env, DDP, rank-0 side effects), the timm optimizer and scheduler, AMP, gradient
accumulation, EMA, checkpoints and resume, progress bars and run records. The task supplies the model, the loaders,
the loss and the metrics (see ``engine.task``).

Determinism and resume: every epoch starts by seeding Python, NumPy and torch from (seed, epoch, rank) and the
sampler and loader generator from (seed, epoch), and a checkpoint is written after every epoch and, with
``--recovery-interval N``, every N optimizer steps inside it (the RNGs are then re-seeded from (seed, epoch, batch,
rank)). A run killed in the middle of epoch e resumes from its last checkpoint: the sampler skips the batches
already trained on and the rest of the epoch is replayed exactly, so with ``--deterministic`` the final weights equal
those of an uninterrupted run, with or without data workers (``make_loader`` seeds each batch's augmentations in a
worker from the epoch and the batch: ``WorkerSeededDataset``).
"""

from __future__ import annotations

import logging
import math
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ..optimize import fast_bf16_available
from .allocator import keep_freed_memory
from .batchnorm import use_wide_batchnorm
from .checkpoint import CheckpointError, check_compatible, load_checkpoint, save_checkpoint, save_weights
from .config import config_to_dict
from .distributed import (
    DistInfo,
    all_reduce_mean,
    barrier,
    cleanup_distributed,
    init_distributed,
    rng_state,
    seed_everything,
    set_rng_state,
)
from .logs import RunLogger, write_json
from .outputs import OutputError, check_run_folder, clear_run_folder, describe_os_error, kept_checkpoint, lock, release

_log = logging.getLogger(__name__)


def log(info: DistInfo, msg: str) -> None:
    """Log on rank 0 only."""
    if info.is_main:
        _log.info(msg)


def to_device(batch: Any, device: torch.device, channels_last: bool = False) -> Any:
    """Move every tensor in a (nested) batch to ``device``; 4-D float tensors become channels_last on request."""
    if isinstance(batch, torch.Tensor):
        batch = batch.to(device, non_blocking=True)
        if channels_last and batch.dim() == 4 and batch.is_floating_point():
            batch = batch.contiguous(memory_format=torch.channels_last)
        return batch
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(b, device, channels_last) for b in batch)
    if isinstance(batch, dict):
        return {k: to_device(v, device, channels_last) for k, v in batch.items()}
    return batch


def batch_size_of(task: Any, batch: Any) -> int:
    if hasattr(task, 'batch_size'):
        return int(task.batch_size(batch))
    first = batch
    while isinstance(first, (list, tuple, dict)):
        first = next(iter(first.values())) if isinstance(first, dict) else first[0]
    return len(first)


def amp_enabled(cfg: Any, device: torch.device) -> bool:
    """Whether ``--amp`` autocasts on ``device``: ``true``/``false`` as given; ``auto`` on CUDA (with bf16 only on
    GPUs that have bf16 tensor cores) and on CPUs with native bf16 (AMX or AVX512-BF16), not on other CPUs, where bf16
    autocast is emulated (a training step of the default Fashion-MNIST model: 6x slower than fp32 on an AVX2 EPYC)."""
    if cfg.amp != 'auto':
        return bool(cfg.amp)
    if device.type == 'cuda' and cfg.amp_dtype == 'float16':
        return True
    return fast_bf16_available(device)


def autocast(cfg: Any, device: torch.device):
    """The autocast context of ``--amp`` (bf16 on the CPU; ``--amp-dtype`` on GPUs), or a no-op."""
    if not amp_enabled(cfg, device):
        return nullcontext()
    dtype = torch.bfloat16 if device.type == 'cpu' else getattr(torch, cfg.amp_dtype)
    return torch.autocast(device.type, dtype=dtype)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def check_config(cfg: Any) -> None:
    """Refuse values the loop cannot run with, naming the flag."""
    for name in ('epochs', 'batch_size', 'grad_accum_steps'):
        if getattr(cfg, name) < 1:
            raise ValueError(f'--{name.replace("_", "-")} must be >= 1, got {getattr(cfg, name)}.')
    for name in ('workers', 'recovery_interval'):
        if getattr(cfg, name) < 0:
            raise ValueError(f'--{name.replace("_", "-")} must be >= 0, got {getattr(cfg, name)}.')


def epoch_seed(cfg: Any, info: DistInfo, epoch: int, batch: int = 0) -> int:
    """The seed of (epoch, first batch, rank): every epoch and every recovery point starts from its own."""
    return cfg.seed + 1_000_003 * (epoch + 1) + 7_919 * batch + info.rank


def fit(task: Any, cfg: Any) -> Dict[str, Any]:
    """Train ``task`` as configured by ``cfg`` (see ``add_engine_arguments``); return the final summary dict.

    Under torchrun every process calls ``fit``; all return the summary, rank 0 alone writes files.
    """
    check_config(cfg)
    info = init_distributed(cfg.device)
    try:
        return _Run(task, cfg, info).train()
    except OSError as err:  # the file system refused a write: say what happened and what is intact
        raise OutputError(f'{describe_os_error(err)}; {kept_checkpoint(cfg.output)}.') from None
    except KeyboardInterrupt:
        raise KeyboardInterrupt(f'interrupted; {kept_checkpoint(cfg.output)}') from None
    finally:
        release(cfg.output)
        cleanup_distributed()


class _Run:
    """One training run: the model and what trains it, and the counters that a checkpoint saves and ``--resume``
    restores. Everything that can refuse the run happens in ``__init__`` before anything is written."""

    def __init__(self, task: Any, cfg: Any, info: DistInfo):
        self.task, self.cfg, self.info, self.start_wall = task, cfg, info, time.time()
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        if cfg.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
            torch.backends.cudnn.benchmark = False
        seed_everything(cfg.seed + info.rank)
        self.output, device = Path(cfg.output), info.device
        if device.type == 'cpu':
            keep_freed_memory()

        replaced = check_run_folder(self.output, cfg.resume, cfg.overwrite) if info.is_main else []
        resume_state: Optional[Dict[str, Any]] = None
        self.model = model = task.build_model()
        if cfg.resume:
            weights, resume_state, meta = load_checkpoint(cfg.resume)
            check_compatible(model, weights, str(cfg.resume), meta)
            model.load_state_dict(weights)
        model.to(device)
        if cfg.channels_last:
            model.to(memory_format=torch.channels_last)
            if device.type == 'cpu':  # PyTorch's CPU batch norm is slow on narrow channels_last tensors
                use_wide_batchnorm(model)
        self.train_loader, self.val_loader = task.build_loaders(info)
        if len(self.train_loader) == 0:
            raise ValueError('the training loader is empty: the dataset holds fewer samples than one batch (-b).')

        from timm.optim import create_optimizer_v2
        from timm.scheduler import create_scheduler_v2
        from timm.utils import ModelEmaV3

        self.global_batch = cfg.batch_size * info.world_size * cfg.grad_accum_steps
        self.lr = cfg.lr if cfg.lr is not None else cfg.lr_base * self.global_batch / cfg.lr_base_size
        self.optimizer = create_optimizer_v2(
            model, opt=cfg.opt, lr=self.lr, weight_decay=cfg.weight_decay, momentum=cfg.momentum
        )
        updates_per_epoch = math.ceil(len(self.train_loader) / cfg.grad_accum_steps)
        self.scheduler, _ = create_scheduler_v2(
            self.optimizer,
            sched=cfg.sched,
            num_epochs=cfg.epochs,
            decay_epochs=cfg.decay_epochs,
            decay_milestones=cfg.decay_milestones,
            decay_rate=cfg.decay_rate,
            min_lr=cfg.min_lr,
            warmup_lr=cfg.warmup_lr,
            warmup_epochs=cfg.warmup_epochs,
            step_on_epochs=cfg.sched_on_epochs,
            updates_per_epoch=updates_per_epoch,
        )
        self.ema = ModelEmaV3(model, decay=cfg.model_ema_decay) if cfg.model_ema else None

        # epochs done, optimizer steps, best score, and from a mid-epoch checkpoint: batches of the next epoch done
        # and their running sums
        self.epoch, self.step, self.best, self.start_batch, self.partial = 0, 0, None, 0, None
        self.elapsed, self.images_seen, self.train_time, history = 0.0, 0, 0.0, []
        if resume_state is not None:
            history = self.restore(resume_state)

        self.train_model: nn.Module = torch.compile(model, backend=cfg.torchcompile) if cfg.torchcompile else model
        self.ddp: Optional[DistributedDataParallel] = None
        if info.distributed:
            ids = [device.index] if device.type == 'cuda' else None
            self.ddp = self.train_model = DistributedDataParallel(self.train_model, device_ids=ids)
        amp = amp_enabled(cfg, device)
        self.scaler = torch.amp.GradScaler('cuda', enabled=amp and device.type == 'cuda' and cfg.amp_dtype == 'float16')

        if info.is_main:
            self.output.mkdir(parents=True, exist_ok=True)
            lock(self.output)  # a second run into this folder is refused from here on
            clear_run_folder(self.output, replaced)  # --overwrite: the replaced run's files go, none of them mixes in
            write_json(self.output / 'config.json', config_to_dict(cfg))
        self.logger = RunLogger(
            self.output, task.main_metric, enabled=info.is_main, history=history, tensorboard=not cfg.no_tensorboard
        )
        self.n_params = count_params(model)
        log(
            info,
            f'{self.n_params / 1e6:.2f} M params; {info.world_size} process(es) on {device}; global batch '
            f'{self.global_batch}; lr {self.lr:.4g}; {cfg.epochs} epochs x {updates_per_epoch} steps; '
            f'{_precision(amp, cfg, device)}{" (--amp auto)" if cfg.amp == "auto" else ""}',
        )

    def restore(self, state: Dict[str, Any]) -> list:
        """Take up a checkpoint's training state (optimizer, scheduler, EMA, RNGs, counters); return its history."""
        cfg = self.cfg
        try:
            self.optimizer.load_state_dict(state['optimizer'])
            if state.get('scheduler') is not None:
                self.scheduler.load_state_dict(state['scheduler'])
            if self.ema is not None:
                if state.get('ema') is None:
                    raise CheckpointError('the checkpoint has no EMA weights but --model-ema is on')
                self.ema.module.load_state_dict(state['ema'])
        except (KeyError, ValueError, RuntimeError) as err:
            raise CheckpointError(
                f'cannot restore the training state of {cfg.resume} ({err}); resume with the optimizer, scheduler '
                'and EMA settings of the run that saved it.'
            ) from None
        set_rng_state(state['rng'])
        self.epoch, self.step = int(state['epoch']), int(state['global_step'])
        self.start_batch, self.partial = int(state.get('batch', 0)), state.get('partial')
        saved = state.get('config', {})
        changed = [
            f'{k}={saved[k]}'
            for k in ('batch_size', 'grad_accum_steps')
            if saved.get(k, getattr(cfg, k)) != getattr(cfg, k)
        ]
        if state.get('world_size', self.info.world_size) != self.info.world_size:
            changed.append(f'{state["world_size"]} processes')
        if self.start_batch and changed:
            raise CheckpointError(
                f'{cfg.resume} was saved in the middle of an epoch with {", ".join(changed)}: resume with the same '
                'values, since the batches already trained on are counted in them.'
            )
        self.best, self.elapsed = state.get('best'), float(state.get('elapsed', 0.0))
        self.images_seen, self.train_time = int(state.get('images_seen', 0)), float(state.get('train_time', 0.0))
        within = f' and {self.start_batch} batches of epoch {self.epoch + 1}' if self.start_batch else ''
        log(self.info, f'resumed from {cfg.resume}: {self.epoch} epochs{within} done, step {self.step}')
        return list(state.get('history', []))

    def training_state(self, epoch: int, batch: int = 0, progress: Optional[dict] = None) -> Dict[str, Any]:
        """What --resume needs: ``epoch`` epochs done, plus ``batch`` batches of the next with their running sums."""
        return {
            'epoch': epoch,
            'batch': batch,
            'partial': progress,
            'world_size': self.info.world_size,
            'global_step': self.step,
            'optimizer': self.optimizer.state_dict(),
            'scheduler': self.scheduler.state_dict(),
            'ema': self.ema.module.state_dict() if self.ema is not None else None,
            'rng': rng_state(),
            'config': config_to_dict(self.cfg),
            'best': self.best,
            'history': self.logger.history,
            'elapsed': self.elapsed + time.time() - self.start_wall,
            'images_seen': self.images_seen,
            'train_time': self.train_time,
        }

    def save(self, epoch: int, batch: int = 0, progress: Optional[dict] = None) -> None:
        """Checkpoint ``last`` (rank 0); inside an epoch, then re-seed as a run resumed from here starts."""
        if self.info.is_main:
            state = self.training_state(epoch, batch, progress)
            save_checkpoint(self.output / 'last', self.model, state, _meta(self.task, self.cfg, epoch))
        if batch:
            seed_everything(epoch_seed(self.cfg, self.info, epoch, batch))

    def train(self) -> Dict[str, Any]:
        """The epochs left, an evaluation every ``--eval-interval`` and after the last; the final summary."""
        cfg, info, task, loader = self.cfg, self.info, self.task, self.train_loader
        final_metrics: Dict[str, float] = {}
        for epoch in range(self.epoch, cfg.epochs):
            epoch_start = time.time()
            first_batch = self.start_batch if epoch == self.epoch else 0
            seed_everything(epoch_seed(cfg, info, epoch, first_batch))
            if hasattr(loader.sampler, 'set_epoch'):
                loader.sampler.set_epoch(epoch)
            if first_batch and not hasattr(loader.sampler, 'skip'):
                raise CheckpointError(
                    f"{cfg.resume} was saved in the middle of an epoch, and this task's training sampler cannot start "
                    'part-way (build the loader with engine.make_loader).'
                )
            if hasattr(loader.sampler, 'skip'):
                loader.sampler.skip = first_batch * cfg.batch_size
            if getattr(loader, 'generator', None) is not None:
                loader.generator.manual_seed(cfg.seed + epoch)
            if hasattr(task, 'on_epoch_start'):
                task.on_epoch_start(epoch)
            stats, n_images, t_train = self.train_one_epoch(epoch, first_batch)
            if cfg.sched_on_epochs:
                self.scheduler.step(epoch + 1)
            self.images_seen += n_images * info.world_size
            self.train_time += t_train
            row: Dict[str, Any] = {'epoch': epoch + 1, 'lr': self.optimizer.param_groups[0]['lr']}
            row.update({f'train_{k}': all_reduce_mean(v, info) for k, v in stats.items()})
            row['train_images_per_s'] = n_images * info.world_size / max(t_train, 1e-9)
            if (epoch + 1) % cfg.eval_interval == 0 or epoch + 1 == cfg.epochs:
                final_metrics = self.evaluate()
                row.update({f'val_{k}': v for k, v in final_metrics.items()})
                self.keep_best(final_metrics, epoch + 1)
            row['epoch_time_s'] = time.time() - epoch_start
            self.logger.log_epoch(row)
            log(info, ' '.join(f'{k}={_fmt(v)}' for k, v in row.items()))
            self.save(epoch + 1)
            barrier()

        if not final_metrics:  # resumed a finished run: evaluate once for the summary
            final_metrics = self.evaluate()
        summary = self.summary(final_metrics)
        if info.is_main:
            meta = _meta(task, cfg, cfg.epochs)
            save_weights(self.output / 'model.safetensors', self.model.state_dict(), meta)
            if self.ema is not None:
                save_weights(self.output / 'model_ema.safetensors', self.ema.module.state_dict(), meta)
            write_json(self.output / 'summary.json', summary)
            log(info, 'summary ' + ' '.join(f'{k}={_fmt(v)}' for k, v in summary.items() if not isinstance(v, dict)))
        self.logger.close()
        return summary

    def train_one_epoch(self, epoch: int, first_batch: int = 0) -> Tuple[Dict[str, float], int, float]:
        """One pass over the training loader (whose sampler already skips the ``first_batch`` batches done before a
        resume, with their running sums ``self.partial``) -> (mean of each step output, images seen by this rank,
        seconds)."""
        from tqdm import tqdm

        cfg, info, optimizer, ema, scaler = self.cfg, self.info, self.optimizer, self.ema, self.scaler
        self.train_model.train()
        accum, n, interval = cfg.grad_accum_steps, first_batch + len(self.train_loader), cfg.recovery_interval
        progress = (self.partial or {}) if first_batch else {}
        sums: Dict[str, float] = dict(progress.get('sums', {}))
        n_images, t_before, t0 = int(progress.get('n_images', 0)), float(progress.get('train_time', 0.0)), time.time()
        bar = tqdm(
            total=n,
            initial=first_batch,
            desc=f'epoch {epoch + 1}/{cfg.epochs}',
            unit='batch',
            disable=cfg.no_progress or not info.is_main,
        )
        optimizer.zero_grad(set_to_none=True)
        for i, batch in enumerate(self.train_loader, start=first_batch):
            batch = to_device(batch, info.device, cfg.channels_last)
            n_images += batch_size_of(self.task, batch)
            last_micro = (i + 1) % accum == 0 or i + 1 == n
            with self.ddp.no_sync() if (self.ddp is not None and not last_micro) else nullcontext():
                with autocast(cfg, info.device):
                    out = self.task.training_step(self.train_model, batch)
                loss = out['loss']
                if not torch.isfinite(loss.detach()):
                    raise FloatingPointError(
                        f'the loss became {loss.item()} at epoch {epoch + 1}, batch {i + 1}: lower --lr, add warm-up '
                        '(--warmup-epochs) or gradient clipping (--clip-grad).'
                    )
                scaler.scale(loss / accum).backward()
            if last_micro:
                if cfg.clip_grad is not None:
                    scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.clip_grad)
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                self.step += 1
                if ema is not None:
                    ema.update(self.model, step=self.step)
                if not cfg.sched_on_epochs:
                    self.scheduler.step_update(num_updates=self.step)
            for k, v in out.items():
                if torch.is_tensor(v) and v.numel() == 1:
                    sums[k] = sums.get(k, 0.0) + float(v.detach())
            rate = (n_images - progress.get('n_images', 0)) * info.world_size / max(time.time() - t0, 1e-9)
            bar.set_postfix(
                loss=f'{sums["loss"] / (i + 1):.4f}', lr=f'{optimizer.param_groups[0]["lr"]:.3g}', img_s=f'{rate:.0f}'
            )
            bar.update()
            if interval and last_micro and self.step % interval == 0 and i + 1 < n:
                self.save(
                    epoch, i + 1, {'sums': dict(sums), 'n_images': n_images, 'train_time': t_before + time.time() - t0}
                )
        bar.close()
        return {k: v / max(n, 1) for k, v in sums.items()}, n_images, t_before + time.time() - t0

    @torch.no_grad()
    def evaluate(self) -> Dict[str, float]:
        """Metrics of the model, and of its EMA (prefixed ``ema_``) when there is one."""
        out: Dict[str, float] = {}
        targets = [('', self.model)] + ([('ema_', self.ema.module)] if self.ema is not None else [])
        for prefix, net in targets:
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                # each rank's last step left its own BN running stats: evaluate everywhere with rank 0's, the saved ones
                for buffer in net.buffers():
                    torch.distributed.broadcast(buffer, 0)
            was_training = net.training
            net.eval()
            with autocast(self.cfg, self.info.device):
                metrics = self.task.evaluate(net, self.val_loader)
            net.train(was_training)
            out.update({f'{prefix}{k}': float(v) for k, v in metrics.items()})
        return out

    def keep_best(self, metrics: Dict[str, float], epoch: int) -> None:
        """Save ``model_best`` (the EMA when there is one) when the main metric beats the best so far."""
        main = self.task.main_metric
        score = metrics.get(f'ema_{main}', metrics.get(main))
        if score is not None and (self.best is None or score > self.best['score']):
            self.best = {'score': float(score), 'epoch': epoch}
            if self.info.is_main:
                best = (self.ema.module if self.ema is not None else self.model).state_dict()
                save_weights(self.output / 'model_best.safetensors', best, _meta(self.task, self.cfg, epoch))

    def summary(self, metrics: Dict[str, float]) -> Dict[str, Any]:
        """The final JSON: the metrics of the delivered model (the EMA when there is one), params and extras."""
        ema, best = self.ema, self.best
        summary = {k[4:]: v for k, v in metrics.items() if k.startswith('ema_')} if ema is not None else dict(metrics)
        if ema is not None:
            summary['model_without_ema'] = {k: v for k, v in metrics.items() if not k.startswith('ema_')}
        summary.update(
            {
                f'best_{self.task.main_metric}': best['score'] if best else None,
                'best_epoch': best['epoch'] if best else None,
                'params': self.n_params,
                'epochs': self.cfg.epochs,
                'world_size': self.info.world_size,
                'global_batch': self.global_batch,
                'lr': self.lr,
                'device': str(self.info.device),
            }
        )
        if hasattr(self.task, 'summary_extras'):
            summary.update(self.task.summary_extras(ema.module if ema is not None else self.model))
        summary.update(
            images_per_s=self.images_seen / max(self.train_time, 1e-9),
            train_time_s=self.train_time,
            wall_time_s=self.elapsed + time.time() - self.start_wall,
        )
        return summary


def _precision(amp: bool, cfg: Any, device: torch.device) -> str:
    if not amp:
        return 'fp32'
    return 'bf16 autocast' if device.type == 'cpu' else f'{cfg.amp_dtype} autocast'


def _fmt(v: Any) -> str:
    return f'{v:.4g}' if isinstance(v, float) else str(v)


def _meta(task: Any, cfg: Any, epoch: int) -> Dict[str, Any]:
    meta = dict(task.metadata()) if hasattr(task, 'metadata') else {}
    meta.setdefault('model', getattr(cfg, 'model', None))
    meta['epoch'] = epoch
    return meta
