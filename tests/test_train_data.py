"""Batching and encoding for the trainer: pure functions, no Ray, no DeepSpeed."""
from __future__ import annotations


import numpy as np
import pytest

from distill_ray.train.data import (
    IGNORE_INDEX,
    BatchPlan,
    Batcher,
    canonical_order,
    collate,
    encode_rows,
    padding_ratio,
    planned_steps,
    validate_rows,
)
from distill_ray.train.student import train_tokenizer
from rows import arithmetic_rows


@pytest.fixture(scope="module")
def tokenizer():
    rows = arithmetic_rows(300)
    return train_tokenizer([t for r in rows for t in (r["prompt"], r["target"])], vocab_size=320)


def test_labels_mask_prompt_and_padding_exactly(tokenizer):
    rows = validate_rows(arithmetic_rows(6) + [{"prompt": "Q: 1 + 1 ?", "target": " 2", "weight": 0.3}])
    encoded, truncated = encode_rows(tokenizer, rows, max_len=128)
    assert truncated == 0
    batch = collate(encoded, tokenizer.pad_token_id)
    ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"]
    for i, (row, enc) in enumerate(zip(rows, encoded)):
        prompt_ids = tokenizer(row["prompt"])["input_ids"]
        target_ids = tokenizer(row["target"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        n = len(prompt_ids) + len(target_ids)
        assert ids[i, :n].tolist() == prompt_ids + target_ids
        assert labels[i, : len(prompt_ids)].eq(IGNORE_INDEX).all()  # prompt: no loss
        assert labels[i, len(prompt_ids) : n].tolist() == target_ids  # target: all of it, EOS included
        assert labels[i, n:].eq(IGNORE_INDEX).all() and mask[i, n:].eq(0).all()  # padding
        assert mask[i, :n].eq(1).all()
    assert batch["weights"].tolist()[-1] == pytest.approx(0.3)


def test_long_targets_are_cut_and_long_prompts_rejected(tokenizer):
    row = {"prompt": "Question: 3 * 4 = ?\nAnswer:", "target": " 3 * 4 = 12 ." * 20, "weight": 1.0}
    (enc,), truncated = encode_rows(tokenizer, [row], max_len=24)
    assert truncated == 1 and len(enc.input_ids) == 24 and enc.prompt_len < 24
    with pytest.raises(ValueError, match="max_seq_len=8"):
        encode_rows(tokenizer, [row], max_len=8)


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"prompt": "q"}, "row 1: 'target' must be a string"),
        ({"prompt": "q", "target": ""}, "row 1: 'target' is empty"),
        ({"prompt": "q", "target": "a", "weight": -1}, "row 1: 'weight'"),
        ({"prompt": 3, "target": "a"}, "row 1: 'prompt' must be a string"),
    ],
)
def test_bad_rows_are_named(bad, message):
    with pytest.raises(ValueError, match=message):
        validate_rows([{"prompt": "q", "target": "a"}, bad])


def test_bucketing_keeps_padding_low():
    rng = np.random.default_rng(0)
    lengths = rng.integers(10, 101, size=2048).tolist()
    plan = BatchPlan(num_examples=2048, global_batch_size=32, world_size=2, micro_batch_size=8)
    batcher = Batcher(plan, lengths)
    steps = planned_steps(2048, 32, epochs=1.0, max_steps=None)
    micro = [mb for s in range(steps) for r in range(2) for mb in batcher.micro_batches(s, r)]
    bucketed = padding_ratio(micro, lengths)
    random_batches = np.array_split(rng.permutation(2048), 2048 // 8)
    unbucketed = padding_ratio(random_batches, lengths)
    assert bucketed < 0.05, bucketed  # measured 0.022
    assert unbucketed > 0.3, unbucketed  # measured 0.38: the waste bucketing removes


@pytest.mark.parametrize("world, micro", [(2, 4), (4, 2), (1, 16)])
def test_every_row_once_per_epoch_and_equal_batches_per_rank(world, micro):
    n, batch = 640, 32
    lengths = np.random.default_rng(1).integers(5, 60, size=n).tolist()
    plan = BatchPlan(num_examples=n, global_batch_size=batch, world_size=world, micro_batch_size=micro, seed=3)
    batcher = Batcher(plan, lengths)
    steps_per_epoch = n // batch
    for epoch in range(2):
        seen = []
        for s in range(epoch * steps_per_epoch, (epoch + 1) * steps_per_epoch):
            per_rank = [batcher.micro_batches(s, r) for r in range(world)]
            assert {len(mbs) for mbs in per_rank} == {plan.grad_accum}
            assert {len(mb) for mbs in per_rank for mb in mbs} == {micro}
            seen += [int(i) for mbs in per_rank for mb in mbs for i in mb]
        assert sorted(seen) == list(range(n))


def test_order_is_deterministic_and_random_access():
    lengths = list(range(1, 301))
    plan = BatchPlan(num_examples=300, global_batch_size=12, world_size=2, micro_batch_size=3, seed=7)
    a, b = Batcher(plan, lengths), Batcher(plan, lengths)
    forward = [a.global_batch(s).tolist() for s in range(60)]
    # A resumed run jumps straight to step 40 and must see what an uninterrupted one saw.
    assert [b.global_batch(s).tolist() for s in range(40, 60)] == forward[40:]
    other = Batcher(BatchPlan(300, 12, 2, 3, seed=8), lengths)
    assert [other.global_batch(s).tolist() for s in range(60)] != forward
    # Steps 25 onwards run into epoch 2 (300 rows / 12 = 25 steps per epoch).
    assert sorted(i for s in range(25, 50) for i in forward[s]) == list(range(300))


def test_canonical_order_ignores_input_order():
    rows = validate_rows(arithmetic_rows(50))
    shuffled = rows[::-1]
    assert canonical_order(rows) == canonical_order(shuffled)


def test_batch_plan_rejects_indivisible_batches():
    with pytest.raises(ValueError, match="batch_size=30 must be a multiple of num_workers \\(4\\)"):
        BatchPlan(num_examples=100, global_batch_size=30, world_size=4, micro_batch_size=2)
    with pytest.raises(ValueError, match="training data is empty"):
        BatchPlan(num_examples=0, global_batch_size=32, world_size=2, micro_batch_size=4)
