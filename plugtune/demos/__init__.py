"""The demos: one skill (skill.py), skills on one base with routing (skills.py), alignment (align.py)."""
