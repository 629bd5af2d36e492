"""Bring-your-own-data loaders: formats, ids, and errors naming file, line and field."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from embed_assets.byod import DataValidationError, detect_format, load_user_pairs
from embed_assets.records import Chunk, content_hash

P1 = "The warranty covers manufacturing defects for two years."
P2 = "Returns are accepted within 30 days with the original receipt."
N1 = "Our stores open at nine in the morning."


def write(tmp_path: Path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return str(path)


def jsonl(rows: list[object]) -> str:
    return "\n".join(json.dumps(r) for r in rows) + "\n"


def test_question_answer_csv(tmp_path):
    path = write(
        tmp_path,
        "pairs.csv",
        "\ufeffQuestion,Answer\n"  # Excel's BOM is tolerated
        f'How long is the warranty?,"{P1}"\n'
        f"What does the warranty cover?,{P1}\n"
        f'Can I return an item?,"{P2}"\n'
        "\n",
    )
    records, chunks = load_user_pairs(path)
    assert [r.query for r in records] == [
        "How long is the warranty?",
        "What does the warranty cover?",
        "Can I return an item?",
    ]
    assert [c.text for c in chunks] == [P1, P2]
    assert all(c.chunk_id == content_hash(c.text) for c in chunks)
    assert records[0].positive_chunk_ids == [content_hash(P1)]
    # pairs on the same passage share a document (leak-free split); the id is the passage's content hash
    assert records[0].doc_id == records[1].doc_id == content_hash(P1) != records[2].doc_id
    assert {c.doc_id for c in chunks} == {content_hash(P1), content_hash(P2)}
    assert all(r.generator == "byod" and r.negative_chunk_ids == [] for r in records)
    assert len({r.qa_id for r in records}) == 3


def test_multiline_quoted_csv_and_doc_id_column(tmp_path):
    path = write(
        tmp_path,
        "pairs.csv",
        f'question,answer,doc_id\n"Multi\nline?","{P1}\nSecond line.",manual.pdf\nOther?,{P2},\n',
    )
    records, chunks = load_user_pairs(path)
    assert records[0].query == "Multi\nline?" and chunks[0].text == f"{P1}\nSecond line."
    assert records[0].doc_id == chunks[0].doc_id == "manual.pdf"
    assert records[1].doc_id == content_hash(P2)


def test_triplets_csv_and_tsv(tmp_path):
    path = write(tmp_path, "triplets.csv", f"anchor,positive,negative\nwarranty length?,{P1},{N1}\n")
    records, chunks = load_user_pairs(path)
    assert records[0].positive_chunk_ids == [content_hash(P1)]
    assert records[0].negative_chunk_ids == [content_hash(N1)]
    assert {c.text for c in chunks} == {P1, N1}
    neg = next(c for c in chunks if c.text == N1)
    assert neg.doc_id == content_hash(N1)

    tsv = write(tmp_path, "t.tsv", f"query\tpositive\tnegative_1\tnegative_2\nq?\t{P1}\t{N1}\t{P2}\n")
    records, _ = load_user_pairs(tsv)
    assert records[0].negative_chunk_ids == [content_hash(N1), content_hash(P2)]


def test_jsonl_pairs_and_triplets(tmp_path):
    path = write(
        tmp_path,
        "train.jsonl",
        jsonl(
            [
                {"query": "warranty?", "positives": [P1, P2], "negatives": [N1]},
                {"query": "returns?", "positive": P2},
                {"question": "hours?", "answer": N1, "doc_id": "stores.md"},
                {"query": "warranty?", "positives": [P1, P2], "negatives": [N1, "Parking is free."]},
            ]
        )
        + "\n\n",
    )
    records, chunks = load_user_pairs(path)
    assert len(records) == 3  # the exact duplicate (same query and positives) is merged
    multi = records[0]
    assert multi.positive_chunk_ids == [content_hash(P1), content_hash(P2)]
    assert multi.negative_chunk_ids == [content_hash(N1), content_hash("Parking is free.")]
    # P1 and P2 are linked by a multi-positive pair: every pair on either passage shares one document
    assert records[1].doc_id == multi.doc_id
    assert {c.doc_id for c in chunks if c.text in (P1, P2)} == {multi.doc_id}
    assert records[2].doc_id == "stores.md" and records[2].positive_chunk_ids == [content_hash(N1)]

    triplets = write(tmp_path, "trip.jsonl", jsonl([{"anchor": "a?", "positive": P1, "negative": N1}]))
    records, _ = load_user_pairs(triplets)
    assert records[0].negative_chunk_ids == [content_hash(N1)]


def test_passages_already_in_the_corpus_are_reused(tmp_path):
    corpus = [Chunk(content_hash(P1), "docs/warranty.md", P1, 0, 1)]
    path = write(tmp_path, "pairs.csv", f"Question,Answer\nwarranty?,{P1}\nreturns?,{P2}\n")
    records, chunks = load_user_pairs(path, corpus=corpus)
    assert [c.text for c in chunks] == [P2]
    assert records[0].positive_chunk_ids == [corpus[0].chunk_id]
    assert records[0].doc_id == "docs/warranty.md"


def test_format_detection(tmp_path):
    assert detect_format(write(tmp_path, "a.csv", "x")) == "csv"
    assert detect_format(write(tmp_path, "a.ndjson", "x")) == "jsonl"
    assert detect_format(write(tmp_path, "data.txt", '{"query": "q", "positive": "p"}\n')) == "jsonl"
    assert detect_format(write(tmp_path, "data2.txt", "query\tpositive\nq\tp\n")) == "tsv"
    records, _ = load_user_pairs(write(tmp_path, "data3.txt", "Question,Answer\nq?,p.\n"))
    assert records[0].query == "q?"


@pytest.mark.parametrize(
    ("name", "text", "expected"),
    [
        (
            "pairs.csv",
            "Question,Answer\n" + "q?,p.\n" * 10 + "q?, \n",
            "pairs.csv:12: field 'Answer' is empty",
        ),
        ("pairs.csv", "Question,Answer\n,p.\n", "pairs.csv:2: field 'Question' is empty"),
        (
            "pairs.csv",
            "Question,Text\nq?,p.\n",
            "pairs.csv:1: missing column 'Answer'; found: Question, Text",
        ),
        ("pairs.csv", "Answer\np.\n", "pairs.csv:1: missing column 'Question'"),
        (
            "pairs.csv",
            "Question,Answer\nq?,p.,extra\n",
            "pairs.csv:2: expected 2 fields (Question, Answer), got 3",
        ),
        ("pairs.csv", 'Question,Answer\nq?,"unterminated\n', "pairs.csv:2: malformed CSV"),
        ("pairs.csv", "", "pairs.csv: empty file"),
        ("pairs.csv", "Question,Answer\n\n", "pairs.csv: no records found"),
        ("trip.csv", "anchor,positive\na,p\n", "trip.csv:1: missing column 'negative'"),
        ("trip.csv", "anchor,positive,negative\na,p,\n", "trip.csv:2: field 'negative' is empty"),
        ("q.csv", "query,negative\nq,n\n", "q.csv:1: missing column 'positive'"),
        (
            "d.jsonl",
            '{"query": "q", "positive": "p"}\n{"query": "q2", "positive": \n',
            "d.jsonl:2: invalid JSON",
        ),
        ("d.jsonl", '{"positive": "p"}\n', "d.jsonl:1: missing field 'query'"),
        ("d.jsonl", '\n{"query": "q"}\n', "d.jsonl:2: missing field 'positives'"),
        ("d.jsonl", '{"query": "  ", "positive": "p"}\n', "d.jsonl:1: field 'query' is empty"),
        ("d.jsonl", '{"query": "q", "positives": []}\n', "d.jsonl:1: field 'positives' is empty"),
        ("d.jsonl", '{"query": "q", "positives": ["p", ""]}\n', "d.jsonl:1: field 'positives[1]' is empty"),
        (
            "d.jsonl",
            '{"query": "q", "positives": ["p", 3]}\n',
            "d.jsonl:1: field 'positives[1]' must be a string",
        ),
        (
            "d.jsonl",
            '{"query": "q", "positive": {"text": "p"}}\n',
            "d.jsonl:1: field 'positive' must be a string or",
        ),
        ("d.jsonl", '{"query": 5, "positive": "p"}\n', "d.jsonl:1: field 'query' must be a string, got int"),
        ("d.jsonl", '["q", "p"]\n', "d.jsonl:1: expected a JSON object, got list"),
        ("d.jsonl", '{"anchor": "a", "positive": "p"}\n', "d.jsonl:1: missing field 'negative'"),
    ],
)
def test_errors_name_file_line_and_field(tmp_path, name, text, expected):
    path = write(tmp_path, name, text)
    with pytest.raises(DataValidationError) as info:
        load_user_pairs(path)
    assert expected in str(info.value), str(info.value)
    assert str(info.value).startswith(path)
    assert isinstance(info.value, ValueError)


def test_all_errors_are_collected_up_to_a_limit(tmp_path):
    path = write(tmp_path, "pairs.csv", "Question,Answer\n" + "q?,\n" * 30)
    with pytest.raises(DataValidationError) as info:
        load_user_pairs(path, max_errors=5)
    assert len(info.value.errors) == 5
    assert info.value.errors[0].endswith("pairs.csv:2: field 'Answer' is empty")
    assert info.value.errors[4].endswith("pairs.csv:6: field 'Answer' is empty")
    assert "more errors not shown" in str(info.value)


def test_line_numbers_count_multiline_records(tmp_path):
    path = write(tmp_path, "pairs.csv", 'Question,Answer\n"a\nb\nc",p.\nq?,\n')
    with pytest.raises(DataValidationError, match=r"pairs\.csv:5: field 'Answer' is empty"):
        load_user_pairs(path)


def test_not_utf8_and_missing_file(tmp_path):
    path = tmp_path / "latin.csv"
    path.write_bytes("Question,Answer\nq?,caf\xe9\n".encode("latin-1"))
    with pytest.raises(DataValidationError, match=r"latin\.csv: not UTF-8 text"):
        load_user_pairs(str(path))
    with pytest.raises(FileNotFoundError):
        load_user_pairs(str(tmp_path / "nope.csv"))
