"""Table 5: the cost-aware exponent α of the value score ``(F/T)^α · V`` (see :mod:`.grid`)."""

from .declare import Field
from .grid import Grid, grid_artefact

# The settings of the supplement's Table 5; the tiny profile runs one.
ALPHAS = Field("alphas", (0.01, 0.03, 0.05, 0.1), {"tiny": (0.03,)})
GRID = Grid(5, "cost_exponent", "α", ALPHAS, "Table 5: the cost-aware exponent α")
ARTEFACT = grid_artefact(GRID, 50)
