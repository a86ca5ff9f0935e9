#!/usr/bin/env bash
# Pack what a GPU machine needs to train model v2 without ../shared/data (run here, on a machine that
# has it):  bash training/gpu/pack.sh
#
# Writes training/data/gpu/a and training/data/gpu/b (ignored by git), each small enough to travel in
# one device call beside the repository (64 MiB in all): a holds the wheels of the training extra that
# the GPU image lacks (albumentations and what it needs, so that the first call can already import the
# training code) and the first part of the labelled slices (data/ma2020.npz, xz-compressed and cut in
# two), b the rest with its sha256 and the negative scans' slices as cached by `prepare
# --negatives-for` (no scans, no SimpleITK needed there).
set -euo pipefail
cd "$(dirname "$0")/.."
SHARED=${SHARED:-../../shared/data}
PYTHON=${PYTHON:-python}
if [ ! -f data/ma2020.npz ]; then
    "$PYTHON" -m covidseg_training prepare --png "$SHARED/ma2020-covid19-ct-png" --out data/ma2020.npz
fi
rm -rf data/gpu
mkdir -p data/gpu/a/wheels data/gpu/b/cache
"$PYTHON" -m covidseg_training prepare --negatives-for configs/v2_all.yaml --out data/gpu/b/cache
# Python 3.12 on the GPU image; versions as installed here (pyproject's training extra).
for package in albumentations albucore pydantic pydantic-core annotated-types typing-inspection typing-extensions \
        simsimd stringzilla; do
    version=$("$PYTHON" -m pip show "$package" 2>/dev/null | sed -n 's/^Version: //p')
    "$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        --platform manylinux_2_24_x86_64 -d data/gpu/a/wheels "$package${version:+==$version}"
done
"$PYTHON" - <<'PY'
# The arrays uncompressed, then xz (zlib inside the .npz would leave xz nothing to gain); part a is
# cut so that a (with the wheels) and b (with the negatives) weigh the same.
import hashlib, io, lzma
from pathlib import Path
import numpy as np
with np.load("data/ma2020.npz") as data:
    buffer = io.BytesIO()
    np.savez(buffer, **{name: data[name] for name in data.files})
raw = buffer.getvalue()
packed = lzma.compress(raw, preset=9)
def weight(folder):
    return sum(path.stat().st_size for path in Path(folder).rglob("*") if path.is_file())
cut = (len(packed) + weight("data/gpu/b") - weight("data/gpu/a")) // 2  # a and b: half of everything each
Path("data/gpu/a/ma2020.npz.xz.0").write_bytes(packed[:cut])
Path("data/gpu/b/ma2020.npz.xz.1").write_bytes(packed[cut:])
Path("data/gpu/b/ma2020.npz.sha256").write_text(hashlib.sha256(raw).hexdigest() + "\n")
PY

du -sh data/gpu/a data/gpu/b
