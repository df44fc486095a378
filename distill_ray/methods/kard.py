"""KARD: knowledge retrieved for the question goes into the prompt, in training and at inference.

The knowledge base is the teacher's K for the training questions (`knowledge` need).
Retrieval embeds the question and searches the K texts (LanceDB vector search, top
`method.kard.top_k`). A training question never retrieves its own K: that K was written
from the gold answer, and a test question has no such entry, so training would teach
the student to copy an answer it never gets at inference.
"""
from __future__ import annotations

import numpy as np

from ..tasks.record import Example
from .recipe import MethodContext, Recipe, TrainRow, question_prompt

KNOWLEDGE_HEADER = "Knowledge:"


def knowledge_prompt(question: str, entries: list[str]) -> str:
    lines = [KNOWLEDGE_HEADER, *(f"- {e}" for e in entries)] if entries else []
    return "\n".join([*lines, question_prompt(question)])


def _question_vectors(examples: list[Example], ctx: MethodContext) -> np.ndarray:
    from ..knowledge.embed import embed_texts

    # The training questions were embedded by the knowledge stage already: served from its cache.
    return embed_texts([ex.question for ex in examples], ctx.cfg.knowledge.embedding_model,
                       batch_size=ctx.cfg.knowledge.batch_size, cache=ctx.cfg.lancedb_uri)


def retrieve(examples: list[Example], ctx: MethodContext, *, exclude_self: bool) -> dict[str, list[str]]:
    """Example id -> the top-k knowledge texts for its question, nearest first."""
    from ..knowledge.search import nearest_neighbours

    if not examples:
        return {}
    hits = nearest_neighbours(
        ctx.cfg.lancedb_uri, ctx.tables["knowledge"], _question_vectors(examples, ctx), ctx.cfg.method.kard.top_k,
        vector_column="vector", columns=["text"],
        exclude_ids=[{ex.id} if exclude_self else set() for ex in examples],
    )
    return {ex.id: [h["text"] for h in rows] for ex, rows in zip(examples, hits)}


def train_rows(examples: list[Example], ctx: MethodContext) -> list[TrainRow]:
    kept = ctx.teacher["rationales"]
    chosen = [ex for ex in examples if ex.id in kept]
    found = retrieve(chosen, ctx, exclude_self=True)
    return [TrainRow(knowledge_prompt(ex.question, found[ex.id]), " " + kept[ex.id]["rationale"]) for ex in chosen]


def annotate(examples: list[Example], ctx: MethodContext) -> dict[str, dict]:
    return {i: {"knowledge": texts} for i, texts in retrieve(examples, ctx, exclude_self=False).items()}


def prompt(ex: Example, extras: dict) -> str:
    return knowledge_prompt(ex.question, extras.get("knowledge", []))


RECIPE = Recipe(
    name="kard",
    needs=("rationales", "knowledge"),
    train_rows=train_rows,
    prompt=prompt,
    annotate=annotate,
    description="retrieved knowledge + question -> rationale + answer (knowledge in every prompt)",
)
