#!/usr/bin/env bash
# Here, after run_v2.sh came back from the GPU machine (this machine has ../shared/data): unpack it,
# export each fold model and the all-data model (covid_unet_v2 2.0.0, with the cross-validation in
# its manifest), evaluate each fold model again with flip test-time augmentation, run the whole-scan
# checks (each fold model on the check scans and on the LIDC scan it did not train on; the all-data
# model on every scan, each LIDC scan scored by a fold model that did not train on it) and copy the
# small tables into results/v2/, ready to commit. A fold that the GPU machine's time limit stopped
# before its evaluation is evaluated here as it is (its history.json says after how many epochs), and
# the cross-validation is aggregated here when it was not there.
#
#   bash training/gpu/after_v2.sh FILES_AT     (the folder holding results.tar.gz and checkpoints-N.tar)
#   bash training/gpu/after_v2.sh RUNS         (a runs folder holding v2/foldK/, e.g. training/runs for
#                                               folds trained on this machine: used in place, not copied)
#
# Settings (environment): DEST (default training/runs/gpu), SCANS (wholescan scan names for the fold
# models; default the checks), RESULTS (default training/results/v2), PYTHON.
set -euo pipefail
FROM=$(cd "${1:?usage: after_v2.sh FOLDER_WITH_RESULTS}" && pwd)
cd "$(dirname "$0")/.."
DEST=${DEST:-runs/gpu}
RESULTS=${RESULTS:-results/v2}
PYTHON=${PYTHON:-python}
SCANS=${SCANS:-"covid-chest-ct example-chest-ct-kernel-L example-chest-ct-kernel-B"}
if [ -f "$FROM/results.tar.gz" ]; then
    runs=$DEST/runs
    mkdir -p "$runs"
    tar -xzf "$FROM/results.tar.gz" -C "$runs"
    for file in "$FROM"/checkpoints-*.tar; do tar -xf "$file" -C "$runs"; done
elif [ -d "$FROM/v2" ]; then
    runs=$FROM
else
    echo "$FROM: neither results.tar.gz (from run_v2.sh) nor a runs folder with v2/" >&2
    exit 2
fi
mkdir -p "$RESULTS"
packages=$DEST/packages
# The negative scan each fold left out, from the config that trained the folds.
read -r -a held_out <<< "$("$PYTHON" -c "from covidseg_training.config import TrainConfig
holdout = TrainConfig.load('configs/v2.yaml').negatives.holdout
print(' '.join(holdout[fold][0] for fold in range(5)))")"

for k in 0 1 2 3 4; do
    [ -f "$runs/v2/fold$k/best.pt" ] || { echo "fold $k: no checkpoint"; continue; }
    if [ ! -f "$runs/v2/fold$k/eval/summary.json" ]; then  # a GPU time limit stopped it, or `train` (no evaluation) made it
        epochs=$("$PYTHON" -c "import json, sys; print(len(json.load(open(sys.argv[1]))))" "$runs/v2/fold$k/history.json")
        echo "fold $k: no evaluation yet (trained $epochs epochs): evaluating its best.pt here"
        "$PYTHON" -m covidseg_training evaluate --checkpoint "$runs/v2/fold$k/best.pt" --out "$runs/v2/fold$k/eval"
    fi
    "$PYTHON" -m covidseg_training export --checkpoint "$runs/v2/fold$k/best.pt" --out "$packages" \
        --name "covid_unet_v2_fold$k" --version "2.0.0-fold$k" --metrics "$runs/v2/fold$k/eval/summary.json"
    scans=()
    for scan in $SCANS "${held_out[$k]}"; do scans+=(--scan "$scan"); done
    "$PYTHON" -m covidseg_training wholescan --device cpu --model "$packages/covid_unet_v2_fold$k.json" "${scans[@]}" \
        --out "$DEST/wholescan-fold$k"
    "$PYTHON" -m covidseg_training evaluate --checkpoint "$packages/covid_unet_v2_fold$k.json" \
        --config configs/v2.yaml --fold "$k" --flip-tta --no-robustness --out "$DEST/eval-flip-tta-fold$k"
    mkdir -p "$RESULTS/fold$k/flip_tta"
    cp "$runs/v2/fold$k/eval/summary.json" "$runs/v2/fold$k/eval/per_case.csv" "$runs/v2/fold$k/history.json" \
        "$RESULTS/fold$k/"
    cp "$DEST/eval-flip-tta-fold$k/summary.json" "$DEST/eval-flip-tta-fold$k/per_case.csv" "$RESULTS/fold$k/flip_tta/"
    cp "$DEST/wholescan-fold$k/wholescan.md" "$DEST/wholescan-fold$k/wholescan.csv" "$RESULTS/fold$k/"
done
if [ ! -d "$runs/v2/crossval" ] && ls "$runs"/v2/fold{0,1,2,3,4}/eval/summary.json > /dev/null 2>&1; then
    "$PYTHON" -c "import sys; from pathlib import Path; from covidseg_training.crossval import aggregate
runs = Path(sys.argv[1]); aggregate({k: runs / f'fold{k}' / 'eval' for k in range(5)}, runs / 'crossval')" "$runs/v2"
fi
if [ -d "$runs/v2/crossval" ]; then
    mkdir -p "$RESULTS/crossval"
    cp "$runs/v2/crossval/"{summary.json,summary.csv,folds.csv,per_case.csv} "$RESULTS/crossval/"
fi
for screen in "$runs"/v2_*/fold*/eval/summary.json; do
    [ -f "$screen" ] || continue
    name=$(basename "$(dirname "$(dirname "$(dirname "$screen")")")")
    mkdir -p "$RESULTS/$name"
    cp "$screen" "$(dirname "$screen")/per_case.csv" "$RESULTS/$name/"
done

if [ -f "$runs/v2_all/all/best.pt" ] && [ -f "$runs/v2/crossval/summary.json" ]; then
    "$PYTHON" -m covidseg_training export --checkpoint "$runs/v2_all/all/best.pt" --out "$packages" \
        --name covid_unet_v2 --version 2.0.0 --metrics "$runs/v2/fold0/eval/summary.json" \
        --crossval "$runs/v2/crossval/summary.json"
    # Fold 0 left LIDC-IDRI-0001 out and fold 1 LIDC-IDRI-0003 (held_out above).
    "$PYTHON" -m covidseg_training wholescan --device cpu --model "$packages/covid_unet_v2.json" \
        --model-for "${held_out[0]}=$packages/covid_unet_v2_fold0.json" \
        --model-for "${held_out[1]}=$packages/covid_unet_v2_fold1.json" --out "$DEST/wholescan-v2.0.0"
    cp "$DEST/wholescan-v2.0.0/wholescan.md" "$RESULTS/wholescan_v2.0.0.md"
    cp "$DEST/wholescan-v2.0.0/wholescan.csv" "$RESULTS/wholescan_v2.0.0.csv"
    echo "release candidate: $packages/covid_unet_v2.{pt,json} (bundle it by hand after reading the tables)"
fi
ls -R "$RESULTS"
