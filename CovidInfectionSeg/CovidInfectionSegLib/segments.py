"""The output segments: label value, name, colour and terminology, defined once.

The training export writes :data:`SEGMENTS` into every model manifest, the engine reads them back
from the manifest (:class:`SegmentInfo`), the ``.seg.nrrd`` writer and the Slicer module turn their
terminology into 3D Slicer's ``TerminologyEntry`` tag with :func:`slicer_terminology` and
:func:`terminology_entry`.

Terminology is coded so that the terminology lists 3D Slicer loads by default (5.6 to current)
resolve every code: the lungs are *Anatomical Structure / Lung* with the laterality modifier *Right*
or *Left*, as in the "3D Slicer General Anatomy list"; the infection is *Morphologically Altered
Structure / Inflammation* in the anatomic region *Lung*, from the "DICOM master list" (the General
Anatomy list has no infection or inflammation type). Code triplets are ``[coding scheme, code value,
code meaning]``; SCT is SNOMED CT.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

GENERAL_ANATOMY_CONTEXT = "Segmentation category and type - 3D Slicer General Anatomy list"
DICOM_MASTER_CONTEXT = "Segmentation category and type - DICOM master list"
ANATOMIC_CONTEXT = "Anatomic codes - DICOM master list"

ANATOMICAL_STRUCTURE = ["SCT", "123037004", "Anatomical Structure"]
MORPHOLOGICALLY_ALTERED_STRUCTURE = ["SCT", "49755003", "Morphologically Altered Structure"]
LUNG = ["SCT", "39607008", "Lung"]
RIGHT = ["SCT", "24028007", "Right"]
LEFT = ["SCT", "7771000", "Left"]
INFLAMMATION = ["SCT", "23583003", "Inflammation"]

# What the post-processed labelmap holds; colours from Slicer's GenericAnatomyColors.
SEGMENTS: list[dict[str, Any]] = [
    {
        "value": 1, "name": "Right lung", "color": [128, 174, 128], "source_label": 1,
        "terminology": {"context": GENERAL_ANATOMY_CONTEXT, "category": ANATOMICAL_STRUCTURE, "type": LUNG,
                        "type_modifier": RIGHT},
    },
    {
        "value": 2, "name": "Left lung", "color": [241, 214, 145], "source_label": 1,
        "terminology": {"context": GENERAL_ANATOMY_CONTEXT, "category": ANATOMICAL_STRUCTURE, "type": LUNG,
                        "type_modifier": LEFT},
    },
    {
        "value": 3, "name": "Infection", "color": [216, 101, 79], "source_label": 2,
        "terminology": {"context": DICOM_MASTER_CONTEXT, "category": MORPHOLOGICALLY_ALTERED_STRUCTURE,
                        "type": INFLAMMATION, "anatomic_context": ANATOMIC_CONTEXT, "anatomic_region": LUNG},
    },
]

@dataclass(frozen=True)
class SegmentInfo:
    """One output segment of the post-processed labelmap (value 1 Right lung, 2 Left lung, 3 Infection)."""

    value: int
    name: str
    color: tuple[int, int, int]
    terminology: dict[str, Any] = field(default_factory=dict)

    @property
    def color_float(self) -> tuple[float, float, float]:
        """The colour as 0..1 floats (what Slicer's segment colours use)."""
        return tuple(channel / 255.0 for channel in self.color)  # type: ignore[return-value]

    @property
    def segment_id(self) -> str:
        """Stable segment ID from the name ("Right lung" -> "Right_lung"), as in the ``.seg.nrrd``."""
        return self.name.replace(" ", "_")

    def to_dict(self) -> dict[str, Any]:
        return {"value": self.value, "name": self.name, "color": list(self.color), "terminology": self.terminology}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "SegmentInfo":
        return cls(int(data["value"]), str(data["name"]), tuple(int(c) for c in data["color"]),  # type: ignore[arg-type]
                   dict(data.get("terminology") or {}))


def _contexts(terminology: Mapping[str, Any]) -> tuple[str, str]:
    """(category/type context, anatomic context); manifests before the ``context`` keys used the
    General Anatomy list and, with an anatomic region, the DICOM anatomic list."""
    context = str(terminology.get("context") or GENERAL_ANATOMY_CONTEXT)
    has_region = bool(terminology.get("anatomic_region"))
    anatomic = str(terminology.get("anatomic_context") or (ANATOMIC_CONTEXT if has_region else ""))
    return context, anatomic


def slicer_terminology(terminology: Mapping[str, Any]) -> dict[str, Any]:
    """Manifest terminology -> slicerio's terminology dictionary (what it writes as the TerminologyEntry tag)."""
    context, anatomic = _contexts(terminology)
    entry: dict[str, Any] = {"contextName": context, "category": list(terminology["category"]),
                             "type": list(terminology["type"])}
    if terminology.get("type_modifier"):
        entry["typeModifier"] = list(terminology["type_modifier"])
    if anatomic:
        entry["anatomicContextName"] = anatomic
    if terminology.get("anatomic_region"):
        entry["anatomicRegion"] = list(terminology["anatomic_region"])
    if terminology.get("anatomic_region_modifier"):
        entry["anatomicRegionModifier"] = list(terminology["anatomic_region_modifier"])
    return entry


def terminology_entry(terminology: Mapping[str, Any]) -> str:
    """Manifest terminology -> the serialized string of Slicer's ``TerminologyEntry`` segment tag.

    The format of ``vtkSlicerTerminologiesModuleLogic::SerializeTerminologyEntry``, unchanged from
    Slicer 5.6 to current: ``context~category~type~typeModifier~anatomicContext~region~regionModifier``,
    each code as ``scheme^value^meaning`` (empty codes as ``^^``).
    """
    context, anatomic = _contexts(terminology)

    def code(key: str) -> str:
        triplet: Sequence[str] = terminology.get(key) or ("", "", "")
        return "^".join(str(part) for part in triplet)

    return "~".join([context, code("category"), code("type"), code("type_modifier"), anatomic,
                     code("anatomic_region"), code("anatomic_region_modifier")])

