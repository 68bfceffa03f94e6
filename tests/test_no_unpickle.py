"""Never unpickle code: every checkpoint loader refuses a crafted payload even when torch is told to allow full
pickles (``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1``), so the payload's flag file is never written."""
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Runs in a fresh interpreter, where the environment variable is read when torch is imported.
PROBE = r'''
import json, os, pickle, sys
from pathlib import Path
import torch

flag, folder = Path(sys.argv[1]), Path(sys.argv[2])

class Payload:
    def __reduce__(self):
        return (os.system, (f'touch {flag}',))

def craft(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({'trainer': Payload(), 'state': Payload(), 'model': Payload()}, path)

results = {}
from timm_cff.experiment.rundir import RunDir
run = RunDir(folder / 'run')
craft(run.checkpoint_path('last'))
try:
    run.load_checkpoint('last'); results['run'] = 'loaded'
except Exception as e:
    results['run'] = type(e).__name__
from timm_cff.pipeline.checkpoint import COMPLETE_FILE, load_merged_state
pipe = folder / 'pipe'
craft(pipe / 'group0.pt')
(pipe / COMPLETE_FILE).write_text(json.dumps({'stage_counts': [1]}))
try:
    load_merged_state(pipe); results['pipeline'] = 'loaded'
except Exception as e:
    results['pipeline'] = type(e).__name__
print(json.dumps(results))
'''


def test_no_checkpoint_loader_runs_code_from_a_file(tmp_path):
    flag = tmp_path / 'pwned'
    env = {**os.environ, 'TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD': '1', 'PYTHONPATH': str(ROOT)}
    out = subprocess.run([sys.executable, '-c', PROBE, str(flag), str(tmp_path)], env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    results = json.loads(out.stdout.strip().splitlines()[-1])
    assert set(results) == {'run', 'pipeline'} and 'loaded' not in results.values(), results
    assert not flag.exists()  # the payload never ran
