"""Table 6: the final keep-ratio ρ (see :mod:`.grid`)."""

from .grid import Grid, grid_artefact

GRID = Grid(6, "rho", "ρ", "rhos", "Table 6: the final keep-ratio ρ")
ARTEFACT = grid_artefact(GRID, 60)
