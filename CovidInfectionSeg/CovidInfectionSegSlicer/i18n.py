"""``tr``, imported as ``_``, for the texts this package shows users.

In 3D Slicer it is ``slicer.i18n.tr``, which finds the translation context from the calling file
(``CovidInfectionSegSlicer.volumes``), so it is imported here and not wrapped. Without the application
(``slicer-core`` in the tests, ``PythonSlicer``, plain Python) the text is returned as written.
Translatable texts are constants, filled in afterwards: ``_("{name}: no voxels").format(name=name)``.
"""

try:
    from slicer import app  # slicer.i18n.tr translates through the application: without it, fall back
    from slicer.i18n import tr
except ImportError:

    def tr(text: str) -> str:
        return text

else:
    del app
