"""Output folders that never lose work: a run folder is checked and locked before anything is written into it.

``train`` writes a run folder, ``export`` an export folder. Each is recognised by what it writes: ``config.json`` or
a resumable ``last.state.pt`` for a run, ``export.json`` for an export. A folder may be used when it is new or empty
(a launcher's log and record, :data:`LAUNCHER_FILES`, do not count); a run folder again only to resume it or with
``--overwrite``, which removes that run's own files first (so two runs never mix); a folder holding anything else
(another kind of output, a user's files) is refused, ``--overwrite`` or not. A training run holds an exclusive lock on
its folder (``fcntl.flock`` on ``.lock``, released by the kernel when the process ends, however it ends), so a second
run into the same folder is refused instead of replacing the first.
"""

from __future__ import annotations

import errno
import fcntl
import os
import shutil
from pathlib import Path
from typing import IO, Any, Callable, Dict, List, Optional, Sequence

RUN_RECORD, EXPORT_RECORD, LOCK = 'config.json', 'export.json', '.lock'
# every file and folder a training run writes (any task), its record and lock included
RUN_FILES = (
    RUN_RECORD, LOCK, 'metrics.csv', 'summary.json', 'curves.png', 'tb', 'last.safetensors', 'last.state.pt',
    'model.safetensors', 'model_best.safetensors', 'model_ema.safetensors', 'confusion_matrix.png',
)  # fmt: skip
EXPORT_FILES = (EXPORT_RECORD, 'model.safetensors', 'model.ts', 'model.onnx')
# what a launcher (``hsresnet study``) writes into a run's folder before starting it: never removed, not a run yet
LAUNCHER_FILES = ('log.txt', 'study_run.json')

_held: Dict[Path, IO] = {}  # the open lock files of this process, by folder


class OutputError(ValueError):
    """An output folder that cannot be written without losing something: names the folder and the way out."""


def _contents(folder: Path) -> List[str]:
    return sorted(p.name for p in folder.iterdir())


def _check_folder(folder: Path, flag: str) -> Optional[List[str]]:
    """The folder's entries, or None when it does not exist; refuses a path that is a file."""
    if folder.exists() and not folder.is_dir():
        raise OutputError(f'{flag} {folder} is a file, not a folder: choose a folder path for {flag}.')
    return _contents(folder) if folder.is_dir() else None


def _sample(names: Sequence[str]) -> str:
    return ', '.join(names[:5]) + (f' and {len(names) - 5} more' if len(names) > 5 else '')


def check_run_folder(output: str | Path, resume: Optional[str | Path], overwrite: bool) -> List[str]:
    """Refuse an ``--output`` that training may not write; return what ``--overwrite`` will remove there (the
    replaced run's own files, see :func:`clear_run_folder`). Changes nothing."""
    output = Path(output)
    entries = _check_folder(output, '--output')
    resuming = resume is not None and _same_run(output, Path(resume))
    entries = [name for name in entries or [] if name not in LAUNCHER_FILES]
    if entries and not resuming and not {RUN_RECORD, 'last.state.pt'} & set(entries):
        raise OutputError(
            f'--output {output} already holds files that are not a training run ({_sample(entries)})'
            + (' (an export)' if EXPORT_RECORD in entries else '')
            + '; choose a new or empty folder, nothing there is removed, --overwrite or not.'
        )
    if entries and not resuming and not overwrite:
        hint = f'--resume {output} to continue it, ' if (output / 'last.state.pt').is_file() else ''
        raise OutputError(
            f'--output {output} already holds a training run: pass {hint}--overwrite to replace it, or choose another '
            '--output.'
        )
    return [name for name in entries if name in RUN_FILES and name != LOCK] if overwrite and not resuming else []


def clear_run_folder(output: str | Path, names: Sequence[str]) -> None:
    """Remove a replaced run's own files (``claim_run_folder``'s list), just before the new run writes."""
    for name in names:
        path = Path(output) / name
        shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)


def _same_run(output: Path, resume: Path) -> bool:
    folder = resume if resume.is_dir() else resume.parent
    return output.resolve() == folder.resolve()


def lock(folder: Path) -> None:
    """Hold an exclusive lock on ``folder`` until this process ends (or :func:`release`)."""
    folder = folder.resolve()
    if folder in _held:
        return
    handle = open(folder / LOCK, 'a+')
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        handle.close()
        if err.errno in (errno.EWOULDBLOCK, errno.EACCES):
            raise OutputError(
                f'{folder} is being written by another training process right now; wait for it to end or choose '
                'another --output (two runs in one folder would replace each other).'
            ) from None
        raise
    handle.seek(0)
    handle.truncate()
    handle.write(f'{os.getpid()}\n')
    handle.flush()
    _held[folder] = handle


def release(folder: str | Path) -> None:
    handle = _held.pop(Path(folder).resolve(), None)
    if handle is not None:
        handle.close()


def claim_export_folder(output: str | Path, overwrite: bool) -> None:
    """Check that an export may write ``output``: new, empty, or (with ``--overwrite``) an earlier export, whose
    files are then removed. A training run or other files are never written over."""
    output = Path(output)
    entries = _check_folder(output, '--output')
    if entries:
        if RUN_RECORD in entries or any(n.startswith('last.') for n in entries):
            raise OutputError(
                f'--output {output} is a training run folder: exporting there would replace its weights; choose '
                'another folder.'
            )
        if set(entries) - set(EXPORT_FILES):  # an export moved in part (killed mid-move) still counts as one
            raise OutputError(
                f'--output {output} already holds files that are not an export ({_sample(entries)}); choose a new or '
                'empty folder.'
            )
        if not overwrite:
            raise OutputError(f'--output {output} already holds an export: pass --overwrite to replace it.')
        clear_run_folder(output, [n for n in entries if n in EXPORT_FILES])
    output.mkdir(parents=True, exist_ok=True)


def atomic_write(path: Path, write: Callable[[Path], Any]) -> None:
    """Call ``write(tmp_path)``, fsync, then rename onto ``path``: a reader (or a run killed at any moment) sees the
    old file or the new one, never half a file. The temporary file is removed on failure."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f'.{path.name}.tmp-{os.getpid()}')
    try:
        write(tmp)
        with open(tmp, 'rb') as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as err:  # name the file the user knows, not the temporary one
        raise OSError(err.errno, err.strerror, str(path)) from None
    finally:
        if tmp.exists():
            tmp.unlink()


def describe_os_error(err: OSError) -> str:
    """One sentence for a file-system error: what could not be done, where, and why in words."""
    why = {
        errno.ENOSPC: 'the disk is full',
        errno.EDQUOT: 'the disk quota is used up',
        errno.EROFS: 'the file system is read-only',
        errno.EACCES: 'permission denied',
        errno.EPERM: 'permission denied',
        errno.ENOTDIR: 'a part of the path is a file, not a folder',
        errno.EISDIR: 'it is a folder, a file was expected',
        errno.EEXIST: 'a file is in the way',
        errno.ENOENT: 'it does not exist',
    }.get(err.errno, err.strerror or str(err))
    where = f' {err.filename}' if err.filename else ''
    return f'cannot use{where}: {why}'


def kept_checkpoint(output: str | Path) -> str:
    """What a stopped run leaves to resume from, in words."""
    state = Path(output) / 'last.state.pt'
    if state.is_file():
        return f'the last complete checkpoint ({state}) is intact: resume with --resume {output}'
    return 'no checkpoint had been written yet'
