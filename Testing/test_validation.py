"""Input checks: every bad input gets a specific error; doubtful inputs get warnings with the measured values."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
from shared_data import shared_path

from CovidInfectionSegLib.imageio import read_image
from CovidInfectionSegLib.validation import InputError, check_image, looks_like_hu, slice_axis


def ct_like(shape=(10, 32, 32), spacing=(0.8, 0.8, 2.0), dtype=np.int16) -> sitk.Image:
    """Air around a soft-tissue block: values like a CT in HU."""
    array = np.full(shape, -1000, dtype=np.float64)
    array[:, 8:24, 8:24] = 40
    image = sitk.GetImageFromArray(array.astype(dtype))
    image.SetSpacing(spacing)
    return image


def test_good_ct_has_no_warnings() -> None:
    assert check_image(ct_like(), "scan.nii.gz") == []


def test_2d_image_is_an_error() -> None:
    image = sitk.GetImageFromArray(np.zeros((32, 32), dtype=np.int16))
    with pytest.raises(InputError, match=r"scan\.png: a 2D image of size 32 x 32.*need one 3D CT volume"):
        check_image(image, "scan.png")


def test_4d_image_is_an_error() -> None:
    image = sitk.JoinSeries([ct_like(), ct_like()])
    assert image.GetDimension() == 4
    with pytest.raises(InputError, match=r"a 4D image of size 32 x 32 x 10 x 2 \(a time series"):
        check_image(image)


def test_multi_component_image_is_an_error() -> None:
    rgb = sitk.GetImageFromArray(np.zeros((10, 16, 16, 3), dtype=np.uint8), isVector=True)
    with pytest.raises(InputError, match=r"3 components per voxel"):
        check_image(rgb)


def test_too_few_slices_is_an_error() -> None:
    with pytest.raises(InputError, match=r"only 5 axial slices \(size 32 x 32 x 5\); need at least 8"):
        check_image(ct_like(shape=(5, 32, 32)))


def test_slices_are_counted_along_the_superior_inferior_axis() -> None:
    # 40 index slices along z, but z is the patient's left-right axis: only 6 axial slices
    image = ct_like(shape=(40, 6, 32))
    image.SetDirection((0, 0, 1, 1, 0, 0, 0, 1, 0))
    assert slice_axis(image) == 1
    with pytest.raises(InputError, match="only 6 axial slices"):
        check_image(image)


@pytest.mark.parametrize("bad_value", [np.nan, np.inf, -np.inf])
def test_non_finite_values_are_an_error(bad_value: float) -> None:
    array = sitk.GetArrayFromImage(ct_like()).astype(np.float32)
    array[3, 4, 5] = bad_value
    array[4, 4, 5] = bad_value
    with pytest.raises(InputError, match=r"2 voxels are NaN or infinite"):
        check_image(sitk.GetImageFromArray(array))


def test_constant_image_is_an_error() -> None:
    image = sitk.GetImageFromArray(np.full((10, 16, 16), -1000, dtype=np.int16))
    with pytest.raises(InputError, match=r"constant image \(every voxel is -1000\)"):
        check_image(image)


def test_non_hu_data_gets_a_warning_with_its_range() -> None:
    array = np.zeros((10, 32, 32), dtype=np.uint8)
    array[:, 8:24, 8:24] = 200
    warnings = check_image(sitk.GetImageFromArray(array), "mri.nrrd")
    assert len(warnings) == 1
    assert "mri.nrrd: intensities do not look like CT in Hounsfield units (range 0..200" in warnings[0]
    assert "min-max" in warnings[0]


def test_raw_values_below_any_hu_are_not_hu() -> None:
    array = np.full((10, 16, 16), -5000, dtype=np.int16)
    array[:, 4:12, 4:12] = 40
    assert not looks_like_hu(array)


def test_coarse_in_plane_spacing_warns_with_values() -> None:
    warnings = check_image(ct_like(spacing=(3.0, 3.0, 2.0)))
    assert len(warnings) == 1
    assert "in-plane spacing 3 x 3 mm is coarser than 1.5 mm" in warnings[0]
    assert "results are unreliable" in warnings[0] and "4% to 30%" in warnings[0]


def test_thick_slices_warn_but_5_mm_is_fine() -> None:
    assert check_image(ct_like(spacing=(0.8, 0.8, 5.0))) == []
    warnings = check_image(ct_like(spacing=(0.8, 0.8, 7.5)))
    assert len(warnings) == 1 and "slices are 7.5 mm thick, more than 5.0 mm" in warnings[0]


def test_real_abdominal_nifti_warns_about_3_mm_spacing() -> None:
    path = shared_path("example-abdominal-ct", "example_ct.nii.gz")
    warnings = check_image(read_image(path), str(path))
    assert len(warnings) == 1 and "in-plane spacing 3 x 3 mm" in warnings[0]


def test_real_chest_ct_is_accepted_without_warnings() -> None:
    image = read_image(shared_path("example-chest-ct", "Lung_Dx-A0001_kernel-L.nii.gz"))
    assert check_image(image) == []
