"""Where a forward's time goes in the deployed inference paths (onnxruntime, OpenVINO, torch.compile,
``hsresnet.optimize``), by kind of op, for hs_resnet50, resnet50 and res2net50_26w_4s, and where hs_resnet50's extra
time against resnet50 goes (docs/performance.md, "What limits it"). 224 px, the benchmark's threads, fp32 except
``openvino_bf16`` and, on a machine with native bf16, ``optimized`` (where ``optimize`` runs in bf16).

Each model is built through the path by ``hsresnet.benchmark.build`` (the exported paths: the ONNX file that
``exported_runner`` writes; compiled: ``torch.compile``, default mode; optimized: ``hsresnet.optimize``), then
profiled by the runtime's own profiler:

- onnxruntime: a second session on the same ONNX file with ``exported_runner``'s options plus
  ``SessionOptions.enable_profiling``; the JSON trace's node times within each run, by op type. Convolutions are
  split by layout: ``NCHWc`` (onnxruntime's blocked kernels; its layout pass pads channel counts to the block) and
  plain ``NCHW`` (the convs the layout pass leaves out: im2col + GEMM, their adds and ReLUs not fused).
- openvino, openvino_bf16: the ONNX file compiled with ``exported_runner``'s config plus ``PERF_COUNT``;
  ``get_profiling_info()`` real time by node type (ops fused into a conv are not run and cost nothing). The plugin's
  counters are running means over every infer, so a round's time is the difference of mean x count at its ends.
- compiled: ``torch.profiler`` over forwards of the compiled model, built with inductor's
  ``cpp.enable_kernel_profile`` so that each generated C++ kernel shows by name; self CPU time by kind:
  convolutions (``aten::mkldnn_convolution``, oneDNN called outside the generated code, or torch's im2col kernel
  for some batch-1 convs), inductor's fused kernels that write into a concat (``fused, cat``: a cascade step's BN
  and ReLU into its concat buffer) and the other fused kernels (BN, ReLU, residual add), copies (channel slices
  made contiguous for a conv), the compiled graph's Python and allocations, and the rest.
- optimized: ``torch.profiler`` over the eager forwards of the BN-folded, channels_last (bf16) model: convolutions,
  elementwise ops (the ReLUs the HS block writes into its output buffers, residual adds), copies (``x_1`` into the
  output buffer, concats, the input's cast and layout change), pooling, and the rest.

The OpenVINO and torch convs are also split by width: ``x16`` where every channel count per group is a multiple
of the kernels' channel block (16 with AVX-512, else 8; the 3-channel stem counts with them), ``odd``
otherwise. MACs per conv category come from the shapes the runtime reports (onnxruntime's NCHWc shapes include
the padding). ``unattributed``: wall time of the profiled forwards minus the ops' times (runtime overhead).

The models are profiled interleaved: ``--rounds`` rounds, each of ``--repeats`` forwards of every model (the
order rotates), plus as many unprofiled forwards through the path (the project's runner; for compiled the same
compiled model outside the profiler) to show the profiler's overhead. Rounds slower than ``--slack`` x the model's
fastest are left out (another process took a core); per category the median over the rest is reported. A path
can be re-run on its own into the same ``--output`` file (at a quieter time, say): it replaces that path's entry.

    python benchmarks/scripts/path_profile.py [--batch-size 8] [--paths onnxruntime openvino compiled] \
        [--threads 2] [--repeats 2] [--rounds 9] [--output benchmarks/results/path-profile-2026-12-04.json]
    python benchmarks/scripts/path_profile.py --paths optimized [-b 8]
"""

import argparse
import collections
import glob
import json
import os
import statistics
import tempfile
import time
from typing import Any, Callable, Dict, List, Sequence, Tuple

import numpy as np
import torch
from _common import make_parser, start

from hsresnet.benchmark import EXPORTED_PATHS, build, kept_signal_stack, machine_info
from hsresnet.optimize import fast_bf16_available

MODELS = ('hs_resnet50', 'resnet50', 'res2net50_26w_4s')
BASE = 'resnet50'
PATHS = ('onnxruntime', 'openvino', 'openvino_bf16', 'compiled', 'optimized')
CONV_X16, CONV_ODD = 'conv x16', 'conv odd'
CATEGORIES = {  # printing order; a category no model has is not printed
    'onnxruntime': ('conv NCHWc', 'conv NCHW', 'reorder', 'concat', 'split/slice', 'add', 'relu', 'batchnorm', 'pool',
                    'other', 'unattributed'),
    'openvino': (CONV_X16, CONV_ODD, 'reorder', 'concat', 'split/slice', 'eltwise', 'pool', 'other', 'unattributed'),
    'compiled': (CONV_X16, CONV_ODD, 'fused, cat', 'fused, other', 'copies', 'graph overhead', 'other',
                 'unattributed'),
    'optimized': (CONV_X16, CONV_ODD, 'eltwise', 'copies', 'pool', 'other', 'unattributed'),
}  # fmt: skip
CATEGORIES['openvino_bf16'] = CATEGORIES['openvino']
CONV_CATEGORIES = (CONV_X16, CONV_ODD, 'conv NCHWc', 'conv NCHW')
# one forward: ms per category, MACs per conv category, op calls per category
Profile = Tuple[Dict[str, float], Dict[str, float], Dict[str, int]]


def channel_block() -> int:
    """The channel block of oneDNN's / MLAS's fp32 conv kernels on this CPU."""
    return 16 if torch.backends.cpu.get_cpu_capability().startswith('AVX512') else 8


def conv_width(in_channels: int, out_channels: int, groups: int) -> str:
    """``CONV_X16`` where every channel count per group is a multiple of the kernels' block (the 3-channel image
    input counts with them), else ``CONV_ODD``."""
    block = channel_block()
    per_in, per_out = in_channels // groups, out_channels // groups
    return CONV_X16 if (per_in % block == 0 or in_channels == 3) and per_out % block == 0 else CONV_ODD


def conv_macs(out_shape: Sequence[int], weight_shape: Sequence[int]) -> float:
    """Output elements x input channels per group x kernel size; the weight ``[out, in/g, kh, kw]`` or
    ``[g, out/g, in/g, kh, kw]``."""
    return float(np.prod(out_shape) * np.prod(weight_shape[-3:]))


def _add(profile: Profile, category: str, ms: float, macs: float = 0.0, calls: int = 1) -> None:
    times, mac_counts, counts = profile
    times[category] = times.get(category, 0.0) + ms
    counts[category] = counts.get(category, 0) + calls
    if category in CONV_CATEGORIES:
        mac_counts[category] = mac_counts.get(category, 0.0) + macs


def _scaled(profile: Profile, n: int, wall_ms: float) -> Profile:
    """A profile summed over ``n`` forwards -> per forward, with ``unattributed`` = wall - the ops' times."""
    times, macs, calls = profile
    per = {k: v / n for k, v in times.items()}
    per['unattributed'] = wall_ms / n - sum(per.values())
    return per, {k: v / n for k, v in macs.items()}, {k: round(v / n) for k, v in calls.items()}


# onnxruntime


def ort_category(op: str, node: str) -> str:
    if op in ('Conv', 'FusedConv'):
        return 'conv NCHWc' if '_nchwc' in node else 'conv NCHW'
    if op in ('ReorderInput', 'ReorderOutput'):
        return 'reorder'
    groups = {'Concat': 'concat', 'Split': 'split/slice', 'Slice': 'split/slice', 'Gather': 'split/slice',
              'Add': 'add', 'Sum': 'add', 'Relu': 'relu', 'BatchNormalization': 'batchnorm', 'MaxPool': 'pool',
              'AveragePool': 'pool', 'GlobalAveragePool': 'pool', 'ReduceMean': 'pool'}  # fmt: skip
    return groups.get(op, 'other')


class OrtProfiler:
    """A profiling onnxruntime session on ``onnx_file``, set up as ``exported_runner``'s plus profiling."""

    def __init__(self, onnx_file: str, trace_dir: str) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.add_session_config_entry('session.intra_op.allow_spinning', '0')
        options.enable_profiling = True
        options.profile_file_prefix = os.path.join(trace_dir, os.path.basename(onnx_file))
        self.session = ort.InferenceSession(onnx_file, options, providers=['CPUExecutionProvider'])
        self.input = self.session.get_inputs()[0].name
        self.runs: List[Tuple[int, float]] = []  # (round, wall ms) of every run; round -1: warm-up
        self.round = 0

    def run(self, x: np.ndarray) -> None:
        begin = time.perf_counter()
        self.session.run(None, {self.input: x})
        self.runs.append((self.round, (time.perf_counter() - begin) * 1e3))

    def end_round(self, keep: bool = True) -> None:
        """Close a round of ``run`` calls; those of a round not kept (warm-up) are left out of ``rounds``."""
        if keep:
            self.round += 1
        else:
            self.runs = [(-1 if r == self.round else r, wall) for r, wall in self.runs]

    def rounds(self) -> List[Profile]:
        """End profiling; one per-forward profile per kept round, from the trace's node times within each run."""
        events = json.load(open(self.session.end_profiling()))
        spans = [(e['ts'], e['ts'] + e['dur']) for e in events if e.get('name') == 'model_run']
        assert len(spans) == len(self.runs), (len(spans), len(self.runs))
        nodes = sorted((e for e in events if e.get('cat') == 'Node' and e['name'].endswith('_kernel_time')),
                       key=lambda e: e['ts'])  # fmt: skip
        per_round: Dict[int, Profile] = collections.defaultdict(lambda: ({}, {}, {}))
        walls: Dict[int, List[float]] = collections.defaultdict(list)
        k = 0
        for (round_, wall), (begin, end) in zip(self.runs, spans):
            walls[round_].append(wall)
            while k < len(nodes) and nodes[k]['ts'] < begin:
                k += 1
            while k < len(nodes) and nodes[k]['ts'] <= end:
                e, k = nodes[k], k + 1
                args = e['args']
                category = ort_category(args['op_name'], e['name'][: -len('_kernel_time')])
                macs = 0.0
                if category.startswith('conv'):
                    weight = next(iter(args['input_type_shape'][1].values()))
                    out = next(iter(args['output_type_shape'][0].values()))
                    macs = conv_macs(out, weight)
                _add(per_round[round_], category, e['dur'] / 1e3, macs)
        return [_scaled(per_round[r], len(walls[r]), sum(walls[r])) for r in sorted(per_round) if r >= 0]


# OpenVINO


def ov_category(node_type: str) -> str:
    groups = {'Reorder': 'reorder', 'Concat': 'concat', 'Split': 'split/slice', 'VariadicSplit': 'split/slice',
              'StridedSlice': 'split/slice', 'Slice': 'split/slice', 'Eltwise': 'eltwise', 'Add': 'eltwise',
              'Relu': 'eltwise', 'Multiply': 'eltwise', 'Subtract': 'eltwise', 'MaxPool': 'pool', 'AvgPool': 'pool',
              'ReduceMean': 'pool', 'Pooling': 'pool'}  # fmt: skip
    return groups.get(node_type, 'other')


class OvProfiler:
    """The ONNX file compiled by OpenVINO's CPU plugin with ``exported_runner``'s config (``precision`` f32 or bf16)
    plus ``PERF_COUNT``.

    The plugin's counters are running means over every infer of the request (total / count, in microseconds), so a
    round's time per node is the difference of mean x count at its ends."""

    def __init__(self, onnx_file: str, batch: int, precision: str = 'f32') -> None:
        import openvino as ov

        core = ov.Core()
        config = {'INFERENCE_NUM_THREADS': torch.get_num_threads(), 'INFERENCE_PRECISION_HINT': precision,
                  'PERFORMANCE_HINT': 'LATENCY', 'PERF_COUNT': True}  # fmt: skip
        compiled = core.compile_model(core.read_model(onnx_file), 'CPU', config)
        self.request = compiled.create_infer_request()
        self.convs: Dict[str, Tuple[str, float]] = {}  # node name -> width category, MACs per forward
        for op in compiled.get_runtime_model().get_ops():
            if op.get_rt_info()['layerType'].astype(str) != 'Convolution':
                continue
            weight = [d.get_length() for d in op.input_value(1).get_partial_shape()]
            in_channels = op.input_value(0).get_partial_shape()[1].get_length()
            out = [batch] + [d.get_length() for d in list(op.get_output_partial_shape(0))[1:]]
            groups = weight[0] if len(weight) == 5 else 1
            self.convs[op.get_friendly_name()] = (conv_width(in_channels, out[1], groups), conv_macs(out, weight))
        self.exec_types: Dict[str, List[str]] = {}  # per category: the plugin's kernels (jit_*, brgconv_*, ref_*)
        self.infers = 0
        self.totals: List[float] = []  # per node of the profiling info: ms over every infer so far
        self.walls: List[float] = []
        self.profiles: List[Profile] = []

    def run(self, x: np.ndarray) -> None:
        begin = time.perf_counter()
        self.request.infer({0: x})
        self.walls.append((time.perf_counter() - begin) * 1e3)
        self.infers += 1

    def end_round(self, keep: bool = True) -> None:
        """Close a round of ``run`` calls: its profile per forward (``keep``), or none (warm-up)."""
        nodes = self.request.get_profiling_info()
        totals = [node.real_time.total_seconds() * 1e3 * self.infers for node in nodes]
        previous = self.totals or [0.0] * len(totals)
        profile: Profile = ({}, {}, {})
        for node, now, before in zip(nodes, totals, previous):
            if str(node.status) != 'Status.EXECUTED':
                continue
            if node.node_type in ('Convolution', 'GroupConvolution'):
                category, macs = self.convs[node.node_name]
            else:
                category, macs = ov_category(node.node_type), 0.0
            kinds = self.exec_types.setdefault(category, [])
            if node.exec_type not in kinds:
                kinds.append(node.exec_type)
            _add(profile, category, now - before, macs * len(self.walls), len(self.walls))
        if keep:
            self.profiles.append(_scaled(profile, len(self.walls), sum(self.walls)))
        self.totals, self.walls = totals, []


# torch.compile (inductor)


# convolution ops and their dispatch layers; the MACs are counted at the kernel: (padding, stride, dilation) args
CONV_OPS = {'aten::convolution': None, 'aten::_convolution': None, 'aten::thnn_conv2d': None,
            'aten::mkldnn_convolution': (3, 4, 5), 'aten::_slow_conv2d_forward': (5, 4, None)}  # fmt: skip
OVERHEAD_OPS = ('TorchDynamo Cache Lookup', 'Torch-Compiled Region', 'Pregraph bytecode', 'AOTDispatcher',
                'aten::empty', 'aten::empty_like', 'aten::empty_strided', 'aten::resize_', 'aten::as_strided',
                'aten::_nnpack_available')  # fmt: skip


def compiled_category(name: str, shapes: Sequence[Sequence[int]]) -> str:
    """The category of one profiler event of a compiled forward (its self time)."""
    if name in CONV_OPS:  # oneDNN (mkldnn), or torch's own im2col kernel (slow_conv2d) for some batch-1 convs
        x, weight = shapes[0], shapes[1]
        return conv_width(x[1], weight[0], x[1] // weight[1])
    if 'cpp_fused' in name or 'triton_' in name:  # inductor's generated kernels
        return 'fused, cat' if 'cat' in name.split('_') else 'fused, other'
    if name in ('aten::copy_', 'aten::clone', 'aten::contiguous', 'aten::cat'):
        return 'copies'
    if name.startswith('## Call CompiledFxGraph') or name.startswith(OVERHEAD_OPS):
        return 'graph overhead'  # the compiled graph's Python, guards, output allocation
    return 'other'


def optimized_category(name: str, shapes: Sequence[Sequence[int]]) -> str:
    """The category of one profiler event of an eager forward of the optimized model (its self time)."""
    if name in CONV_OPS:
        x, weight = shapes[0], shapes[1]
        return conv_width(x[1], weight[0], x[1] // weight[1])
    if name in ('aten::clamp_min', 'aten::relu', 'aten::relu_', 'aten::add', 'aten::add_'):
        return 'eltwise'
    if name in ('aten::copy_', 'aten::cat', 'aten::clone', 'aten::contiguous', 'aten::_to_copy'):
        return 'copies'
    if name in ('aten::max_pool2d', 'aten::avg_pool2d', 'aten::adaptive_avg_pool2d', 'aten::mean'):
        return 'pool'
    return 'other'


class TorchProfiler:
    """``torch.profiler`` over forwards of a torch model, compiled or eager (self CPU time of every op and generated
    kernel), each event put in a category by ``category(name, input_shapes)``."""

    def __init__(self, run: Callable[[torch.Tensor], Any], category: Callable[[str, Sequence], str]) -> None:
        self.model = run
        self.category = category
        self.profiles: List[Profile] = []

    def profile_round(self, x: torch.Tensor, n: int) -> None:
        from torch.profiler import ProfilerActivity, profile

        with torch.inference_mode(), profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            begin = time.perf_counter()
            for _ in range(n):
                self.model(x)
            wall = (time.perf_counter() - begin) * 1e3
        total: Profile = ({}, {}, {})
        for e in prof.events():
            category = self.category(e.name, e.input_shapes)
            macs = self._conv_macs(e) if CONV_OPS.get(e.name) else 0.0
            _add(total, category, e.self_cpu_time_total / 1e3, macs)
        self.profiles.append(_scaled(total, n, wall))

    @staticmethod
    def _conv_macs(event: Any) -> float:
        """MACs of one conv kernel call, from its shapes and (padding, stride, dilation) arguments."""
        x, weight = event.input_shapes[0], event.input_shapes[1]
        args = event.concrete_inputs or []
        padding, stride, dilation = (args[i] if i is not None and i < len(args) else None for i in CONV_OPS[event.name])
        dilation = dilation or [1, 1]
        if not (stride and padding):
            return 0.0
        size = [(x[2 + i] + 2 * padding[i] - dilation[i] * (weight[2 + i] - 1) - 1) // stride[i] + 1 for i in (0, 1)]
        return conv_macs([x[0], weight[0]] + size, weight)


# the run


def undisturbed(totals: Sequence[float], slack: float) -> List[int]:
    """The rounds within ``slack`` x the fastest one. On a shared 2-core machine a round during which another process
    takes a core can run several times slower (most of all with OpenMP, whose 2-thread team waits on the
    descheduled thread at every kernel's barrier); such a round says nothing about the model."""
    fastest = min(totals)
    return [i for i, t in enumerate(totals) if t <= slack * fastest]


def merge(rounds: List[Profile], slack: float) -> Dict[str, Any]:
    """Per category the median over the undisturbed rounds (the medians need not add up to the median total
    exactly), and every round's numbers."""
    totals = [sum(r[0].values()) for r in rounds]
    kept = [rounds[i] for i in undisturbed(totals, slack)]
    median = lambda i, k: statistics.median(r[i].get(k, 0.0) for r in kept)  # noqa: E731
    times = {k: median(0, k) for k in dict.fromkeys(k for r in kept for k in r[0])}
    macs = {k: median(1, k) for k in dict.fromkeys(k for r in kept for k in r[1])}
    rates = {k: macs[k] / times[k] / 1e6 for k in macs if times.get(k)}
    conv_ms = sum(v for k, v in times.items() if k in CONV_CATEGORIES)
    if conv_ms:
        rates['conv, all'] = sum(macs.values()) / conv_ms / 1e6
    return {
        'ms': {k: round(v, 3) for k, v in times.items()},
        'conv_gmacs': {k: round(v / 1e9, 4) for k, v in macs.items()},
        'conv_gmac_per_sec': {k: round(v, 2) for k, v in rates.items()},
        'calls': rounds[-1][2],
        'rounds_kept': undisturbed(totals, slack),
        'total_ms_per_round': [round(t, 2) for t in totals],
        'ms_per_round': [{k: round(v, 3) for k, v in r[0].items()} for r in rounds],
    }


def profile_path(path: str, models: Sequence[str], args: argparse.Namespace, work_dir: str) -> Dict[str, Any]:
    """Build every model through ``path``, then profile them interleaved; one entry per model."""
    build_args = argparse.Namespace(num_classes=1000, in_chans=3, img_size=224, torchcompile=None)
    device = torch.device('cpu')
    x = torch.randn(args.batch_size, 3, 224, 224)
    profilers, runners, build_s = {}, {}, {}
    for name in models:
        begin = time.perf_counter()
        spec = {'name': name, 'model': name, 'kwargs': {}}
        built_path = build(spec, path, 'inference', args.batch_size, device, build_args, work_dir)
        onnx_file = os.path.join(work_dir, f'{name}-{args.batch_size}.onnx')  # as build() names it
        if path == 'onnxruntime':
            profilers[name] = OrtProfiler(onnx_file, work_dir)
        elif path.startswith('openvino'):
            profilers[name] = OvProfiler(onnx_file, args.batch_size, 'bf16' if path == 'openvino_bf16' else 'f32')
        else:
            category = compiled_category if path == 'compiled' else optimized_category
            profilers[name] = TorchProfiler(built_path.run, category)
        runners[name] = built_path.run
        with torch.inference_mode():
            for _ in range(args.warmup):  # compiled: the first call compiles
                runners[name](x)
        build_s[name] = round(time.perf_counter() - begin, 1)
        print(f'  {path}: {name} built and warmed up in {build_s[name]:.0f} s', flush=True)
    x_np = x.numpy()
    for name in models:
        if path in EXPORTED_PATHS:
            for _ in range(args.warmup):
                profilers[name].run(x_np)
            profilers[name].end_round(keep=False)
    unprofiled: Dict[str, List[float]] = {name: [] for name in models}
    loads = []
    for r in range(args.rounds):
        loads.append(round(os.getloadavg()[0], 2))
        order = list(models)[r % len(models) :] + list(models)[: r % len(models)]
        for name in order:
            with torch.inference_mode():
                begin = time.perf_counter()
                for _ in range(args.repeats):
                    runners[name](x)
                unprofiled[name].append((time.perf_counter() - begin) * 1e3 / args.repeats)
            if path not in EXPORTED_PATHS:
                profilers[name].profile_round(x, args.repeats)
            else:
                for _ in range(args.repeats):
                    profilers[name].run(x_np)
                profilers[name].end_round()
    result: Dict[str, Any] = {'load_avg_1min_per_round': loads}
    for name in models:
        entry = merge(profilers[name].profiles if path != 'onnxruntime' else profilers[name].rounds(), args.slack)
        entry['unprofiled_ms_per_round'] = [round(t, 2) for t in unprofiled[name]]
        entry['unprofiled_ms'] = statistics.median(
            unprofiled[name][i] for i in undisturbed(unprofiled[name], args.slack)
        )
        entry['build_and_warmup_s'] = build_s[name]
        if path.startswith('openvino'):
            entry['exec_types'] = profilers[name].exec_types
        result[name] = entry
    return result


def print_path(path: str, result: Dict[str, Any], models: Sequence[str], batch: int) -> None:
    """ms per forward and share per category for every model, then each model minus resnet50 (and the share of the
    gap each category makes up); conv rates, ops per forward and the unprofiled forward time below."""
    others = [m for m in models if m != BASE]
    print(f'\n== {path}, batch {batch}: ms per forward (share of the forward); minus {BASE} (share of the gap); '
          f'load average per round {result["load_avg_1min_per_round"]}')  # fmt: skip
    print(f'{"":<18}' + ''.join(f'{m[:19]:>20}' for m in models) + ''.join(f'{"- " + BASE:>20}' for _ in others))
    print(f'{"":<18}' + ''.join(f'{"":>20}' for _ in models) + ''.join(f'{"(" + m[:17] + ")":>20}' for m in others))
    totals = {m: sum(result[m]['ms'].values()) for m in models}
    present = [c for c in CATEGORIES[path] if any(c in result[m]['ms'] for m in models)]
    convs = {m: sum(v for k, v in result[m]['ms'].items() if k in CONV_CATEGORIES) for m in models}
    sums = {'total': totals, 'conv, all': convs, 'not conv': {m: totals[m] - convs[m] for m in models}}
    for c in present + list(sums):
        ms = sums[c] if c in sums else {m: result[m]['ms'].get(c, 0.0) for m in models}
        line = f'{c:<18}' + ''.join(f'{ms[m]:>11.1f} ({100 * ms[m] / totals[m]:5.1f}%)' for m in models)
        for m in others:
            gap = totals[m] - totals[BASE]
            line += f'{ms[m] - ms[BASE]:>+11.1f} ({100 * (ms[m] - ms[BASE]) / gap if gap else 0:5.0f}%)'
        print(line)
    rates = (*CONV_CATEGORIES, 'conv, all')
    rows = {f'{c} GMAC/s': lambda m, c=c: result[m]['conv_gmac_per_sec'].get(c) for c in rates}
    rows['ops / forward'] = lambda m: sum(result[m]['calls'].values())
    rows['rounds kept'] = lambda m: len(result[m]['rounds_kept'])
    rows['unprofiled ms'] = lambda m: result[m]['unprofiled_ms']
    for label, value in rows.items():
        cells = [value(m) for m in models]
        if any(v is not None for v in cells):
            print(f'{label:<18}' + ''.join(f'{"-" if v is None else f"{v:.1f}":>20}' for v in cells))


def main() -> None:
    parser = make_parser(__doc__, repeats=2)
    parser.add_argument('--batch-size', '-b', type=int, default=8)
    parser.add_argument('--paths', nargs='+', choices=PATHS, default=list(PATHS))
    parser.add_argument('--models', nargs='+', default=list(MODELS), help=f'the first is compared with {BASE}')
    parser.add_argument('--rounds', type=int, default=9, help='interleaved rounds of --repeats forwards per model')
    parser.add_argument('--warmup', type=int, default=2)
    parser.add_argument('--slack', type=float, default=1.25, help='rounds slower than this x the fastest are left out')
    parser.add_argument(
        '--output', default=None, help='write the numbers as JSON; the paths of an existing file of the same batch '
        'size that this run does not profile are kept (a path re-run on its own replaces its entry)'
    )  # fmt: skip
    args = start(parser)
    models = list(dict.fromkeys([*args.models, BASE]))
    import onnxruntime
    import openvino

    report: Dict[str, Any] = {
        'machine': machine_info(torch.device('cpu'), args),
        'onnxruntime': onnxruntime.__version__,
        'openvino': openvino.__version__,
        'batch_size': args.batch_size,
        'img_size': 224,
        'channel_block': channel_block(),
        'optimized_dtype': 'bfloat16' if fast_bf16_available() else 'float32',
        'units': 'ms per forward (median over the rounds kept); conv_gmacs per forward; calls: ops per forward',
        'paths': {},
    }
    if args.output and os.path.exists(args.output):
        with open(args.output) as f:
            previous = json.load(f)
        if previous.get('batch_size') == args.batch_size:
            report['paths'] = {k: v for k, v in previous['paths'].items() if k not in args.paths}
    if 'compiled' in args.paths:
        from torch._inductor import config as inductor_config

        inductor_config.cpp.enable_kernel_profile = True  # each generated C++ kernel a profiler event
    with tempfile.TemporaryDirectory() as work_dir:
        for path in args.paths:
            started = time.strftime('%Y-%m-%d %H:%M', time.gmtime())
            with kept_signal_stack():
                result = profile_path(path, models, args, work_dir)
            result.update(date_utc=started, rounds=args.rounds, repeats=args.repeats, slack=args.slack)
            report['paths'][path] = result
            print_path(path, result, models, args.batch_size)
            for trace in glob.glob(os.path.join(work_dir, '*.json')):
                os.remove(trace)
    report['machine']['load_avg_after'] = [round(v, 2) for v in os.getloadavg()]
    if args.output:
        with open(args.output, 'w') as f:
            json.dump(report, f, indent=1)
        print(f'wrote {args.output}')


if __name__ == '__main__':
    main()
