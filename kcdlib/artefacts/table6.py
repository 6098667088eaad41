"""Table 6: the final keep-ratio ρ (see :mod:`.grid`)."""

from .declare import Field
from .grid import Grid, grid_artefact

# The settings of the supplement's Table 6; the tiny profile runs one.
RHOS = Field("rhos", (0.9, 0.7, 0.5, 0.3), {"tiny": (0.7,)})
GRID = Grid(6, "rho", "ρ", RHOS, "Table 6: the final keep-ratio ρ")
ARTEFACT = grid_artefact(GRID, 60)
