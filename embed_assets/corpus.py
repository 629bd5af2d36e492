"""Reading a folder of documents into a corpus, with every rejected file and its reason."""

from __future__ import annotations

import errno
import fnmatch
import hashlib
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from embed_assets.records import Document, content_hash


class EmptyCorpusError(ValueError):
    """Raised when a corpus folder yields no usable document."""


@dataclass
class CorpusScan:
    """The documents read from a folder and the files that were rejected."""

    root: str
    documents: list[Document]
    rejected: list[dict[str, str]] = field(default_factory=list)  # {"path", "reason"}

    @property
    def data_version(self) -> str:
        """Hash of all documents' ids and content hashes: changes iff a document is added, removed or edited."""
        return corpus_version((d.doc_id, d.content_hash) for d in self.documents)

    @property
    def n_bytes(self) -> int:
        return sum(d.n_bytes for d in self.documents)


def _is_binary(sample: bytes) -> bool:
    return b"\x00" in sample


def read_corpus(
    root: str | os.PathLike[str],
    extensions: Sequence[str] = (".txt", ".md"),
    exclude_globs: Sequence[str] = ("README.md", "LICENSE*"),
    max_file_bytes: int = 5_000_000,
    encoding: str = "utf-8",
) -> CorpusScan:
    """Read every document under ``root`` (recursively) into memory (:func:`scan_documents` streams them).

    Files are rejected, never fatal, for: an unsupported extension, binary content, undecodable text,
    emptiness, exceeding ``max_file_bytes``, or a symlink that loops or leaves the folder unreadable.

    Args:
        root: Corpus folder.
        extensions: File name suffixes to read (case-insensitive).
        exclude_globs: File-name patterns to skip silently (e.g. the corpus's own README).
        max_file_bytes: Larger files are rejected (split them first).
        encoding: Text encoding of the documents.

    Returns:
        A :class:`CorpusScan`.

    Raises:
        FileNotFoundError: ``root`` does not exist or is not a folder.
        EmptyCorpusError: no usable document was found (the message lists why files were rejected).
    """
    rejected: list[dict[str, str]] = []
    documents = list(scan_documents(root, extensions, exclude_globs, max_file_bytes, encoding, rejected))
    root_path = Path(root).expanduser()
    if not documents:
        raise empty_corpus_error(root_path, rejected, extensions)
    return CorpusScan(root=str(root_path), documents=documents, rejected=rejected)


def scan_documents(
    root: str | os.PathLike[str],
    extensions: Sequence[str],
    exclude_globs: Sequence[str],
    max_file_bytes: int,
    encoding: str = "utf-8",
    rejected: list[dict[str, str]] | None = None,
) -> Iterator[Document]:
    """Yield the usable documents under ``root`` one at a time, in a stable order (sorted names, depth first),
    so a caller holds one document's text at a time.

    Args:
        root: Corpus folder.
        extensions: File name suffixes to read (case-insensitive).
        exclude_globs: File-name patterns to skip silently.
        max_file_bytes: Larger files are rejected.
        encoding: Text encoding of the documents.
        rejected: Receives ``{"path", "reason"}`` of every rejected file, as the scan goes.

    Yields:
        Documents.

    Raises:
        FileNotFoundError: ``root`` does not exist or is not a folder (at the first ``next``).
    """
    root_path = Path(root).expanduser()
    if not root_path.is_dir():
        raise FileNotFoundError(
            f"corpus folder {str(root_path)!r} does not exist or is not a folder; set corpus.path to a "
            "folder of .txt/.md documents"
        )
    exts = _extensions(extensions)
    rejected = [] if rejected is None else rejected
    seen_real: set[str] = set()

    def reject(rel: str, reason: str) -> None:
        rejected.append({"path": _display(rel), "reason": reason})

    # os.walk with followlinks=False never loops; symlinked files are resolved and checked one by one.
    for dirpath, dirnames, filenames in os.walk(root_path, followlinks=False):
        dirnames.sort()
        for link in [d for d in dirnames if (Path(dirpath) / d).is_symlink()]:
            reject(_rel(Path(dirpath) / link, root_path), "symlinked folder not followed")
        for name in sorted(filenames):
            path = Path(dirpath) / name
            rel = _rel(path, root_path)
            if any(fnmatch.fnmatch(name, pat) for pat in exclude_globs):
                continue
            if not name.lower().endswith(exts):
                reject(rel, f"unsupported extension (allowed: {', '.join(exts)})")
                continue
            if not _is_utf8_name(rel):
                # The name becomes the document id, written to UTF-8 artifacts and metadata: reject it here
                # rather than fail later in a JSON/Parquet writer with a UnicodeEncodeError.
                reject(rel, "file name is not valid UTF-8; rename the file")
                continue
            doc, reason = _read_one(path, rel, max_file_bytes, encoding, seen_real)
            if doc is None:
                reject(rel, reason)
            else:
                yield doc


def corpus_version(index: Iterable[tuple[str, str]]) -> str:
    """Hash of ``(doc_id, content hash)`` pairs, order-free: changes iff a document is added, removed or
    edited."""
    h = hashlib.sha256()
    for doc_id, digest in sorted(index):
        h.update(f"{doc_id}\x00{digest}\n".encode())
    return h.hexdigest()[:16]


def empty_corpus_error(
    root: Path, rejected: Sequence[dict[str, str]], extensions: Sequence[str]
) -> EmptyCorpusError:
    """The error for a folder without a usable document (it lists why files were rejected)."""
    detail = "; ".join(f"{r['path']}: {r['reason']}" for r in rejected[:10]) or "the folder holds no files"
    return EmptyCorpusError(
        f"no usable document in {str(root)!r} ({len(rejected)} rejected: {detail}). "
        f"Add UTF-8 text files with extensions {', '.join(_extensions(extensions))} or change corpus.extensions."
    )


def _extensions(extensions: Sequence[str]) -> tuple[str, ...]:
    return tuple(e.lower() if e.startswith(".") else f".{e.lower()}" for e in extensions)


def _rel(path: Path, root: Path) -> str:
    """POSIX path relative to ``root``; undecodable bytes of a name stay as surrogate escapes."""
    return path.relative_to(root).as_posix()


def _is_utf8_name(rel: str) -> bool:
    try:
        rel.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _display(rel: str) -> str:
    """A printable, UTF-8-safe form of a path (undecodable bytes shown as ``\\xNN``)."""
    return os.fsencode(rel).decode("utf-8", "backslashreplace")


def _read_one(
    path: Path, rel: str, max_file_bytes: int, encoding: str, seen_real: set[str]
) -> tuple[Document | None, str]:
    try:
        real = path.resolve(strict=True)
    except (OSError, RuntimeError) as e:  # a loop: RuntimeError up to Python 3.12, OSError(ELOOP) after
        if isinstance(e, RuntimeError) or getattr(e, "errno", None) == errno.ELOOP:
            return None, "unreadable link (symlink loop)"
        return None, f"unreadable link ({type(e).__name__}: {getattr(e, 'strerror', None) or e})"
    if not real.is_file():
        return None, "not a regular file"
    if str(real) in seen_real:
        return None, "duplicate of another file (symlink to the same target)"
    seen_real.add(str(real))
    try:
        size = real.stat().st_size
        if size == 0:
            return None, "empty file"
        if size > max_file_bytes:
            return None, f"too large ({size:,} bytes > max_file_bytes={max_file_bytes:,}); split it"
        raw = real.read_bytes()
    except OSError as e:
        return None, f"cannot read ({e.strerror})"
    if _is_binary(raw):  # the whole file: a text header followed by a binary blob is binary too
        return None, "binary content (NUL bytes)"
    try:
        text = raw.decode(encoding)
    except UnicodeDecodeError as e:
        return None, f"not valid {encoding} (byte {e.start}); convert it to UTF-8"
    text = text.replace("\r\n", "\n").lstrip("\ufeff")
    if not text.strip():
        return None, "only whitespace"
    return Document(doc_id=rel, text=text, content_hash=content_hash(text), n_bytes=len(raw)), ""
