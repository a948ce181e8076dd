"""Sections to chunks: paragraphs packed under a size limit, never across a heading, with overlap.

A chunk ends at a paragraph break when it can, at a sentence end when a paragraph is too long, and
at a space only for a sentence longer than a chunk. Each new chunk of a section starts with the
last sentence(s) of the previous one (up to ``overlap`` characters), so an answer cut by a boundary
is still whole in one of them. The size keeps a chunk inside MiniLM's 256-token window.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from bot.knowledge.documents import Section

MAX_CHARS = 900
OVERLAP_CHARS = 150

_PARAGRAPH_BREAK = re.compile(r"\n[ \t]*\n+")
_SENTENCE_END = re.compile(r"(?<=[.!?:;])\s+")


@dataclass(frozen=True, slots=True)
class Chunk:
    index: int  # position in its document, from 0
    heading: str
    text: str

    def embedding_text(self, title: str) -> str:
        """What is embedded: the nearest heading (else the document's title), then the chunk.

        The heading names the topic of text that may not repeat it; the whole trail or the title
        on every chunk measured worse with MiniLM (mean pooling dilutes the text with them).
        """
        label = self.heading or title
        return f"{label}\n{self.text}" if label else self.text


def _pieces(text: str, max_chars: int) -> Iterator[tuple[str, str]]:
    """(separator before it, piece) with every piece at most ``max_chars`` long."""
    for paragraph in _PARAGRAPH_BREAK.split(text.strip()):
        paragraph = paragraph.strip("\n")
        if not paragraph.strip():
            continue
        if len(paragraph) <= max_chars:
            yield "\n\n", paragraph
            continue
        sep = "\n\n"
        for sentence in _SENTENCE_END.split(paragraph):
            while len(sentence) > max_chars:
                cut = sentence.rfind(" ", 0, max_chars + 1)
                cut = cut if cut > max_chars // 2 else max_chars
                yield sep, sentence[:cut].rstrip()
                sep, sentence = " ", sentence[cut:].lstrip()
            if sentence:
                yield sep, sentence
                sep = " "


def _tail(text: str, limit: int) -> str:
    """The end of ``text``, at most ``limit`` characters, starting at a sentence or word boundary."""
    if len(text) <= limit:
        return text
    window = text[-limit:]
    for boundary in (_SENTENCE_END, re.compile(r"\s+")):
        if m := boundary.search(window):
            return window[m.end() :]
    return window


def chunk_sections(
    sections: Iterable[Section], max_chars: int = MAX_CHARS, overlap: int = OVERLAP_CHARS
) -> list[Chunk]:
    chunks: list[Chunk] = []
    for section in sections:
        current = ""
        for sep, piece in _pieces(section.text, max_chars):
            if current and len(current) + len(sep) + len(piece) > max_chars:
                chunks.append(Chunk(len(chunks), section.heading, current))
                carried = _tail(current, overlap)
                fits = len(carried) + len(sep) + len(piece) <= max_chars
                current = f"{carried}{sep}{piece}" if carried and fits else piece
            else:
                current = f"{current}{sep}{piece}" if current else piece
        if current:
            chunks.append(Chunk(len(chunks), section.heading, current))
    return chunks
