"""Table 5: the cost-aware exponent α of the value score ``(F/T)^α · V`` (see :mod:`.grid`)."""

from .grid import Grid, grid_artefact

GRID = Grid(5, "alpha", "α", "alphas", "Table 5: the cost-aware exponent α")
ARTEFACT = grid_artefact(GRID, 50)
