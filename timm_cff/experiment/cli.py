"""``timm-cff``: train, probe, evaluate and export CFF runs from YAML recipes.

    timm-cff train --config quickstart [--section.key=value ...]     (a shipped recipe's name, or a YAML path)
    timm-cff train --resume runs/NAME
    timm-cff probe runs/NAME [--probe.epochs=10]
    timm-cff probe runs/NAME/export --data.dataset=npz --data.root=DIR [--out NEW_DIR]
    timm-cff eval runs/NAME | EXPORT_DIR [--data.root=...]
    timm-cff export runs/NAME [--out DIR] [--checkpoint final|best]
    timm-cff analyze runs/NAME | EXPORT_DIR [--out DIR]
    timm-cff compare runs/A runs/B ...
    timm-cff recipes [FILTER]

The only module that prints and configures logging.
"""
import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

from ..data import DataError
from ..methods import NonFiniteLossError
from .allocator import keep_freed_memory
from .commands import analyze_path, evaluate_export, evaluate_run, export_run, train_run
from .compare import format_comparison, read_histories, summarize_run, write_comparison
from .config import Config, ConfigError, apply_overrides, iter_fields, load_config, parse_override
from .progress import Progress
from .recipes import Recipe, list_recipes, resolve_recipe
from .rundir import CheckpointError, RunDir, RunInUseError
from .transfer import probe_path

__all__ = ['main']

_logger = logging.getLogger('timm_cff.cli')
_EXPECTED_ERRORS = (ConfigError, DataError, CheckpointError, RunInUseError, FileNotFoundError, FileExistsError,
                    ValueError, TypeError)


class TqdmProgress(Progress):
    """tqdm bars with the per-stage losses of the latest step (``s0``, ``s1``, ...)."""

    def __init__(self, refresh_every: int = 10):
        self.refresh_every, self._count = refresh_every, 0

    def bar(self, iterable=None, desc='', total=None):
        from tqdm.auto import tqdm
        return tqdm(iterable, desc=desc, total=total, leave=False, dynamic_ncols=True)

    def update(self, bar, values, advance=False):
        self._count += 1
        if advance:
            bar.update(1)
        if advance or self._count % self.refresh_every == 0:  # reading a tensor syncs the device: not every step
            shown = {k.replace('loss_stage', 's'): f'{float(v):.3f}' for k, v in values.items()
                     if k.startswith('loss_stage') or k in ('loss', 'val_loss', 'val_top1')}
            bar.set_postfix(shown, refresh=False)

    def close(self, bar):
        bar.close()

    def message(self, text):
        print(text, flush=True)


class QuietProgress(Progress):
    def message(self, text):
        _logger.info(text)


def _add_config_options(parser: argparse.ArgumentParser) -> None:
    """One ``--section.key`` option per config field, with its default in the help."""
    groups: dict[str, Any] = {}
    for key, field, value in iter_fields(Config()):
        section = key.split('.')[0]
        group = groups.setdefault(section, parser.add_argument_group(f'{section} options'))
        group.add_argument(f'--{key}', dest=key, metavar='V', default=argparse.SUPPRESS,
                           help=f'{field.metadata.get("help", "")} (default: {value!r})'.replace('%', '%%'))


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    keys = {key for key, _, _ in iter_fields(Config())}
    return dict(parse_override(f'{k}={v}') for k, v in vars(args).items() if k in keys)


_PROBE_HELP = """Linear probe (fc_norm + head) on a frozen encoder.

  timm-cff probe RUN [--probe.epochs=10]
      redo the probe of a run in place on its own data (best stage-1 encoder), then test and export again
  timm-cff probe RUN/export --data.dataset=npz --data.root=DIR [--out NEW] [--probe.*=...]
      transfer probe: the export's encoder (a run folder means its export/) with a new head for the new data's
      classes, trained on the new data, tested, and written as a NEW timm export folder; the source is only read
  timm-cff probe RUN --checkpoint best [--out NEW] [--data.*=...]
      the same from a run's best stage-1 checkpoint so far, also while the run trains (the run is only read)

An export folder, another data.dataset or data.root than the source's, --out or --checkpoint make it a transfer
probe. With
another dataset or root the data section starts from the defaults plus the data.* keys given (the source's other
data keys, e.g. data.train_subset, are logged as dropped); probe.* settings are the defaults plus the keys given.
A transfer probe reads only data.*, probe.* and run.seed/device/topk/metric/quiet; images with other channels or
size than the export takes are refused before training. See docs/training.md, "Probing on new data"."""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog='timm-cff', allow_abbrev=False, description='Layer-local training of '
                                     'timm ViTs with Contrastive Forward-Forward (CFF).')
    sub = parser.add_subparsers(dest='command', required=True)
    train = sub.add_parser('train', allow_abbrev=False, help='stage 1 + probe + test + export',
                           description='Train a run: stage 1 (layer-local), stage 2 (linear probe), test accuracy, '
                           'timm export.')
    train.add_argument('--config', help='a shipped recipe by name (timm-cff recipes lists them, e.g. quickstart, '
                       'cifar10_vit128-4-5_rc) or a YAML file; options below override it')
    train.add_argument('--resume', metavar='RUN_DIR', help='continue an interrupted run from its last checkpoint; '
                       'with --train.epochs=N it extends the run to N epochs')
    _add_config_options(train)
    probe = sub.add_parser('probe', allow_abbrev=False, help='redo stage 2 of a run, or probe an export on new data',
                           formatter_class=argparse.RawDescriptionHelpFormatter, description=_PROBE_HELP)
    probe.add_argument('path', metavar='PATH', help='a run folder or an export folder (config.json + '
                       'model.safetensors + timm_cff.json)')
    probe.add_argument('--out', metavar='DIR', help='transfer probe: the new export folder (missing, empty or an '
                       'earlier export; default: PATH-probe-DATA-TIME beside PATH, or beside the run of a run\'s '
                       'export)')
    probe.add_argument('--checkpoint', choices=('best', 'final'), help="transfer probe of this checkpoint of the run "
                       "folder PATH instead of its export ('best': stage 1's best epoch so far, also while it trains)")
    _add_config_options(probe)
    evaluate = sub.add_parser('eval', allow_abbrev=False, help='test accuracy of a run or an export folder')
    evaluate.add_argument('path', help='a run folder or an export folder (config.json + model.safetensors)')
    evaluate.add_argument('--timing', action='store_true', help='also report milliseconds per test image of the '
                          'one-forward classifier and, for the FF family, of the C-pass prediction (Table 2)')
    _add_config_options(evaluate)
    analyze = sub.add_parser('analyze', allow_abbrev=False, help='layer-wise report of a run or an export folder',
                             description='Per-block Fisher criterion, linear-probe accuracy, clamped fraction R(k), '
                             'anchor cosines, t-SNE maps and training curves, on the clean validation images, '
                             'written as report.md + metrics.json + PNGs.')
    analyze.add_argument('path', help='a run folder or an export folder (its dataset comes from timm_cff.json)')
    analyze.add_argument('--out', help='output folder (default: PATH/analysis)')
    analyze.add_argument('--samples', type=int, default=5000, help='validation images used (default: 5000)')
    analyze.add_argument('--tsne-samples', type=int, default=1000, help='points per t-SNE map, 0: none '
                         '(default: 1000)')
    _add_config_options(analyze)
    compare = sub.add_parser('compare', allow_abbrev=False, help='one table row per run folder',
                             description='A markdown table of run folders (method, model, epochs, selected epoch, '
                             'test accuracy, one-pass head, stage-1 time), finished or still training.')
    compare.add_argument('run_dirs', nargs='+', metavar='RUN_DIR')
    compare.add_argument('--format', choices=('markdown', 'json'), default='markdown',
                         help='print a markdown table or a JSON list of rows (default: markdown)')
    compare.add_argument('--json', dest='format', action='store_const', const='json', help='same as --format json')
    compare.add_argument('--out', metavar='PREFIX', help='also write PREFIX.json, PREFIX.md and the runs\' '
                         'per-epoch metrics as PREFIX.history.csv, e.g. docs/results/cifar10_vit128-4-5_rc')
    recipes = sub.add_parser('recipes', allow_abbrev=False, help='list the shipped recipes',
                             description='The recipes shipped in the package, each with the paper row it reproduces; '
                             'pass a name to --config.')
    recipes.add_argument('filter', nargs='?', default='', help='only names containing this text')
    export = sub.add_parser('export', allow_abbrev=False, help='write the timm folder of a run')
    export.add_argument('run_dir')
    export.add_argument('--out', help='output folder (default: RUN_DIR/export)')
    export.add_argument('--checkpoint', choices=('final', 'best'), default='final',
                        help="'final' (after the probe) or 'best' (stage 1 only) (default: final)")
    return parser


def _run_name(config_path: str | None) -> str:
    stem = Path(config_path).stem if config_path else 'run'
    return f'{stem}-{time.strftime("%Y%m%d-%H%M%S")}'


def _train(args: argparse.Namespace) -> dict[str, Any]:
    overrides = _overrides(args)
    if args.resume:
        if args.config:
            raise ConfigError('--resume continues a run with its saved config; do not pass --config.')
        cfg = load_config(RunDir(args.resume).config_path, overrides)
        path = Path(args.resume)
    else:
        cfg = load_config(args.config and resolve_recipe(args.config), overrides)
        path = Path(cfg.run.output) / (cfg.run.name or _run_name(args.config))
    lead = os.environ.get('RANK', '0') == '0'  # under torchrun only rank 0 reports
    _setup_logging(cfg.run.quiet, lead)
    if lead:
        print(f'run folder: {path}', flush=True)
    progress = QuietProgress() if cfg.run.quiet or not lead else TqdmProgress()
    return train_run(cfg, path, resume=bool(args.resume), progress=progress, explicit_keys=set(overrides))


def _setup_logging(quiet: bool, lead: bool = True) -> None:
    """INFO (WARNING when quiet) on the lead process; under torchrun the other ranks report errors only."""
    from timm.utils.log import FormatterNoInfo  # timm's console format: INFO lines plain, others 'LEVEL: ...'
    level = (logging.WARNING if quiet else logging.INFO) if lead else logging.ERROR
    handler = logging.StreamHandler()
    handler.setFormatter(FormatterNoInfo())
    logging.basicConfig(level=level, handlers=[handler], force=True)  # as timm's setup_default_logging, repeatable


def _apply(overrides: dict[str, Any]):
    return (lambda cfg: apply_overrides(cfg, overrides)) if overrides else None


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    _setup_logging(quiet=False)
    keep_freed_memory()  # CPU steps reuse freed activations instead of faulting fresh pages in (see allocator.py)
    try:
        if args.command == 'train':
            result = _train(args)
        elif args.command == 'probe':
            result = probe_path(args.path, _overrides(args), args.out, TqdmProgress(), args.checkpoint)
        elif args.command == 'eval':
            path = Path(args.path)
            result = evaluate_export(path, _overrides(args)) if (path / 'config.json').exists() else \
                evaluate_run(path, _apply(_overrides(args)), timing=args.timing)
        elif args.command == 'analyze':
            result = analyze_path(args.path, args.out, _overrides(args), max_samples=args.samples,
                                  tsne_samples=args.tsne_samples)
            result = {'report': result['files'][0]}
        elif args.command == 'recipes':
            _print_recipes(list_recipes(args.filter))
            result = None
        elif args.command == 'compare':
            rows = [summarize_run(path) for path in args.run_dirs]
            print(json.dumps(rows, indent=2, ensure_ascii=False) if args.format == 'json' else format_comparison(rows))
            if args.out:
                write_comparison(rows, args.out, read_histories(args.run_dirs))
            result = None
        else:
            result = {'export': str(export_run(args.run_dir, args.out, args.checkpoint))}
    except NonFiniteLossError as e:
        print(f'timm-cff: stopped: {e} The last good checkpoint is kept; fix the cause and use --resume.',
              file=sys.stderr)
        return 3
    except _EXPECTED_ERRORS as e:
        print(f'timm-cff: error: {e}', file=sys.stderr)
        return 1
    except OSError as e:  # disk full, permissions, a vanished file: the checkpoints written so far stay valid
        print(f'timm-cff: error: {e.strerror or e}{f": {e.filename}" if e.filename else ""}. Fix it and continue '
              'with --resume RUN.', file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print('timm-cff: interrupted; the last checkpoint is kept: continue with --resume RUN.', file=sys.stderr)
        return 130
    if result:  # empty on the pipeline ranks other than 0
        _print_result(result)
    return 0


def _print_recipes(recipes: list[Recipe]) -> None:
    width = max((len(r.name) for r in recipes), default=0)
    paper = max((len(r.paper) for r in recipes), default=0)
    for r in recipes:
        print(f'{r.name:<{width}}  {r.paper or "-":<{paper}}  {r.title}')


def _print_result(result: dict[str, Any]) -> None:
    for name, label in (('test', 'test accuracy'), ('test_one_pass_head', 'test accuracy, one-pass head')):
        accs = {k: v for k, v in result.get(name, {}).items() if k.startswith('top')}
        if accs:
            print(f'{label}: ' + ', '.join(f'{k} {v:.2f}%' for k, v in accs.items()))
    for name, ms in result.get('timing_ms_per_image', {}).items():
        print(f'inference {name.replace("_", " ")}: {ms:.4f} ms/image')
    for key in ('export', 'report', 'wall_time_s'):
        if result.get(key):
            print(f'{key}: {result[key]}')


if __name__ == '__main__':
    sys.exit(main())
