"""Measured epoch times of the process pipeline (gloo, one CPU thread per process) next to the cost model.

    python benchmarks/pipeline_timing.py --rounds 3 --stages 1 2 3 -- --batches 16 --batch 32

Runs ``examples/pipeline_demo.py`` once per configuration and round (the rounds interleave the configurations, so
load from other jobs on the machine spreads over all of them) and prints a markdown table. Measured: the fastest
epoch of a run, median over rounds. Predicted by ``simulate_pipeline`` (``benchmarks/cost.py``) from (a) the per-stage
costs that the one-process run of the same round measured, the stage groups the pipeline chose and the transfer
times it measured, and (b) the same transfers and each group's own compute time in the run (``busy_s``), which checks
the schedule model apart from how much slower each process computes when processes share cores.
Arguments after ``--`` go to the demo.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from cost import group_costs, simulate_pipeline

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / 'examples' / 'pipeline_demo.py'


def run_demo(stages: int, demo_args: list[str], out: Path) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT), GLOO_SOCKET_IFNAME='lo', OMP_NUM_THREADS='1')
    if stages == 1:
        cmd = [sys.executable, str(DEMO)]
    else:
        cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', f'--nproc-per-node={stages}', str(DEMO)]
    subprocess.run(cmd + ['--stages', str(stages), '--json', str(out), *demo_args], env=env, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=1800)
    return json.loads(out.read_text())


def predictions(run: dict, stage_costs: list[float]) -> tuple[float, float, float | None, list[float]]:
    """Measured epoch, the prediction from one-process stage costs, and the one from the run's own busy times."""
    best = min(range(len(run['epoch_times'])), key=run['epoch_times'].__getitem__)
    n, transfers = run['num_batches'], run['transfers'] or None
    a_priori = simulate_pipeline(group_costs(stage_costs, run['stage_counts']), n, transfers)
    if not run['busy_s']:
        return run['epoch_times'][best], a_priori, None, []
    busy = run['busy_s'][best][:len(run['stage_counts'])]  # replica 0's groups
    return run['epoch_times'][best], a_priori, simulate_pipeline([b / n for b in busy], n, transfers), busy


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--rounds', type=int, default=3)
    p.add_argument('--stages', type=int, nargs='+', default=[1, 2, 3])
    args, demo_args = p.parse_known_args()
    demo_args = [a for a in demo_args if a != '--']
    stages = sorted(set(args.stages) | {1})  # the one-process run gives the stage costs
    rows: dict[int, list[tuple]] = {k: [] for k in stages}
    load_before = os.getloadavg()[1]  # the machine may be shared: report how busy it was
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            runs = {k: run_demo(k, demo_args, Path(tmp) / f'{k}.json') for k in stages}
            for k, run in runs.items():
                rows[k].append(predictions(run, runs[1]['stage_costs']))
                print(f'round {r} K={k}: groups {run["stage_counts"]}, (measured, predicted, predicted from busy '
                      f'times, busy times) {rows[k][-1]}, transfers {run["transfers"]}', file=sys.stderr, flush=True)
    median = statistics.median
    base = median(row[0] for row in rows[1])
    base_predicted = median(row[1] for row in rows[1])
    print(f'\n{os.cpu_count()} CPU cores, 5-minute load average {load_before:.1f} before and '
          f'{os.getloadavg()[1]:.1f} after; medians over {args.rounds} rounds\n')
    print('| processes K | stage groups (last round) | measured epoch (s) | predicted from stage costs (s) | '
          'predicted from busy times (s) | measured speed-up | predicted speed-up |')
    print('|---|---|---|---|---|---|---|')
    for k in stages:
        measured, predicted = median(row[0] for row in rows[k]), median(row[1] for row in rows[k])
        in_run = median(row[2] for row in rows[k]) if k > 1 else measured
        print(f'| {k} | {runs[k]["stage_counts"]} | {measured:.2f} | {predicted:.2f} | {in_run:.2f} | '
              f'{base / measured:.2f}x | {base_predicted / predicted:.2f}x |')


if __name__ == '__main__':
    main()
