#!/usr/bin/env bash
# Model v2 on one GPU machine (issue 10), in one call of the device tool: the five folds of
# configs/v2.yaml (each trained, then evaluated on its held-out patients), the all-data model
# (configs/v2_all.yaml) and the fold-1 screens (a wider network; "no infection" only on dense lung;
# per-case weighting; deep supervision; harmonised data paths), side by side on the one GPU; then the
# cross-validation aggregate. Resumable: run it again on the same machine and finished folds are
# skipped, interrupted ones resume from their last.pt.
#
#   bash training/gpu/run_v2.sh            (from the repository root; see training/README.md)
#
# Needs training/data/gpu/a and training/data/gpu/b from `bash training/gpu/pack.sh` (two calls carry
# them: a first, then b with this command). Settings (environment):
#   JOBS      runs as CONFIG[:FOLD] (default: v2:0 .. v2:4, v2_all, and the screens v2_wide:1,
#             v2_dense:1, v2_casebalanced:1, v2_deepsup:1, v2_harmonised:1)
#   DEVICE    cuda (default) or cpu;  WORKERS  augmenting processes per run (default 2)
#   EPOCHS    overrides the configs' epochs;  EXTRA  YAML lines added to every config (a smoke test)
#   BUDGET_S  seconds the runs may take before they are stopped to be resumed (default 450)
#   KEEP      config names whose best.pt come back, in files of at most 15 MiB; one larger than that
#             alone comes back as its float16 copy (default: v2 v2_all)
#   RUNS      the runs' folder, under training/ (default runs)
#   FILE_LIMIT_KIB  the checkpoints' files' size limit (default 15360: 15 MiB; smaller in a smoke test)
# Writes to $OUT (default training/runs/gpu-out): results.tar.gz (each run's config, history and
# eval/, the crossval/ aggregate, the logs) and checkpoints-N.tar.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu-out}
JOBS=${JOBS:-"v2:0 v2:1 v2:2 v2:3 v2:4 v2_all v2_wide:1 v2_dense:1 v2_casebalanced:1 v2_deepsup:1 v2_harmonised:1"}
DEVICE=${DEVICE:-cuda}
WORKERS=${WORKERS:-2}
BUDGET_S=${BUDGET_S:-450}
KEEP=${KEEP:-"v2 v2_all"}
RUNS=${RUNS:-runs}
mkdir -p "$OUT" "$RUNS/logs" "$RUNS/cache"
started=$(date +%s)

if ! python3 -c "import albumentations" 2> /dev/null; then  # the GPU image lacks the training extra
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        data/gpu/a/wheels/*.whl || exit 2
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=../CovidInfectionSeg:.${PYTHONPATH:+:$PYTHONPATH}

if [ ! -f data/ma2020.npz ]; then
    for part in data/gpu/a/ma2020.npz.xz.0 data/gpu/b/ma2020.npz.xz.1; do
        [ -f "$part" ] || { echo "$part is missing: pack.sh makes it; a travels in the call before this one"; exit 3; }
    done
    cat data/gpu/a/ma2020.npz.xz.0 data/gpu/b/ma2020.npz.xz.1 |
        python3 -c "import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.stdin.buffer), sys.stdout.buffer)" \
        > data/ma2020.npz.part || exit 3
    echo "$(cat data/gpu/b/ma2020.npz.sha256)  data/ma2020.npz.part" | sha256sum -c --quiet || exit 3
    mv data/ma2020.npz.part data/ma2020.npz
fi
cp -n data/gpu/b/cache/*.npz "$RUNS/cache/" 2> /dev/null || true

epochs=()
[ -n "${EPOCHS:-}" ] && epochs=(--epochs "$EPOCHS")
pids=()
for job in $JOBS; do
    name=${job%%:*}
    config=$RUNS/$name.gpu.yaml
    { sed -e 's|^data: .*|data: data/ma2020.npz|' -e "s|^output_dir: .*|output_dir: $RUNS|" "configs/$name.yaml"
      printf '%s\n' "${EXTRA:-}"; } > "$config"
    if [ "$job" = "$name" ]; then  # no fold: the config's own (the all-data model)
        command=(python3 -m covidseg_training train "$config")
    else
        command=(python3 -m covidseg_training crossval "$config" --folds "${job#*:}")
    fi
    timeout --signal=INT --kill-after=30 "$BUDGET_S" "${command[@]}" --device "$DEVICE" --workers "$WORKERS" "${epochs[@]}" \
        > "$RUNS/logs/${job/:/-fold}.log" 2>&1 &
    pids+=($!)
    echo "started $job"
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=1; done
echo "runs ended after $(( $(date +%s) - started )) s (status $status)"
for log in "$RUNS"/logs/*.log; do echo "== $log"; tail -n 3 "$log"; done

# Each fold's crossval wrote its own one-fold aggregate into NAME/crossval: aggregate again, over the five
# folds, each config that has them all evaluated (after_v2.sh takes a crossval/ it finds as the five folds').
for name in $(for job in $JOBS; do [ "$job" != "${job%%:*}" ] && echo "${job%%:*}"; done | sort -u); do
    rm -rf "${RUNS:?}/$name/crossval"
    if ls "$RUNS/$name"/fold{0,1,2,3,4}/eval/summary.json > /dev/null 2>&1; then
        python3 -m covidseg_training crossval "$RUNS/$name.gpu.yaml" --device "$DEVICE" || status=1
    fi
done

# Paths inside the archives start at the runs' folder (v2/fold0/..., whatever RUNS is called).
tar -czf "$OUT/results.tar.gz" -C "$RUNS" --exclude='*.pt' --exclude='cache' --exclude='*.npz' --exclude=gpu-out . || status=1
# The kept best.pt in tar files of at most 15 MiB (the tool returns files of up to 16 MiB). A checkpoint
# over 15 MiB alone (a 24-channel network's is 17.5 MB) goes as its float16 copy, under the same name: its
# record says so, and its eval/ stays the float32 original's (after_v2.sh evaluates the copy again).
limit=$((${FILE_LIMIT_KIB:-15360} * 1024))
part=0; size=0; batch=()
pack_batch() { [ ${#batch[@]} -gt 0 ] && { part=$((part + 1)); tar -cf "$OUT/checkpoints-$part.tar" -C "$RUNS" "${batch[@]}"; }; batch=(); size=0; }
for name in $KEEP; do
    for file in "$RUNS/$name"/*/best.pt; do
        [ -f "$file" ] || continue
        # best.float32.pt beside it: a call before this one made the copy (a second copy would replace the original)
        if [ "$(stat -c %s "$file")" -gt "$limit" ] && [ ! -f "${file%.pt}.float32.pt" ]; then
            python3 -c "import sys; from covidseg_training.checkpoint import save_half_precision_copy as h
h(sys.argv[1], sys.argv[2])" "$file" "${file%.pt}.float16.pt" && mv "$file" "${file%.pt}.float32.pt" \
                && mv "${file%.pt}.float16.pt" "$file" || status=1
        fi
        bytes=$(stat -c %s "$file")
        [ $((size + bytes)) -gt "$limit" ] && pack_batch
        batch+=("${file#"$RUNS"/}"); size=$((size + bytes))
    done
done
pack_batch
ls -la "$OUT"
echo "finished after $(( $(date +%s) - started )) s"
exit $status
