"""The split of the package: the model library runs on torch, torchvision and timm alone; each command that needs an
extra says which one when it is missing; the extras of pyproject.toml and the CLI's map of them agree."""

from __future__ import annotations

import importlib.metadata
import re
import subprocess
import sys
import textwrap

import pytest

from hsresnet.cli import EXTRA_OF_PACKAGE, user_message

# packages installed with the extras that neither torch, torchvision nor timm brings along
APPLICATION_ONLY = sorted(set(EXTRA_OF_PACKAGE) - {'numpy', 'PIL', 'yaml', 'safetensors', 'tqdm'})

# None in sys.modules: import raises ModuleNotFoundError, importlib.util.find_spec answers None: as if not installed
BLOCKER = 'import sys\nsys.modules.update(dict.fromkeys({blocked!r}))\n'


def run_without(blocked: list, code: str) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter where the ``blocked`` packages cannot be imported, as if not installed."""
    script = BLOCKER.format(blocked=set(blocked)) + textwrap.dedent(code)
    return subprocess.run([sys.executable, '-c', script], capture_output=True, text=True, timeout=300)


def test_the_model_library_needs_no_extra():
    result = run_without(
        APPLICATION_ONLY,
        """
        import torch, torchvision, timm
        import hsresnet
        from hsresnet.complexity import count_complexity

        for name in timm.list_models('hs_*'):
            model = hsresnet.create_model(name, num_classes=3).eval()
            assert model(torch.randn(1, 3, 64, 64)).shape == (1, 3), name
        model = hsresnet.hsify(torchvision.models.resnet50(num_classes=3))
        fast = hsresnet.optimize(model.eval())
        x = torch.randn(2, 3, 64, 64)
        assert torch.allclose(fast(x).float(), model(x), atol=1e-2)
        print(count_complexity(model, 64).macs > 0)
        app = sorted(m for m in sys.modules if m.startswith('hsresnet.') and m.split('.')[1] in
                     ('engine', 'classification', 'detection', 'segmentation', 'dense', 'study', 'benchmark',
                      'prepare', 'cli'))
        print('application modules:', app)
        """,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split('\n')[:2] == ['True', 'application modules: []']


def test_a_missing_extra_is_named_with_its_install_command():
    result = run_without(
        ['openvino'],
        """
        from hsresnet.cli import main
        sys.exit(main(['benchmark', '--paths', 'openvino', '-m', 'resnet18', '--img-size', '32']))
        """,
    )
    assert result.returncode == 2, result.stderr[-3000:]
    assert 'openvino' in result.stderr.split('extra')[0]
    assert "this command needs the 'export' extra (pip install 'hsresnet[export]')" in result.stderr
    assert 'Traceback' not in result.stderr


@pytest.mark.parametrize(('package', 'extra'), [('faster_coco_eval.core', 'detect'), ('yaml', 'train'), ('x', 'all')])
def test_user_message_maps_a_missing_package_to_its_extra(package, extra):
    err = ModuleNotFoundError(f'No module named {package!r}', name=package)
    assert user_message(err).endswith(f"needs the '{extra}' extra (pip install 'hsresnet[{extra}]')")


def test_the_cli_map_of_extras_matches_the_installed_metadata():
    """Every requirement of an extra (pyproject.toml, as installed) is in the CLI's map under that extra, and the map
    holds nothing else; the core requirements are torch, torchvision and timm."""
    import_names = importlib.metadata.packages_distributions()
    dist_to_imports: dict = {}
    for module, dists in import_names.items():
        for dist in dists:
            dist_to_imports.setdefault(re.sub(r'[-_.]+', '-', dist).lower(), set()).add(module)
    core, mapped = [], {}
    for requirement in importlib.metadata.requires('hsresnet'):
        name = re.sub(r'[-_.]+', '-', re.match(r'[A-Za-z0-9_.-]+', requirement).group(0)).lower()
        extra = re.search(r'extra == "(\w+)"', requirement)
        if extra is None:
            core.append(name)
        elif name != 'hsresnet' and extra.group(1) != 'dev':
            modules = dist_to_imports[name] & set(EXTRA_OF_PACKAGE)
            assert modules, f'{name} (extra {extra.group(1)}) is missing from cli.EXTRA_OF_PACKAGE'
            mapped.update(dict.fromkeys(modules, extra.group(1)))
    assert sorted(core) == ['timm', 'torch', 'torchvision']
    assert mapped == EXTRA_OF_PACKAGE


def test_help_needs_no_extra():
    result = run_without(APPLICATION_ONLY, "from hsresnet.cli import main\nmain(['--help'])")
    assert result.returncode == 0, result.stderr[-3000:]
    assert 'detect' in result.stdout and 'benchmark' in result.stdout


LIBRARY = ('__init__', 'layers', 'models', 'baselines', 'hsify', 'optimize', 'complexity', 'receptive_field',
           'reference', 'factory')  # fmt: skip


@pytest.mark.parametrize('module', LIBRARY)
def test_library_modules_import_nothing_of_the_application_even_lazily(module):
    """Every import in a library module, at the top or inside a function, is of the standard library, torch,
    torchvision, timm or another library module."""
    import ast
    from pathlib import Path

    import hsresnet

    source = Path(hsresnet.__file__).with_name(f'{module}.py').read_text()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.level:
            names = [node.module] if node.module else [a.name for a in node.names]
            assert all(n.split('.')[0] in LIBRARY for n in names), f'{module}.py imports .{names} (application)'
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module]
            tops = {n.split('.')[0] for n in names}
            assert tops <= set(sys.stdlib_module_names) | {'torch', 'torchvision', 'timm'}, f'{module}.py: {tops}'
