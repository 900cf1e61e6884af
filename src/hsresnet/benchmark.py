"""Benchmark HS-ResNets against ResNet baselines in one run, every figure also as a ratio to timm's resnet50.

In the spirit of timm's ``benchmark.py``: inference (``torch.inference_mode``) and training steps (forward, cross
entropy, backward, SGD step), warm-up, then repeats that interleave the models (the order rotates every repeat),
reporting medians. Per model: images/s, step time, peak memory per image, params, MACs per image and GMAC/s.
The baselines (timm ``resnet50``, ``resnet50d``, ``res2net50_26w_4s``) and the deliberately plain reference HS
block (``<model>@reference``, :mod:`hsresnet.reference`) run in the same process, so the ratios are measured,
not claimed. Every path (``--paths``: how a model is run) is applied to every model of the run, and every ratio is
taken within one path: a model through a path against the ratio base through the same path.

Conventions (also in docs/performance.md):
- MACs: ``torch.utils.flop_counter.FlopCounterMode`` FLOPs / 2, which counts conv and matmul/linear only (not
  norm, activation, pooling or add). Train MACs are 3x the forward MACs (backward = 2x forward, the usual
  convention), the same for every implementation and path of a model.
- Peak memory: what one step allocates above what was allocated before it (:func:`peak_memory`).
- Paired ratio (``paired x``): each round's ratio to the ratio base through the same path, its median over rounds
  and quartiles, robust to a slow drift of a shared machine.
- ``--sweep``: the paper's speed ablation (RQ3): the budget-matched presets and s = 2..8 at ResNet-50's budget.
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import datetime
import gc
import importlib
import itertools
import json
import os
import platform
import re
import statistics
import tempfile
import time
from contextlib import contextmanager, nullcontext
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .complexity import count_complexity
from .engine.allocator import keep_freed_memory
from .engine.logs import new_figure, save_figure, write_csv, write_json
from .factory import check_model_name
from .optimize import fast_bf16_available

BASELINES = ('resnet50', 'resnet50d', 'res2net50_26w_4s')
RATIO_BASE = 'resnet50'
SWEEP_PRESETS = {4: 'hs_resnet50_22w_4s', 5: 'hs_resnet50_18w_5s', 6: 'hs_resnet50_16w_6s', 8: 'hs_resnet50_12w_8s'}
TRAIN_MAC_FACTOR = 3  # a training step = forward + backward; by convention 3x the forward MACs
RATIO_KEYS = ('samples_per_sec', 'step_time_ms', 'gmac_per_sec', 'peak_mem_mb_per_image', 'param_count_m', 'gmacs')
PAIRED_KEYS = ('samples_per_sec', 'step_time_ms', 'gmac_per_sec')  # ratios taken round by round
TRAIN_PATHS = ('eager', 'amp', 'channels_last', 'amp_channels_last', 'compiled')  # the torch paths
EXPORTED_PATHS = ('onnxruntime', 'openvino', 'openvino_bf16')  # the model exported to ONNX and run outside torch
PATHS = TRAIN_PATHS + ('optimized', 'optimized_compiled') + EXPORTED_PATHS  # all but the torch paths: inference only
RUNTIME_OF_PATH = {'onnxruntime': 'onnxruntime', 'openvino': 'openvino', 'openvino_bf16': 'openvino'}
PATH_HELP = (
    'eager: fp32; amp: autocast to --amp-dtype; channels_last: model and input NHWC; amp_channels_last: both; '
    'compiled: torch.compile (mode from --torchcompile, else default); optimized: hsresnet.optimize(model) (BN '
    'folded, channels_last, bf16 where native); optimized_compiled: hsresnet.optimize(model, compile=True) (the same, '
    'compiled by inductor with freezing); onnxruntime / openvino: exported by torch.onnx (dynamo), run by onnxruntime '
    '(on the --device) / OpenVINO (CPU), fp32, with the same threads; openvino_bf16: OpenVINO in bf16 (where the CPU '
    'has native bf16; elsewhere OpenVINO stays in fp32). All but the torch paths are inference only.'
)
SHORTHAND_HELP = (
    'Without --paths, --amp/--channels-last pick the path (eager, amp, channels_last, amp_channels_last); with '
    '--paths they add it. --torchcompile adds compiled, --optimized optimized, --onnxruntime onnxruntime.'
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        '--model',
        '-m',
        nargs='+',
        default=['hs_resnet50'],
        help='registered timm/hsresnet models, each optionally with constructor kwargs as a YAML mapping: '
        "'hs_resnet26_small{w: 19, s: 5}'",
    )
    parser.add_argument(
        '--baselines',
        default=','.join(BASELINES),
        help='comma-separated baseline models (default: %(default)s; empty: none); --ratio-base is always added',
    )
    parser.add_argument(
        '--ratio-base', default=RATIO_BASE, help='the model every ratio refers to, same syntax as -m (%(default)s)'
    )
    parser.add_argument('--no-reference', action='store_true', help='skip the plain reference HS block models')
    parser.add_argument(
        '--paths',
        nargs='+',
        choices=PATHS,
        default=None,
        metavar='PATH',
        help=f'run every model through each of these paths ({", ".join(PATHS)}) in one interleaved run, ratios '
        f'within each path, one paths x models table. {PATH_HELP} Default: eager. {SHORTHAND_HELP}',
    )
    parser.add_argument('--optimized', action='store_true', help='shorthand: add the optimized path')
    parser.add_argument('--onnxruntime', action='store_true', help='shorthand: add the onnxruntime path')
    parser.add_argument('--bench', choices=('inference', 'train', 'both'), default='both')
    parser.add_argument('-b', '--batch-size', type=int, nargs='+', default=[8], help='one or more batch sizes')
    parser.add_argument('--img-size', type=int, default=224)
    parser.add_argument('--in-chans', type=int, default=3, help='input channels (1 for grey images)')
    parser.add_argument('--num-classes', type=int, default=1000)
    parser.add_argument('--amp', action='store_true', help='shorthand for the amp (or amp_channels_last) path')
    parser.add_argument('--amp-dtype', choices=('bfloat16', 'float16'), default='bfloat16', help='of the amp paths')
    parser.add_argument('--channels-last', action='store_true', help='shorthand for the channels_last path')
    parser.add_argument(
        '--torchcompile',
        nargs='?',
        const='default',
        default=None,
        metavar='MODE',
        help='shorthand: add the compiled path, with this torch.compile mode',
    )
    parser.add_argument('--device', default=None, help='default: cuda if available, else cpu')
    parser.add_argument('--threads', type=int, default=None, help='torch.set_num_threads (CPU)')
    parser.add_argument('--warmup', type=int, default=2, help='warm-up steps per model')
    parser.add_argument('--iters', type=int, default=1, help='timed steps per repeat')
    parser.add_argument('--repeats', type=int, default=5, help='interleaved repeats; the median is reported')
    parser.add_argument('--no-memory', action='store_true', help='skip the peak memory measurement')
    parser.add_argument('--sweep', action='store_true', help='speed ablation: presets and s = 2..8 at a fixed budget')
    parser.add_argument('--plot', default=None, help='--sweep: PNG path (default: next to --results-file)')
    parser.add_argument(
        '--agreement',
        default=None,
        metavar='CHECKPOINT',
        help='instead of timing: top-1 of a Fashion-MNIST '
        'checkpoint (`hsresnet train`) in eager fp32 vs hsresnet.optimize(), and their top-1 agreement',
    )
    parser.add_argument('--results-file', default=None, help='write the results as JSON')
    parser.add_argument('--csv', default=None, help='write the results as CSV')


def resolve_paths(args: argparse.Namespace) -> List[str]:
    """The run's paths: ``--paths`` plus those the shorthand flags name (without ``--paths``: the path of
    ``--amp``/``--channels-last``, eager by default), in order, without repeats."""
    torch_path = {(False, False): 'eager', (True, False): 'amp', (False, True): 'channels_last'}
    flag_path = torch_path.get((args.amp, args.channels_last), 'amp_channels_last')
    paths = list(args.paths or [])
    if not paths or flag_path != 'eager':
        paths.append(flag_path)
    shorthands = (('compiled', args.torchcompile), ('optimized', args.optimized), ('onnxruntime', args.onnxruntime))
    paths += [p for p, on in shorthands if on]
    return list(dict.fromkeys(paths))


def check_paths(paths: Sequence[str], args: argparse.Namespace, device: torch.device) -> None:
    """Refuse what cannot run: an inference-only path with ``--bench train``, a missing runtime, OpenVINO off CPU."""
    inference_only = [p for p in paths if p not in TRAIN_PATHS]
    if args.bench == 'train' and inference_only:
        raise SystemExit(
            f'hsresnet benchmark: --bench train runs the torch paths only ({", ".join(TRAIN_PATHS)}); '
            f'{", ".join(inference_only)} is inference only (exported or BN-folded). Drop it or use --bench inference.'
        )
    if args.sweep and len(paths) > 1:
        raise SystemExit('hsresnet benchmark: --sweep runs one path; give one of --paths.')
    for path in sorted(set(paths) & set(EXPORTED_PATHS)):  # a missing runtime is refused before anything runs
        importlib.import_module(RUNTIME_OF_PATH[path])
    openvino = [p for p in paths if RUNTIME_OF_PATH.get(p) == 'openvino']
    if openvino and device.type != 'cpu':
        raise SystemExit(f'hsresnet benchmark: the {", ".join(openvino)} path runs on the CPU; use --device cpu.')


def run(args: argparse.Namespace) -> int:
    import hsresnet  # noqa: F401  (registers the hs_resnet* models)

    device = torch.device(args.device or ('cuda' if torch.cuda.is_available() else 'cpu'))
    if device.type == 'cuda' and not torch.cuda.is_available():
        raise SystemExit('hsresnet benchmark: --device cuda but CUDA is not available; use --device cpu.')
    if args.threads:
        torch.set_num_threads(args.threads)
    if device.type == 'cpu':
        keep_freed_memory()  # as `hsresnet train` does; the same for every model of the run
    if args.agreement:
        result = fashion_mnist_agreement(args.agreement, device)
        print(json.dumps(result, indent=2))
        if args.results_file:
            write_json(args.results_file, {'meta': machine_info(device, args), 'agreement': result})
        return 0
    if min(args.batch_size) < 1 or args.img_size < 8 or args.repeats < 1 or args.iters < 1 or args.in_chans < 1:
        raise SystemExit('hsresnet benchmark: -b, --repeats, --iters and --in-chans must be >= 1, --img-size >= 8.')
    paths = resolve_paths(args)
    check_paths(paths, args, device)
    if args.sweep:
        specs = sweep_specs()
    else:
        baselines = [b for b in args.baselines.split(',') if b]
        names = [args.ratio_base] + [n for n in baselines + list(args.model) if n != args.ratio_base]
        specs = [{'name': n, **model_spec(n)} for n in dict.fromkeys(names)]
        for n in args.model:
            spec = model_spec(n)
            if spec['model'].startswith('hs_') and not args.no_reference:
                specs.append({'name': f'{n}@reference', **spec, 'reference': True})
    for name in dict.fromkeys(s['model'] for s in specs):
        try:
            check_model_name(name)
        except ValueError as err:
            raise SystemExit(f'hsresnet benchmark: {err}') from None

    meta = machine_info(device, args)
    meta['paths'] = paths
    peaks = ', '.join(f'{dt} {rate}' for dt, rate in meta['matmul_gmac_per_sec'].items())
    print(f'{meta.get("gpu", meta["cpu"])}, {meta["torch_threads"]} threads; matmul peak GMAC/s: {peaks}')
    if any(p.startswith('amp') for p in paths) and not meta['native_bf16'] and args.amp_dtype == 'bfloat16':
        print(f'note: no native bf16 on this {device.type}: the amp paths run emulated bf16 kernels (slow)')
    rows: List[Dict[str, Any]] = []
    kinds = ('inference', 'train') if args.bench == 'both' else (args.bench,)
    if args.sweep:
        kinds = ('inference',)
    batch_sizes = sorted(set(args.batch_size) | ({1} if args.sweep else set()))
    for kind in kinds:
        kind_paths = [p for p in paths if kind == 'inference' or p in TRAIN_PATHS]
        if len(kind_paths) < len(paths):
            print(f'note: {", ".join(p for p in paths if p not in kind_paths)}: inference only, not in {kind}')
        if not kind_paths:
            continue
        for batch in batch_sizes:
            with kept_signal_stack():
                group = bench_group([(s, p) for p in kind_paths for s in specs], kind, batch, device, args)
            print_table(group)
            if len(kind_paths) > 1:
                print_paths_table(group, args.ratio_base)
            rows += group
            meta['load_avg_after'] = _load_avg()
            if args.results_file:  # after every group, so a long run keeps what it measured
                write_json(args.results_file, {'meta': meta, 'results': rows})
    if args.results_file:
        print(f'wrote {args.results_file}')
    if args.csv:
        write_csv(args.csv, [{k: v for k, v in r.items() if not isinstance(v, list)} for r in rows])  # JSON has all
        print(f'wrote {args.csv}')
    if args.sweep:
        print_sweep_markdown(rows, specs, args.batch_size[0])
        plot = args.plot or (os.path.splitext(args.results_file)[0] + '.png' if args.results_file else None)
        if plot:
            plot_sweep(rows, specs, args.batch_size[0], plot, meta)
            print(f'wrote {plot}')
    return 0


def model_spec(text: str) -> Dict[str, Any]:
    """``'hs_resnet26_small{w: 19, s: 5}'`` -> ``{'model': 'hs_resnet26_small', 'kwargs': {'w': 19, 's': 5}}``."""
    import yaml

    name, brace, rest = text.partition('{')
    try:
        kwargs = yaml.safe_load(brace + rest) if brace else {}
    except yaml.YAMLError:
        kwargs = None
    if not isinstance(kwargs, dict) or not name:
        raise SystemExit(f'hsresnet benchmark: {text!r} is not NAME or NAME{{key: value, ...}}.')
    return {'model': name.strip(), 'kwargs': kwargs}


def sweep_specs() -> List[Dict[str, Any]]:
    """resnet50, the four budget-matched presets and, for the other s in 2..8, the w closest to ResNet-50's MACs."""
    target = count_macs(_meta_model('resnet50', {}))
    specs = [{'name': RATIO_BASE, 'model': RATIO_BASE, 'kwargs': {}}]
    for s in range(2, 9):
        if s in SWEEP_PRESETS:
            specs.append({'name': SWEEP_PRESETS[s], 'model': SWEEP_PRESETS[s], 'kwargs': {}, 's': s})
        else:
            w = budget_width(s, target)
            specs.append({'name': f'hs_resnet50_{w}w_{s}s', 'model': 'hs_resnet50', 'kwargs': {'w': w, 's': s}, 's': s})
    return specs


def budget_width(s: int, target_macs: float, w_values: Sequence[int] = range(4, 257)) -> int:
    """The w whose HS-ResNet-50 MACs (224 px, the closed form of :mod:`hsresnet.complexity`) are closest to
    ``target_macs``."""
    from .complexity import hs_resnet_complexity

    return min(w_values, key=lambda w: abs(hs_resnet_complexity(w, s, 50).macs - target_macs))


def _meta_model(name: str, kwargs: Dict[str, Any]) -> nn.Module:
    import timm

    with torch.device('meta'):
        return timm.create_model(name, **kwargs).eval()


def count_macs(model: nn.Module, img_size: int = 224, in_chans: int = 3) -> float:
    """Forward MACs per image (conv + linear: FlopCounterMode FLOPs / 2), the counter of ``hsresnet complexity``."""
    return float(count_complexity(model, img_size, in_chans).macs)


class Built(NamedTuple):
    """A model built through a path."""

    model: nn.Module  # the eager model: parameters, MACs and the optimizer of a training step
    run: Callable[[torch.Tensor], Any]  # runs one batch through the path
    runtime: str  # what runs it: the module's class (a timm class, OptimizedModel, OptimizedModule) or the runtime's
    batchnorm_layers: Optional[int]  # BatchNorm2d modules left in what runs (torch paths only)


def build(
    spec: Dict[str, Any],
    path: str,
    kind: str,
    batch: int,
    device: torch.device,
    args: argparse.Namespace,
    onnx_dir: str,
) -> Built:
    """``spec``'s model through ``path``, for inference or training: the one place where a path is applied. The
    exported paths share one ONNX file per model in ``onnx_dir``."""
    import timm

    from .optimize import optimize
    from .reference import to_reference

    model = timm.create_model(spec['model'], num_classes=args.num_classes, in_chans=args.in_chans, **spec['kwargs'])
    if spec.get('reference'):
        to_reference(model)
    model.train(kind == 'train')
    if path in EXPORTED_PATHS:
        onnx_file = os.path.join(onnx_dir, re.sub(r'[^\w@.-]', '_', spec['name']) + f'-{batch}.onnx')
        try:
            runner, runtime = exported_runner(model, onnx_file, path, batch, device, args)
        except Exception as e:  # an exporter or a runtime's graph compiler refusing the model
            raise SystemExit(
                f'hsresnet benchmark: {spec["name"]} cannot be built through the {path} path '
                f'({type(e).__name__}: {str(e).strip().splitlines()[-1][:300]}); drop the path or the model '
                '(--no-reference drops the @reference models).'
            ) from e
        return Built(model, runner, runtime, None)
    model.to(device)
    if path in ('channels_last', 'amp_channels_last'):
        model.to(memory_format=torch.channels_last)
    run: nn.Module = model
    if path == 'optimized':
        run = optimize(model)
    elif path == 'optimized_compiled':
        run = optimize(model, compile=True)
    elif path == 'compiled':
        run = torch.compile(model, mode=args.torchcompile or 'default')
    batchnorms = sum(isinstance(m, nn.BatchNorm2d) for m in run.modules())
    runtime = type(run).__name__
    if path == 'optimized_compiled':  # OptimizedModel(OptimizedModule): torch.compile's wrapper inside
        runtime += f'({type(run.model).__name__})'
    return Built(model, run, runtime, batchnorms)


class _SignalStack(ctypes.Structure):
    _fields_ = [('ss_sp', ctypes.c_void_p), ('ss_flags', ctypes.c_int), ('ss_size', ctypes.c_size_t)]


@contextmanager
def kept_signal_stack():
    """Give the calling thread back its alternate signal stack (``sigaltstack``) once the block's objects are freed.

    OpenVINO's CPU plugin (2026.4) installs a signal stack of its own on the thread that compiles a model and, when
    several compiled models are freed, can leave the thread pointing at freed memory. The next signal with a Python
    handler then kills the process with SIGSEGV: torch's DataLoader sets one for SIGCHLD, so any child process that
    ends after a benchmark in the same process (a data-loader worker, a subprocess) would crash it."""
    libc = ctypes.CDLL(None, use_errno=True) if platform.system() == 'Linux' else None
    before = _SignalStack()
    if libc is None or libc.sigaltstack(None, ctypes.byref(before)) != 0:
        yield
        return
    try:
        yield
    finally:
        gc.collect()  # free the runtime's objects first: their destructors may set the stack again
        libc.sigaltstack(ctypes.byref(before), None)  # the old stack, or SS_DISABLE where there was none


def exported_runner(
    model: nn.Module, onnx_file: str, path: str, batch: int, device: torch.device, args: argparse.Namespace
) -> Tuple[Callable[[torch.Tensor], Any], str]:
    """Export ``model`` (eval, float32) to ``onnx_file`` with torch.onnx's dynamo exporter, unless it is there, and
    load it into onnxruntime (on ``device``; on a GPU through its TensorRT provider where installed) or OpenVINO (CPU),
    fp32, with as many intra-op threads as torch uses. Returns a runner of CPU batches and the runtime's name."""
    from .classification.export import write_onnx

    if not os.path.exists(onnx_file):
        write_onnx(model.cpu().eval(), torch.randn(batch, args.in_chans, args.img_size, args.img_size), onnx_file)
    threads = torch.get_num_threads()
    if RUNTIME_OF_PATH[path] == 'openvino':
        import openvino as ov

        core = ov.Core()
        config = {
            'INFERENCE_NUM_THREADS': threads,
            'INFERENCE_PRECISION_HINT': 'bf16' if path == 'openvino_bf16' else 'f32',
            'PERFORMANCE_HINT': 'LATENCY',
        }
        compiled = core.compile_model(core.read_model(onnx_file), 'CPU', config)
        request = compiled.create_infer_request()
        used = compiled.get_property('INFERENCE_PRECISION_HINT').get_type_name()  # what runs: bf16 needs native bf16
        return (lambda x: request.infer({0: x.numpy()})), f'openvino.CompiledModel({used})'
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # onnxruntime's threads otherwise spin-wait after each run and slow the next model of the round
    options.add_session_config_entry('session.intra_op.allow_spinning', '0')
    provider = 'CUDAExecutionProvider' if device.type == 'cuda' else 'CPUExecutionProvider'
    available = ort.get_available_providers()
    if provider not in available:
        raise SystemExit(f'hsresnet benchmark: onnxruntime has no {provider} here; drop the onnxruntime path.')
    providers = [provider]
    if device.type == 'cuda' and 'TensorrtExecutionProvider' in available:  # the CUDA provider runs what TensorRT won't
        providers.insert(0, 'TensorrtExecutionProvider')
    session = ort.InferenceSession(onnx_file, options, providers=providers)
    name = session.get_inputs()[0].name
    runtime = 'onnxruntime.InferenceSession' + (f'({providers[0]})' if device.type == 'cuda' else '')
    return (lambda x: session.run(None, {name: x.numpy()})), runtime


def bench_group(
    entries: Sequence[Tuple[Dict[str, Any], str]], kind: str, batch: int, device: torch.device, args: argparse.Namespace
) -> List[Dict[str, Any]]:
    """Build every (model spec, path) of ``entries``, warm up and time them interleaved (the order rotates every
    repeat); one row per model and path, with its ratios to the ratio base through the same path."""
    paths = ', '.join(dict.fromkeys(p for _, p in entries))
    models = ', '.join(dict.fromkeys(s['name'] for s, _ in entries))
    print(f'== {kind}, batch {batch}, {args.img_size} px, {device}; paths: {paths}; models: {models}', flush=True)
    sync = torch.cuda.synchronize if device.type == 'cuda' else (lambda: None)
    steps, rows = [], []
    counts: Dict[str, Tuple[float, int]] = {}  # per model: MACs and params, the same through every path
    with tempfile.TemporaryDirectory() as onnx_dir:  # the exported paths' ONNX files, one per model
        for spec, path in entries:
            built = build(spec, path, kind, batch, device, args, onnx_dir)
            if spec['name'] not in counts:
                macs = count_macs(copy.deepcopy(built.model).float().eval(), args.img_size, args.in_chans)
                params = sum(p.numel() for p in built.model.parameters())
                counts[spec['name']] = (macs * (TRAIN_MAC_FACTOR if kind == 'train' else 1), params)
            macs, params = counts[spec['name']]
            step = make_step(built, path, kind, batch, device, args)
            for _ in range(args.warmup):
                step()
            sync()
            rows.append(
                {
                    'model': spec['name'],
                    'path': path,
                    'bench': kind,
                    'batch_size': batch,
                    'img_size': args.img_size,
                    'runtime': built.runtime,
                    'batchnorm_layers': built.batchnorm_layers,
                    'param_count_m': round(params / 1e6, 3),
                    'gmacs': macs / 1e9,
                    's': spec.get('s'),
                }
            )
            steps.append(step)
    times: List[List[float]] = [[] for _ in entries]
    for r in range(args.repeats):
        for k in range(len(entries)):
            i = (k + r) % len(entries)
            sync()
            start = time.perf_counter()
            for _ in range(args.iters):
                steps[i]()
            sync()
            times[i].append((time.perf_counter() - start) / args.iters)
    for i, row in enumerate(rows):
        t = statistics.median(times[i])
        row.update(step_time_ms=t * 1e3, step_time_ms_min=min(times[i]) * 1e3, samples_per_sec=batch / t)
        row['gmac_per_sec'] = row['gmacs'] * batch / t if row['gmacs'] else None
        no_peak = args.no_memory or row['path'] in EXPORTED_PATHS  # their arenas are not torch's allocator
        peak = None if no_peak else peak_memory(steps[i], device)
        row['peak_mem_mb_per_image'] = peak / batch / 2**20 if peak is not None else None
    ratio_base = RATIO_BASE if args.sweep else args.ratio_base
    for i, row in enumerate(rows):
        b = next((j for j, r in enumerate(rows) if r['model'] == ratio_base and r['path'] == row['path']), None)
        base = rows[b] if b is not None else None
        for key in RATIO_KEYS:
            ok = base is not None and row.get(key) is not None and base.get(key)
            row[f'{key}_ratio'] = row[key] / base[key] if ok else None
        row['step_times_ms'] = [round(t * 1e3, 3) for t in times[i]]
        paired: Dict[str, Tuple[Optional[float], ...]] = {k: (None,) * 3 for k in PAIRED_KEYS}
        if b is not None:
            paired['samples_per_sec'] = paired_ratio(times[i], times[b], 1.0)
            paired['step_time_ms'] = paired_ratio(times[i], times[b])
            if row['gmacs'] and base['gmacs']:
                paired['gmac_per_sec'] = paired_ratio(times[i], times[b], row['gmacs'] / base['gmacs'])
        for key, values in paired.items():
            row.update(zip((f'{key}_paired_ratio', f'{key}_paired_q1', f'{key}_paired_q3'), values))
    return rows


def paired_ratio(
    times: Sequence[float], base_times: Sequence[float], work_ratio: Optional[float] = None
) -> Tuple[float, ...]:
    """Median and quartiles over the rounds of one model's figure relative to the baseline's in the same round.

    Without ``work_ratio`` the figure is the step time; with it, the rate, where ``work_ratio`` is the model's work
    per step over the baseline's (its MACs over the baseline's for GMAC/s). Both ran within seconds of each other in
    every round, so a slow drift of the machine cancels in each round's ratio, where it does not in the ratio of the
    two medians; the quartiles show how far single rounds disagree.
    """
    pairs = zip(times, base_times)
    per_round = [t / b for t, b in pairs] if work_ratio is None else [work_ratio * b / t for t, b in pairs]
    if len(per_round) < 2:
        return per_round[0], per_round[0], per_round[0]
    q1, median, q3 = statistics.quantiles(per_round, n=4, method='inclusive')
    return median, q1, q3


def make_step(
    built: Built, path: str, kind: str, batch: int, device: torch.device, args: argparse.Namespace
) -> Callable[[], None]:
    """One inference or training step through ``path`` on a fixed random batch (as timm's benchmark does)."""
    fmt = torch.channels_last if path in ('channels_last', 'amp_channels_last') else torch.contiguous_format
    x_device = torch.device('cpu') if path in EXPORTED_PATHS else device
    x = torch.randn(batch, args.in_chans, args.img_size, args.img_size, device=x_device).contiguous(memory_format=fmt)
    amp, amp_dtype = path.startswith('amp'), torch.bfloat16 if args.amp_dtype == 'bfloat16' else torch.float16
    autocast = (lambda: torch.autocast(device.type, dtype=amp_dtype)) if amp else nullcontext
    run_model = built.run
    if kind == 'inference':

        def step() -> None:
            with torch.inference_mode(), autocast():
                run_model(x)

        return step
    target = torch.randint(0, args.num_classes, (batch,), device=device)
    optimizer = torch.optim.SGD(built.model.parameters(), lr=1e-4, momentum=0.9)
    scaler = torch.amp.GradScaler(device.type, enabled=amp and amp_dtype == torch.float16)

    def train_step() -> None:
        with autocast():
            loss = F.cross_entropy(run_model(x), target)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)  # at the end: each step (and its memory profile) starts without grads

    return train_step


def peak_memory(step: Callable[[], None], device: torch.device) -> Optional[float]:
    """Peak bytes allocated during one step, above what was allocated before it. CUDA:
    ``torch.cuda.max_memory_allocated``. CPU: the highest running total of the allocations and frees that
    ``torch.profiler`` (``profile_memory=True``) records, i.e. every tensor and kernel workspace allocated through
    PyTorch's CPU allocator, above the weights (and optimizer state). A training step ends by freeing the gradients,
    so they count."""
    if device.type == 'cuda':
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        step()
        torch.cuda.synchronize()
        return float(torch.cuda.max_memory_allocated(device) - before)
    from torch.profiler import ProfilerActivity, profile

    try:
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            step()
        events = prof.profiler.kineto_results.events()
        allocs = sorted((e.start_ns(), e.nbytes()) for e in events if e.name() == '[memory]')
    except (AttributeError, RuntimeError):  # the profiler's event API differs in this torch: no memory figure
        return None
    return float(max(itertools.accumulate((nbytes for _, nbytes in allocs), initial=0)))  # the highest running total


def fashion_mnist_agreement(checkpoint: str, device: torch.device, batch_size: int = 250) -> Dict[str, Any]:
    """Top-1 of eager fp32 and of :func:`hsresnet.optimize.optimize` (its defaults: bf16 where fast) on the whole
    Fashion-MNIST test set (10k images), and the fraction of images where both predict the same class."""
    from .classification.data import FashionMNIST, find_fashion_mnist
    from .classification.task import load_classifier
    from .optimize import optimize

    model, meta = load_classifier(checkpoint)
    model.to(device)
    test = FashionMNIST(find_fashion_mnist(), 'test')
    x = torch.from_numpy(test.images.copy()).float().div(255)[:, None]
    size, chans = int(meta.get('img_size', 28)), int(meta.get('in_chans', 1))
    if size != x.shape[-1]:
        x = F.interpolate(x, size=(size, size), mode='bilinear', align_corners=False)
    mean = torch.tensor(meta.get('mean', [0.0] * chans)).view(1, -1, 1, 1)
    std = torch.tensor(meta.get('std', [1.0] * chans)).view(1, -1, 1, 1)
    x = (x.expand(-1, chans, -1, -1) - mean) / std
    y = torch.from_numpy(test.labels)
    fast = optimize(model)
    with torch.inference_mode():
        p32, popt = (
            torch.cat([net(xb.to(device)).argmax(1).cpu() for xb in x.split(batch_size)]) for net in (model, fast)
        )
    return {
        'checkpoint': meta.get('checkpoint', checkpoint),
        'model': meta.get('model'),
        'images': len(y),
        'bf16': fast_bf16_available(device),
        'top1_fp32': 100 * (p32 == y).float().mean().item(),
        'top1_optimized': 100 * (popt == y).float().mean().item(),
        'agreement': 100 * (p32 == popt).float().mean().item(),
    }


def machine_info(device: torch.device, args: argparse.Namespace) -> Dict[str, Any]:
    import timm

    cpu = platform.processor()
    try:
        cpu = next(ln.split(':', 1)[1].strip() for ln in open('/proc/cpuinfo') if ln.startswith('model name'))
    except (OSError, StopIteration):
        pass
    info = {
        'date_utc': datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M'),
        'device': str(device),
        'cpu': cpu,
        'cpu_count': os.cpu_count(),
        'torch_threads': torch.get_num_threads(),
        'torch': torch.__version__,
        'timm': timm.__version__,
        'python': platform.python_version(),
        'load_avg_before': _load_avg(),
        'args': {k: v for k, v in vars(args).items() if k != 'func'},
        'conventions': 'MACs = FlopCounterMode FLOPs / 2 (conv + matmul); ratios to resnet50 in the same run',
    }
    if device.type == 'cuda':
        info['gpu'] = torch.cuda.get_device_name(device)
    else:
        info['cpu_capability'] = torch.backends.cpu.get_cpu_capability()  # the vector ISA torch's kernels use
    info['native_bf16'] = fast_bf16_available(device)
    dtypes = (torch.float32, torch.bfloat16) if info['native_bf16'] else (torch.float32,)
    info['matmul_gmac_per_sec'] = {str(dt).removeprefix('torch.'): matmul_rate(device, dt) for dt in dtypes}
    return info


def matmul_rate(device: torch.device, dtype: torch.dtype, n: int = 2048, repeats: int = 7) -> float:
    """The machine's practical peak: median GMAC/s of an ``n x n`` matmul at the current thread count (a roof for
    every convolution of the run, which oneDNN/cuDNN lower to GEMM-like kernels)."""
    n = n * 4 if device.type == 'cuda' else n
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    sync = torch.cuda.synchronize if device.type == 'cuda' else (lambda: None)
    times = []
    for i in range(repeats + 2):
        sync()
        start = time.perf_counter()
        a @ b
        sync()
        if i >= 2:  # two warm-up products
            times.append(time.perf_counter() - start)
    return round(n**3 / statistics.median(times) / 1e9, 1)


def _load_avg() -> Optional[List[float]]:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def _fmt(v: Any, digits: int = 2) -> str:
    if v is None:
        return '-'
    if isinstance(v, float):
        return f'{v:.{digits}f}'
    return str(v)


def _fmt_paired(row: Dict[str, Any], key: str = 'gmac_per_sec', digits: int = 3) -> str:
    """A paired ratio as ``median (q1-q3)``, or ``-`` where the row has none."""
    median, q1, q3 = (row.get(f'{key}_paired_{k}') for k in ('ratio', 'q1', 'q3'))
    return '-' if median is None else f'{median:.{digits}f} ({q1:.2f}-{q3:.2f})'


TABLE_COLUMNS = (  # print_table: (header, row key, decimals); '_paired' keys print as median (q1-q3)
    ('model', 'model', 0),
    ('path', 'path', 0),
    ('bench', 'bench', 0),
    ('b', 'batch_size', 0),
    ('img/s', 'samples_per_sec', 2),
    ('step ms', 'step_time_ms', 1),
    ('GMAC/s', 'gmac_per_sec', 2),
    ('MB/img', 'peak_mem_mb_per_image', 1),
    ('M params', 'param_count_m', 2),
    ('GMACs', 'gmacs', 3),
    ('img/s x', 'samples_per_sec_ratio', 3),
    ('GMAC/s x', 'gmac_per_sec_ratio', 3),
    ('paired x (IQR)', 'gmac_per_sec_paired', 3),
    ('MB/img x', 'peak_mem_mb_per_image_ratio', 3),
)


def print_aligned(lines: List[List[str]], left: int) -> None:
    """Print text columns, each as wide as its widest cell: the first ``left`` aligned left, the others right."""
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    for line in lines:
        print('  '.join(c.ljust(w) if i < left else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths))))


def print_table(rows: List[Dict[str, Any]]) -> None:
    """One line per model and path: absolute figures, then the ratios to the ratio base through the same path (x);
    ``paired x`` is the median over rounds of the GMAC/s ratio within each round, with its quartiles
    (:func:`paired_ratio`)."""
    lines = [[head for head, _, _ in TABLE_COLUMNS]]
    for r in rows:
        lines.append(
            [
                _fmt_paired(r, key.removesuffix('_paired'), digits) if key.endswith('_paired') else _fmt(r[key], digits)
                for _, key, digits in TABLE_COLUMNS
            ]
        )
    print_aligned(lines, left=3)


def print_paths_table(rows: List[Dict[str, Any]], base: str) -> None:
    """Paths as rows, models as columns: each cell is the model's images/s over ``base``'s through the same path (the
    paired median over the rounds, quartiles in brackets); the second column is ``base``'s images/s per path."""
    models = list(dict.fromkeys(r['model'] for r in rows))
    cells = {(r['path'], r['model']): r for r in rows}
    print(f'-- images/s x {base} through the same path (paired median, IQR), {rows[0]["bench"]}, batch '
          f'{rows[0]["batch_size"]}:')  # fmt: skip
    lines = [['path', f'{base} img/s'] + models]
    for path in dict.fromkeys(r['path'] for r in rows):
        line = [path, _fmt(cells[path, base]['samples_per_sec'] if (path, base) in cells else None)]
        lines.append(
            line + [_fmt_paired(cells[path, m], 'samples_per_sec') if (path, m) in cells else '-' for m in models]
        )
    print_aligned(lines, left=1)


def _sweep_points(rows: List[Dict[str, Any]], specs: Sequence[Dict[str, Any]], batch: int) -> List[Dict[str, Any]]:
    """resnet50 (s ``-``), then per s: the throughput row at ``batch`` and the latency row at batch 1."""
    named = [(RATIO_BASE, '-')] + [(spec['name'], spec['s']) for spec in specs if spec.get('s') is not None]
    by = {(r['model'], r['batch_size']): r for r in rows}  # a sweep runs one path, inference only
    return [{'s': s, 'name': name, 'thr': by[name, batch], 'lat': by[name, 1]} for name, s in named]


def print_sweep_markdown(rows: List[Dict[str, Any]], specs: Sequence[Dict[str, Any]], batch: int) -> None:
    """The RQ3 table: ratios to resnet50 are paired (median over rounds, quartiles in brackets)."""
    print(
        f'\n| model | s | M params | GMACs | latency b=1 (ms) | x resnet50 | img/s b={batch} | GMAC/s b={batch} | '
        'x resnet50 |'
    )
    print('|---|---|---|---|---|---|---|---|---|')
    for p in _sweep_points(rows, specs, batch):
        t, lt = p['thr'], p['lat']
        print(
            f'| {p["name"]} | {p["s"]} | {t["param_count_m"]:.1f} | {t["gmacs"]:.2f} | {lt["step_time_ms"]:.1f} | '
            f'{_fmt_paired(lt, "step_time_ms", 2)} | {t["samples_per_sec"]:.1f} | {t["gmac_per_sec"]:.1f} | '
            f'{_fmt_paired(t, "gmac_per_sec", 2)} |'
        )


def plot_sweep(
    rows: List[Dict[str, Any]], specs: Sequence[Dict[str, Any]], batch: int, path: str, meta: Dict[str, Any]
) -> None:
    """GMAC/s, throughput and batch-1 latency against s, with resnet50 as a dashed line."""
    base, *points = _sweep_points(rows, specs, batch)
    s = [p['s'] for p in points]
    panels = [
        (f'GMAC/s (batch {batch})', 'thr', 'gmac_per_sec'),
        (f'images/s (batch {batch})', 'thr', 'samples_per_sec'),
        ('latency, batch 1 (ms)', 'lat', 'step_time_ms'),
    ]
    fig, axes = new_figure(1, 3, figsize=(13, 3.8))
    for ax, (title, which, key) in zip(axes, panels):
        ax.plot(s, [p[which][key] for p in points], 'o-', label='HS-ResNet-50 at ResNet-50 budget')
        ax.axhline(base[which][key], color='grey', ls='--', label='resnet50')
        ax.set_xlabel('split count s')
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(
        f'HS-ResNet-50 speed vs s: {meta["device"]} ({meta["cpu"]}, {meta["torch_threads"]} threads), '
        f'{meta["date_utc"]} UTC',
        fontsize=9,
    )
    save_figure(fig, path)


if __name__ == '__main__':
    parser = argparse.ArgumentParser(description=__doc__)
    add_arguments(parser)
    raise SystemExit(run(parser.parse_args()))
