"""Token-importance compression of K (the LLMLingua family, token level).

A small causal LM reads the text; each token's self-information -log p(token | prefix)
says how much it tells the model that the model could not guess. The most informative
fraction r of the tokens is kept, in its original order, and decoded back to text.
Ties keep the earlier token. r = 1 returns the text untouched without scoring; r = 0
returns "".

The scorer is a small protocol so the selection can be pinned with known
probabilities; `CausalLMScorer` is the real one over any Hugging Face causal LM dir
(by default the student as trained so far, i.e. the previous curriculum stage).
`compress_column` runs it as a Ray Data stage over an actor pool, one model per actor.
"""
from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import pyarrow as pa

ACTOR_START_TIMEOUT_S = 600


class TokenScorer(Protocol):
    def encode(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each text, no special tokens."""

    def self_information(self, token_ids: Sequence[Sequence[int]]) -> list[np.ndarray]:
        """-log p(token_i | tokens before i) for every token of every sequence."""

    def decode(self, token_ids: Sequence[int]) -> str:
        """Text of a (possibly gappy) token sequence."""


@dataclass(frozen=True)
class Compressed:
    text: str
    tokens: int  # tokens of the input under the scorer's tokenizer
    kept: int  # tokens kept


def check_ratio(ratio: float) -> float:
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or math.isnan(ratio) or not 0 <= ratio <= 1:
        raise ValueError(f"keep ratio must be a number in [0, 1], got {ratio!r}")
    return float(ratio)


def keep_count(num_tokens: int, ratio: float) -> int:
    """round(r * n), halves up, so the achieved ratio is as close to r as integers allow."""
    return min(num_tokens, math.floor(check_ratio(ratio) * num_tokens + 0.5))


def keep_indices(information: np.ndarray, ratio: float) -> np.ndarray:
    """Positions of the most informative round(r * n) tokens, in their original order."""
    info = np.asarray(information, dtype=np.float64)
    n = keep_count(len(info), ratio)
    # A stable sort on -info: among equally informative tokens the earlier one stays.
    chosen = np.argsort(-info, kind="stable")[:n]
    return np.sort(chosen)


def compress(texts: Sequence[str], ratio: float, scorer: TokenScorer | None) -> list[Compressed]:
    """Each text cut to the informative fraction `ratio` of its tokens (see module doc)."""
    ratio = check_ratio(ratio)
    items = list(texts)
    bad = next((i for i, t in enumerate(items) if not isinstance(t, str)), None)
    if bad is not None:
        raise ValueError(f"compress: item {bad} is {type(items[bad]).__name__}, expected text")
    if ratio == 1:
        return [Compressed(t, -1, -1) for t in items]  # untouched, never tokenised
    if ratio == 0:
        return [Compressed("", -1, 0) for _ in items]
    if scorer is None:
        raise ValueError(f"compress: keep ratio {ratio} needs a scorer")
    ids = scorer.encode(items)
    if len(ids) != len(items):
        raise ValueError(f"compress: the scorer encoded {len(ids)} of {len(items)} texts")
    todo = [i for i, seq in enumerate(ids) if keep_count(len(seq), ratio) < len(seq)]
    infos = dict(zip(todo, scorer.self_information([ids[i] for i in todo]))) if todo else {}
    out = []
    for i, seq in enumerate(ids):
        if i not in infos:
            out.append(Compressed(items[i], len(seq), len(seq)))
            continue
        info = np.asarray(infos[i])
        if info.shape != (len(seq),):
            raise ValueError(f"compress: the scorer gave {info.shape} scores for {len(seq)} tokens")
        keep = keep_indices(info, ratio)
        out.append(Compressed(scorer.decode([seq[j] for j in keep]).strip(), len(seq), len(keep)))
    return out


def compress_texts(texts: Sequence[str], ratio: float, scorer: TokenScorer | None) -> list[str]:
    return [c.text for c in compress(texts, ratio, scorer)]


class CausalLMScorer:
    """Self-information under a Hugging Face causal LM, scored in padded batches on CPU.

    The first token is scored after the tokenizer's BOS (else EOS) so it has a context
    like the others; a text longer than the model's positions is scored in windows,
    each starting afresh after that context token.
    """

    def __init__(self, model_dir: str, *, batch_size: int = 16, max_length: int | None = None):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if not os.path.isfile(os.path.join(model_dir, "config.json")):
            raise ValueError(f"compressor model {model_dir!r} is not a saved Hugging Face model dir (no config.json)")
        if batch_size < 1:
            raise ValueError(f"compressor batch_size must be >= 1, got {batch_size}")
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        self.batch_size = batch_size
        tok = self.tokenizer
        self.context_id = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else (self.context_id or 0)
        positions = getattr(self.model.config, "max_position_embeddings", None) or 1024
        limit = min(positions, max_length) if max_length else positions
        self.window = limit - (1 if self.context_id is not None else 0)
        if self.window < 1:
            raise ValueError(f"compressor model {model_dir!r}: {limit} positions leave no room to score a token")

    def encode(self, texts: Sequence[str]) -> list[list[int]]:
        if not texts:
            return []
        return [list(ids) for ids in self.tokenizer(list(texts), add_special_tokens=False)["input_ids"]]

    def decode(self, token_ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(token_ids), skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def self_information(self, token_ids: Sequence[Sequence[int]]) -> list[np.ndarray]:
        import torch

        out = [np.zeros(len(seq), dtype=np.float64) for seq in token_ids]
        pieces = [(i, s, list(seq[s : s + self.window])) for i, seq in enumerate(token_ids)
                  for s in range(0, len(seq), self.window)]
        pieces.sort(key=lambda p: len(p[2]))  # similar lengths per batch: little padding
        prefix = [self.context_id] if self.context_id is not None else []
        with torch.no_grad():
            for b in range(0, len(pieces), self.batch_size):
                batch = pieces[b : b + self.batch_size]
                width = len(prefix) + max(len(p[2]) for p in batch)
                ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
                mask = torch.zeros((len(batch), width), dtype=torch.long)
                for r, (_, _, piece) in enumerate(batch):
                    row = prefix + piece
                    ids[r, : len(row)] = torch.tensor(row)
                    mask[r, : len(row)] = 1
                logp = torch.log_softmax(self.model(input_ids=ids, attention_mask=mask).logits.float(), dim=-1)
                # logits at position j predict token j + 1
                info = -logp[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1).double().numpy()
                for r, (i, start, piece) in enumerate(batch):
                    n = len(piece)
                    if prefix:
                        out[i][start : start + n] = info[r, :n]
                    else:
                        # Nothing predicts a window's first token: it is kept as maximally informative.
                        out[i][start] = np.inf
                        out[i][start + 1 : start + n] = info[r, : n - 1]
        return out


class CompressColumn:
    """Ray Data UDF: `column` compressed to `ratio` into `out_column`, with token counts."""

    def __init__(self, model_dir: str, ratio: float, column: str, out_column: str, batch_size: int, threads: int):
        import torch

        torch.set_num_threads(max(1, threads))  # its share of the node, not every core
        self.scorer = CausalLMScorer(model_dir, batch_size=batch_size)
        self.ratio, self.column, self.out_column = ratio, column, out_column

    def __call__(self, batch: pa.Table) -> pa.Table:
        texts = _texts(batch, self.column)
        results = compress(texts, self.ratio, self.scorer)
        batch = _put(batch, self.out_column, pa.array([c.text for c in results], type=pa.string()))
        batch = _put(batch, f"{self.out_column}_tokens", pa.array([c.tokens for c in results], type=pa.int64()))
        return _put(batch, f"{self.out_column}_kept", pa.array([c.kept for c in results], type=pa.int64()))


# Arrow batches, not numpy: other columns may hold ragged lists, which numpy batches
# turn into object arrays that Ray Data can only pickle on the way back.
def _texts(batch: pa.Table, column: str) -> list[str]:
    if column not in batch.column_names:
        raise ValueError(f"compression stage: no column {column!r} (columns: {batch.column_names})")
    return ["" if t is None else str(t) for t in batch.column(column).to_pylist()]


def _put(batch: pa.Table, name: str, values: pa.Array) -> pa.Table:
    if name in batch.column_names:
        return batch.set_column(batch.column_names.index(name), name, values)
    return batch.append_column(name, values)


def _unchanged(batch: pa.Table, column: str, out_column: str, empty: bool) -> pa.Table:
    texts = _texts(batch, column)
    return _put(batch, out_column, pa.array(["" if empty else t for t in texts], type=pa.string()))


def compress_column(
    ds,
    column: str,
    ratio: float,
    *,
    model_dir: str | None,
    actors: int = 1,
    cpus: float = 0.5,
    out_column: str | None = None,
    batch_size: int = 64,
):
    """`ds` with `out_column` (default: `column`) holding `column` compressed to `ratio`.

    0 < r < 1 scores on a pool of `actors` actors of `cpus` CPUs each and also adds
    `<out>_tokens` / `<out>_kept` counts; r = 1 and r = 0 need no model and run as plain
    tasks. Fractional CPUs: an actor holding a whole CPU on a 2-CPU node starves the
    read tasks that feed it, and the pool hangs.
    """
    import ray

    ratio = check_ratio(ratio)
    out_column = out_column or column
    if actors < 1 or cpus <= 0:
        raise ValueError(f"compression stage: needs actors >= 1 and cpus > 0, got {actors} actors of {cpus} CPUs")
    if ratio in (0.0, 1.0):
        return ds.map_batches(_unchanged, fn_kwargs={"column": column, "out_column": out_column, "empty": ratio == 0},
                              batch_format="pyarrow")
    if not model_dir or not os.path.isfile(os.path.join(model_dir, "config.json")):
        raise ValueError(f"compression stage: keep ratio {ratio} needs a saved causal LM dir, got {model_dir!r}")
    out = ds.map_batches(
        CompressColumn,
        fn_constructor_kwargs={"model_dir": model_dir, "ratio": ratio, "column": column, "out_column": out_column,
                               "batch_size": 16, "threads": max(1, round(cpus))},
        batch_size=batch_size,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=actors),
        num_cpus=cpus,
    )
    out.context.wait_for_min_actors_s = ACTOR_START_TIMEOUT_S
    return out
