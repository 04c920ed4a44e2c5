"""Verifiable instructions: the checkers (checkers.py) and the prompts they check, in train.jsonl / test.jsonl."""
