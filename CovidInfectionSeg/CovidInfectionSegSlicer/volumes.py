"""Volume nodes to SimpleITK images and back, with the same physical geometry.

The engine works in LPS (ITK, DICOM); MRML in RAS. Only MRML and VTK are used, so this runs inside
the Slicer application and under plain Python with the ``slicer-core`` package.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import SimpleITK as sitk
import slicer
import vtk
from vtk.util import numpy_support

from CovidInfectionSegLib.validation import InputError

from .i18n import tr as _

# RAS (Slicer) <-> LPS (ITK, DICOM): flip the first two axes.
LPS_FROM_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
MAX_DIRECTION_SKEW = 1e-4


def nodeLabel(node: Any) -> str:
    """How messages name a volume node: ``volume 'CTChest'``."""
    return _("input volume") if node is None else _("volume '{name}'").format(name=node.GetName())


def volumeNodeToImage(volumeNode: Any) -> sitk.Image:
    """Copy a scalar volume node into a SimpleITK image with the same physical geometry (LPS).

    The node's parent transform is not applied: the output is placed under the same transform.
    Raises :class:`InputError` for no node, a label map, an empty, 2D, multi-component or sheared volume.
    """
    name = nodeLabel(volumeNode)
    if volumeNode is None:
        raise InputError(_("no input volume selected"))
    if not volumeNode.IsA("vtkMRMLScalarVolumeNode") or volumeNode.IsA("vtkMRMLLabelMapVolumeNode"):
        raise InputError(_("{name}: is a {nodeClass}; need a scalar CT volume (vtkMRMLScalarVolumeNode)").format(
            name=name, nodeClass=volumeNode.GetClassName()))
    imageData = volumeNode.GetImageData()
    if imageData is None or imageData.GetNumberOfPoints() == 0:
        raise InputError(_("{name}: the volume has no voxels (empty image data)").format(name=name))
    components = imageData.GetNumberOfScalarComponents()
    if components != 1:
        raise InputError(_("{name}: {components} components per voxel; need a single-channel (grey-scale) CT volume").format(
            name=name, components=components))
    dimensions = imageData.GetDimensions()
    if min(dimensions) <= 1:
        size = " x ".join(str(d) for d in dimensions)
        raise InputError(_("{name}: a 2D image (size {size}); need a 3D CT volume with many axial slices").format(
            name=name, size=size))

    ijkToLps = LPS_FROM_RAS @ ijkToRasArray(volumeNode)
    spacing = np.linalg.norm(ijkToLps[:3, :3], axis=0)
    direction = ijkToLps[:3, :3] / spacing
    if np.abs(direction.T @ direction - np.eye(3)).max() > MAX_DIRECTION_SKEW:
        raise InputError(_("{name}: the IJK-to-RAS matrix is sheared (axes not perpendicular); resample the volume first").format(
            name=name))

    image = sitk.GetImageFromArray(np.array(slicer.util.arrayFromVolume(volumeNode), copy=True))
    image.SetSpacing(tuple(float(s) for s in spacing))
    image.SetOrigin(tuple(float(v) for v in ijkToLps[:3, 3]))
    image.SetDirection(tuple(float(v) for v in direction.ravel()))
    return image


def imageToVolumeNode(image: sitk.Image, scene: Any, name: str) -> Any:
    """Add a scalar volume node holding ``image`` (voxels and physical geometry) to ``scene``.

    The inverse of :func:`volumeNodeToImage`; the batch script loads scans with it. Raises
    :class:`InputError` for images that are not 3D scalar.
    """
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(_("{name}: a {dimension}D image with {components} components per voxel; need one 3D "
                           "single-channel CT volume").format(
            name=name, dimension=image.GetDimension(), components=image.GetNumberOfComponentsPerPixel()))
    array = sitk.GetArrayViewFromImage(image)
    imageData = vtk.vtkImageData()
    imageData.SetDimensions(*image.GetSize())
    imageData.AllocateScalars(numpy_support.get_vtk_array_type(array.dtype), 1)
    numpy_support.vtk_to_numpy(imageData.GetPointData().GetScalars())[:] = array.ravel()
    ijkToLps = np.eye(4)
    ijkToLps[:3, :3] = np.asarray(image.GetDirection(), dtype=float).reshape(3, 3) @ np.diag(image.GetSpacing())
    ijkToLps[:3, 3] = image.GetOrigin()
    ijkToRas = vtk.vtkMatrix4x4()
    slicer.util.updateVTKMatrixFromArray(ijkToRas, LPS_FROM_RAS @ ijkToLps)  # the flip is its own inverse

    volumeNode = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", scene.GenerateUniqueName(name))
    volumeNode.SetIJKToRASMatrix(ijkToRas)
    volumeNode.SetAndObserveImageData(imageData)
    volumeNode.CreateDefaultDisplayNodes()
    return volumeNode


def ijkToRasArray(volumeNode: Any) -> np.ndarray:
    """The node's IJK-to-RAS matrix as a 4x4 numpy array."""
    matrix = vtk.vtkMatrix4x4()
    volumeNode.GetIJKToRASMatrix(matrix)
    return slicer.util.arrayFromVTKMatrix(matrix)
