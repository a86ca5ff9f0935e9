"""Negative training slices: whole CT scans without COVID-19, every level from neck to abdomen.

The expert-labelled slices (the PNG export) all come from the middle of infected lungs. Negative
scans add what the model never saw: apex, bases, upper abdomen, neck, healthy lung, nodules and
contrast. Each slice is read from HU through the engine exactly as inference reads it
(``imageio.read_image`` -> canonical orientation -> ``preprocessing.preprocess_slices``), so window
and CLAHE are applied once. Labels: infection nowhere; lung where the classical HU lung mask
(:mod:`classical_lung`) says, padded and resized like the image. Beside them each scan keeps a
``dense`` mask: lung denser than ``DENSE_LUNG_HU`` (vessels, nodules, atelectasis) and, for LIDC
scans, the radiologists' nodules (the XML beside the scan), which ``lung_label:
no_infection_where_dense`` alone labels "lung, no infection".

Which scans a fold may train on (``NegativesConfig.holdout``): folds 0, 2 and 4 leave
LIDC-IDRI-0001 out and folds 1 and 3 leave LIDC-IDRI-0003 out, so that every whole-scan check of an
LIDC scan can use a fold model that never saw it; the released model (no fold) uses them all.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from CovidInfectionSegLib.atomic import atomic_path
from CovidInfectionSegLib.checksums import sha256_of
from CovidInfectionSegLib.preprocessing import (IntensityRecipe, SliceGeometry, context_indices, pad_to_square,
                                             preprocess_slices)

from .classical_lung import classical_lung_mask
from .data import LUNG, LUNG_UNKNOWN, SliceDataset

SHARED_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
# Training negatives. Never example-chest-ct or covid-chest-ct: they are the whole-scan checks.
NEGATIVE_SCANS = {
    "LIDC-IDRI-0001": "lidc-idri-chest-ct/LIDC-IDRI-0001.nii.gz",
    "LIDC-IDRI-0003": "lidc-idri-chest-ct/LIDC-IDRI-0003.nii.gz",
    "abdominal-ct": "example-abdominal-ct/example_ct.nii.gz",
}
DEFAULT_HOLDOUT = {0: ["LIDC-IDRI-0001"], 1: ["LIDC-IDRI-0003"], 2: ["LIDC-IDRI-0001"],
                   3: ["LIDC-IDRI-0003"], 4: ["LIDC-IDRI-0001"]}
APEX_LEVEL = 0.8  # the top fifth of the lungs (NegativeScan.levels)
CACHE_VERSION = 4  # 2: each cache records its recipe, so a machine without the scans can use it; 3: dense
# 4: the classical lung mask leaves out a trachea that is not pure gas (LIDC-IDRI-0003)
# Where they come from (the README beside each scan), for the model manifest.
LIDC_SOURCE = "LIDC-IDRI (Armato III SG et al., TCIA, doi:10.7937/K9/TCIA.2015.LO9QL9SX), CC BY 3.0"
NEGATIVE_SCAN_SOURCES = {
    "LIDC-IDRI-0001": LIDC_SOURCE,
    "LIDC-IDRI-0003": LIDC_SOURCE,
    "abdominal-ct": "example_ct.nii.gz of the TotalSegmentator tests' reference files, Apache-2.0",
}
# Healthy lung denser than this is what a model trained on infected slices mistakes for infection
# (vessels, nodules, dependent atelectasis); aerated healthy lung lies well below it.
DENSE_LUNG_HU = -500.0
# What each ``negatives.lung_label`` teaches inside a negative scan's classical lung mask.
LUNG_LABEL_MEANS = {
    "lung": "lung, no infection, everywhere in the classical lung mask",
    "lung_or_infection": "lung or infection (no loss between the two) in the classical lung mask",
    "no_infection_where_dense": f"lung, no infection, on lung denser than {DENSE_LUNG_HU:g} HU and on the "
                                "radiologists' nodules; lung or infection on the aerated rest of the classical lung mask",
}
LUNG_LABELS = tuple(LUNG_LABEL_MEANS)


@dataclass
class NegativesConfig:
    """The ``negatives`` block of a training config. ``per_epoch`` 0 trains without negatives."""

    scans: list[str] = field(default_factory=lambda: list(NEGATIVE_SCANS))
    per_epoch: int = 0
    holdout: dict[int, list[str]] = field(default_factory=lambda: dict(DEFAULT_HOLDOUT))
    root: str = ""  # folder holding the scans (NEGATIVE_SCANS paths); empty = ../shared/data
    # Inside the classical lung mask: "lung" teaches lung and no infection there; "lung_or_infection"
    # teaches only lung-or-infection against background, so a negative scan's lung never says "no
    # infection" (outside the lungs, "no infection" is taught either way); "no_infection_where_dense"
    # says "lung, no infection" on the scan's dense lung and nodules and "lung or infection" on the
    # aerated rest, so "no infection" is taught only where healthy tissue looks like infection.
    lung_label: str = "lung"
    # Hard negatives: this share of each epoch's negative slices is drawn in proportion to the infection
    # the model calls on each negative slice at the epoch's start (all of it false); 0 draws them all
    # uniformly. The rest are drawn uniformly as without it.
    hard_share: float = 0.0
    # Apex negatives: this share of each epoch's negative slices is drawn from the top of the lungs
    # (level ``apex_level`` to 1, see :class:`NegativeScan`) of the scans whose lung top lies inside the
    # scan, evenly over those scans; 0 leaves them to the uniform draw (about one slice in ten).
    apex_share: float = 0.0
    apex_level: float = APEX_LEVEL

    def __post_init__(self) -> None:
        if self.lung_label not in LUNG_LABELS:
            raise ValueError(f"negatives.lung_label must be one of {LUNG_LABELS}, not {self.lung_label!r}")
        for name in ("hard_share", "apex_share"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"negatives.{name} must lie in [0, 1], not {getattr(self, name)!r}")
        if self.hard_share + self.apex_share > 1.0:
            raise ValueError(f"negatives.hard_share + apex_share must not exceed 1, not "
                             f"{self.hard_share} + {self.apex_share}")
        if not 0.0 <= self.apex_level < 1.0:
            raise ValueError(f"negatives.apex_level must lie in [0, 1), not {self.apex_level!r}")

    def scans_for_fold(self, fold: int | None) -> list[str]:
        """The negative scans a model of ``fold`` trains on (all of them when ``fold`` is None)."""
        left_out = set() if fold is None else set(self.holdout.get(int(fold), []))
        return [name for name in self.scans if name not in left_out]

    def path_of(self, name: str) -> Path:
        root = Path(self.root) if self.root else SHARED_DATA
        return root / NEGATIVE_SCANS.get(name, name)


@dataclass
class NegativeScan:
    """One scan's slices after the recipe, its lung labels, and where each slice lies: ``levels`` is
    the slice's height within the classical lung's z extent (0 at its lowest slice, 1 at its highest,
    below 0 under the lungs, above 1 over them; NaN when the scan has no lung). ``dense``: per pixel,
    lung denser than ``DENSE_LUNG_HU`` or a radiologist's nodule (see the module doc)."""

    name: str
    slices: SliceDataset
    levels: np.ndarray
    dense: np.ndarray


def load_negative_scan(path: Path, recipe: IntensityRecipe, name: str | None = None) -> NegativeScan:
    """Read a CT in HU as the engine does, and make its slices and lung labels (see the module doc)."""
    import SimpleITK as sitk  # only here: training from cached slices (a GPU machine) needs no SimpleITK

    from CovidInfectionSegLib.imageio import read_image, to_canonical

    from .lidc_nodules import nodule_mask, parse_nodule_xml

    original = read_image(path)
    image = sitk.Cast(to_canonical(original), sitk.sitkFloat32)
    volume = sitk.GetArrayFromImage(image)
    spacing = image.GetSpacing()[::-1]
    lungs = classical_lung_mask(volume, spacing)
    images = preprocess_slices(volume, recipe)
    labels = resize_labels(lungs.astype(np.uint8) * LUNG, recipe)
    dense = lungs & (volume > DENSE_LUNG_HU)
    reads = nodule_reads_beside(Path(path))
    if reads is not None:
        dense |= nodule_mask(parse_nodule_xml(reads), original).mask
    dense = resize_labels(dense.astype(np.uint8), recipe).astype(bool)
    in_plane_mm = max(volume.shape[1] * spacing[1], volume.shape[2] * spacing[2]) / recipe.input_size
    name = name or Path(path).name
    dataset = SliceDataset(images, labels, np.full(len(images), name), np.full(len(images), in_plane_mm, np.float32))
    return NegativeScan(name, dataset, lung_levels(lungs), dense)


def nodule_reads_beside(path: Path) -> Path | None:
    """The LIDC readers' XML beside a scan (``X.nii.gz`` -> ``X.nodules.xml``), if there is one."""
    stem = path.name[: -len(".nii.gz")] if path.name.endswith(".nii.gz") else path.stem
    reads = path.with_name(f"{stem}.nodules.xml")
    return reads if reads.exists() else None


def resize_labels(labels: np.ndarray, recipe: IntensityRecipe) -> np.ndarray:
    """(z, rows, cols) labels padded and resized (nearest) as ``preprocess_slice`` does the image."""
    geometry = SliceGeometry.for_shape(labels.shape[1:], recipe.pad_to_square)
    size = recipe.input_size
    out = np.empty((len(labels), size, size), dtype=np.uint8)
    for index, label in enumerate(labels):
        padded = pad_to_square(label, geometry, fill=0)
        out[index] = cv2.resize(padded, (size, size), interpolation=cv2.INTER_NEAREST)
    return out


def lung_levels(lungs: np.ndarray) -> np.ndarray:
    """Each slice's height within the lungs' z extent (see :class:`NegativeScan`)."""
    with_lung = np.flatnonzero(lungs.any(axis=(1, 2)))
    z = np.arange(len(lungs), dtype=np.float32)
    if not len(with_lung):
        return np.full(len(lungs), np.nan, dtype=np.float32)
    return (z - with_lung[0]) / max(1, with_lung[-1] - with_lung[0])


def apex_indices(levels: np.ndarray, apex_level: float = APEX_LEVEL) -> np.ndarray:
    """The slices at the top of a scan's lungs (level ``apex_level`` to 1); none when the lungs reach the
    scan's top slice (an abdominal scan's lung bases, not an apex)."""
    if not np.any(levels > 1.0):
        return np.zeros(0, dtype=np.int64)
    return np.flatnonzero((levels >= apex_level) & (levels <= 1.0))


def load_negatives(config: NegativesConfig, recipe: IntensityRecipe, names: list[str],
                   cache_dir: Path | None = None) -> list[NegativeScan]:
    """The named negative scans, from ``cache_dir`` when an up-to-date copy is there (the lung masks
    take half a minute a scan)."""
    scans = []
    for name in names:
        path = config.path_of(name)
        if not path.exists():
            cache = None if cache_dir is None else cache_without_scan(Path(cache_dir), name, recipe)
            if cache is None:
                where = f", and no cache of it for this recipe in {cache_dir}" if cache_dir is not None else ""
                raise FileNotFoundError(f"negative scan {name}: {path} not found{where} (see the training README)")
        else:
            cache = None if cache_dir is None else Path(cache_dir) / f"negative-{name}-{_cache_key(path, recipe)}.npz"
        if cache is not None and cache.exists():
            with np.load(cache) as data:
                dataset = SliceDataset(data["images"], data["labels"], data["cases"].astype(str), data["pixel_mm"])
                scans.append(NegativeScan(name, dataset, data["levels"], data["dense"]))
            continue
        scan = load_negative_scan(path, recipe, name)
        if cache is not None:
            cache.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(cache) as temporary:
                with open(temporary, "wb") as handle:
                    np.savez_compressed(handle, images=scan.slices.images, labels=scan.slices.labels,
                                        cases=scan.slices.cases, pixel_mm=scan.slices.pixel_mm, levels=scan.levels,
                                        dense=scan.dense, recipe=_recipe_key(recipe))
        scans.append(scan)
    return scans


def cache_without_scan(cache_dir: Path, name: str, recipe: IntensityRecipe) -> Path | None:
    """The cached slices of ``name`` made for ``recipe`` when the scan itself is not on this machine (a
    GPU machine gets the cache, not the scans): the one cache file of that name that records this
    recipe. None when there is none; an error when several do (made from different copies of the scan)."""
    pattern = re.compile(rf"negative-{re.escape(name)}-[0-9a-f]{{12}}\.npz")
    matches = []
    for candidate in sorted(cache_dir.glob(f"negative-{name}-*.npz")):
        if pattern.fullmatch(candidate.name):
            with np.load(candidate) as data:
                if "recipe" in data.files and str(data["recipe"]) == _recipe_key(recipe):
                    matches.append(candidate)
    if len(matches) > 1:
        raise ValueError(f"negative scan {name} is not here and {len(matches)} caches of it fit this recipe "
                         f"({', '.join(m.name for m in matches)}): keep the one made from the scan you mean")
    return matches[0] if matches else None


def _recipe_key(recipe: IntensityRecipe) -> str:
    return json.dumps([CACHE_VERSION, recipe.to_manifest()], sort_keys=True)


def _cache_key(path: Path, recipe: IntensityRecipe) -> str:
    # The files' contents, not their times: a shared data folder copied afresh for each session keeps
    # its cache (hashing a scan takes a fraction of a second; its lung mask half a minute).
    reads = nodule_reads_beside(path)
    files = [path] if reads is None else [path, reads]
    contents = [sha256_of(file) for file in files]
    text = json.dumps([CACHE_VERSION, contents, recipe.to_manifest()], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


class NegativeSampler:
    """Draws ``per_epoch`` negative slices for an epoch, spread evenly over the scans and, within a
    scan, uniformly over its slices (every level: neck, apex, mid-lung, bases, abdomen). The draw
    depends only on the seed and the epoch, so a resumed run draws what an uninterrupted one would.

    With ``hard_share`` above 0 and the infection the model calls on each slice (``hardness``, see
    :meth:`epoch`), that share of the draw goes to the slices in proportion to it instead. With
    ``apex_share`` above 0, that share goes to the apex slices (``apex_rows``: :func:`apex_indices` at
    ``apex_level``), evenly over the scans that have them."""

    def __init__(self, scans: list[NegativeScan], per_epoch: int, seed: int = 0, lung_label: str = "lung",
                 hard_share: float = 0.0, context_slices: int = 0, apex_share: float = 0.0,
                 apex_level: float = APEX_LEVEL):
        self.scans = [scan for scan in scans if len(scan.slices.images)]
        if lung_label in ("lung_or_infection", "no_infection_where_dense"):
            for scan in self.scans:
                labels = np.where(scan.slices.labels == LUNG, LUNG_UNKNOWN, scan.slices.labels).astype(np.uint8)
                if lung_label == "no_infection_where_dense":
                    labels[scan.dense] = LUNG
                scan.slices.labels = labels
        self.per_epoch = per_epoch if self.scans else 0
        self.seed = seed
        self.hard_share = hard_share
        self.apex_share = apex_share
        self.apex_rows = [apex_indices(scan.levels, apex_level) for scan in self.scans]
        self.context_slices = context_slices
        # Each slice's neighbours in its scan, as the engine picks them (end slices repeated). The adjacent
        # slices: the negative scans are 2.5-3 mm apart, where a ``context_mm`` of 2-4 mm makes the engine
        # take the adjacent slices too.
        context = IntensityRecipe(context_slices=context_slices)
        self.context_rows = [context_indices(len(scan.slices.images), context, None) for scan in self.scans]

    def hard_count(self, hardness: list[np.ndarray] | None) -> int:
        """How many of an epoch's draws go by ``hardness``: none without it or when it is 0 everywhere."""
        if hardness is None or not sum(float(np.sum(h)) for h in hardness):
            return 0
        return int(round(self.per_epoch * self.hard_share))

    def apex_count(self) -> int:
        """How many of an epoch's draws go to apex slices: none when no scan has an apex."""
        if not any(len(rows) for rows in self.apex_rows):
            return 0
        return int(round(self.per_epoch * self.apex_share))

    def epoch(self, epoch: int, hardness: list[np.ndarray] | None = None) -> list[tuple[int, int]]:
        """``per_epoch`` (scan index, slice index) pairs for epoch ``epoch``. ``hardness``: per scan (in
        ``scans`` order), a weight per slice (the infection pixels the model calls there)."""
        if not self.per_epoch:
            return []
        rng = np.random.default_rng([self.seed, epoch])
        hard = self.hard_count(hardness)
        apex = self.apex_count()
        scan_of = rng.permutation(np.arange(self.per_epoch - hard - apex) % len(self.scans))
        picks = [(int(s), int(rng.integers(len(self.scans[s].slices.images)))) for s in scan_of]
        if hard:
            weights = np.concatenate([np.asarray(h, dtype=np.float64) for h in hardness])
            starts = np.cumsum([0] + [len(scan.slices.images) for scan in self.scans])
            if len(weights) != starts[-1]:
                raise ValueError("hardness must give one weight per negative slice, scan by scan")
            for flat in rng.choice(len(weights), size=hard, p=weights / weights.sum()):
                scan = int(np.searchsorted(starts, flat, side="right") - 1)
                picks.append((scan, int(flat - starts[scan])))
        if apex:
            with_apex = [s for s, rows in enumerate(self.apex_rows) if len(rows)]
            for s in rng.permutation(np.arange(apex) % len(with_apex)):
                scan = with_apex[int(s)]
                picks.append((scan, int(rng.choice(self.apex_rows[scan]))))
        return picks

    def slice(self, scan_index: int, slice_index: int) -> tuple[np.ndarray, np.ndarray]:
        """A negative slice (with its neighbours as channels, ``context_slices``) and its labels."""
        data = self.scans[scan_index].slices
        if not self.context_slices:
            return data.images[slice_index], data.labels[slice_index]
        return data.images[self.context_rows[scan_index][slice_index]], data.labels[slice_index]

    def level(self, scan_index: int, slice_index: int) -> float:
        """The slice's height in its scan's lung (:class:`NegativeScan`; NaN for a scan without lung)."""
        return float(self.scans[scan_index].levels[slice_index])

    def inputs(self, scan_index: int) -> np.ndarray:
        """A scan's slices as the network reads them: (N, H, W), or (N, C, H, W) with neighbours."""
        images = self.scans[scan_index].slices.images
        return images if not self.context_slices else images[self.context_rows[scan_index]]
