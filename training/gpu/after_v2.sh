#!/usr/bin/env bash
# Here, after run_v2.sh came back from the GPU machine (this machine has ../shared/data): unpack it,
# export each fold model and the all-data model (covid_unet_v2 2.0.0, with the cross-validation in
# its manifest), evaluate each fold model again with flip test-time augmentation, run the whole-scan
# checks (each fold model on the check scans and on the LIDC scan it did not train on; the all-data
# model on every scan, each LIDC scan scored by a fold model here that did not train on it) and copy the
# small tables into results/v2/, ready to commit. A fold that the GPU machine's time limit stopped
# before its evaluation is evaluated here as it is (its history.json says after how many epochs), and
# the cross-validation is aggregated here when it was not there (only one over all five folds is copied
# and goes into a release). The whole-scan previews come along as JPEG (about 300 kB each; the PNGs are
# 2-3 MB).
#
#   bash training/gpu/after_v2.sh FILES_AT     (the folder holding results.tar.gz and checkpoints-N.tar)
#   bash training/gpu/after_v2.sh RUNS         (a runs folder holding v2/foldK/ or v2_all/all/, e.g.
#                                               training/runs for runs trained on this machine: used in
#                                               place, not copied; folds that are not there are skipped)
#   RECIPE=v2_dense bash training/gpu/after_v2.sh training/runs
#                                              (the folds of configs/v2_dense.yaml, in v2_dense/foldK/;
#                                               results in results/v2/v2_dense/, the all-data model
#                                               from v2_dense_all/all/)
#
# Settings (environment): RECIPE (the config name, default v2), VERSION (of the all-data model, default
# 2.0.0; the fold models are VERSION-foldK, a kept epoch VERSION-foldK-eNN), FOLDS (the folds to export, check and
# copy, default "0 1 2 3 4": FOLDS=2 after a fold trained here, so the others are not redone; a fold with kept
# epochs also gets them averaged, in RESULTS/foldK/averaged/, and a swing.{md,png} of best, kept and averaged;
# a fold already copied into RESULTS from the same run, with its package here, is skipped),
# DEST (default training/runs/gpu), SCANS
# (wholescan scan names for the fold models; default the checks), PRECISION (of the whole-scan checks, as
# `wholescan --precision`; default auto: bf16 on a CPU with native bf16, else fp32), RESULTS (default
# training/results/v2 for v2, training/results/v2/RECIPE otherwise), DATA (the shared data folder of the
# whole-scan checks, as `wholescan --data`; default ../shared/data), LABELLED (the labelled slices of the
# flip-TTA evaluation, as `evaluate --data`; default the config's), PYTHON.
set -euo pipefail
FROM=$(cd "${1:?usage: after_v2.sh FOLDER_WITH_RESULTS}" && pwd)
cd "$(dirname "$0")/.."
RECIPE=${RECIPE:-v2}
DEST=${DEST:-runs/gpu}
if [ "$RECIPE" = v2 ]; then RESULTS=${RESULTS:-results/v2}; else RESULTS=${RESULTS:-results/v2/$RECIPE}; fi
PYTHON=${PYTHON:-python}
VERSION=${VERSION:-2.0.0}
FOLDS=${FOLDS:-"0 1 2 3 4"}
SCANS=${SCANS:-"covid-chest-ct example-chest-ct-kernel-L example-chest-ct-kernel-B"}
PRECISION=${PRECISION:-auto}
data=(); [ -n "${DATA:-}" ] && data=(--data "$DATA")
labelled=(); [ -n "${LABELLED:-}" ] && labelled=(--data "$LABELLED")
export PYTHONHASHSEED=0  # byte-reproducible TorchScript archives from export (see its docstring)
if [ -f "$FROM/results.tar.gz" ]; then
    runs=$DEST/runs
    mkdir -p "$runs"
    tar -xzf "$FROM/results.tar.gz" -C "$runs"
    for file in "$FROM"/checkpoints-*.tar; do tar -xf "$file" -C "$runs"; done
elif [ -d "$FROM/$RECIPE" ] || [ -d "$FROM/${RECIPE}_all" ]; then  # the all-data run alone: its folds went with an earlier machine
    runs=$FROM
else
    echo "$FROM: neither results.tar.gz (from run_v2.sh) nor a runs folder with $RECIPE/ or ${RECIPE}_all/" >&2
    exit 2
fi
mkdir -p "$RESULTS"
packages=$DEST/packages
# The negative scan each fold left out, from the config that trained the folds.
read -r -a held_out <<< "$("$PYTHON" -c "from covidseg_training.config import TrainConfig
holdout = TrainConfig.load('configs/$RECIPE.yaml').negatives.holdout
print(' '.join(holdout[fold][0] for fold in range(5)))")"

# The whole-scan previews of folder $1 as JPEG in folder $2.
jpeg_previews() { "$PYTHON" -m covidseg_training.jpeg_previews "$1" "$2"; }

# Export checkpoint $1 as package $3 (version $4) into folder $2, and run the whole-scan checks of the
# array `scans` on it into folder $5; further arguments go to export.
export_and_check() {
    "$PYTHON" -m covidseg_training export --checkpoint "$1" --out "$2" --name "$3" --version "$4" "${@:6}"
    "$PYTHON" -m covidseg_training wholescan --device cpu --precision "$PRECISION" --model "$2/$3.json" "${scans[@]}" \
        ${data[@]+"${data[@]}"} --out "$5"
}

for k in $FOLDS; do
    [ -f "$runs/$RECIPE/fold$k/best.pt" ] || { echo "fold $k: no checkpoint"; continue; }
    # A fold whose run is the one already copied into $RESULTS (same history) and whose package is here was
    # done by an earlier call: its checks take half an hour, so it is not redone (remove
    # $RESULTS/foldK/history.json to redo it).
    if cmp -s "$runs/$RECIPE/fold$k/history.json" "$RESULTS/fold$k/history.json" \
            && [ -f "$RESULTS/fold$k/wholescan.csv" ] && [ -f "$packages/covid_unet_${RECIPE}_fold$k.json" ]; then
        echo "fold $k: already in $RESULTS/fold$k (same history.json); not redone"
        continue
    fi
    if [ ! -f "$runs/$RECIPE/fold$k/eval/summary.json" ]; then  # a GPU time limit stopped it, or `train` (no evaluation) made it
        epochs=$("$PYTHON" -c "import json, sys; print(len(json.load(open(sys.argv[1]))))" "$runs/$RECIPE/fold$k/history.json")
        echo "fold $k: no evaluation yet (trained $epochs epochs): evaluating its best.pt here"
        "$PYTHON" -m covidseg_training evaluate --checkpoint "$runs/$RECIPE/fold$k/best.pt" --out "$runs/$RECIPE/fold$k/eval"
    fi
    # A best.pt that came back as its float16 copy (run_v2.sh, for a checkpoint over 15 MiB) is not the file
    # the GPU machine evaluated: it is evaluated here too, and its package carries these metrics.
    metrics=$runs/$RECIPE/fold$k/eval/summary.json
    if ! "$PYTHON" -c "import json, sys; from pathlib import Path; from covidseg_training.export import check_metrics_belong_to
try: check_metrics_belong_to(json.load(open(sys.argv[1])), Path(sys.argv[2]))
except ValueError: sys.exit(1)" "$metrics" "$runs/$RECIPE/fold$k/best.pt"; then
        echo "fold $k: best.pt is not the file its eval/ measured (a float16 copy): evaluating it here too"
        [ -f "$runs/$RECIPE/fold$k/eval_float16/summary.json" ] || "$PYTHON" -m covidseg_training evaluate \
            --checkpoint "$runs/$RECIPE/fold$k/best.pt" --out "$runs/$RECIPE/fold$k/eval_float16"
        metrics=$runs/$RECIPE/fold$k/eval_float16/summary.json
        mkdir -p "$RESULTS/fold$k/float16"
        cp "$metrics" "$runs/$RECIPE/fold$k/eval_float16/per_case.csv" "$RESULTS/fold$k/float16/"
    fi
    scans=()
    for scan in $SCANS "${held_out[$k]}"; do scans+=(--scan "$scan"); done
    export_and_check "$runs/$RECIPE/fold$k/best.pt" "$packages" "covid_unet_${RECIPE}_fold$k" "$VERSION-fold$k" \
        "$DEST/wholescan-$RECIPE-fold$k" --metrics "$metrics"
    "$PYTHON" -m covidseg_training evaluate --checkpoint "$packages/covid_unet_${RECIPE}_fold$k.json" \
        --config "configs/$RECIPE.yaml" --fold "$k" ${labelled[@]+"${labelled[@]}"} --flip-tta --no-robustness \
        --out "$DEST/eval-flip-tta-$RECIPE-fold$k"
    mkdir -p "$RESULTS/fold$k/flip_tta"
    cp "$runs/$RECIPE/fold$k/eval/summary.json" "$runs/$RECIPE/fold$k/eval/per_case.csv" "$runs/$RECIPE/fold$k/history.json" \
        "$RESULTS/fold$k/"
    cp "$DEST/eval-flip-tta-$RECIPE-fold$k/summary.json" "$DEST/eval-flip-tta-$RECIPE-fold$k/per_case.csv" "$RESULTS/fold$k/flip_tta/"
    cp "$DEST/wholescan-$RECIPE-fold$k/wholescan.md" "$DEST/wholescan-$RECIPE-fold$k/wholescan.csv" "$RESULTS/fold$k/"
    jpeg_previews "$DEST/wholescan-$RECIPE-fold$k" "$RESULTS/fold$k"
    # The epochs a config keeps (keep_from_epoch) through the same checks: one run's checkpoints swing
    # far more on the whole scans than on the labelled slices, so a recipe is read over its last epochs.
    for checkpoint in "$runs/$RECIPE/fold$k"/epoch*.pt; do
        [ -f "$checkpoint" ] || continue
        epoch=$(basename "$checkpoint" .pt); epoch=${epoch#epoch}
        [ -f "$RESULTS/fold$k/wholescan_epoch$epoch.csv" ] && continue
        export_and_check "$checkpoint" "$DEST/packages-swing" "covid_unet_${RECIPE}_fold${k}_e$epoch" \
            "$VERSION-fold$k-e$epoch" "$DEST/wholescan-swing-$RECIPE-fold$k-e$epoch"
        cp "$DEST/wholescan-swing-$RECIPE-fold$k-e$epoch/wholescan.md" "$RESULTS/fold$k/wholescan_epoch$epoch.md"
        cp "$DEST/wholescan-swing-$RECIPE-fold$k-e$epoch/wholescan.csv" "$RESULTS/fold$k/wholescan_epoch$epoch.csv"
    done
    # The kept epochs averaged (`average`): one model from the whole end of the run, through the same
    # checks and the labelled slices' evaluation, in $RESULTS/foldK/averaged/.
    kept=("$runs/$RECIPE/fold$k"/epoch*.pt)
    if [ -f "${kept[0]}" ] && [ ${#kept[@]} -ge 2 ] && [ ! -f "$RESULTS/fold$k/averaged/wholescan.csv" ]; then
        averaged=$runs/$RECIPE/fold$k/averaged.pt
        [ -f "$averaged" ] || "$PYTHON" -m covidseg_training average "${kept[@]}" --out "$averaged"
        "$PYTHON" -m covidseg_training evaluate --checkpoint "$averaged" --out "$DEST/eval-$RECIPE-fold$k-averaged"
        export_and_check "$averaged" "$DEST/packages-swing" "covid_unet_${RECIPE}_fold${k}_averaged" \
            "$VERSION-fold$k-averaged" "$DEST/wholescan-$RECIPE-fold$k-averaged" \
            --metrics "$DEST/eval-$RECIPE-fold$k-averaged/summary.json"
        mkdir -p "$RESULTS/fold$k/averaged"
        cp "$DEST/eval-$RECIPE-fold$k-averaged/"{summary.json,per_case.csv} \
            "$DEST/wholescan-$RECIPE-fold$k-averaged/"{wholescan.md,wholescan.csv} "$RESULTS/fold$k/averaged/"
    fi
    # The best epoch, the kept epochs and their average side by side (`tradeoff`): $RESULTS/foldK/swing.{md,png}.
    if [ -f "${kept[0]}" ] && [ ! -f "$RESULTS/fold$k/swing.md" ]; then
        swing=(--model "best=$RESULTS/fold$k/wholescan.csv"); group=best
        for csv in "$RESULTS/fold$k"/wholescan_epoch*.csv; do
            epoch=$(basename "$csv" .csv); epoch=e${epoch#wholescan_epoch}
            swing+=(--model "$epoch=$csv"); group="$group,$epoch"
        done
        swing+=(--group "$RECIPE fold $k=$group")
        if [ -f "$RESULTS/fold$k/averaged/wholescan.csv" ]; then
            swing+=(--model "averaged=$RESULTS/fold$k/averaged/wholescan.csv" --group "kept epochs averaged=averaged")
        fi
        "$PYTHON" -m covidseg_training tradeoff "${swing[@]}" --out "$RESULTS/fold$k/swing.md" \
            --figure "$RESULTS/fold$k/swing.png"
    fi
done
# The cross-validation, once every fold's evaluation is here: from the run folder, or from the copies
# committed in $RESULTS/foldK/ for a fold whose run folder went with an earlier machine.
eval_dirs=()
for k in 0 1 2 3 4; do
    if [ -f "$runs/$RECIPE/fold$k/eval/summary.json" ]; then eval_dirs+=("$k=$runs/$RECIPE/fold$k/eval")
    elif [ -f "$RESULTS/fold$k/summary.json" ] && [ -f "$RESULTS/fold$k/per_case.csv" ]; then eval_dirs+=("$k=$RESULTS/fold$k")
    fi
done
# How many folds the aggregate in $runs/$RECIPE/crossval covers: a fold's own `crossval --folds K` leaves
# one there, which is that fold's tables again, not a cross-validation.
crossval_folds() {
    "$PYTHON" -c "import json, sys; print(len(json.load(open(sys.argv[1]))['folds']))" \
        "$runs/$RECIPE/crossval/summary.json" 2> /dev/null || echo 0
}
if [ "$(crossval_folds)" != 5 ] && [ ${#eval_dirs[@]} -eq 5 ]; then
    rm -rf "${runs:?}/$RECIPE/crossval"
    "$PYTHON" -m covidseg_training aggregate "$runs/$RECIPE/crossval" "${eval_dirs[@]}"
fi
crossval=""
if [ "$(crossval_folds)" = 5 ]; then
    crossval=$runs/$RECIPE/crossval/summary.json
    mkdir -p "$RESULTS/crossval"
    cp "$runs/$RECIPE/crossval/"{summary.json,summary.csv,folds.csv,per_case.csv} "$RESULTS/crossval/"
else
    echo "cross-validation: ${#eval_dirs[@]} of 5 folds evaluated; none copied, no release (the folds' own tables are in $RESULTS/foldK/)"
fi
if [ "$RECIPE" = v2 ]; then  # the single-fold screens, beside v2's folds
    for screen in "$runs"/v2_*/fold*/eval/summary.json; do
        [ -f "$screen" ] || continue
        name=$(basename "$(dirname "$(dirname "$(dirname "$screen")")")")
        mkdir -p "$RESULTS/$name"
        cp "$screen" "$(dirname "$screen")/per_case.csv" "$RESULTS/$name/"
    done
fi

if [ -f "$runs/${RECIPE}_all/all/best.pt" ] && [ -n "$crossval" ]; then
    "$PYTHON" -m covidseg_training export --checkpoint "$runs/${RECIPE}_all/all/best.pt" --out "$packages" \
        --name covid_unet_v2 --version "$VERSION" --metrics "$RESULTS/fold0/summary.json" --crossval "$crossval"
    # Each held-out LIDC scan is scored by the first fold model here that left it out (held_out above:
    # folds 0, 2, 4 left out one scan, folds 1, 3 the other). A fold's package can be gone with its
    # machine: the all-data model then scores that scan itself, flagged as trained on in the table,
    # and the scan's held-out figures are the committed rows of the folds that left it out.
    model_for=()
    for scan in $(printf '%s\n' "${held_out[@]}" | sort -u); do
        scored=""
        for k in 0 1 2 3 4; do
            if [ "${held_out[$k]}" = "$scan" ] && [ -f "$packages/covid_unet_${RECIPE}_fold$k.json" ]; then
                model_for+=(--model-for "$scan=$packages/covid_unet_${RECIPE}_fold$k.json"); scored=yes; break
            fi
        done
        if [ -z "$scored" ]; then
            folds=$(for k in 0 1 2 3 4; do [ "${held_out[$k]}" = "$scan" ] && [ -f "$RESULTS/fold$k/wholescan.md" ] && printf ' %s' "$RESULTS/fold$k/wholescan.md"; done; true)
            echo "$scan: no fold model here that left it out; the all-data model scores it (flagged as trained on)." \
                "Held out, it is in:${folds:- no committed fold table}" >&2
        fi
    done
    "$PYTHON" -m covidseg_training wholescan --device cpu --precision "$PRECISION" --model "$packages/covid_unet_v2.json" \
        ${model_for[@]+"${model_for[@]}"} ${data[@]+"${data[@]}"} --out "$DEST/wholescan-v$VERSION"
    cp "$DEST/wholescan-v$VERSION/wholescan.md" "$RESULTS/wholescan_v$VERSION.md"
    cp "$DEST/wholescan-v$VERSION/wholescan.csv" "$RESULTS/wholescan_v$VERSION.csv"
    mkdir -p "$RESULTS/wholescan_v$VERSION"
    jpeg_previews "$DEST/wholescan-v$VERSION" "$RESULTS/wholescan_v$VERSION"
    echo "release candidate: $packages/covid_unet_v2.{pt,json} (bundle it by hand after reading the tables)"
fi
ls -R "$RESULTS"
