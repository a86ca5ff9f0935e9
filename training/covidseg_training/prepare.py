"""Turn the training data into one ``.npz`` of network-ready slices (``SliceDataset``).

    python -m covidseg_training prepare --png ../../shared/data/ma2020-covid19-ct-png --out data/ma2020.npz
    python -m covidseg_training prepare --zenodo data/zenodo --out data/zenodo.npz [--input-size 256]
        [--middle 0.6 | --middle 1] [--all-slices] [--orientation engine|png-export]
    python -m covidseg_training prepare --negatives-for configs/v2.yaml [--out runs/cache] [--preview labels.png]

``--negatives-for`` reads every negative scan of a training config through the engine into that
config's cache folder (``<output_dir>/cache``, or ``--out``), the form in which a machine without the
scans (a GPU machine) trains from them (:mod:`negatives`).

From the Zenodo volumes (``download`` unpacks them into COVID-19-CT-Seg_20cases/, Lung_Mask/,
Infection_Mask/ and Lung_and_Infection_Mask/) the slices are made as the shared PNG export made its
own (see that export's README): the middle 60% of axial slices, the engine's intensity recipe
(imported from CovidInfectionSegLib.preprocessing), masks padded and resized the same way and
binarised at 0.5, only slices that hold infection. Each slice keeps its pixel size in mm after the
resize (``SliceDataset.pixel_mm``, from the volume's spacing) for the surface metrics.
Orientation: by default the engine's reader and canonical LPS orientation
(CovidInfectionSegLib.imageio), i.e. what the model sees at inference;
``--orientation png-export`` reproduces the export's ``np.rot90`` of nibabel's array instead (it
ignores the affine: the export's Radiopaedia slices are upside down next to the coronacases ones).

Intensity storage differs inside the record: the 10 coronacases volumes are in HU, the 10 Radiopaedia
volumes were stored windowed to [-1250, 250] and rescaled to 0..255. Clipping 0..255 values to the HU
window [-1024, 3071] would be harmless numerically but wrong in meaning, so a volume whose values all
lie in [0, 255] is treated as "windowed 0..255" and gets the recipe without the HU clip; the per-slice
min-max that follows makes the two kinds comparable. The choice per volume is logged and written to
``<out>.json``.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

import cv2
import numpy as np

import SimpleITK as sitk

from CovidInfectionSegLib.atomic import atomic_path, write_text_atomic
from CovidInfectionSegLib.imageio import read_image, to_canonical
from CovidInfectionSegLib.preprocessing import IntensityRecipe, SliceGeometry, pad_to_square, preprocess_slices

from .config import TrainConfig
from .data import SliceDataset, labels_from_masks, load_png_export
from .figures import plot_negative_labels
from .negatives import NegativeSampler, load_negatives

IMAGE_DIR = "COVID-19-CT-Seg_20cases"
LUNG_DIR = "Lung_Mask"
INFECTION_DIR = "Infection_Mask"
COMBINED_DIR = "Lung_and_Infection_Mask"  # 1 left lung, 2 right lung, 3 infection
COMBINED_INFECTION = 3


def case_key(path: Path) -> str:
    """One name per patient across the image and mask files of the record and of its Kaggle copy
    (``coronacases_org_001`` and ``coronacases_001``; ``radiopaedia_org_covid-19-pneumonia-4_85506_1-dcm``
    and ``radiopaedia_4_85506_1``)."""
    stem = re.sub(r"\.nii(\.gz)?$", "", path.name)
    corona = re.fullmatch(r"coronacases_(?:org_)?(\d+)", stem)
    if corona:
        return f"coronacases_{int(corona.group(1)):03d}"
    radiopaedia = re.fullmatch(r"radiopaedia_(?:org_covid-19-pneumonia-)?(\d+)_(\d+)_(\d+)(?:-dcm)?", stem)
    if radiopaedia:
        return "radiopaedia_" + "_".join(radiopaedia.groups())
    return stem


def _volumes(folder: Path) -> dict[str, Path]:
    files = sorted(p for p in folder.rglob("*") if p.is_file() and re.search(r"\.nii(\.gz)?$", p.name))
    return {case_key(path): path for path in files}


ORIENTATIONS = ("engine", "png-export")


def read_volume(path: Path, orientation: str = "engine") -> np.ndarray:
    """(slices, rows, cols) float32 axial slices of a NIfTI volume.

    ``engine``: the runtime engine's reader and canonical LPS orientation (anterior up, patient right
    on the image left), so training slices look like what the model is given at inference.
    ``png-export``: ``np.rot90`` of nibabel's (x, y, z) array, as the shared PNG export was made; that
    ignores the affine, and the Radiopaedia slices of the export are indeed upside down (posterior up)
    next to the coronacases ones.
    """
    return read_volume_and_spacing(path, orientation)[0]


def read_volume_and_spacing(path: Path, orientation: str = "engine") -> tuple[np.ndarray, tuple[float, float]]:
    """:func:`read_volume` plus the in-plane pixel spacing in mm as (row, column)."""
    if orientation == "engine":
        image = to_canonical(read_image(path))
        data = sitk.GetArrayFromImage(image).astype(np.float32, copy=False)
        spacing = (float(image.GetSpacing()[1]), float(image.GetSpacing()[0]))
    elif orientation == "png-export":
        import nibabel

        try:
            nifti = nibabel.load(str(path))
            data = np.moveaxis(np.rot90(nifti.get_fdata(dtype=np.float32)), 2, 0)
        except Exception as error:  # nibabel raises several types for damaged files
            raise ValueError(f"{path}: not a readable NIfTI volume: {error}") from error
        zooms = nifti.header.get_zooms()
        spacing = (float(zooms[1]), float(zooms[0]))  # rot90 turns (x, y) into (rows ~ y, columns ~ x)
    else:
        raise ValueError(f"unknown orientation {orientation!r}; choose from {ORIENTATIONS}")
    if data.ndim != 3:
        raise ValueError(f"{path}: expected a 3D volume, got shape {data.shape}")
    return np.ascontiguousarray(data), spacing


def stored_pixel_mm(shape: tuple[int, int], spacing: tuple[float, float], input_size: int) -> float:
    """Pixel size in mm of a (rows, cols) slice once padded to a square and resized to ``input_size``.
    Padding is in pixels, so an anisotropic in-plane spacing (rare in CT) is summarised by its
    geometric mean."""
    return float(max(shape) * np.sqrt(spacing[0] * spacing[1]) / input_size)


def stored_windowed(volume: np.ndarray) -> bool:
    """True for volumes stored as 0..255 after a display window (the Radiopaedia cases), False for HU."""
    return float(volume.min()) >= 0.0 and float(volume.max()) <= 255.0


def middle_range(n_slices: int, fraction: float) -> range:
    """Slice indices of the middle ``fraction`` of a volume (0.6 -> round(0.2 n) .. round(0.8 n))."""
    if not 0 < fraction <= 1:
        raise ValueError(f"middle fraction must be in (0, 1], got {fraction}")
    margin = (1 - fraction) / 2
    return range(round(margin * n_slices), round((1 - margin) * n_slices))


def resize_masks(masks: np.ndarray, recipe: IntensityRecipe) -> np.ndarray:
    """(n, rows, cols) binary masks -> (n, size, size) bool, padded and resized as the image slices are."""
    size = recipe.input_size
    out = np.empty((len(masks), size, size), dtype=bool)
    for index, mask in enumerate(masks):
        geometry = SliceGeometry.for_shape(mask.shape, recipe.pad_to_square)
        square = pad_to_square((mask > 0).astype(np.float32), geometry, fill=0.0)
        out[index] = cv2.resize(square, (size, size), interpolation=cv2.INTER_CUBIC) > 0.5
    return out


def find_cases(root: Path) -> list[tuple[str, Path, Path, Path | None]]:
    """(case, image, lung mask, infection mask or None for the combined mask) for every volume."""
    images = _volumes(root / IMAGE_DIR)
    if not images:
        raise FileNotFoundError(f"{root / IMAGE_DIR}: no .nii/.nii.gz volumes (run `download --out {root}` first)")
    lungs, infections = _volumes(root / LUNG_DIR), _volumes(root / INFECTION_DIR)
    combined = _volumes(root / COMBINED_DIR)
    cases = []
    for key, image in images.items():
        if key in lungs and key in infections:
            cases.append((key, image, lungs[key], infections[key]))
        elif key in combined:
            cases.append((key, image, combined[key], None))
        else:
            raise FileNotFoundError(f"{image}: no masks for case {key!r} in {root / LUNG_DIR} + {root / INFECTION_DIR} "
                                    f"or {root / COMBINED_DIR}")
    return cases


def prepare_volume(image_path: Path, lung_path: Path, infection_path: Path | None, *, input_size: int,
                   middle: float, only_infected: bool, orientation: str = "engine"
                   ) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """One case -> (images uint8 (n, s, s), labels uint8 (n, s, s), facts about it, incl. ``pixel_mm``
    the in-plane pixel size of the stored slices)."""
    volume, spacing = read_volume_and_spacing(image_path, orientation)
    lung_volume = read_volume(lung_path, orientation)
    infection_volume = (read_volume(infection_path, orientation) if infection_path
                        else (lung_volume == COMBINED_INFECTION).astype(np.float32))
    for path, other in ((lung_path, lung_volume), (infection_path or lung_path, infection_volume)):
        if other.shape != volume.shape:
            raise ValueError(f"{path}: mask shape {other.shape} differs from the image {image_path} {volume.shape}")
    windowed = stored_windowed(volume)
    recipe = IntensityRecipe(input_size=input_size)
    if windowed:
        recipe = replace(recipe, hu_window=None)
    selection = list(middle_range(len(volume), middle))
    images = preprocess_slices(volume[selection], recipe)
    lungs = resize_masks(lung_volume[selection], recipe)
    infection = resize_masks(infection_volume[selection], recipe)
    labels = labels_from_masks(lungs, infection)
    keep = infection.any(axis=(1, 2)) if only_infected else np.ones(len(images), dtype=bool)
    facts = {
        "image": str(image_path), "slices_rows_cols": list(volume.shape),
        "spacing_rows_cols_mm": list(spacing), "pixel_mm": stored_pixel_mm(volume.shape[1:], spacing, input_size),
        "stored_as": "windowed [-1250, 250] rescaled to 0..255 (no HU clip)" if windowed else "HU (clipped to the recipe window)",
        "value_range": [float(volume.min()), float(volume.max())],
        "slices_in_middle": len(selection), "slices_kept": int(keep.sum()),
    }
    return images[keep], labels[keep], facts


def prepare_zenodo(root: str | Path, *, input_size: int = 256, middle: float = 0.6, only_infected: bool = True,
                   orientation: str = "engine", log: Callable[[str], None] = print
                   ) -> tuple[SliceDataset, dict[str, Any]]:
    """All cases of an unpacked record -> (dataset, per-case facts)."""
    root = Path(root)
    images, labels, cases, pixel_mm, facts = [], [], [], [], {}
    for key, image_path, lung_path, infection_path in find_cases(root):
        case_images, case_labels, case_facts = prepare_volume(
            image_path, lung_path, infection_path, input_size=input_size, middle=middle, only_infected=only_infected,
            orientation=orientation)
        log(f"{key}: {case_facts['slices_rows_cols']} {case_facts['stored_as']}, kept {case_facts['slices_kept']} slices")
        images.append(case_images)
        labels.append(case_labels)
        cases.append(np.full(len(case_images), key))
        pixel_mm.append(np.full(len(case_images), case_facts["pixel_mm"], dtype=np.float32))
        facts[key] = case_facts
    dataset = SliceDataset(np.concatenate(images), np.concatenate(labels), np.concatenate(cases).astype(str),
                           np.concatenate(pixel_mm))
    return dataset, {"source": str(root), "input_size": input_size, "middle_fraction": middle,
                     "only_slices_with_infection": only_infected, "orientation": orientation,
                     "cases": facts}


def save_dataset(dataset: SliceDataset, out: Path, facts: dict[str, Any]) -> None:
    """Write ``out`` (.npz) and ``out``.json (how it was made), each atomically."""
    if out.suffix != ".npz":
        raise ValueError(f"{out}: the output must be a .npz file")
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as temporary:
        dataset.save(temporary)
    write_text_atomic(out.with_suffix(".json"), json.dumps(
        {**facts, "slices": int(len(dataset.images)), "n_cases": int(len(set(dataset.cases.tolist())))}, indent=2) + "\n")


def cache_negatives(config_path: Path, cache_dir: Path | None, preview: Path | None = None) -> int:
    """Every negative scan of the config (all folds' scans) read once into ``cache_dir``; ``preview``:
    a PNG of what they teach under the config's ``negatives.lung_label``."""
    config = TrainConfig.load(config_path)
    names = config.negatives.scans_for_fold(None)
    cache_dir = cache_dir or Path(config.output_dir) / "cache"
    scans = load_negatives(config.negatives, IntensityRecipe(input_size=config.input_size), names, cache_dir=cache_dir)
    for scan in scans:
        print(f"{scan.name}: {len(scan.slices.images)} slices")
    print(f"cached in {cache_dir}")
    if preview is not None:
        sampler = NegativeSampler(scans, per_epoch=1, lung_label=config.negatives.lung_label)
        plot_negative_labels([(scan.name, scan.slices.images, scan.slices.labels, scan.levels) for scan in sampler.scans],
                             config.negatives.lung_label, preview)
        print(f"wrote {preview}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="covidseg_training prepare", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--png", type=Path, help="the shared PNG export folder (recipe already applied)")
    source.add_argument("--zenodo", type=Path, help="folder with the unpacked Zenodo 3757476 archives")
    source.add_argument("--negatives-for", type=Path, metavar="CONFIG",
                        help="a training config: cache the slices of all its negative scans (--out: a folder)")
    parser.add_argument("--out", type=Path, help="output .npz (with --negatives-for: the cache folder, "
                                                 "default the config's <output_dir>/cache)")
    parser.add_argument("--preview", type=Path, help="with --negatives-for: a PNG of what the negatives teach")
    parser.add_argument("--input-size", type=int, default=256, help="slice size (Zenodo only; the PNGs are 256)")
    parser.add_argument("--middle", type=float, default=0.6, help="fraction of central slices kept (Zenodo only)")
    parser.add_argument("--all-slices", action="store_true", help="keep slices without infection (Zenodo only)")
    parser.add_argument("--orientation", choices=ORIENTATIONS, default="engine",
                        help="engine: canonical LPS like inference (default); png-export: rot90 like the PNG export")
    args = parser.parse_args(argv)
    if args.negatives_for:
        return cache_negatives(args.negatives_for, args.out, args.preview)
    if args.out is None:
        parser.error("--out is required with --png or --zenodo")
    if args.png:
        dataset = load_png_export(args.png)
        facts: dict[str, Any] = {"source": str(args.png), "input_size": int(dataset.images.shape[-1]),
                                 "note": "PNG export: recipe, middle 60% and infection-only selection already applied"}
    else:
        dataset, facts = prepare_zenodo(args.zenodo, input_size=args.input_size, middle=args.middle,
                                        only_infected=not args.all_slices, orientation=args.orientation)
    save_dataset(dataset, args.out, facts)
    print(f"wrote {args.out}: {len(dataset.images)} slices of {dataset.images.shape[1:]} from "
          f"{len(set(dataset.cases.tolist()))} cases")
    return 0


if __name__ == "__main__":
    sys.exit(main())
