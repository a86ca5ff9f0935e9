"""Patient-grouped folds: no patient on both sides of a split, even when it has several volumes."""

from __future__ import annotations

import csv

import cv2
import numpy as np
import pytest

from covidseg_training.data import DEFAULT_PNG_ROOT, PNG_EXPORT_SAME_PATIENT, patient_folds, patient_of

needs_export = pytest.mark.skipif(not (DEFAULT_PNG_ROOT / "cases.csv").exists(),
                                  reason=f"shared PNG export not found at {DEFAULT_PNG_ROOT}")


def slices_of(sizes: dict[str, int]) -> np.ndarray:
    return np.array([case for case, size in sizes.items() for _ in range(size)])


def assert_patients_in_one_fold(cases: np.ndarray, folds: np.ndarray) -> None:
    fold_of_patient: dict[str, set[int]] = {}
    for case, fold in zip(cases, folds):
        fold_of_patient.setdefault(patient_of(case), set()).add(int(fold))
    split = {patient: found for patient, found in fold_of_patient.items() if len(found) > 1}
    assert not split, f"patients in several folds: {split}"


def test_patient_of_names_the_radiopaedia_case_and_the_export_pair():
    assert patient_of("radiopaedia_10_85902_1") == patient_of("radiopaedia_10_85902_3") == "radiopaedia_10"
    assert patient_of("radiopaedia_29_86490_1") == patient_of("radiopaedia_29_86491_1")
    assert patient_of("radiopaedia_4_85506_1") != patient_of("radiopaedia_40_86625_0")
    assert patient_of("coronacases_001") == "coronacases_001"
    assert patient_of("12") == patient_of("11") and patient_of("13") == "13"


def test_volumes_of_one_patient_share_a_fold():
    # the record's 20 volumes with made-up slice counts; the two same-patient pairs would be split
    # if each volume were its own patient
    sizes = {f"coronacases_{i:03d}": 100 + 7 * i for i in range(1, 11)}
    sizes.update({"radiopaedia_4_85506_1": 20, "radiopaedia_7_85703_0": 45, "radiopaedia_10_85902_1": 11,
                  "radiopaedia_10_85902_3": 118, "radiopaedia_14_85914_0": 66, "radiopaedia_27_86410_0": 33,
                  "radiopaedia_29_86490_1": 24, "radiopaedia_29_86491_1": 55, "radiopaedia_36_86526_0": 22,
                  "radiopaedia_40_86625_0": 27})
    cases = slices_of(sizes)
    for seed in range(5):
        folds = patient_folds(cases, 5, seed)
        assert_patients_in_one_fold(cases, folds)
        assert set(folds) == set(range(5))


def test_grouping_moves_only_the_smaller_volumes():
    sizes = {"01": 90, "02": 80, "03": 70, "04": 60, "11": 15, "12": 50}
    cases = slices_of(sizes)
    folds = patient_folds(cases, 3, seed=0)
    fold_of = {case: int(folds[cases == case][0]) for case in sizes}
    assert fold_of["11"] == fold_of["12"]
    # the same split with "11" renamed so it is its own patient: only "11" may differ
    renamed = np.where(cases == "11", "99", cases)
    alone = patient_folds(renamed, 3, seed=0)
    alone_of = {case: int(alone[renamed == case][0]) for case in set(renamed)}
    assert all(fold_of[case] == alone_of[case] for case in sizes if case != "11")


def test_too_few_patients_for_the_folds():
    with pytest.raises(ValueError, match="patients"):
        patient_folds(slices_of({"11": 5, "12": 5, "13": 5}), 3)


@needs_export
def test_shared_export_split_keeps_cases_11_and_12_together():
    with (DEFAULT_PNG_ROOT / "cases.csv").open(encoding="utf-8") as handle:
        cases = np.array([row["case"] for row in csv.DictReader(handle)])
    folds = patient_folds(cases, 5, seed=0)
    assert_patients_in_one_fold(cases, folds)
    assert len(set(folds[np.isin(cases, ["11", "12"])])) == 1


@needs_export
def test_export_cases_11_and_12_are_one_patient_by_their_images():
    """The evidence behind PNG_EXPORT_SAME_PATIENT: the best-matching CT slices of 11 and 12 are near
    copies, far above any other pair of cases."""
    with (DEFAULT_PNG_ROOT / "cases.csv").open(encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    cases = np.array([row["case"] for row in rows])
    images = np.stack([cv2.resize(cv2.imread(str(DEFAULT_PNG_ROOT / "ct" / f"{row['slice']}.png"), cv2.IMREAD_GRAYSCALE),
                                  (48, 48), interpolation=cv2.INTER_AREA).ravel() for row in rows]).astype(float)
    images -= images.mean(axis=1, keepdims=True)
    images /= np.linalg.norm(images, axis=1, keepdims=True)
    correlation = images @ images.T
    ids = sorted(set(cases))
    best = {(a, b): correlation[np.ix_(cases == a, cases == b)].max() for a in ids for b in ids if a < b}
    assert best[("11", "12")] > 0.95
    others = {pair: value for pair, value in best.items() if pair != ("11", "12")}
    assert max(others.values()) < 0.9, max(others, key=others.get)
    assert PNG_EXPORT_SAME_PATIENT == {"12": "11"}


def test_case_balanced_epochs_draw_every_case_about_equally():
    """case_balanced: as many labelled slices per epoch as there are, each case equally likely (a case
    with 10 times the slices is drawn about as often as the others), the same draw for the same
    epoch and another for the next; off, every slice once in order."""
    from covidseg_training.config import TrainConfig
    from covidseg_training.train import labelled_indices

    cases = np.array(["big"] * 800 + ["small_a"] * 80 + ["small_b"] * 80 + ["small_c"] * 40)
    plain = TrainConfig()
    np.testing.assert_array_equal(labelled_indices(cases, plain, 0), np.arange(len(cases)))
    balanced = TrainConfig(case_balanced=True)
    drawn = labelled_indices(cases, balanced, 0)
    assert len(drawn) == len(cases)
    counts = {name: int((cases[drawn] == name).sum()) for name in np.unique(cases)}
    assert all(200 <= count <= 300 for count in counts.values()), counts  # 250 each expected
    np.testing.assert_array_equal(labelled_indices(cases, balanced, 0), drawn)
    assert not np.array_equal(labelled_indices(cases, balanced, 1), drawn)
