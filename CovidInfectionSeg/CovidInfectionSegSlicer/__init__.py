"""3D Slicer side of CovidInfectionSeg: MRML, the engine child process, Python packages.

Not part of the engine package that ``pip install`` ships: everything here needs ``slicer`` (the
application or the ``slicer-core`` package), except ``engine_process`` and ``dependencies``, which are
plain Python.
"""
