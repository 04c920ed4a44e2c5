"""The demo skills: generator (generate.py) and the JSONL files it wrote, beside it."""
