"""The engine: shared training types, the one loop, checkpoints, distributed runs, schedule, metrics
log and trackers. It knows no recipe: objectives and batch sources are plugged in (types.py)."""
