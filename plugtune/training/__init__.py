"""Training, in layers: compute/ (log-probs, prompt trees, losses, reference) -> engine/ (types, the
one loop, checkpoints, distributed) -> recipes/ (sft, multitask, reward model, dpo, ppo, grpo) ->
run.py (config -> recipe -> engine -> published artefact). See ARCHITECTURE.md.

Nothing is imported here, so that importing a lower layer never loads a higher one."""
