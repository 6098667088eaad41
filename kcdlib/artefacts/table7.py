"""Table 7: knowledge augmentation variants, what happens to the points below the cut (see :mod:`.grid`)."""

from .grid import Grid, grid_artefact

GRID = Grid(7, "augment", "augmentation", "augments", "Table 7: knowledge augmentation variants")
ARTEFACT = grid_artefact(GRID, 70)
