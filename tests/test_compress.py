"""The K compressor: the selection rule under known probabilities, the real causal-LM
scorer against an unbatched forward pass, achieved keep-ratios on real K texts, and the
Ray Data actor-pool stage."""
from __future__ import annotations

import math

import numpy as np
import pytest
import ray
import torch

from distill_ray.curriculum.compress import (
    CausalLMScorer, compress, compress_column, compress_texts, keep_count, keep_indices,
)
from distill_ray.tasks.synthetic import generate
from distill_ray.teacher.oracle_answers import synthetic_knowledge
from distill_ray.teacher.prompts import render_knowledge
from distill_ray.train.student import TinySpec, tiny_model, train_tokenizer

pytestmark = pytest.mark.timeout(300)


class WordScorer:
    """Words are tokens, each with a fixed probability: self-information is -log p exactly."""

    def __init__(self, probs: dict[str, float]):
        self.probs, self.words, self.ids = probs, [], {}
        self.scored = 0

    def encode(self, texts):
        out = []
        for t in texts:
            out.append([self.ids.setdefault(w, len(self.ids)) for w in t.split()])
            self.words = list(self.ids)
        return out

    def self_information(self, token_ids):
        self.scored += len(token_ids)
        return [np.array([-math.log(self.probs[self.words[i]]) for i in seq]) for seq in token_ids]

    def decode(self, token_ids):
        return " ".join(self.words[i] for i in token_ids)


PROBS = {"the": 0.9, "zorp": 0.01, "equals": 0.6, "four": 0.05, "blips": 0.02, "and": 0.8, "sum": 0.3,
         "is": 0.7, "nine": 0.05}
TEXT = "the zorp equals four blips and the sum is nine"


def test_most_informative_tokens_survive_in_order():
    scorer = WordScorer(PROBS)
    # 10 tokens, keep 5: the five least probable, in the order they were written.
    assert compress_texts([TEXT], 0.5, scorer) == ["zorp four blips sum nine"]
    # Keep 3: "four" and "nine" tie (p = 0.05); the earlier one stays.
    assert compress_texts([TEXT], 0.3, scorer) == ["zorp four blips"]
    # Counts per text, and a text too short to lose a token is not scored at all.
    before = scorer.scored
    (c,) = compress(["zorp"], 0.6, scorer)
    assert (c.text, c.tokens, c.kept) == ("zorp", 1, 1) and scorer.scored == before


def test_ratio_one_and_zero_need_no_scoring():
    class Refuses:
        def encode(self, texts):
            raise AssertionError("r = 1 and r = 0 must not tokenise")

        self_information = decode = encode

    assert compress_texts([TEXT, ""], 1.0, Refuses()) == [TEXT, ""]
    assert compress_texts([TEXT, ""], 0.0, Refuses()) == ["", ""]
    assert compress_texts([TEXT], 1.0, None) == [TEXT]


def test_keep_count_rounds_half_up_and_bad_ratios_fail():
    assert [keep_count(n, 0.5) for n in (0, 1, 2, 7)] == [0, 1, 1, 4]
    assert keep_count(10, 0.25) == 3 and keep_count(10, 0.24) == 2
    assert list(keep_indices(np.array([1.0, 5.0, 5.0, 0.5]), 0.5)) == [1, 2]
    for bad in (-0.1, 1.5, float("nan"), "0.5", True):
        with pytest.raises(ValueError, match="keep ratio must be a number in"):
            compress_texts([TEXT], bad, WordScorer(PROBS))
    with pytest.raises(ValueError, match="needs a scorer"):
        compress_texts([TEXT], 0.5, None)
    with pytest.raises(ValueError, match="item 1 is int"):
        compress_texts([TEXT, 3], 0.5, WordScorer(PROBS))


def _k_texts(n: int, seed: int) -> list[str]:
    train, _ = generate(n, 0, seed=seed)
    return [render_knowledge(*synthetic_knowledge(ex.question), inline=True) for ex in train]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    """A tiny Llama with a tokenizer trained on K texts, saved like a trained student."""
    path = tmp_path_factory.mktemp("scorer")
    tokenizer = train_tokenizer(_k_texts(200, seed=1), vocab_size=320)
    spec = TinySpec(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, max_positions=256,
                    vocab_size=320)
    model = tiny_model(tokenizer, spec, seed=3)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def _unbatched_information(scorer: CausalLMScorer, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        full = torch.tensor([[scorer.context_id, *ids]])
        logp = torch.log_softmax(scorer.model(input_ids=full).logits.float(), dim=-1)[0]
    return np.array([-float(logp[j, full[0, j + 1]]) for j in range(len(ids))])


def test_causal_lm_scorer_matches_an_unbatched_forward(model_dir):
    scorer = CausalLMScorer(model_dir, batch_size=3)
    texts = _k_texts(7, seed=2)
    ids = scorer.encode(texts)
    assert len({len(s) for s in ids}) > 1  # padded batches of mixed lengths
    for seq, info in zip(ids, scorer.self_information(ids)):
        np.testing.assert_allclose(info, _unbatched_information(scorer, seq), rtol=1e-4, atol=1e-4)
    # Longer than the window: each window is scored afresh after the context token.
    short = CausalLMScorer(model_dir, batch_size=2, max_length=17)
    seq = ids[0]
    assert len(seq) > 32
    info = short.self_information([seq])[0]
    np.testing.assert_allclose(info[:16], _unbatched_information(short, seq[:16]), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(info[16:32], _unbatched_information(short, seq[16:32]), rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="is not a saved Hugging Face model dir"):
        CausalLMScorer(str(model_dir) + "/nowhere")


def test_achieved_keep_ratio_on_real_k_texts(model_dir):
    scorer = CausalLMScorer(model_dir, batch_size=16)
    texts = _k_texts(60, seed=5)
    original = sum(len(s) for s in scorer.encode(texts))
    for r in (0.75, 0.5, 0.25):
        results = compress(texts, r, scorer)
        # As counted by the compressor: r of the tokens up to rounding per text.
        assert abs(sum(c.kept for c in results) / original - r) <= 0.01
        # Re-tokenising the returned text: pieces can merge anew, so within 5 points of r.
        retokenised = sum(len(s) for s in scorer.encode([c.text for c in results]))
        assert abs(retokenised / original - r) <= 0.05, (r, retokenised / original)
    # What is kept is what the model found more surprising than what was dropped.
    ids = scorer.encode(texts[:10])
    for seq, info in zip(ids, scorer.self_information(ids)):
        kept = keep_indices(info, 0.5)
        dropped = np.setdiff1d(np.arange(len(seq)), kept)
        assert info[kept].min() >= info[dropped].max()


def test_ray_data_stage_compresses_a_column(model_dir):
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        texts = _k_texts(40, seed=6)
        ds = ray.data.from_items([{"id": str(i), "k": t} for i, t in enumerate(texts)])
        out = compress_column(ds, "k", 0.4, model_dir=model_dir, actors=1, cpus=0.5, out_column="k_t", batch_size=16)
        rows = {r["id"]: r for r in out.take_all()}
        expected = compress(texts, 0.4, CausalLMScorer(model_dir))
        assert [rows[str(i)]["k_t"] for i in range(len(texts))] == [c.text for c in expected]
        assert [rows[str(i)]["k_t_kept"] for i in range(len(texts))] == [c.kept for c in expected]
        assert all(rows[str(i)]["k"] == t for i, t in enumerate(texts))  # the source column stays
        # r = 0 (and r = 1) need no model at all.
        assert {r["k"] for r in compress_column(ds, "k", 0.0, model_dir=None).take_all()} == {""}
        with pytest.raises(ValueError, match="needs a saved causal LM dir"):
            compress_column(ds, "k", 0.5, model_dir=None)
    finally:
        if started:
            ray.shutdown()
