__version__ = "0.1.0"

# Bumped by every change that changes what a run computes (a loss, an initialisation, the data order, a schedule):
# it is part of every run's identity, so a record made by other numerics is never reused as if it were this code's.
NUMERICS_VERSION = 2
