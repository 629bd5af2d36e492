"""Bad user data (bring your own pairs, BEIR folders): every error names the file, the line and the field.

Complements test_byod.py / test_metrics.py (which cover the common malformed rows) with what a real export,
a crashed writer or another tool's encoding produces.
"""

from __future__ import annotations

import json
from pathlib import Path

import dagster as dg
import pytest

from embed_assets.beir_io import load_beir_folder
from embed_assets.byod import DataValidationError, load_user_pairs
from embed_assets.definitions import corpus, corpus_chunks, pipeline_resources, synthetic_qa
from embed_assets.defs.resources import ArtifactStore, LLMResource
from embed_assets.storage import read_jsonl


def write(folder: Path, name: str, data: str | bytes) -> str:
    path = folder / name
    path.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)
    return str(path)


def errors_of(path: str) -> list[str]:
    with pytest.raises(DataValidationError) as info:
        load_user_pairs(path)
    assert all(e.startswith(path) for e in info.value.errors), info.value.errors
    return [e[len(path) :] for e in info.value.errors]


# ------------------------------------------------------------------------------------------ user pairs


def test_csv_field_over_the_csv_limit_names_line(tmp_path: Path) -> None:
    path = write(tmp_path, "pairs.csv", "Question,Answer\nq?,short.\nq2?," + "word " * 30_000 + "\n")
    assert errors_of(path) == [":3: malformed CSV (field larger than field limit (131072))"]


def test_tsv_missing_column_names_what_was_found(tmp_path: Path) -> None:
    path = write(tmp_path, "pairs.tsv", "query\tanswer_text\nq\tp\n")
    assert errors_of(path) == [":1: missing column 'positive'; found: query, answer_text"]


def test_jsonl_truncated_by_a_crashed_writer_names_the_last_line(tmp_path: Path) -> None:
    path = write(tmp_path, "pairs.jsonl", '{"query": "q", "positive": "p"}\n{"query": "q2", "posi')
    assert errors_of(path) == [":2: invalid JSON (Unterminated string starting at at column 17)"]


def test_pretty_printed_json_array_gets_one_clear_error(tmp_path: Path) -> None:
    rows = [{"query": "q", "positive": "p"}, {"query": "q2", "positive": "p2"}]
    path = write(tmp_path, "pairs.json", json.dumps(rows, indent=2))
    assert errors_of(path) == [
        ":1: a JSON array; expected JSON Lines (one JSON object per line, no enclosing [ ])"
    ]


def test_jsonl_lone_surrogate_escape_names_line_and_field(tmp_path: Path) -> None:
    # "\ud800" is valid JSON but not Unicode text: it used to crash hashing with a bare UnicodeEncodeError.
    path = write(
        tmp_path,
        "pairs.jsonl",
        '{"query": "ok", "positive": "p"}\n{"query": "q", "positives": ["p", "x\\ud800"]}\n',
    )
    assert errors_of(path) == [
        ":2: field 'positives[1]' is not valid Unicode (unpaired surrogate at character 1)"
    ]


def test_non_utf8_file_names_byte_and_line(tmp_path: Path) -> None:
    data = '{"query": "q", "positive": "p"}\n{"query": "caf\xe9", "positive": "p"}\n'.encode("latin-1")
    path = write(tmp_path, "pairs.jsonl", data)
    assert errors_of(path) == [": not UTF-8 text (invalid continuation byte at byte 46, line 2)"]


def test_duplicate_rows_are_merged_into_one_record(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "pairs.jsonl",
        '{"query": "q", "positive": "p", "negative": "n1"}\n'
        '{"query": "q", "positive": "p", "negative": "n2"}\n'
        '{"query": "q", "positive": "p", "negative": "n1"}\n',
    )
    records, chunks = load_user_pairs(path)
    assert len(records) == 1 and len(records[0].negative_chunk_ids) == 2
    assert sorted(c.text for c in chunks) == ["n1", "n2", "p"]  # each passage once


def test_user_data_error_fails_the_synthetic_qa_asset_naming_file_and_line(tmp_path: Path) -> None:
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "a.txt").write_text("The harbor was rebuilt in 1921. Ships arrive every second day.")
    bad = write(tmp_path, "pairs.csv", "Question,Answer\nq?,p.\nq2?,\n")
    instance = dg.DagsterInstance.ephemeral()
    with pytest.raises(DataValidationError, match=rf"^{bad}:3: field 'Answer' is empty$"):
        dg.materialize(
            [corpus, corpus_chunks, synthetic_qa],
            instance=instance,
            resources=pipeline_resources(ArtifactStore(root=str(tmp_path / "artifacts")), llm=LLMResource()),
            run_config={
                "ops": {
                    "corpus": {"config": {"path": str(docs)}},
                    "synthetic_qa": {"config": {"generator": "user_data", "user_data_path": bad}},
                }
            },
        )
    assert instance.get_latest_materialization_event(dg.AssetKey("synthetic_qa")) is None
    assert instance.get_latest_materialization_event(dg.AssetKey("corpus_chunks")) is not None


# ------------------------------------------------------------------------------------------ BEIR folders

HEADER = "query-id\tcorpus-id\tscore\n"


def beir(folder: Path, corpus: bytes, queries: bytes, qrels: bytes) -> Path:
    (folder / "qrels").mkdir(parents=True, exist_ok=True)
    (folder / "corpus.jsonl").write_bytes(corpus)
    (folder / "queries.jsonl").write_bytes(queries)
    (folder / "qrels" / "test.tsv").write_bytes(qrels)
    return folder


CORPUS = b'{"_id": "d1", "text": "a"}\n{"_id": "d2", "text": "b"}\n'
QUERIES = b'{"_id": "q1", "text": "x"}\n{"_id": "q2", "text": "y"}\n'


def test_qrels_with_unknown_ids_name_file_line_and_field_even_with_crlf(tmp_path: Path) -> None:
    crlf = (HEADER + "q1\td1\t1\nq2\td9\t1\n").replace("\n", "\r\n").encode()
    folder = beir(tmp_path, CORPUS, QUERIES, crlf)
    with pytest.raises(ValueError, match=r"qrels/test\.tsv:3: corpus-id 'd9' not in corpus\.jsonl$"):
        load_beir_folder(folder)
    beir(tmp_path, CORPUS, QUERIES, (HEADER + "q7\td1\t1\n").replace("\n", "\r\n").encode())
    with pytest.raises(ValueError, match=r"qrels/test\.tsv:2: query-id 'q7' not in queries\.jsonl$"):
        load_beir_folder(folder)
    beir(tmp_path, CORPUS, QUERIES, (HEADER + "q1\td1\t1\n").replace("\n", "\r\n").encode())
    assert load_beir_folder(folder)[2] == {"q1": {"d1": 1}}  # CRLF files load


def test_duplicate_query_ids_name_both_lines(tmp_path: Path) -> None:
    folder = beir(tmp_path, CORPUS, QUERIES + b'{"_id": "q1", "text": "again"}\n', HEADER.encode())
    with pytest.raises(ValueError, match=r"queries\.jsonl:3: duplicate _id 'q1' \(first on line 1\)"):
        load_beir_folder(folder)


@pytest.mark.parametrize("broken", ["corpus.jsonl", "queries.jsonl", "qrels/test.tsv"])
def test_non_utf8_beir_file_names_file_and_line(tmp_path: Path, broken: str) -> None:
    files = {
        "corpus.jsonl": CORPUS + '{"_id": "d3", "text": "caf\xe9"}\n'.encode("latin-1"),
        "queries.jsonl": QUERIES + '{"_id": "q3", "text": "na\xefve"}\n'.encode("latin-1"),
        "qrels/test.tsv": (HEADER + "q1\td1\t1\n").encode() + "q2\td\xe92\t1\n".encode("latin-1"),
    }
    good = {
        "corpus.jsonl": CORPUS,
        "queries.jsonl": QUERIES,
        "qrels/test.tsv": (HEADER + "q1\td1\t1\n").encode(),
    }
    good[broken] = files[broken]
    folder = beir(tmp_path, good["corpus.jsonl"], good["queries.jsonl"], good["qrels/test.tsv"])
    line = {"corpus.jsonl": 3, "queries.jsonl": 3, "qrels/test.tsv": 3}[broken]
    with pytest.raises(ValueError, match=rf"{broken}:{line}: not UTF-8 text \(invalid continuation byte"):
        load_beir_folder(folder)


def test_read_jsonl_names_file_and_line_of_non_utf8(tmp_path: Path) -> None:
    path = write(tmp_path, "rows.jsonl", b'{"a": 1}\n{"a": "\xff"}\n')
    with pytest.raises(ValueError, match=r"rows\.jsonl:2: not UTF-8 text"):
        read_jsonl(path)
