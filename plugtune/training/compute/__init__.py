"""Pure computation the recipes share: log-probabilities of labelled tokens, prompt trees (one
forward for rows that share a prompt), the losses (pure functions of log-probs) and the reference
policy. Nothing here runs a training step."""
