"""`plugtune compare`: the same base and data, one budget, every technique; a measured trade-off table.
config.py reads the compare config, runner.py runs the methods, report.py writes the report."""
from plugtune.compare.runner import run_compare

__all__ = ["run_compare"]
