#!/usr/bin/env bash
# One fold of a recipe that changes only a run's last epochs, screened on this machine against a control
# that shares every epoch before them. The default is configs/v2_dense_late_masses_halo_hardneg.yaml:
# v2_dense_hardneg.yaml with masses from epoch 25 (augment.mass_from_epoch).
#
#   bash training/cpu/fork_screen.sh FOLD
#
# The steps, each skipped when a rerun finds it done (a killed call resumes):
#   1. The arm trains to epoch FORK (`train --stop-after FORK`).
#   2. Its resume point there (last.pt, best.pt, history.json, epochFORK.pt) is copied into the control's
#      run folder.
#   3. The arm trains on to its last epoch and is evaluated (`crossval --folds FOLD`).
#   4. The control config trains from that resume point to its last epoch (`train`).
#      The two runs then differ only in what the arm changes after FORK.
#   5. Checkpoints exported (`export`) and checked on the whole scans (`wholescan --precision fp32`):
#        - both runs' last epoch;
#        - the control's last epoch at infection offsets 1 and 2, its threshold line;
#        - the shared epoch FORK;
#        - both runs' kept epochs from FORK+1 (the control's keep_from_epoch, if later) to the last but one.
#      The whole scans are covid-chest-ct, both example-chest-ct kernels, and the LIDC scan the fold
#      left out.
#   6. The last epochs, the offsets and epoch FORK evaluated on the fold's held-out labelled slices
#      (`evaluate`, fp32).
#   7. The small tables, histories and JPEG previews copied into RESULTS/foldK and RESULTS/foldK_control.
#   8. The trade-off table and figure drawn (`tradeoff`): RESULTS/tradeoff_foldK.{md,png}.
#      When OWN holds wholescan_epochNN.csv files, they are drawn as a third group, for scale.
# Both runs train in bf16 where the CPU has it, as `train` picks.
#
# Settings (environment):
#   ARM       the arm's config name (default v2_dense_late_masses_halo_hardneg)
#   CONTROL   the control's config name (default v2_dense_hardneg)
#   FORK      the last shared epoch (default: the arm's augment.mass_from_epoch - 1)
#   DATA      the prepared labelled slices (default data/ma2020.npz, from `prepare`)
#   SHARED    the shared data folder of the whole-scan checks, as `wholescan --data`
#             (default: wholescan's, ../shared/data)
#   OUT       the working folder (default runs/screen), ignored by git. It holds:
#               - the two configs, with DATA and OUT;
#               - the runs, in ARM/foldK and CONTROL/foldK;
#               - fork_foldK/ (packages, wholescan-NAME, eval-NAME).
#   RESULTS   default results/v2/ARM
#   OWN       default results/v2/CONTROL/foldK: the control config's own run of the fold
#   PYTHON    default python
set -euo pipefail
FOLD=${1:?usage: fork_screen.sh FOLD}
cd "$(dirname "$0")/.."
ARM=${ARM:-v2_dense_late_masses_halo_hardneg}
CONTROL=${CONTROL:-v2_dense_hardneg}
DATA=${DATA:-data/ma2020.npz}
OUT=${OUT:-runs/screen}
RESULTS=${RESULTS:-results/v2/$ARM}
OWN=${OWN:-results/v2/$CONTROL/fold$FOLD}
PYTHON=${PYTHON:-python}
shared=(); [ -n "${SHARED:-}" ] && shared=(--data "$SHARED")
export PYTHONHASHSEED=0  # byte-reproducible TorchScript archives from export (see its docstring)
[ -f "$DATA" ] || { echo "$DATA: no prepared slices (python -m covidseg_training prepare ... --out $DATA)" >&2; exit 2; }
mkdir -p "$OUT"

# The two configs with DATA and OUT; from the arm's: the fork epoch, the last epoch and the LIDC scan the fold
# leaves out; from the control's: its first kept epoch.
settings=$("$PYTHON" - "$ARM" "$CONTROL" "$DATA" "$OUT" "$FOLD" "${FORK:-}" <<'EOF'
import sys
from pathlib import Path
import yaml
from covidseg_training.config import TrainConfig
arm_name, control_name, data, out, fold, fork = sys.argv[1:]
values = {}
for name in (arm_name, control_name):
    path = Path(f"configs/{name}.yaml")
    if not path.is_file():
        sys.exit(f"{path}: no such config")
    values[name] = {**yaml.safe_load(path.read_text(encoding="utf-8")), "data": data, "output_dir": out}
arm, control = (TrainConfig.from_dict(values[name]) for name in (arm_name, control_name))
fold = int(fold)
if not 0 <= fold < arm.n_folds:
    sys.exit(f"fold {fold}: {arm_name} has folds 0 to {arm.n_folds - 1}")
fork = int(fork) if fork else arm.augment.mass_from_epoch - 1
if not 1 <= fork < arm.epochs:
    sys.exit(f"FORK {fork}: the last shared epoch must be 1 to {arm.epochs - 1} (set FORK, or augment.mass_from_epoch "
             f"in configs/{arm_name}.yaml)")
if control.epochs != arm.epochs:
    sys.exit(f"{control_name} has {control.epochs} epochs, {arm_name} {arm.epochs}: the control must run the same schedule")
if not 1 <= arm.keep_from_epoch <= fork:
    sys.exit(f"{arm_name}: keep_from_epoch {arm.keep_from_epoch} must keep the shared epoch {fork} (1 to {fork})")
if not control.keep_from_epoch:
    sys.exit(f"{control_name}: keep_from_epoch is 0, so no epoch of the control would be kept to check")
for name in (arm_name, control_name):
    (Path(out) / f"{name}.yaml").write_text(yaml.safe_dump(values[name], sort_keys=False), encoding="utf-8")
print(fork, arm.epochs, arm.negatives.holdout[fold][0], control.keep_from_epoch)
EOF
)  # an assignment, so that set -e stops here when the configs are refused
read -r FORK LAST HELD_OUT CONTROL_KEEP <<< "$settings"
arm_run=$OUT/$ARM/fold$FOLD
control_run=$OUT/$CONTROL/fold$FOLD
work=$OUT/fork_fold$FOLD
epoch_of() { "$PYTHON" -c "import sys, torch; print(torch.load(sys.argv[1], map_location='cpu', weights_only=False)['state']['epoch'])" "$1"; }
echo "fold $FOLD: $ARM against $CONTROL, sharing epochs 1-$FORK of $LAST; held-out scan $HELD_OUT"

# 1-2. The arm to the fork, and the fork.
if [ ! -f "$control_run/last.pt" ]; then
    if [ -f "$arm_run/last.pt" ] && [ "$(epoch_of "$arm_run/last.pt")" -gt "$FORK" ]; then
        echo "$arm_run is past epoch $FORK and $control_run was never forked from it: remove $arm_run to start again" >&2
        exit 2
    fi
    "$PYTHON" -m covidseg_training train "$OUT/$ARM.yaml" --fold "$FOLD" --stop-after "$FORK"
    mkdir -p "$control_run"
    printf -v kept 'epoch%02d.pt' "$FORK"
    cp "$arm_run/last.pt" "$arm_run/best.pt" "$arm_run/history.json" "$arm_run/$kept" "$control_run/"
    echo "forked at epoch $(epoch_of "$control_run/last.pt") into $control_run"
fi
# 3-4. Both runs to their last epoch.
"$PYTHON" -m covidseg_training crossval "$OUT/$ARM.yaml" --folds "$FOLD"
"$PYTHON" -m covidseg_training train "$OUT/$CONTROL.yaml" --fold "$FOLD"

# 5-6. Export, whole scans, held-out slices.
packages=$work/packages
scans=(--scan covid-chest-ct --scan example-chest-ct-kernel-L --scan example-chest-ct-kernel-B --scan "$HELD_OUT")
check() {  # NAME CHECKPOINT [export options]
    [ -f "$work/wholescan-$1/wholescan.csv" ] && return 0
    "$PYTHON" -m covidseg_training export --checkpoint "$2" --out "$packages" --name "covid_unet_$1" \
        --version "fork-fold$FOLD-$1" "${@:3}"
    "$PYTHON" -m covidseg_training wholescan --device cpu --precision fp32 --model "$packages/covid_unet_$1.json" \
        "${scans[@]}" ${shared[@]+"${shared[@]}"} --out "$work/wholescan-$1"
}
evaluate() {  # NAME
    [ -f "$work/eval-$1/summary.json" ] && return 0
    "$PYTHON" -m covidseg_training evaluate --checkpoint "$packages/covid_unet_$1.json" --config "configs/$CONTROL.yaml" \
        --fold "$FOLD" --data "$DATA" --out "$work/eval-$1"
}
e() { printf 'epoch%02d.pt' "$1"; }
first_checked=$(( FORK + 1 > CONTROL_KEEP ? FORK + 1 : CONTROL_KEEP ))
checked=(); for ((epoch = first_checked; epoch < LAST; epoch++)); do checked+=("$epoch"); done
check arm_e$LAST "$arm_run/$(e "$LAST")"
check control_e$LAST "$control_run/$(e "$LAST")"
check control_e${LAST}_offset1 "$control_run/$(e "$LAST")" --infection-offset 1
check control_e${LAST}_offset2 "$control_run/$(e "$LAST")" --infection-offset 2
check shared_e$FORK "$arm_run/$(e "$FORK")"
for epoch in ${checked[@]+"${checked[@]}"}; do
    check arm_e$epoch "$arm_run/$(e "$epoch")"
    check control_e$epoch "$control_run/$(e "$epoch")"
done
for name in arm_e$LAST control_e$LAST control_e${LAST}_offset1 control_e${LAST}_offset2 shared_e$FORK; do evaluate "$name"; done

# 7. Into RESULTS.
jpegs() { "$PYTHON" -m covidseg_training.jpeg_previews "$1" "$2"; }  # PNG_FOLDER JPEG_FOLDER
table() {  # NAME DESTINATION
    mkdir -p "$2"
    cp "$work/wholescan-$1/wholescan.md" "$work/wholescan-$1/wholescan.csv" "$work/eval-$1/per_case.csv" \
        "$work/eval-$1/summary.json" "$2/"
}
arm_results=$RESULTS/fold$FOLD
control_results=$RESULTS/fold${FOLD}_control
table arm_e$LAST "$arm_results/epoch$LAST"; jpegs "$work/wholescan-arm_e$LAST" "$arm_results/epoch$LAST"
table shared_e$FORK "$arm_results/epoch$FORK"
table control_e$LAST "$control_results/epoch$LAST"; jpegs "$work/wholescan-control_e$LAST" "$control_results/epoch$LAST"
table control_e${LAST}_offset1 "$control_results/offset1"
table control_e${LAST}_offset2 "$control_results/offset2"
cp "$arm_run/history.json" "$arm_results/"
cp "$control_run/history.json" "$control_results/"
for epoch in ${checked[@]+"${checked[@]}"}; do
    for pair in "arm_e$epoch:$arm_results" "control_e$epoch:$control_results"; do
        cp "$work/wholescan-${pair%%:*}/wholescan.md" "${pair#*:}/wholescan_epoch$epoch.md"
        cp "$work/wholescan-${pair%%:*}/wholescan.csv" "${pair#*:}/wholescan_epoch$epoch.csv"
    done
done

# 8. The trade-off: the control's last epoch at its three thresholds as a line, each run's checked epochs as a group.
models=(--model "epoch $FORK (shared)=$arm_results/epoch$FORK"
        --model "control e$LAST=$control_results/epoch$LAST"
        --model "control e$LAST offset 1=$control_results/offset1"
        --model "control e$LAST offset 2=$control_results/offset2"
        --model "arm e$LAST=$arm_results/epoch$LAST")
arm_group="arm e$LAST"; control_group="control e$LAST"; own_group=""
for epoch in ${checked[@]+"${checked[@]}"}; do
    models+=(--model "control e$epoch=$control_results/wholescan_epoch$epoch.csv"
             --model "arm e$epoch=$arm_results/wholescan_epoch$epoch.csv")
    arm_group="arm e$epoch,$arm_group"; control_group="control e$epoch,$control_group"
done
for csv in "$OWN"/wholescan_epoch*.csv; do
    [ -f "$csv" ] || continue
    epoch=${csv##*wholescan_epoch}; epoch=${epoch%.csv}
    models+=(--model "own run e$epoch=$csv"); own_group="${own_group:+$own_group,}own run e$epoch"
done
groups=(--group "control ($CONTROL), epochs $first_checked-$LAST=$control_group"
        --group "arm ($ARM), epochs $first_checked-$LAST=$arm_group")
[ -n "$own_group" ] && groups+=(--group "$CONTROL's own fold-$FOLD run=$own_group")
"$PYTHON" -m covidseg_training tradeoff "${models[@]}" "${groups[@]}" \
    --curve "control e$LAST,control e$LAST offset 1,control e$LAST offset 2" \
    --curve-name "control e$LAST at stricter thresholds" \
    --out "$RESULTS/tradeoff_fold$FOLD.md" --figure "$RESULTS/tradeoff_fold$FOLD.png"
echo "fold $FOLD: done; tables in $arm_results, $control_results and $RESULTS/tradeoff_fold$FOLD.md"
