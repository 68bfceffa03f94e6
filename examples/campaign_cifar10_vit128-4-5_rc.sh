#!/usr/bin/env bash
# The CIFAR-10 ViT[128 4 5] RC campaign (docs/reproduce.md): CFF+M, CFF and BP+CE on the full cifar10_jpeg, each
# until patience 30 or 600 epochs. Starts the runs that do not exist yet and resumes the others, in the background,
# one CPU thread each; safe to call again at any time (a run that is training holds its folder's lock, a run with
# a summary.json is finished and left alone).
#
#   examples/campaign_cifar10_vit128-4-5_rc.sh [ROOT [COMMIT]]
#
# ROOT (default ~/timm-cff-campaign) holds everything, outside the repository: wt/ (a worktree of this repository
# pinned to COMMIT, default HEAD, on the first call; ROOT/COMMIT keeps it for the whole campaign), venv/, runs/, logs/.
# Data: $TIMM_CFF_DATA/cifar10_jpeg (default ../shared/data beside the repository).
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
root=$(mkdir -p "${1:-$HOME/timm-cff-campaign}" && cd "${1:-$HOME/timm-cff-campaign}" && pwd)
data=${TIMM_CFF_DATA:-$(cd "$repo/.." && pwd)/shared/data}/cifar10_jpeg
[ -f "$data/train.npz" ] || { echo "campaign: no $data/train.npz; set TIMM_CFF_DATA to the folder holding cifar10_jpeg/" >&2; exit 1; }

pinned=$(cat "$root/COMMIT" 2>/dev/null || true)  # written on the first call: the campaign's one commit
if [ ! -d "$root/wt" ]; then
    git -C "$repo" worktree prune  # forget a worktree whose folder is gone
    git -C "$repo" worktree add --detach "$root/wt" "${pinned:-${2:-HEAD}}"
fi
commit=$(git -C "$root/wt" rev-parse HEAD)
[ -n "$pinned" ] || { pinned=$commit; echo "$commit" > "$root/COMMIT"; }
for want in "$pinned" "${2:-$pinned}"; do
    if [ "$(git -C "$repo" rev-parse "$want^{commit}")" != "$commit" ]; then
        echo "campaign: $root is pinned to ${pinned:0:7} ($root/wt is at ${commit:0:7}); a campaign keeps one commit" \
            "(use another ROOT for $want)" >&2; exit 1
    fi
done
commit=${commit:0:7}
if [ ! -x "$root/venv/bin/timm-cff" ]; then
    python3 -m venv "$root/venv"
    "$root/venv/bin/pip" install -q torch==2.14.1 torchvision==0.29.1
    "$root/venv/bin/pip" install -q -e "$root/wt"
fi
mkdir -p "$root/runs" "$root/logs"

export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 HF_HUB_OFFLINE=1
start() {  # start() NAME [train options...]: create the run, or resume it
    local name=$1 run=$root/runs/$1; shift
    if [ -f "$run/summary.json" ]; then echo "$name: finished"; return; fi
    local pid
    pid=$(python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))["pid"])' "$run/.lock" 2>/dev/null) || pid=
    if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then echo "$name: training (process $pid)"; return; fi
    if [ -d "$run" ]; then set -- --resume "$run"; else
        set -- --config cifar10_vit128-4-5_rc --data.dataset=npz --data.root="$data" --train.patience=30 \
            --run.output="$root/runs" --run.name="$name" "$@"
    fi
    echo "$name: $(date -u +%FT%TZ) timm-cff train $* (commit $commit)" >> "$root/logs/commands.log"
    nohup setsid nice -n 5 "$root/venv/bin/timm-cff" train "$@" >> "$root/logs/$name.out" 2>&1 < /dev/null &
    echo "$name: started (log $root/logs/$name.out)"
}
start c10_vit128-4-5_rc_cffm
start c10_vit128-4-5_rc_cff --train.m0=0 --train.m_last=0
start c10_vit128-4-5_rc_bp --train.method=bp
