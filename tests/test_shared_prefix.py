"""Rollout batches (one prompt, several sampled completions) run each prompt once: the tree forward of
training/compute/prompt_trees.py generalised to groups of rows equals the padded forward, values and gradients."""
import random

import pytest
import torch
from torch.testing import assert_close

from plugtune.adapters import adapter_state, attach_adapter
from plugtune.data.preference import PromptItem
from plugtune.models.tiny import build_model
from plugtune.training.compute.token_logps import token_logps
from plugtune.training.compute.prompt_trees import pack_trees, prompt_groups
from plugtune.training.recipes.rollouts import build_rollout

VOCAB = 400


def rollout_batch(seed=0):
    """3 prompts of different lengths x 3 samples, rows shuffled; two samples of a prompt share their
    first completion tokens, one sample is a single token."""
    rng = random.Random(seed)
    prompts = [[rng.randrange(5, VOCAB) for _ in range(n)] for n in (7, 4, 11)]
    rows = []
    for p in prompts:
        shared = [rng.randrange(5, VOCAB) for _ in range(2)]
        rows += [(p, shared + [rng.randrange(5, VOCAB) for _ in range(3)]),
                 (p, shared + [rng.randrange(5, VOCAB)]),
                 (p, [rng.randrange(5, VOCAB)])]
    rng.shuffle(rows)
    batch = build_rollout([PromptItem(p) for p, _ in rows], [c for _, c in rows], pad_id=0)
    return batch, rows


def policy(arch, impl):
    model = build_model(arch, VOCAB, seed=0)
    model.config._attn_implementation = impl
    torch.manual_seed(1)
    attach_adapter(model, "lora", {"r": 4, "alpha": 8})
    with torch.no_grad():
        for name, p in adapter_state(model, "default").items():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    return model


def test_prompt_groups_collects_the_rows_of_each_prompt():
    batch, rows = rollout_batch()
    groups = prompt_groups(batch["input_ids"], batch["labels"])
    assert sorted(len(g) for g in groups) == [3, 3, 3]
    for g in groups:
        assert len({tuple(rows[r][0]) for r in g}) == 1
    packed = pack_trees(batch["input_ids"], batch["attention_mask"], groups)
    real = int(batch["attention_mask"].sum())
    prompts = sum(len(p) for p in {tuple(p) for p, _ in rows})
    # each group: its common prefix (the prompt: the third sample starts differently) once, then each
    # sample's rest (the two samples' common first tokens are not shared: only the whole group's prefix is)
    assert int((packed.index[batch["attention_mask"].bool()]).unique().numel()) == real - 2 * prompts
    with pytest.raises(ValueError, match="cover each of the 9 rows exactly once"):
        pack_trees(batch["input_ids"], batch["attention_mask"], groups[:2])


@pytest.mark.parametrize("arch,impl", [("llama", "sdpa"), ("llama", "eager"), ("gpt2", "sdpa")])
def test_shared_prompt_forward_equals_the_padded_forward(arch, impl):
    batch, _ = rollout_batch()
    results = []
    for share in (True, False):
        model = policy(arch, impl)
        lp = token_logps(model, batch, temperature=0.7, share_prefixes=share)
        (lp.per_token.sum() + lp.hidden[batch["attention_mask"].bool()].pow(2).mean()).backward()
        real = lp.hidden[batch["attention_mask"].bool()]
        results.append((lp.per_token, lp.mask, real, {n: p.grad for n, p in adapter_state(model, "default").items()}))
    (a, mask_a, ha, ga), (b, mask_b, hb, gb) = results
    assert torch.equal(mask_a, mask_b) and int(mask_a.sum()) == 9 + 3 * 4 + 3 * 1 + 3 * 1  # completion tokens
    assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert_close(ha, hb, rtol=1e-5, atol=1e-5)
    for name in ga:
        assert_close(ga[name], gb[name], rtol=1e-4, atol=1e-6, msg=name)
