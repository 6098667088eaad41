"""Table 7: knowledge augmentation variants, what happens to the points below the cut (see :mod:`.grid`)."""

from .declare import Field
from .grid import Grid, grid_artefact

# The settings of the supplement's Table 7; the tiny profile runs one.
AUGMENTS = Field("augments", ("none", "random", "K1H", "K1L"), {"tiny": ("K1L",)})
GRID = Grid(7, "augment", "augmentation", AUGMENTS, "Table 7: knowledge augmentation variants")
ARTEFACT = grid_artefact(GRID, 70)
