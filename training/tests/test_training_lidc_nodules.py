"""LIDC nodule reads: the XML parsed, contours filled on the right slices of the scan's grid."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from CovidInfectionSegLib.imageio import read_image, to_canonical
from covidseg_training.lidc_nodules import nodule_mask, parse_nodule_xml
from shared_data_paths import shared_path
from synthetic_lidc import non_nodule, nodule, roi, square, write_read_message


def grid(direction_z: float = 1.0) -> sitk.Image:
    """32 x 32 x 5 voxels, 1 x 1 x 2.5 mm; slices at z = -15, -12.5, -10, -7.5, -5 mm."""
    image = sitk.Image(32, 32, 5, sitk.sitkInt16)
    image.SetSpacing((1.0, 1.0, 2.5))
    image.SetDirection((1, 0, 0, 0, 1, 0, 0, 0, direction_z))
    image.SetOrigin((0.0, 0.0, -15.0 if direction_z > 0 else -5.0))
    return image


@pytest.fixture()
def reads_xml(tmp_path):
    first_reader = [
        nodule("A", [roi(-12.5, square(4, 4, 14, 14)), roi(-12.5, square(8, 8, 10, 10), inclusion=False),
                     roi(-11.4, square(20, 20, 22, 22)),  # 1.1 mm from the slice at -12.5: that slice
                     roi(40.0, square(4, 4, 6, 6))]),  # far from every slice: unmatched
        nodule("small", [roi(-10.0, [(16, 16)])]),  # a small nodule's centre mark: left out
        non_nodule(-10.0, 25, 25),
    ]
    second_reader = [nodule("B", [roi(-12.5, square(12, 4, 18, 8)), roi(-7.5, square(1, 1, 3, 2))])]
    return write_read_message(tmp_path / "reads.xml", [first_reader, second_reader])


def test_reads_parsed_and_left_out_marks_counted(reads_xml):
    reads = parse_nodule_xml(reads_xml)
    assert reads.readers == 2
    assert [(read.reader, read.nodule_id, len(read.contours)) for read in reads.nodules] == [(0, "A", 4), (1, "B", 2)]
    assert reads.small_nodule_marks == 1 and reads.non_nodule_marks == 1
    assert reads.nodules[0].contours[1].inclusion is False
    assert reads.nodules[0].contours[0].points[:2].tolist() == [[4, 4], [5, 4]]  # (column, row)


@pytest.mark.parametrize("direction_z", [1.0, -1.0])
def test_union_of_readers_on_the_slices_at_their_z_positions(reads_xml, direction_z):
    image = grid(direction_z)
    found = nodule_mask(parse_nodule_xml(reads_xml), image)
    assert found.contours == 6 and found.unmatched_contours == 1
    # Canonical LPS: slice k at z = -15 + 2.5 k, whichever way the file stores its slices.
    expected = np.zeros((5, 32, 32), dtype=bool)
    expected[1, 4:15, 4:15] = True  # reader 1's outline, boundary included: 11 x 11
    expected[1, 8:11, 8:11] = False  # its exclusion (a hole)
    expected[1, 20:23, 20:23] = True  # matched within half a slice
    expected[1, 4:9, 12:19] = True  # reader 2, overlapping reader 1: the union
    expected[3, 1:3, 1:4] = True  # reader 2 at z = -7.5
    assert np.array_equal(found.mask, expected)


def test_rows_are_y_and_columns_are_x(tmp_path):
    xml = write_read_message(tmp_path / "one.xml", [[nodule("N", [roi(-15.0, square(2, 10, 5, 11))])]])
    mask = nodule_mask(parse_nodule_xml(xml), grid()).mask
    assert np.argwhere(mask[0]).min(axis=0).tolist() == [10, 2] and mask.sum() == 8


def test_not_lidc_xml_is_a_clear_error(tmp_path):
    (tmp_path / "other.xml").write_text("<svg xmlns='http://www.w3.org/2000/svg'/>")
    (tmp_path / "broken.xml").write_text("<LidcReadMessage")
    with pytest.raises(ValueError, match="not an LIDC read message"):
        parse_nodule_xml(tmp_path / "other.xml")
    with pytest.raises(ValueError, match="not readable XML"):
        parse_nodule_xml(tmp_path / "broken.xml")


def test_sagittal_slices_are_refused(reads_xml):
    image = grid()
    image.SetDirection((0, 0, 1, 1, 0, 0, 0, 1, 0))
    with pytest.raises(ValueError, match="axial slices"):
        nodule_mask(parse_nodule_xml(reads_xml), image)


def test_real_lidc_0001_nodule_lies_in_the_lung_on_its_xml_slices():
    """LIDC-IDRI-0001: one nodule outlined by all four readers, 32 contours between z -125 and -105 mm.
    Placed right, it is solid tissue (the bright blob) surrounded by aerated lung."""
    scan = shared_path("lidc-idri-chest-ct", "LIDC-IDRI-0001.nii.gz")
    reads = parse_nodule_xml(shared_path("lidc-idri-chest-ct", "LIDC-IDRI-0001.nodules.xml"))
    assert (reads.readers, len(reads.nodules), reads.small_nodule_marks, reads.non_nodule_marks) == (4, 4, 9, 13)
    image = read_image(scan)
    found = nodule_mask(reads, image)
    assert found.unmatched_contours == 0 and found.contours == 32
    canonical = to_canonical(image)
    ct = sitk.GetArrayFromImage(canonical).astype(np.float32)
    slice_z = [canonical.TransformIndexToPhysicalPoint((0, 0, int(k)))[2]
               for k in np.flatnonzero(found.mask.any(axis=(1, 2)))]
    xml_z = {contour.z_mm for read in reads.nodules for contour in read.contours}
    assert set(np.round(slice_z, 1)) == set(np.round(sorted(xml_z), 1))
    assert ndimage.label(found.mask)[1] == 1
    shell = ndimage.binary_dilation(found.mask, iterations=4) & ~found.mask
    assert np.median(ct[found.mask]) > -400, "the outlines cover the solid nodule"
    assert np.median(ct[shell]) < -700, "the nodule sits in aerated lung"
    assert 5000 < found.mask.sum() < 10000
