"""Turn an uploaded file into knowledge-base chunks.

* `.txt` / `.md` / `.markdown`: split by Markdown headings (the heading path becomes the chunk's
  title), then by paragraphs packed up to `chunk_chars`, with `chunk_overlap` characters carried
  over between consecutive chunks of one section; over-long paragraphs are split at sentence ends.
* `.csv` / `.jsonl` Q&A: one chunk per pair (`question`, `answer`, optional `category` columns or
  keys); question and answer are kept in metadata. A JSONL line may instead carry `text` (+ `title`).

Chunk ids are content-derived (source + question, or source + position + text), so re-ingesting an
unchanged file produces the same ids. Every problem is a `DocumentError` with a message a person
can act on; nothing is ingested from a file with an error.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import re
from dataclasses import dataclass, field

SUPPORTED = {".txt": "text", ".md": "markdown", ".markdown": "markdown", ".csv": "csv", ".jsonl": "jsonl"}
_HEADING = re.compile(r"^(#{1,6})\s+(.*\S)\s*$")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


class DocumentError(ValueError):
    pass


@dataclass
class Chunk:
    id: str
    text: str
    metadata: dict = field(default_factory=dict)


def normalise_question(q: str) -> str:
    return re.sub(r"[^a-z0-9]+", " ", q.lower()).strip()


def _id(*parts: str) -> str:
    return hashlib.sha256("\x1f".join(parts).encode()).hexdigest()[:24]


def content_hash(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def detect_format(filename: str, declared: str | None = None) -> str:
    if declared:
        if declared not in set(SUPPORTED.values()):
            raise DocumentError(f"unsupported format '{declared}'; use one of: text, markdown, csv, jsonl")
        return declared
    suffix = "." + filename.rsplit(".", 1)[-1].lower() if "." in filename else ""
    if suffix not in SUPPORTED:
        raise DocumentError(
            f"unsupported file type '{suffix or filename}'; supported: {', '.join(sorted(SUPPORTED))}"
        )
    return SUPPORTED[suffix]


def decode(data: bytes, source: str, max_bytes: int) -> str:
    if len(data) > max_bytes:
        raise DocumentError(f"{source}: {len(data)} bytes is over the {max_bytes}-byte limit (rag.max_document_bytes)")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DocumentError(f"{source}: not valid UTF-8 (byte {exc.start}); convert the file to UTF-8") from None
    if not text.strip():
        raise DocumentError(f"{source}: the document is empty")
    return text


def parse(source: str, data: bytes, *, fmt: str | None = None, chunk_chars: int = 800, chunk_overlap: int = 100,
          max_bytes: int = 5_000_000) -> list[Chunk]:
    kind = detect_format(source, fmt)
    text = decode(data, source, max_bytes)
    if kind == "csv":
        chunks = _qa_chunks(source, _csv_rows(text, source))
    elif kind == "jsonl":
        chunks = _jsonl_chunks(source, text, chunk_chars, chunk_overlap)
    else:
        chunks = _text_chunks(source, text, chunk_chars, chunk_overlap, markdown=kind == "markdown")
    if not chunks:
        raise DocumentError(f"{source}: no content found to ingest")
    return chunks


def _csv_rows(text: str, source: str) -> list[dict]:
    reader = csv.DictReader(io.StringIO(text))
    fields = {f.lower().strip(): f for f in (reader.fieldnames or []) if f}
    if not {"question", "answer"} <= set(fields):
        raise DocumentError(f"{source}: a Q&A CSV needs 'question' and 'answer' columns (found: {sorted(fields)})")
    rows = []
    for line, row in enumerate(reader, start=2):
        q = (row.get(fields["question"]) or "").strip()
        a = (row.get(fields["answer"]) or "").strip()
        if not q or not a:
            raise DocumentError(f"{source}: line {line} has an empty question or answer")
        rows.append({"question": q, "answer": a, "category": (row.get(fields.get("category", "")) or "").strip()})
    return rows


def _qa_chunks(source: str, rows: list[dict]) -> list[Chunk]:
    chunks: dict[str, Chunk] = {}
    for row in rows:
        cid = _id(source, normalise_question(row["question"]))
        chunks[cid] = Chunk(  # a repeated question: the later row wins
            cid,
            f"Q: {row['question']}\nA: {row['answer']}",
            {"source": source, "kind": "qa", "question": row["question"], "answer": row["answer"],
             "title": row["question"], "category": row.get("category") or ""},
        )
    return list(chunks.values())


def _jsonl_chunks(source: str, text: str, chunk_chars: int, overlap: int) -> list[Chunk]:
    qa, chunks = [], []
    for line_no, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DocumentError(f"{source}: line {line_no} is not valid JSON ({exc.msg})") from None
        if not isinstance(obj, dict):
            raise DocumentError(f"{source}: line {line_no} must be a JSON object")
        if obj.get("question") and obj.get("answer"):
            qa.append({"question": str(obj["question"]).strip(), "answer": str(obj["answer"]).strip(),
                       "category": str(obj.get("category") or "")})
        elif obj.get("text"):
            title = str(obj.get("title") or "")
            chunks += _text_chunks(f"{source}", str(obj["text"]), chunk_chars, overlap, markdown=False,
                                   title=title, salt=str(line_no))
        else:
            raise DocumentError(f"{source}: line {line_no} needs 'question' and 'answer', or 'text'")
    return _qa_chunks(source, qa) + chunks


def _text_chunks(source: str, text: str, chunk_chars: int, overlap: int, *, markdown: bool,
                 title: str = "", salt: str = "") -> list[Chunk]:
    sections: list[tuple[str, list[str]]] = []
    path: list[str] = [title] if title else []
    current: list[str] = []
    paragraph: list[str] = []

    def end_paragraph() -> None:
        if paragraph:
            current.append(" ".join(s.strip() for s in paragraph))
            paragraph.clear()

    for line in text.splitlines():
        heading = _HEADING.match(line) if markdown else None
        if heading:
            end_paragraph()
            if current:
                sections.append((" > ".join(path), list(current)))
                current.clear()
            level = len(heading.group(1))
            path = path[: level - 1] + [heading.group(2)]
        elif not line.strip():
            end_paragraph()
        else:
            paragraph.append(line)
    end_paragraph()
    if current:
        sections.append((" > ".join(path), current))

    chunks: list[Chunk] = []
    for section_title, paragraphs in sections:
        for n, body in enumerate(_pack(paragraphs, chunk_chars, overlap)):
            cid = _id(source, salt, section_title, str(n), body)
            chunks.append(Chunk(cid, body, {"source": source, "kind": "text", "title": section_title,
                                            "category": "", "question": "", "answer": ""}))
    return chunks


def _pack(paragraphs: list[str], limit: int, overlap: int) -> list[str]:
    pieces: list[str] = []
    for p in paragraphs:
        if len(p) <= limit:
            pieces.append(p)
            continue
        sentence_buf = ""
        for sentence in _SENTENCE_END.split(p):
            while len(sentence) > limit:  # one enormous "sentence": hard split
                pieces.append(sentence[:limit])
                sentence = sentence[limit:]
            if sentence_buf and len(sentence_buf) + 1 + len(sentence) > limit:
                pieces.append(sentence_buf)
                sentence_buf = sentence
            else:
                sentence_buf = f"{sentence_buf} {sentence}".strip()
        if sentence_buf:
            pieces.append(sentence_buf)
    chunks: list[str] = []
    buf = ""
    for piece in pieces:
        if buf and len(buf) + 2 + len(piece) > limit:
            chunks.append(buf)
            tail = buf[-overlap:] if overlap else ""
            tail = tail[tail.find(" ") + 1 :] if " " in tail else tail
            buf = f"{tail}\n\n{piece}".strip() if tail and len(tail) + 2 + len(piece) <= limit else piece
        else:
            buf = f"{buf}\n\n{piece}".strip()
    if buf:
        chunks.append(buf)
    return chunks
