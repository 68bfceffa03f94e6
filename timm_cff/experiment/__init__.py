"""The experiment layer: recipes (config), run folders, building a run from a config, stage 1 and stage 2 of a
run, the commands and the ``timm-cff`` CLI. The only layer that reads a config."""
from .commands import analyze_path as analyze_path
from .commands import evaluate_export as evaluate_export
from .commands import evaluate_run as evaluate_run
from .commands import export_run as export_run
from .commands import probe_run as probe_run
from .commands import train_run as train_run
from .config import Config as Config
from .config import ConfigError as ConfigError
from .config import load_config as load_config

__all__ = ['analyze_path', 'evaluate_export', 'evaluate_run', 'export_run', 'probe_run', 'train_run', 'Config',
           'ConfigError', 'load_config']
