"""The layers of timm_cff (docs/index.md, "Layers"): no module imports a layer above its own.

Every module is parsed with ``ast``; absolute and relative imports count wherever they are written (module level,
functions, ``if TYPE_CHECKING`` blocks), and so do ``importlib.import_module`` / ``__import__`` calls with a literal
name.
"""
import ast
import shutil
from pathlib import Path

import pytest

PACKAGE_DIR = Path(__file__).resolve().parents[1] / 'timm_cff'
ROOT = 'timm_cff'

# Bottom to top. A module may import its own layer and any layer of a lower rank; layers of one rank (data,
# analysis) do not import each other. Keys: layer name -> the top-level modules/folders of timm_cff in it.
RANKS: tuple[dict[str, tuple[str, ...]], ...] = (
    {'base': ('registry', 'version', 'metrics', 'timing', 'files')},
    {'loss': ('loss', 'margins')},
    {'families': ('families',)},
    {'methods': ('methods', 'probe', 'export', 'loop', '__init__')},
    {'data': ('data',), 'analysis': ('analysis',)},
    {'pipeline': ('pipeline',)},
    {'experiment': ('experiment', '__main__')},
)
LEAVES = ('timm_cff.loop',)  # import no module of timm_cff
CONFIG_MODULES = ('timm_cff.experiment', 'timm_cff.experiment.config')  # the package re-exports Config
CONFIG_LAYER = 'experiment'
CONFIG_FORMATS = ('yaml',)  # third-party readers of config files, for the config layer only
FOREIGN = ('benchmarks', 'tests', 'conftest')  # outside the package: never imported by it

_LAYER = {top: (rank, name) for rank, layers in enumerate(RANKS) for name, tops in layers.items() for top in tops}


def module_name(path: Path, package_dir: Path = PACKAGE_DIR) -> str:
    """``timm_cff/loss/supcon.py`` -> ``timm_cff.loss.supcon``; a package's ``__init__.py`` -> the package."""
    parts = (package_dir.name, *path.relative_to(package_dir).with_suffix('').parts)
    return '.'.join(parts[:-1] if parts[-1] == '__init__' and len(parts) > 1 else parts)


def _resolve(importer: str, is_package: bool, level: int, module: str | None) -> str:
    """The absolute name of ``from {'.' * level}{module} import ...`` written in ``importer``."""
    if not level:
        return module or ''
    base = importer.split('.') if is_package else importer.split('.')[:-1]
    base = base[:len(base) - (level - 1)]
    return '.'.join(base + ([module] if module else []))


def scan_imports(package_dir: Path = PACKAGE_DIR) -> dict[str, list[tuple[str, str]]]:
    """For every module of the package, ``(imported module, 'file:line')`` of each import it makes.

    ``from X import name`` counts as an import of ``X.name`` when that is a module or package of the tree, else of
    ``X``; ``import X.Y`` counts as ``X.Y``.
    """
    files = sorted(package_dir.rglob('*.py'))
    known = {module_name(p, package_dir) for p in files}
    out: dict[str, list[tuple[str, str]]] = {}
    for path in files:
        name, is_package = module_name(path, package_dir), path.name == '__init__.py'
        where = lambda node: f'{path.relative_to(package_dir.parent)}:{node.lineno}'  # noqa: E731
        found = out.setdefault(name, [])
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                found += [(alias.name, where(node)) for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                source = _resolve(name, is_package, node.level, node.module)
                for alias in node.names:
                    sub = f'{source}.{alias.name}'
                    found.append((sub if sub in known else source, where(node)))
            elif (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
                  and isinstance(node.args[0].value, str)
                  and (getattr(node.func, 'attr', None) == 'import_module'
                       or getattr(node.func, 'id', None) in ('import_module', '__import__'))):
                package = node.args[1].value if len(node.args) > 1 and isinstance(node.args[1], ast.Constant) \
                    else None
                target = node.args[0].value
                if target.startswith('.') and package:
                    level = len(target) - len(target.lstrip('.'))
                    target = _resolve(package, True, level, target.lstrip('.') or None)
                found.append((target, where(node)))
    return out


def layer_of(module: str) -> tuple[int, str] | None:
    """(rank, layer name) of a ``timm_cff`` module; None for a module outside the package or one in no layer."""
    parts = module.split('.')
    if parts[0] != ROOT:
        return None
    return _LAYER.get(parts[1] if len(parts) > 1 else '__init__')


def check_layers(imports: dict[str, list[tuple[str, str]]]) -> list[str]:
    """Every breach of the layer rules in ``scan_imports``'s output, one readable line each."""
    problems = []
    for importer, found in sorted(imports.items()):
        own = layer_of(importer)
        if own is None:
            problems.append(f'{importer} is in no layer: add it to RANKS (tests/test_layers.py) and docs/index.md')
            continue
        for target, where in found:
            top = target.split('.')[0]
            if top in FOREIGN:
                problems.append(f'{where}: {importer} imports {target}, which is outside the package')
            if top in CONFIG_FORMATS and own[1] != CONFIG_LAYER:
                problems.append(f'{where}: {importer} ({own[1]}) imports {target}; only {CONFIG_LAYER} reads config')
            if top != ROOT:
                continue
            if target == ROOT and importer != ROOT:
                problems.append(f'{where}: {importer} imports the package root; import the defining module')
                continue
            if importer in LEAVES and target != importer:
                problems.append(f'{where}: {importer} imports {target}; it imports no module of {ROOT}')
            if target in CONFIG_MODULES and own[1] != CONFIG_LAYER:
                problems.append(f'{where}: {importer} ({own[1]}) imports {target}; only {CONFIG_LAYER} reads config')
            theirs = layer_of(target)
            if theirs is None:
                problems.append(f'{where}: {importer} imports {target}, which is in no layer')
            elif theirs[0] > own[0] or (theirs[0] == own[0] and theirs[1] != own[1]):
                problems.append(f'{where}: {importer} ({own[1]}) imports {target} ({theirs[1]}), '
                                f'{"a peer" if theirs[0] == own[0] else "a layer above"}')
    return problems


# ---------------------------------------------------------------------------------------------- the package


def test_no_module_imports_above_its_layer():
    imports = scan_imports()
    assert len(imports) > 50 and 'timm_cff.experiment.cli' in imports  # the scan found the package
    assert check_layers(imports) == []


def test_every_layer_is_a_folder_or_module_of_the_package():
    tops = {p.stem if p.suffix == '.py' else p.name for p in PACKAGE_DIR.iterdir()
            if p.suffix == '.py' or (p / '__init__.py').is_file()}
    assert set(_LAYER) == tops


def test_docs_map_lists_the_layers_of_this_test():
    """docs/index.md's map: one line per layer, top first, naming the folders and modules of RANKS."""
    text = (PACKAGE_DIR.parent / 'docs' / 'index.md').read_text()
    block = text.split('## Layers', 1)[1].split('```text', 1)[1].split('```', 1)[0]
    documented = {}
    for line in reversed(block.strip().splitlines()):
        name, *words = line.split()
        documented[name] = tuple(w.removesuffix('/').removesuffix('.py') for w in words
                                 if w.endswith(('/', '.py')))
    assert list(documented) == [name for layers in RANKS for name in layers]
    assert documented == {name: tops for layers in RANKS for name, tops in layers.items()}


# ---------------------------------------------------------------------------------------------- the checker

def _write(root: Path, files: dict[str, str]) -> Path:
    pkg = root / ROOT
    for rel, text in files.items():
        (pkg / rel).parent.mkdir(parents=True, exist_ok=True)
        (pkg / rel).write_text(text)
    return pkg


def test_scan_resolves_relative_absolute_and_nested_imports(tmp_path):
    pkg = _write(tmp_path, {
        '__init__.py': '', 'registry.py': '', 'margins.py': '',
        'loss/__init__.py': 'from .supcon import f\n', 'loss/supcon.py': 'from .. import registry\n',
        'methods/__init__.py': '', 'methods/cff.py': (
            'import timm_cff.loss.supcon\nfrom ..margins import x\nfrom . import cff\n'
            'def f():\n    from ..experiment.config import Config\n'
            'if False:\n    import importlib; importlib.import_module("timm_cff.pipeline")\n'),
        'experiment/__init__.py': '', 'experiment/config.py': 'import yaml\n', 'pipeline/__init__.py': '',
    })
    got = {k: [t for t, _ in v if t.startswith(ROOT)] for k, v in scan_imports(pkg).items()}
    assert got['timm_cff.loss'] == ['timm_cff.loss.supcon']
    assert got['timm_cff.loss.supcon'] == ['timm_cff.registry']
    assert sorted(got['timm_cff.methods.cff']) == sorted([
        'timm_cff.loss.supcon', 'timm_cff.margins', 'timm_cff.methods.cff', 'timm_cff.experiment.config',
        'timm_cff.pipeline'])
    where = dict(scan_imports(pkg)['timm_cff.methods.cff'])
    assert where['timm_cff.experiment.config'] == 'timm_cff/methods/cff.py:5'


@pytest.mark.parametrize('importer, target, breach', [
    ('timm_cff.loss.supcon', 'timm_cff.registry', None),
    ('timm_cff.methods.head', 'timm_cff.probe', None),          # same layer
    ('timm_cff.experiment.build', 'timm_cff.pipeline.session', None),
    ('timm_cff.loss.supcon', 'timm_cff.methods.cff', 'a layer above'),
    ('timm_cff.families.vit', 'timm_cff.methods', 'a layer above'),
    ('timm_cff.registry', 'timm_cff.margins', 'a layer above'),
    ('timm_cff.methods.cff', 'timm_cff.data', 'a layer above'),
    ('timm_cff.analysis.pairs', 'timm_cff.data.loader', 'a peer'),
    ('timm_cff.data.loader', 'timm_cff.analysis', 'a peer'),
    ('timm_cff.pipeline.session', 'timm_cff.experiment.config', 'only experiment reads config'),
    ('timm_cff.pipeline.session', 'timm_cff.experiment', 'only experiment reads config'),
    ('timm_cff.analysis.report', 'yaml', 'only experiment reads config'),
    ('timm_cff.loop', 'timm_cff.metrics', 'it imports no module'),
    ('timm_cff.probe', 'timm_cff', 'package root'),
    ('timm_cff.export', 'benchmarks.harness', 'outside the package'),
    ('timm_cff.methods.cff', 'timm_cff.newthing', 'in no layer'),
    ('timm_cff.newthing', 'torch', 'is in no layer'),
])
def test_checker_flags_each_kind_of_breach(importer, target, breach):
    problems = check_layers({importer: [(target, 'x.py:1')]})
    if breach is None:
        assert problems == []
    else:
        assert len(problems) >= 1 and any(breach in p for p in problems), problems


def test_a_bad_import_in_a_copy_of_the_package_fails(tmp_path):
    """An upward import inside a function of a scratch copy is found, with its file and line."""
    copy = tmp_path / ROOT
    shutil.copytree(PACKAGE_DIR, copy, ignore=shutil.ignore_patterns('__pycache__', '*.npz'))
    supcon = copy / 'loss' / 'supcon.py'
    lines = supcon.read_text().splitlines()
    supcon.write_text('\n'.join(lines + ['', 'def _late():', '    from ..methods.cff import LocalTrainer', '']))
    problems = check_layers(scan_imports(copy))
    assert problems == [f'timm_cff/loss/supcon.py:{len(lines) + 3}: timm_cff.loss.supcon (loss) imports '
                        'timm_cff.methods.cff (methods), a layer above']
