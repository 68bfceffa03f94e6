"""The CLI's glibc malloc settings: a freed large tensor is reused by the next one instead of faulted in afresh,
settings the user chose win, and the run folder records what was done."""
import json
import os
import platform
import subprocess
import sys

import pytest

from timm_cff.experiment import allocator

GLIBC = sys.platform.startswith('linux') and platform.libc_ver()[0] == 'glibc'

# Twenty 64 MiB tensors one after the other (above glibc's largest dynamic mmap threshold, 32 MiB), as a training
# step frees and re-creates its activations; the page faults they cost.
_FAULTS = """
import json, resource, sys, torch
from timm_cff.experiment.allocator import keep_freed_memory
applied = keep_freed_memory() if sys.argv[1] == 'tuned' else False
for _ in range(3):
    torch.ones(16 << 20)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    torch.ones(16 << 20)
print(json.dumps({'applied': applied, 'faults': resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before}))
"""


def _clean_env() -> dict[str, str]:
    """This environment without any malloc choice of its own."""
    return {k: v for k, v in os.environ.items()
            if not k.startswith('MALLOC_') and k not in ('GLIBC_TUNABLES', 'TIMM_CFF_MALLOC', 'LD_PRELOAD')}


def _faults(mode: str) -> dict:
    done = subprocess.run([sys.executable, '-c', _FAULTS, mode], env=_clean_env(), capture_output=True, text=True,
                          check=True)
    return json.loads(done.stdout)


@pytest.mark.skipif(not GLIBC, reason='glibc malloc settings')
def test_freed_blocks_are_reused_instead_of_faulted_in():
    default, tuned = _faults('default'), _faults('tuned')
    assert tuned['applied']
    assert default['faults'] >= 20  # glibc maps every block afresh (a fault per page, or per huge page with THP)
    assert tuned['faults'] * 10 < default['faults']  # the heap hands the freed block to the next tensor


@pytest.mark.parametrize('environ', [{'TIMM_CFF_MALLOC': 'default'}, {'MALLOC_MMAP_THRESHOLD_': '65536'},
                                     {'GLIBC_TUNABLES': 'glibc.malloc.trim_threshold=0'},
                                     {'LD_PRELOAD': '/usr/lib/x86_64-linux-gnu/libjemalloc.so.2'}])
def test_settings_the_user_chose_win(environ):
    assert not allocator.keep_freed_memory(environ)
    assert allocator.malloc_state().startswith('left as it was: ')


@pytest.mark.skipif(not GLIBC, reason='glibc malloc settings')
def test_the_cli_sets_the_allocator_and_the_run_records_it(tmp_path):
    recipe = allocator.__file__.replace('experiment/allocator.py', 'recipes/quickstart.yaml')
    subprocess.run([sys.executable, '-m', 'timm_cff', 'train', '--config', recipe, '--train.epochs=1',
                    '--train.max_steps=1', '--probe.epochs=0', '--data.train_subset=64', '--data.test_subset=32',
                    '--data.batch_size=32', '--model.depth=1', '--model.embed_dim=16', '--run.quiet=true',
                    f'--run.output={tmp_path}', '--run.name=r'], env=_clean_env(), check=True, capture_output=True)
    recorded = json.loads((tmp_path / 'r' / 'environment.json').read_text())['malloc']
    assert recorded == ', '.join(f'{name}={value}' for name, _, value in allocator.MALLOC_SETTINGS)
