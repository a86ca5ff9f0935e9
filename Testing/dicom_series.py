"""A volume written as a minimal CT DICOM series, for tests that read DICOM folders."""

from __future__ import annotations

from pathlib import Path

import SimpleITK as sitk


def write_dicom_series(image: sitk.Image, folder: Path) -> None:
    """A minimal CT DICOM series, one file per slice."""
    folder.mkdir(parents=True)
    image = sitk.Cast(image, sitk.sitkInt16)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k in range(image.GetDepth()):
        plane = image[:, :, k]
        position = image.TransformIndexToPhysicalPoint((0, 0, k))
        for tag, value in {
            "0008|0060": "CT", "0020|000d": "1.2.826.0.1.3680043.2.1125.1", "0020|000e": "1.2.826.0.1.3680043.2.1125.2",
            "0020|0032": "\\".join(f"{v:f}" for v in position), "0020|0037": "1\\0\\0\\0\\1\\0",
            "0020|0013": str(k + 1), "0028|0030": f"{image.GetSpacing()[1]}\\{image.GetSpacing()[0]}",
            "0018|0050": str(image.GetSpacing()[2]),
        }.items():
            plane.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"slice{k:03d}.dcm"))
        writer.Execute(plane)
