"""CovidInfectionSeg engine: CT volume in, lung and COVID-19 infection labels and measurements out.

Imports neither Slicer nor Qt, so the Slicer module, the ``covidseg`` CLI and ``training/`` share it.
"""
