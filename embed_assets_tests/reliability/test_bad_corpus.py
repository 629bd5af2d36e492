"""Bad corpus input: every bad file is rejected with its name and reason, the good ones are kept, and a folder
without a usable document fails the ``corpus`` asset with a message naming the folder."""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path

import dagster as dg
import pytest

from embed_assets.chunking import chunk_corpus, chunk_document, tokenizer_counter
from embed_assets.corpus import EmptyCorpusError, read_corpus
from embed_assets.definitions import corpus, pipeline_resources
from embed_assets.defs.resources import ArtifactStore

GOOD = "The harbor was rebuilt in 1921. Ships arrive every second day. The pier is made of oak."


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    root = tmp_path / "corpus"
    root.mkdir()
    (root / "good.txt").write_text(GOOD)
    return root


def scan(folder: Path, **kwargs):
    result = read_corpus(folder, **kwargs)
    assert [d.doc_id for d in result.documents] == ["good.txt"]  # the good document is always kept
    assert result.documents[0].text == GOOD
    return {r["path"]: r["reason"] for r in result.rejected}


def test_binary_file_is_rejected(folder: Path) -> None:
    (folder / "image.txt").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)))
    assert scan(folder) == {"image.txt": "binary content (NUL bytes)"}


def test_text_with_a_binary_tail_is_rejected(folder: Path) -> None:
    # 20 KB of text, then a binary blob: the whole file is checked, not only its first block.
    (folder / "log.txt").write_bytes(b"plain text line.\n" * 1200 + b"\x00\x01\x02\x03" * 64)
    assert scan(folder) == {"log.txt": "binary content (NUL bytes)"}


def test_non_utf8_text_is_rejected_with_the_byte_offset(folder: Path) -> None:
    (folder / "latin1.md").write_bytes("Le café est servi. Très bien.".encode("latin-1"))
    assert scan(folder) == {"latin1.md": "not valid utf-8 (byte 6); convert it to UTF-8"}


def test_empty_and_whitespace_only_files_are_rejected(folder: Path) -> None:
    (folder / "empty.txt").write_bytes(b"")
    (folder / "blank.md").write_text(" \n\t\n\n")
    assert scan(folder) == {"empty.txt": "empty file", "blank.md": "only whitespace"}


def test_file_over_the_size_limit_is_rejected_unread(folder: Path) -> None:
    with open(folder / "huge.txt", "wb") as f:  # sparse: 50 MB on paper, nothing on disk
        f.truncate(50_000_000)
    start = time.monotonic()
    reasons = scan(folder)
    assert time.monotonic() - start < 2.0  # judged by its size, never read
    assert reasons == {"huge.txt": "too large (50,000,000 bytes > max_file_bytes=5,000,000); split it"}


def test_huge_file_without_sentence_breaks_is_chunked_quickly_within_the_token_limit(
    tmp_path: Path, bundled_model_path: str
) -> None:
    """A 0.5 MB 'sentence' (a log, a table dump) under the size limit: cut into passages of at most
    ``max_tokens`` model tokens with a few token counts per passage (it used to be one count per word, which
    made a multi-megabyte file take minutes)."""
    (tmp_path / "dump.txt").write_text(" ".join(f"field{i}=value{i % 97}" for i in range(30_000)))
    docs = read_corpus(tmp_path).documents
    tokenizer = tokenizer_counter(bundled_model_path)
    calls = [0]

    class Counting:
        special_tokens = tokenizer.special_tokens
        sentence_lengths = tokenizer.sentence_lengths

        def __call__(self, text: str) -> int:
            calls[0] += 1
            return tokenizer(text)

    count = Counting()

    start = time.monotonic()
    chunks, _ = chunk_corpus(docs, sentences_per_chunk=5, max_tokens=512, count_tokens=count)
    elapsed = time.monotonic() - start
    assert max(c.n_tokens for c in chunks) <= 512
    assert all(tokenizer(c.text) == c.n_tokens for c in chunks[:5])
    assert " ".join(c.text for c in chunks) == docs[0].text  # nothing lost, nothing repeated
    assert calls[0] <= 10 * len(chunks), (calls[0], len(chunks))  # not one count per word (30,000)
    print(f"{len(docs[0].text):,} chars -> {len(chunks)} passages, {calls[0]} token counts, {elapsed:.1f}s")
    assert elapsed < 60


def test_text_without_spaces_is_cut_within_the_token_limit(tmp_path: Path, bundled_model_path: str) -> None:
    """A language written without spaces is one 'word' per paragraph: it is cut between characters too."""
    text = "日本語の文章には単語の間に空白がありません。" * 300
    (tmp_path / "ja.txt").write_text(text)
    (doc,) = read_corpus(tmp_path).documents
    chunks = chunk_document(doc, max_tokens=64, count_tokens=tokenizer_counter(bundled_model_path))
    assert len(chunks) > 1 and max(c.n_tokens for c in chunks) <= 64
    assert "".join(c.text for c in chunks) == text


def test_symlink_loops_and_dangling_links_are_rejected(folder: Path) -> None:
    (folder / "self.txt").symlink_to(folder / "self.txt")
    (folder / "a.txt").symlink_to(folder / "b.txt")
    (folder / "b.txt").symlink_to(folder / "a.txt")
    (folder / "gone.txt").symlink_to(folder / "deleted.txt")
    (folder / "sub").mkdir()
    (folder / "sub" / "up").symlink_to(folder, target_is_directory=True)  # a folder loop
    reasons = scan(folder)
    assert set(reasons) == {"self.txt", "a.txt", "b.txt", "gone.txt", "sub/up"}
    for name in ("self.txt", "a.txt", "b.txt"):
        assert reasons[name] == "unreadable link (symlink loop)"
    assert reasons["gone.txt"] == "unreadable link (FileNotFoundError: No such file or directory)"
    assert reasons["sub/up"] == "symlinked folder not followed"


def test_unsupported_extension_is_rejected(folder: Path) -> None:
    (folder / "report.pdf").write_bytes(b"%PDF-1.7 ...")
    (folder / "notes.TXT").write_text("Upper-case suffixes count. They are read.")  # case-insensitive
    result = read_corpus(folder)
    assert sorted(d.doc_id for d in result.documents) == ["good.txt", "notes.TXT"]
    assert result.rejected == [{"path": "report.pdf", "reason": "unsupported extension (allowed: .txt, .md)"}]


def test_file_name_that_is_not_utf8_is_rejected_not_fatal(folder: Path, tmp_path: Path) -> None:
    """Its name would be the document id, written to UTF-8 JSON/Parquet and metadata: rejected, shown escaped."""
    (folder / os.fsdecode(b"caf\xe9.txt")).write_text("A readable text. With a Latin-1 file name.")
    assert scan(folder) == {"caf\\xe9.txt": "file name is not valid UTF-8; rename the file"}
    # ... and the corpus asset (which writes documents.jsonl and metadata) succeeds with it in the folder.
    result = _materialize(folder, tmp_path)
    assert result.success
    rejected = [r.data for r in _metadata(result)["rejected"].records]
    assert {"path": "caf\\xe9.txt", "reason": "file name is not valid UTF-8; rename the file"} in rejected


def test_fifo_is_rejected_without_blocking(folder: Path) -> None:
    os.mkfifo(folder / "pipe.txt")
    box: dict = {}
    reader = threading.Thread(target=lambda: box.update(reasons=scan(folder)), daemon=True)
    reader.start()
    reader.join(10)
    assert not reader.is_alive(), "read_corpus blocked on a FIFO"
    assert box["reasons"] == {"pipe.txt": "not a regular file"}


def test_empty_folder_fails_with_a_clear_message(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(EmptyCorpusError) as info:
        read_corpus(tmp_path / "empty")
    message = str(info.value)
    assert str(tmp_path / "empty") in message and "the folder holds no files" in message


def test_folder_of_only_bad_files_fails_listing_them(tmp_path: Path) -> None:
    (tmp_path / "a.bin").write_bytes(b"\x00")
    (tmp_path / "b.txt").write_bytes(b"")
    with pytest.raises(EmptyCorpusError) as info:
        read_corpus(tmp_path)
    message = str(info.value)
    assert f"no usable document in {str(tmp_path)!r} (2 rejected:" in message
    assert "a.bin: unsupported extension" in message and "b.txt: empty file" in message


# --------------------------------------------------------------------------------------------- the asset


def _materialize(
    path: Path, tmp_path: Path, raise_on_error: bool = True, instance: dg.DagsterInstance | None = None
) -> dg.ExecuteInProcessResult:
    return dg.materialize(
        [corpus],
        instance=instance or dg.DagsterInstance.ephemeral(),
        resources=pipeline_resources(ArtifactStore(root=str(tmp_path / "artifacts"))),
        run_config={"ops": {"corpus": {"config": {"path": str(path)}}}},
        raise_on_error=raise_on_error,
    )


def _metadata(result: dg.ExecuteInProcessResult) -> dict:
    (event,) = result.get_asset_materialization_events()
    return event.materialization.metadata


def test_corpus_asset_lists_every_rejected_file_with_its_reason(folder: Path, tmp_path: Path) -> None:
    (folder / "image.txt").write_bytes(b"\x89PNG\x00\x00")
    (folder / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    (folder / "empty.md").write_bytes(b"")
    (folder / "loop.txt").symlink_to(folder / "loop.txt")
    (folder / "slides.pptx").write_bytes(b"PK\x03\x04")
    with open(folder / "huge.txt", "wb") as f:
        f.truncate(6_000_000)
    instance = dg.DagsterInstance.ephemeral()
    result = _materialize(folder, tmp_path, instance=instance)
    assert result.success
    meta = _metadata(result)
    assert meta["documents"].value == 1 and meta["rejected_files"].value == 6
    table = "\n".join(f"| {r.data['path']} | {r.data['reason']} |" for r in meta["rejected"].records)
    for name, reason in [
        ("image.txt", "binary content"),
        ("latin1.txt", "not valid utf-8"),
        ("empty.md", "empty file"),
        ("loop.txt", "unreadable link"),
        ("slides.pptx", "unsupported extension"),
        ("huge.txt", "too large"),
    ]:
        assert f"| {name} | {reason}" in table, table
    warnings = [r.user_message for r in instance.all_logs(result.run_id) if r.level == logging.WARNING]
    assert "rejected slides.pptx: unsupported extension (allowed: .txt, .md)" in warnings
    assert len([w for w in warnings if w.startswith("rejected ")]) == 6
    # the kept document is the one that was written
    written = Path(result.output_for_node("corpus").path).read_text()
    assert '"doc_id": "good.txt"' in written and "image.txt" not in written


def test_corpus_asset_with_no_usable_document_fails_naming_the_folder(tmp_path: Path) -> None:
    bad = tmp_path / "only-bad"
    bad.mkdir()
    (bad / "scan.pdf").write_bytes(b"%PDF")
    (bad / "empty.txt").write_bytes(b"")
    with pytest.raises(EmptyCorpusError, match=rf"no usable document in '{bad}' \(2 rejected: "):
        _materialize(bad, tmp_path)

    result = _materialize(bad, tmp_path, raise_on_error=False)
    assert not result.success
    (failure,) = [e for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
    error = failure.step_failure_data.error
    user_error = error.cause or error  # Dagster wraps the user's exception
    assert user_error.cls_name == "EmptyCorpusError"
    assert str(bad) in user_error.message and "empty.txt: empty file" in user_error.message
    # raised by our own code with a message, not by a library deep in the stack
    assert "embed_assets/stages/ingest.py" in user_error.stack[-1]


def test_corpus_asset_with_a_missing_folder_fails_naming_it(tmp_path: Path) -> None:
    with pytest.raises(
        FileNotFoundError, match=r"corpus folder '.*nowhere' does not exist or is not a folder"
    ):
        _materialize(tmp_path / "nowhere", tmp_path)
