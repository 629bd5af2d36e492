from __future__ import annotations

import os
from pathlib import Path

import pytest

from embed_assets.chunking import chunk_corpus, chunk_document, split_sentences, tokenizer_counter
from embed_assets.corpus import EmptyCorpusError, read_corpus
from embed_assets.records import Document, content_hash


def test_sample_corpus_reads_cleanly() -> None:
    scan = read_corpus(Path(__file__).resolve().parents[1] / "sample_corpus")
    assert len(scan.documents) == 28
    assert scan.rejected == []  # README.md is excluded by pattern, not rejected


def test_rejections_name_the_file_and_reason(tmp_path: Path) -> None:
    (tmp_path / "good.txt").write_text("A real sentence here. Another one follows.")
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "blank.md").write_text("   \n\n")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 au lait".encode("latin-1"))
    (tmp_path / "binary.txt").write_bytes(b"\x00\x01\x02PNG")
    (tmp_path / "image.png").write_bytes(b"\x89PNG")
    (tmp_path / "big.txt").write_text("word " * 1000)
    (tmp_path / "loop.txt").symlink_to(tmp_path / "loop.txt")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "back").symlink_to(tmp_path, target_is_directory=True)
    scan = read_corpus(tmp_path, max_file_bytes=2000)
    assert [d.doc_id for d in scan.documents] == ["good.txt"]
    reasons = {r["path"]: r["reason"] for r in scan.rejected}
    assert reasons["empty.txt"] == "empty file"
    assert reasons["blank.md"] == "only whitespace"
    assert "not valid utf-8" in reasons["latin1.txt"]
    assert "binary" in reasons["binary.txt"]
    assert "unsupported extension" in reasons["image.png"]
    assert "too large" in reasons["big.txt"]
    assert "link" in reasons["loop.txt"]
    assert "symlinked folder" in reasons["sub/back"]


def test_empty_corpus_fails_with_a_clear_message(tmp_path: Path) -> None:
    (tmp_path / "a.bin").write_bytes(b"\x00")
    with pytest.raises(EmptyCorpusError, match=r"no usable document .*a.bin: unsupported extension"):
        read_corpus(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_corpus(tmp_path / "missing")


def test_data_version_changes_only_with_content(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("One. Two.")
    (tmp_path / "b.txt").write_text("Three. Four.")
    v1 = read_corpus(tmp_path).data_version
    os.utime(tmp_path / "a.txt", (0, 0))  # touching a file is not a change
    assert read_corpus(tmp_path).data_version == v1
    (tmp_path / "b.txt").write_text("Three. Five.")
    assert read_corpus(tmp_path).data_version != v1


def test_split_sentences_handles_wrapping_headings_and_abbreviations() -> None:
    text = "Title\n*****\n\nThe first sentence is\nwrapped over lines. It cites e.g. numbers like 3.5 here.\n\n# Heading\nLast one!"
    assert split_sentences(text) == [
        "Title",
        "The first sentence is wrapped over lines.",
        "It cites e.g. numbers like 3.5 here.",
        "# Heading",
        "Last one!",
    ]


def _doc(text: str, doc_id: str = "d.txt") -> Document:
    return Document(doc_id=doc_id, text=text, content_hash=content_hash(text), n_bytes=len(text))


def test_chunks_respect_sentence_count_and_token_limit(bundled_model_path: str) -> None:
    count = tokenizer_counter(bundled_model_path)
    text = " ".join(f"Sentence number {i} talks about topic {i} in some detail." for i in range(23))
    chunks = chunk_document(_doc(text), sentences_per_chunk=5, max_tokens=512, count_tokens=count)
    assert [c.sent_end - c.sent_start for c in chunks] == [5, 5, 5, 5, 3]
    assert all(c.chunk_id == content_hash(c.text) for c in chunks)
    tight = chunk_document(_doc(text), sentences_per_chunk=5, max_tokens=30, count_tokens=count)
    assert all(count(c.text) <= 30 for c in tight)
    assert " ".join(c.text for c in tight) == " ".join(c.text for c in chunks)  # nothing lost
    huge = chunk_document(_doc("word " * 400 + "."), max_tokens=64, count_tokens=count)
    assert len(huge) > 1 and all(count(c.text) <= 64 for c in huge)


def test_one_tokenizer_pass_gives_exact_counts(bundled_model_path: str) -> None:
    """Span-summed sentence counts equal a per-chunk encode, at ~1 batched tokenizer call per 64 documents."""
    from tokenizers import Tokenizer

    exact = Tokenizer.from_file(str(Path(bundled_model_path) / "tokenizer.json"))
    exact.no_truncation()
    exact.no_padding()
    count = tokenizer_counter(bundled_model_path)
    calls = {"encode_batch": 0, "encode": 0}
    inner = count._tokenizer  # type: ignore[attr-defined]

    class Spy:
        post_processor = inner.post_processor

        def encode_batch(self, *a, **k):
            calls["encode_batch"] += 1
            return inner.encode_batch(*a, **k)

        def encode(self, *a, **k):
            calls["encode"] += 1
            return inner.encode(*a, **k)

    count._tokenizer = Spy()  # type: ignore[attr-defined]
    docs = read_corpus(Path(__file__).resolve().parents[1] / "sample_corpus").documents
    for limit in (64, 512):
        calls.update(encode_batch=0, encode=0)
        chunks, _ = chunk_corpus(docs, sentences_per_chunk=5, max_tokens=limit, count_tokens=count)
        assert chunks and all(c.n_tokens == len(exact.encode(c.text).ids) <= limit for c in chunks)
        assert calls["encode_batch"] == 1  # 28 documents: one batch
    # At 512 tokens no sentence is too long: nothing is encoded twice (3.1 encode calls per chunk before).
    assert calls["encode"] == 0, calls


def test_chunk_ids_are_stable_and_duplicates_dropped() -> None:
    a = _doc("Alpha one. Alpha two.", "a.txt")
    b = _doc("Alpha one. Alpha two.", "b.txt")  # identical text in another file
    chunks, dups = chunk_corpus([a, b], sentences_per_chunk=5)
    assert len(chunks) == 1 and dups == 1
    again, _ = chunk_corpus([a], sentences_per_chunk=5)
    assert again[0].chunk_id == chunks[0].chunk_id
