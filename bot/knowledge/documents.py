"""Files to documents: text split into sections under their headings. Pure and synchronous.

Markdown (ATX and setext headings, front-matter title, fenced code kept whole), HTML (stdlib
``html.parser``: headings, block elements, no scripts or styles), PDF (pypdf, one section per
page) and anything else that is text. A file that cannot be used raises :class:`SkipFile` with a
reason a person understands; ingestion reports it and carries on.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path

log = logging.getLogger(__name__)

MAX_FILE_BYTES = 20 * 1024 * 1024
MARKDOWN = frozenset({".md", ".markdown", ".mdown", ".mkd", ".mdx"})
HTML = frozenset({".html", ".htm", ".xhtml"})
PDF = frozenset({".pdf"})
BINARY = frozenset(
    {
        ".png",
        ".jpg",
        ".jpeg",
        ".gif",
        ".webp",
        ".bmp",
        ".ico",
        ".svgz",
        ".tif",
        ".tiff",
        ".zip",
        ".gz",
        ".tgz",
        ".xz",
        ".bz2",
        ".zst",
        ".7z",
        ".rar",
        ".tar",
        ".iso",
        ".img",
        ".qcow2",
        ".exe",
        ".dll",
        ".so",
        ".dylib",
        ".bin",
        ".o",
        ".a",
        ".pyc",
        ".class",
        ".jar",
        ".wasm",
        ".mp3",
        ".mp4",
        ".mkv",
        ".mov",
        ".avi",
        ".wav",
        ".flac",
        ".ogg",
        ".webm",
        ".woff",
        ".woff2",
        ".ttf",
        ".otf",
        ".sqlite",
        ".sqlite3",
        ".db",
        ".doc",
        ".docx",
        ".xls",
        ".xlsx",
        ".ppt",
        ".pptx",
        ".odt",
        ".ods",
        ".odp",
    }
)


class SkipFile(Exception):
    """This file is not ingested; ``reason`` says why in words for the summary."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)


@dataclass(frozen=True, slots=True)
class Section:
    heading: str  # nearest heading above the text ("" before the first one)
    text: str


@dataclass(frozen=True, slots=True)
class Document:
    source: str
    title: str
    kind: str  # markdown, html, pdf, text
    content_hash: str  # sha256 of the file's bytes
    sections: tuple[Section, ...]


def read_document(data: bytes, source: str) -> Document:
    """Parse a file's bytes. ``source`` names it (its suffix picks the parser)."""
    if not data:
        raise SkipFile("empty file")
    if len(data) > MAX_FILE_BYTES:
        raise SkipFile(_too_big(len(data)))
    suffix = Path(source).suffix.lower()
    stem = Path(source).stem or source
    if suffix in BINARY:
        raise SkipFile(f"unsupported file type ({suffix})")
    if suffix in PDF:
        title, sections, kind = *_read_pdf(data, stem), "pdf"
    else:
        text = _decode(data)
        if suffix in HTML:
            title, sections, kind = *_read_html(text, stem), "html"
        elif suffix in MARKDOWN:
            title, sections, kind = *_read_markdown(text, stem), "markdown"
        else:
            title, sections, kind = stem, [Section("", text.strip())], "text"
    kept = tuple(s for s in sections if s.text.strip())
    if not kept:
        what = "no text layer (a scanned PDF?)" if kind == "pdf" else "no text"
        raise SkipFile(what)
    return Document(source, title.strip() or stem, kind, hashlib.sha256(data).hexdigest(), kept)


def _decode(data: bytes) -> str:
    if b"\x00" in data[:8192]:
        raise SkipFile("binary file")
    for encoding in ("utf-8-sig", "cp1252"):
        try:
            text = data.decode(encoding)
            break
        except UnicodeDecodeError:
            continue
    else:
        raise SkipFile("not text (neither UTF-8 nor Windows-1252)")
    sample = text[:8192]
    controls = sum(1 for ch in sample if ord(ch) < 32 and ch not in "\t\n\r\f")
    if controls > len(sample) // 100:
        raise SkipFile("binary file")
    return text.replace("\r\n", "\n").replace("\r", "\n")


# --- Markdown ------------------------------------------------------------------------------------

_ATX = re.compile(r"^ {0,3}(#{1,6})(?:[ \t]+(.*?))?(?:[ \t]+#+)?[ \t]*$")
_SETEXT = re.compile(r"^ {0,3}(=+|-+)[ \t]*$")
_FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})")
_FRONT_TITLE = re.compile(r"^title:\s*(.+?)\s*$", re.MULTILINE)


class _Outline:
    """Collects sections while headings open and close."""

    def __init__(self) -> None:
        self.stack: list[tuple[int, str]] = []
        self.lines: list[str] = []
        self.sections: list[Section] = []

    def flush(self) -> None:
        text = "\n".join(self.lines).strip()
        if text:
            self.sections.append(Section(self.stack[-1][1] if self.stack else "", text))
        self.lines = []

    def heading(self, level: int, title: str) -> None:
        self.flush()
        while self.stack and self.stack[-1][0] >= level:
            self.stack.pop()
        self.stack.append((level, title))


def _read_markdown(text: str, stem: str) -> tuple[str, list[Section]]:
    title = ""
    lines = text.split("\n")
    if lines and lines[0].strip() == "---":  # YAML front matter
        for end in range(1, len(lines)):
            if lines[end].strip() in ("---", "..."):
                if m := _FRONT_TITLE.search("\n".join(lines[1:end])):
                    title = m.group(1).strip("\"'")
                lines = lines[end + 1 :]
                break
    outline = _Outline()
    fence = ""
    for line in lines:
        if fence:
            outline.lines.append(line)
            if line.strip().startswith(fence):
                fence = ""
            continue
        if m := _FENCE.match(line):
            fence = m.group(1)[0] * 3
            outline.lines.append(line)
        elif m := _ATX.match(line):
            outline.heading(len(m.group(1)), _inline(m.group(2) or ""))
            title = title or (outline.stack[-1][1] if len(m.group(1)) == 1 else "")
        elif (
            (m := _SETEXT.match(line))
            and outline.lines
            and outline.lines[-1].strip()
            and (len(outline.lines) == 1 or not outline.lines[-2].strip())
        ):
            heading = _inline(outline.lines.pop().strip())
            level = 1 if m.group(1)[0] == "=" else 2
            outline.heading(level, heading)
            title = title or (heading if level == 1 else "")
        else:
            outline.lines.append(line)
    outline.flush()
    return title or stem, outline.sections


def _inline(text: str) -> str:
    """Heading text without Markdown emphasis, code ticks or link targets."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", text)
    return re.sub(r"[*_`]+", "", text).strip()


# --- HTML ----------------------------------------------------------------------------------------

_SKIP_TAGS = frozenset({"script", "style", "noscript", "template", "svg", "head", "iframe", "object"})
_BLOCK_TAGS = frozenset(
    {
        "p",
        "div",
        "section",
        "article",
        "main",
        "header",
        "footer",
        "aside",
        "nav",
        "li",
        "ul",
        "ol",
        "dl",
        "dt",
        "dd",
        "table",
        "tr",
        "blockquote",
        "pre",
        "hr",
        "figure",
        "figcaption",
        "form",
        "details",
        "summary",
        "br",
    }
)


class _HTMLText(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.outline = _Outline()
        self.title = ""
        self.first_h1 = ""
        self._skip = 0
        self._in_title = False
        self._heading: tuple[int, list[str]] | None = None
        self._pre = 0
        self._para: list[str] = []

    def _end_paragraph(self) -> None:
        text = "".join(self._para)
        text = text.strip("\n") if self._pre else re.sub(r"\s+", " ", text).strip()
        if text:
            self.outline.lines.extend([text, ""])
        self._para = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "title":
            self._in_title = True
        if tag in _SKIP_TAGS:
            self._skip += 1
        elif len(tag) == 2 and tag[0] == "h" and tag[1] in "123456":
            self._end_paragraph()
            self._heading = (int(tag[1]), [])
        elif tag in _BLOCK_TAGS:
            self._end_paragraph()
            self._pre += tag == "pre"

    def handle_endtag(self, tag: str) -> None:
        if tag == "title":
            self._in_title = False
        if tag in _SKIP_TAGS:
            self._skip = max(0, self._skip - 1)
        elif self._heading and tag == f"h{self._heading[0]}":
            level, parts = self._heading
            self._heading = None
            heading = re.sub(r"\s+", " ", "".join(parts)).strip()
            if heading:
                self.outline.heading(level, heading)
                if level == 1 and not self.first_h1:
                    self.first_h1 = heading
        elif tag in _BLOCK_TAGS:
            self._end_paragraph()
            self._pre -= tag == "pre" and self._pre > 0

    def handle_data(self, data: str) -> None:
        if self._in_title:
            self.title += data
        elif self._skip:
            return
        elif self._heading:
            self._heading[1].append(data)
        else:
            self._para.append(data)

    def finish(self) -> tuple[str, list[Section]]:
        self.close()
        self._end_paragraph()
        self.outline.flush()
        return re.sub(r"\s+", " ", self.title).strip() or self.first_h1, self.outline.sections


def _read_html(text: str, stem: str) -> tuple[str, list[Section]]:
    parser = _HTMLText()
    parser.feed(text)
    title, sections = parser.finish()
    return title or stem, sections


# --- PDF -----------------------------------------------------------------------------------------


def _read_pdf(data: bytes, stem: str) -> tuple[str, list[Section]]:
    from pypdf import PdfReader

    logging.getLogger("pypdf").setLevel(logging.ERROR)  # it warns about every malformed object
    # pypdf raises many exception types for damaged files; any of them means "skip this file".
    try:
        reader = PdfReader(io.BytesIO(data))
        if reader.is_encrypted and not reader.decrypt(""):
            raise SkipFile("encrypted PDF (it needs a password)")
        title = ""
        if reader.metadata is not None and isinstance(reader.metadata.title, str):
            title = reader.metadata.title
        sections = []
        for number, page in enumerate(reader.pages, 1):
            text = (page.extract_text() or "").strip()
            if text:
                sections.append(Section(f"page {number}", text))
    except SkipFile:
        raise
    except Exception as exc:
        raise SkipFile(f"not a readable PDF ({type(exc).__name__}: {exc})") from None
    return title or stem, sections


# --- finding files -------------------------------------------------------------------------------


def source_name(path: Path) -> str:
    """How a file is named in the knowledge base: relative to the working directory when inside it."""
    resolved = path.resolve()
    try:
        return resolved.relative_to(Path.cwd().resolve()).as_posix()
    except ValueError:
        return resolved.as_posix()


def collect_files(paths: Iterable[Path]) -> tuple[list[Path], list[tuple[str, str]]]:
    """Files named or found under folders (sorted, hidden entries in folders left out, each once),
    and ``(path, reason)`` for arguments that do not exist."""
    files: list[Path] = []
    missing: list[tuple[str, str]] = []
    seen: set[Path] = set()

    def keep(p: Path) -> None:
        real = p.resolve()
        if real not in seen:
            seen.add(real)
            files.append(p)

    for path in paths:
        if path.is_dir():
            for root, dirs, names in os.walk(path):
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                for name in sorted(names):
                    if not name.startswith(".") and (Path(root) / name).is_file():
                        keep(Path(root) / name)
        elif path.is_file():
            keep(path)
        elif path.exists():
            missing.append((str(path), "not a regular file"))
        else:
            missing.append((str(path), "does not exist"))
    return files, missing


def read_bytes(path: Path) -> bytes:
    """A file's bytes; too big or unreadable files raise SkipFile."""
    try:
        size = path.stat().st_size
        if size > MAX_FILE_BYTES:
            raise SkipFile(_too_big(size))
        return path.read_bytes()
    except PermissionError:
        raise SkipFile("permission denied") from None
    except OSError as exc:
        raise SkipFile(f"cannot be read ({exc.strerror or exc})") from None


def _too_big(size: int) -> str:
    return f"too big ({size / 2**20:.1f} MiB; the limit is {MAX_FILE_BYTES // 2**20} MiB)"
