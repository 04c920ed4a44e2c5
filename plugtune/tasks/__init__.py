"""Shipped tasks: skill generators and their JSONL files (`plugtune:skills/...`), verifiable
instructions (prompts and checkers), and the chatterbot corpus (topics, general chat)."""
