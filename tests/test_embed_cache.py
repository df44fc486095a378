"""The embedding cache: LanceDB `embeddings`, keyed by (model identity, text).

Real components: LanceDB in tmp_path, the packaged all-MiniLM-L6-v2 (and altered copies
of it as "other models"), a local Ray, the oracle teacher for the stage.
"""
from __future__ import annotations

import json
import shutil
import threading

import numpy as np
import pyarrow as pa
import pytest
import ray

from distill_ray.config import Config
from distill_ray.knowledge.embed import DEFAULT_MODEL, EMBED_DIM, embed_table, embed_texts, resolve_model
from distill_ray.knowledge.embed_cache import EMBEDDINGS, EmbeddingCache, model_identity
from distill_ray.store import open_db, read_table
from distill_ray.tasks.synthetic import generate

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module", autouse=True)
def ray_runtime():
    # Ray first: LanceDB's runtime must not be running in the driver when Ray starts its processes.
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def _questions(n: int, seed: int) -> list[str]:
    return [ex.question for ex in generate(n, 0, seed=seed)[0]]


class CountingEncoder:
    """The real model, recording which texts it was asked to embed."""

    def __init__(self, model: str = DEFAULT_MODEL) -> None:
        self.model, self.calls = model, []

    def __call__(self, texts: list[str]) -> np.ndarray:
        self.calls.append(list(texts))
        return embed_texts(texts, self.model)


def _rows(uri: str) -> int:
    return read_table(open_db(uri), EMBEDDINGS).num_rows


def _model_copy(tmp_path, name: str):
    path = tmp_path / name
    shutil.copytree(resolve_model(DEFAULT_MODEL), path)
    return path


def test_hits_are_the_models_vectors_and_misses_are_embedded_once(tmp_path):
    uri = str(tmp_path / "db")
    texts = _questions(12, seed=1)
    batch = texts[:8] + texts[:3]  # three texts twice in one call
    cache, encode = EmbeddingCache(uri, DEFAULT_MODEL), CountingEncoder()

    first = cache.embed(batch, encode)
    assert encode.calls == [texts[:8]]  # each distinct text once, in first-seen order
    assert cache.stats() == {"embed_cache_hits": 0, "embed_new": 8} and _rows(uri) == 8
    assert np.array_equal(first[8:], first[:3])

    uncached = embed_texts(batch)
    second = embed_texts(batch, cache=cache)  # all hits: the model is not asked
    assert cache.stats() == {"embed_cache_hits": 11, "embed_new": 8} and _rows(uri) == 8
    assert second.dtype == np.float32 and second.shape == (11, EMBED_DIM)
    assert np.array_equal(second, first)  # stored and read back bit for bit
    assert np.allclose(second, uncached, atol=1e-6)

    # A mix: only the new texts reach the model; a fresh handle sees what the first one stored.
    later = EmbeddingCache(uri, DEFAULT_MODEL)
    mixed = later.embed(texts[6:], encode)
    assert encode.calls[1:] == [texts[8:]] and later.stats() == {"embed_cache_hits": 2, "embed_new": 4}
    assert np.allclose(mixed, embed_texts(texts[6:]), atol=1e-6) and _rows(uri) == 12


def test_another_model_never_hits(tmp_path):
    uri, texts = str(tmp_path / "db"), _questions(6, seed=2)
    minilm = EmbeddingCache(uri, DEFAULT_MODEL)
    embed_texts(texts, cache=minilm)

    # Byte-identical files elsewhere are the same model: it hits.
    same = EmbeddingCache(uri, str(_model_copy(tmp_path, "same")))
    assert same.digest == minilm.digest and same.model_id != minilm.model_id  # the label names the directory
    assert np.array_equal(embed_texts(texts, same.model, cache=same), embed_texts(texts, cache=minilm))
    assert same.stats() == {"embed_cache_hits": 6, "embed_new": 0}

    # Same weights, CLS instead of mean pooling: other vectors, so no hit.
    cls_dir = _model_copy(tmp_path, "cls")
    pooling = json.loads((cls_dir / "1_Pooling" / "config.json").read_text())
    pooling.update(pooling_mode_mean_tokens=False, pooling_mode_cls_token=True)
    (cls_dir / "1_Pooling" / "config.json").write_text(json.dumps(pooling))
    cls = EmbeddingCache(uri, str(cls_dir))
    got = embed_texts(texts, str(cls_dir), cache=cls)
    assert cls.digest != minilm.digest and cls.stats() == {"embed_cache_hits": 0, "embed_new": 6}
    assert np.allclose(got, embed_texts(texts, str(cls_dir)), atol=1e-6)
    assert not np.allclose(got, embed_texts(texts), atol=1e-3)
    assert _rows(uri) == 12

    # One weight byte changed, every file size equal: still another identity.
    tuned = _model_copy(tmp_path, "tuned")
    with open(tuned / "model.safetensors", "r+b") as fh:
        fh.seek(-1, 2)
        last = fh.read(1)
        fh.seek(-1, 2)
        fh.write(bytes([last[0] ^ 1]))
    assert model_identity(str(tuned))[0] != minilm.digest


def test_bad_cache_is_refused_with_its_name(tmp_path):
    (tmp_path / "a_file").write_text("not a database")
    for uri in (str(tmp_path / "a_file"), str(tmp_path / "a_file" / "db"), "nosuch://bucket/db"):
        with pytest.raises(ValueError, match=r"embedding cache '.*': not a usable LanceDB database"):
            embed_texts(["some text"], cache=uri)
    with pytest.raises(ValueError, match="expected a LanceDB uri or an EmbeddingCache, got ''"):
        embed_texts(["some text"], cache="")
    cls_dir = _model_copy(tmp_path, "other")
    (cls_dir / "README.md").write_text("another model")
    with pytest.raises(ValueError, match="embedding cache was opened for 'all-MiniLM-L6-v2', not for '.*other'"):
        embed_texts(["some text"], str(cls_dir), cache=EmbeddingCache(str(tmp_path / "db"), DEFAULT_MODEL))


def test_concurrent_writers_of_the_same_keys_leave_a_readable_table(tmp_path):
    texts = _questions(5, seed=3)
    vectors = embed_texts(texts)
    # Several fresh caches raced at once: creating the table is where rows used to get lost
    # (a second concurrent create became an overwrite of rows already appended).
    for round_ in range(6):
        uri = str(tmp_path / f"db{round_}")
        caches = [EmbeddingCache(uri, DEFAULT_MODEL) for _ in range(4)]  # one connection each, as separate runs
        keys = [caches[0].key(t) for t in texts]
        errors: list[BaseException] = []

        def write(cache: EmbeddingCache) -> None:
            try:
                cache.put(keys, vectors)
            except BaseException as e:  # surfaced below: a thread's exception would otherwise vanish
                errors.append(e)

        threads = [threading.Thread(target=write, args=(c,)) for c in caches]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, f"round {round_}: {errors[0]!r}"
        assert _rows(uri) == 20, f"round {round_}"  # every append landed; duplicates are harmless
        found = EmbeddingCache(uri, DEFAULT_MODEL).lookup(keys)
        assert set(found) == set(keys)
        assert np.array_equal(np.stack([found[k] for k in keys]), vectors)


def test_ray_data_stage_embeds_only_what_the_cache_lacks(tmp_path, ray_runtime):
    uri = str(tmp_path / "db")
    cfg = Config()
    cfg.knowledge.batch_size = 4  # several batches per actor
    cfg.knowledge.pool_min_texts = 0  # so few texts would otherwise be embedded here, not on the pool
    questions = _questions(10, seed=4)
    texts = [f"Supplementary Knowledge: 1. fact {i % 4}" for i in range(10)]  # 4 distinct
    table = pa.table({"id": [str(i) for i in range(10)], "question": questions, "text": texts})
    columns = {"question": "question_vector", "text": "vector"}
    embed_texts(questions[:3], cache=uri)  # known from a driver-side call

    cache = EmbeddingCache(uri, DEFAULT_MODEL)
    out = embed_table(table, cfg.knowledge, columns, cache=cache)
    assert cache.stats() == {"embed_cache_hits": 3, "embed_new": 7 + 4} and _rows(uri) == 3 + 11
    assert out.column("id").to_pylist() == table.column("id").to_pylist()  # order kept
    assert out.schema.field("vector").type == pa.list_(pa.float32(), EMBED_DIM)
    for source, target in columns.items():
        got = np.array(out.column(target).to_pylist(), dtype=np.float32)
        assert np.allclose(got, embed_texts(table.column(source).to_pylist()), atol=1e-5)

    again = EmbeddingCache(uri, DEFAULT_MODEL)
    assert embed_table(table, cfg.knowledge, columns, cache=again).equals(out)
    assert again.stats() == {"embed_cache_hits": 20, "embed_new": 0} and _rows(uri) == 14


def test_a_second_knowledge_stage_and_kard_embed_nothing(tmp_path, ray_runtime):
    from distill_ray.config import FaultConfig
    from distill_ray.methods.kard import _question_vectors
    from distill_ray.methods.recipe import MethodContext
    from distill_ray.teacher.needs import collect_need
    from distill_ray.teacher.oracle import start_oracle

    train, _ = generate(12, 0, seed=5)
    cfgs = [Config(run_name=name) for name in ("first run", "second run")]
    cfgs[0].knowledge.pool_min_texts = 0  # the first run's texts go through the actor pool
    with start_oracle(FaultConfig()) as oracle:
        needs = []
        for cfg in cfgs:
            cfg.storage.root = str(tmp_path / "runs")
            cfg.teacher.base_url = oracle.base_url
            needs.append(collect_need("knowledge", cfg, train))
    first, second = needs
    kept = int(first.stats["kept"])
    assert kept == len(train) and first.table != second.table
    assert first.stats["embed_cache_hits"] == 0 and 0 < first.stats["embed_new"] <= 2 * kept
    assert first.stats["embed_pool_texts"] == first.stats["embed_new"]
    assert second.stats["embed_new"] == 0 and second.stats["embed_cache_hits"] == 2 * kept
    assert second.stats["embed_pool_texts"] == 0
    db = open_db(cfgs[0].lancedb_uri)
    a, b = (read_table(db, n.table).sort_by("id") for n in needs)
    for column in ("question_vector", "vector"):
        assert a.column(column).equals(b.column(column))

    stored = _rows(cfgs[0].lancedb_uri)
    vectors = _question_vectors(train, MethodContext(cfgs[1], {}))
    assert _rows(cfgs[0].lancedb_uri) == stored  # every training question came from the cache
    assert np.allclose(vectors, embed_texts([ex.question for ex in train]), atol=1e-5)
