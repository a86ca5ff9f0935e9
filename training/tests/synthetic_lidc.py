"""Write small LIDC read messages (the XML of the LIDC-IDRI nodule reads) for tests."""

from __future__ import annotations

from pathlib import Path

HEADER = ('<?xml version="1.0" encoding="UTF-8"?>\n'
          '<LidcReadMessage uid="1.2.3" xmlns="http://www.nih.gov" '
          'xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance">\n'
          '<ResponseHeader><Version>1.8.1</Version></ResponseHeader>\n')


def square(x0: int, y0: int, x1: int, y1: int) -> list[tuple[int, int]]:
    """The boundary pixels of the square [x0, x1] x [y0, y1], in order around it."""
    top = [(x, y0) for x in range(x0, x1 + 1)]
    right = [(x1, y) for y in range(y0 + 1, y1 + 1)]
    bottom = [(x, y1) for x in range(x1 - 1, x0 - 1, -1)]
    left = [(x0, y) for y in range(y1 - 1, y0, -1)]
    return top + right + bottom + left


def roi(z_mm: float, points: list[tuple[int, int]], inclusion: bool = True) -> str:
    edges = "".join(f"<edgeMap><xCoord>{x}</xCoord><yCoord>{y}</yCoord></edgeMap>" for x, y in points)
    return (f"<roi><imageZposition>{z_mm:.6f} </imageZposition><imageSOP_UID>1.2.{round(abs(z_mm) * 10)}"
            f"</imageSOP_UID><inclusion>{'TRUE' if inclusion else 'FALSE'}</inclusion>{edges}</roi>")


def nodule(nodule_id: str, rois: list[str]) -> str:
    return f"<unblindedReadNodule><noduleID>{nodule_id}</noduleID>{''.join(rois)}</unblindedReadNodule>"


def non_nodule(z_mm: float, x: int, y: int) -> str:
    return (f"<nonNodule><nonNoduleID>n1</nonNoduleID><imageZposition>{z_mm}</imageZposition>"
            f"<locus><xCoord>{x}</xCoord><yCoord>{y}</yCoord></locus></nonNodule>")


def write_read_message(path: Path, sessions: list[list[str]]) -> Path:
    """An LIDC XML with one readingSession per list of nodule / non-nodule elements."""
    body = "".join(f"<readingSession><servicingRadiologistID>{index}</servicingRadiologistID>{''.join(items)}"
                   "</readingSession>\n" for index, items in enumerate(sessions))
    path.write_text(HEADER + body + "</LidcReadMessage>\n")
    return path
