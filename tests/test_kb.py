"""NesyCD's knowledge base on a real LanceDB directory with the real MiniLM: merging,
versions, export/import, the retrieval modes and `distill-ray kb`."""
from __future__ import annotations

import json
import math

import pytest

from distill_ray.cli import main
from distill_ray.knowledge.kb import Entry, KBError, KnowledgeBase
from distill_ray.knowledge.kb_search import search
from kb_entries import NURL, PLIM, make_kb, unit_question


# --- the knowledge base -----------------------------------------------------------------


def test_near_duplicates_merge_and_every_change_is_a_version(tmp_path):
    kb = make_kb(tmp_path)
    v0 = kb.version
    assert [r["sources"] for r in sorted(kb.rows(), key=lambda r: r["sources"])] == [["e0"], ["e1"], ["e2"]]
    # Same fact in other words' spacing: merged into the existing entry, its source recorded there.
    report = kb.add([Entry("Supplementary  Knowledge: 1. 1 plim = 9 blips", "synthetic/unit_conversion",
                           sources=("e9",), origin="teacher")])
    assert report.added == [] and len(report.merged) == 1
    plim = next(r for r in kb.rows() if "plim" in r["text"])
    assert plim["sources"] == ["e0", "e9"]
    assert kb.version > v0
    # Identical analyses of three errors: one entry, the other two merged into it, all three sources kept.
    same = "Supplementary Knowledge: 1. 1 zorb = 4 quibs"
    report = kb.add([Entry(same, "synthetic/unit_conversion", sources=(f"z{i}",), origin="teacher") for i in range(3)])
    assert len(report.added) == 1 and [t for _, t in report.merged] == [report.added[0]] * 2
    assert next(r for r in kb.rows() if r["id"] == report.added[0])["sources"] == ["z0", "z1", "z2"]
    kb.remove(report.added)
    # A shared learning summary makes two analyses embed almost alike; the units they define
    # differ, so merging would lose one: both stay.
    summary = ("Learning Summary: 1. recall how many base units one of each unit is worth 2. multiply each count "
               "by the size of its unit in base units 3. a count already in the base unit stays as it is 4. add "
               "the converted amounts to get the total Supplementary Knowledge: 1. 1 zorp = 4 blips 2. ")
    facts = ("1 quib = 6 blips 3. 5 * 4 = 20 4. 3 * 6 = 18 5. 20 + 18 = 38",
             "1 trell = 8 blips 3. 5 * 4 = 20 4. 3 * 8 = 24 5. 20 + 24 = 44")
    pair = [Entry(summary + fact, "synthetic/unit_conversion", sources=(f"u{i}",), origin="teacher")
            for i, fact in enumerate(facts)]
    a, b = kb._embed([e.text for e in pair])
    assert float(a @ b) >= kb.dedup_threshold
    report = kb.add(pair)
    assert len(report.added) == 2 and report.merged == []
    kb.remove(report.added)
    # Another task is never merged into, however similar.
    report = kb.add([Entry(PLIM, "synthetic/chain", origin="user")])
    assert len(report.added) == 1
    # Old versions stay readable: the KB as the first run saw it.
    assert len(kb.rows(version=v0)) == 3 and len(kb.rows()) == 4
    removed_at = kb.remove([report.added[0]])
    assert removed_at == kb.version and len(kb.rows()) == 3
    with pytest.raises(KBError, match="no entry with id 'nope' in knowledge base 'kb_test'; nothing deleted"):
        kb.remove(["nope", plim["id"]])
    assert len(kb.rows()) == 3
    assert "FTS" in kb.stats()["indices"]


def test_export_import_round_trip_and_a_bad_import_changes_nothing(tmp_path):
    kb = make_kb(tmp_path)
    out = tmp_path / "kb.jsonl"
    assert kb.export_jsonl(out) == 3
    copy = KnowledgeBase(kb.uri, "kb_copy", kb.model)
    copy.import_jsonl(out)
    assert sorted(r["text"] for r in copy.rows()) == sorted(r["text"] for r in kb.rows())
    assert {r["id"] for r in copy.rows()} == {r["id"] for r in kb.rows()}

    version, rows = kb.version, kb.rows()
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "1 hoff = 8 drams"}) + "\n" + json.dumps({"text": "  "}) + "\n")
    with pytest.raises(KBError, match="line 2: 'text' must be non-empty"):
        kb.import_jsonl(bad)
    bad.write_text(json.dumps({"text": "1 hoff = 8 drams"}) + "\n{not json\n")
    with pytest.raises(KBError, match="line 2: not JSON"):
        kb.import_jsonl(bad)
    bad.write_text(json.dumps({"text": "x", "colour": "red"}) + "\n")
    with pytest.raises(KBError, match=r"line 1: unknown field\(s\) \['colour'\]"):
        kb.import_jsonl(bad)
    with pytest.raises(KBError, match="already in knowledge base"):
        kb.import_jsonl(out)  # the same ids again
    assert kb.version == version and kb.rows() == rows


@pytest.mark.parametrize("mode", ["bm25", "dense", "hybrid"])
def test_each_retrieval_mode_finds_the_entry_about_the_question(tmp_path, mode):
    kb = make_kb(tmp_path)
    plim, nurl = (unit_question("plim", 3, 5), "Bo has 4 nurls and 2 drams . How many drams is that ?")
    hits = search(kb, [plim, nurl], mode=mode, k=2)
    assert [h[0].text for h in hits] == [PLIM, NURL]
    assert all(len(h) == 2 for h in hits)
    top, second = hits[0]
    assert top.similarity > second.similarity and top.similarity >= 0.3
    # A question never retrieves the analysis of its own error.
    excluded = search(kb, [plim], mode=mode, k=3, exclude_sources=[{"e0"}])[0]
    assert PLIM not in [h.text for h in excluded]


def test_a_training_question_skips_only_entries_about_its_own_error_alone(tmp_path):
    kb = make_kb(tmp_path)
    q = unit_question("plim", 3, 5)
    # e9's analysis states the same fact: the entry stays in the KB without e0's error.
    assert len(kb.add([Entry(PLIM, "synthetic/unit_conversion", sources=("e9",), origin="teacher")]).merged) == 1
    assert search(kb, [q], mode="hybrid", k=1, exclude_sources=[{"e0"}])[0][0].text == PLIM
    assert PLIM not in [h.text for h in search(kb, [q], mode="hybrid", k=3, exclude_sources=[{"e0", "e9"}])[0]]
    # An entry people wrote has no source error and is never excluded.
    kb.add([Entry("Supplementary Knowledge: 1. 1 plim = 9 blips , always", "synthetic/unit_conversion", origin="user")])
    texts = [h.text for h in search(kb, [q], mode="bm25", k=4, exclude_sources=[{"e0", "e9"}])[0]]
    assert "Supplementary Knowledge: 1. 1 plim = 9 blips , always" in texts


def test_one_question_searches_without_writing_to_the_embedding_cache(tmp_path):
    """A served request embeds its one query in memory: a cache miss would commit a table
    version per request (about 350 in one evaluation of 600 questions, ever slower)."""
    from distill_ray.knowledge.embed_cache import as_cache
    from distill_ray.store import open_db

    kb = make_kb(tmp_path)
    cache = as_cache(kb.uri, kb.model)
    table = open_db(kb.uri).open_table(cache.table)
    before = table.version
    search(kb, [unit_question("plim", 3, 5)], mode="dense", k=1)
    table.checkout_latest()
    assert table.version == before
    search(kb, [unit_question("plim", 3, 5)], mode="dense", k=1, cache_queries=True)  # bulk: cached
    table.checkout_latest()
    assert table.version == before + 1


def test_hybrid_fuses_by_reciprocal_rank(tmp_path):
    kb = make_kb(tmp_path)
    q = unit_question("plim", 3, 5)
    bm25 = search(kb, [q], mode="bm25", k=3)[0]
    dense = search(kb, [q], mode="dense", k=3)[0]
    hybrid = search(kb, [q], mode="hybrid", k=3)[0]
    rank = lambda hits: {h.id: r for r, h in enumerate(hits, start=1)}  # noqa: E731
    rb, rd = rank(bm25), rank(dense)
    for h in hybrid:
        want = sum(1 / (60 + r[h.id]) for r in (rb, rd) if h.id in r)
        assert math.isclose(h.score, want, rel_tol=1e-9)


def test_kb_command_line(tmp_path, capsys):
    base = ["-c", "ray_config.yaml", "--set", f"storage.root={tmp_path}", "--set", "run_name=cli"]

    def kb(*args: str) -> tuple[int, str, str]:
        code = main(["kb", *base, *args])
        out = capsys.readouterr()
        return code, out.out, out.err

    code, _, err = kb("stats")
    assert code == 2 and "does not exist" in err
    code, out, _ = kb("add", PLIM, "--task", "synthetic/unit_conversion")
    assert code == 0 and "added user-" in out
    entry_id = out.split()[1].rstrip(";")
    assert kb("add", NURL)[0] == 0
    code, out, _ = kb("search", unit_question("plim", 2, 2), "--mode", "bm25", "-k", "1")
    assert code == 0 and entry_id in out and "plim" in out
    code, out, _ = kb("show", entry_id)
    assert json.loads(out)["text"] == PLIM
    code, out, _ = kb("stats")
    assert json.loads(out)["entries"] == 2
    export = tmp_path / "out.jsonl"
    assert kb("export", str(export))[0] == 0 and len(export.read_text().splitlines()) == 2
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "1 hoff = 8 drams", "origin": "robot"}) + "\n")
    version = json.loads(kb("stats")[1])["version"]
    code, _, err = kb("import", str(bad))
    assert code == 2 and "line 1: 'origin' must be one of" in err
    assert json.loads(kb("stats")[1])["version"] == version
    code, _, err = kb("rm", "user-nope")
    assert code == 2 and "no entry with id 'user-nope'" in err
    assert kb("rm", entry_id)[0] == 0
    assert json.loads(kb("stats")[1])["entries"] == 1
    code, _, err = kb("show", entry_id)
    assert code == 2 and "no entry" in err
    # Options may also follow the action, as the README writes them.
    assert main(["kb", "stats", "-c", "ray_config.yaml", "--set", f"storage.root={tmp_path}", "--set", "run_name=cli"]) == 0
    assert json.loads(capsys.readouterr().out)["entries"] == 1
    assert main(["kb", "--set", f"storage.root={tmp_path}", "stats", "--set", "run_name=other"]) == 2
    assert "kb_other" in capsys.readouterr().err
