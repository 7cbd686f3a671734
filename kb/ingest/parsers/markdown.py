"""Markdown: rendered to plain text with markdown-it-py, keeping headings, paragraphs, lists and tables.

Markup (emphasis, link targets, raw HTML tags) goes; the words stay. Blocks are separated by a
blank line so the segmenter can cut between them; list items and table rows by one newline.
"""

from __future__ import annotations

import warnings

from markdown_it import MarkdownIt
from markdown_it.token import Token

from kb.ingest.document import ParsedDocument, normalize_newlines, single_page
from kb.ingest.parsers.text import decode_text


def _inline_text(token: Token) -> str:
    """The visible text of an inline token: text, code, image alt text and line breaks."""
    out: list[str] = []
    for child in token.children or []:
        if child.type in ("text", "code_inline"):
            out.append(child.content)
        elif child.type in ("softbreak", "hardbreak"):
            out.append("\n")
        elif child.type == "image":
            out.append(_inline_text(child))
        elif child.type == "html_inline":
            continue
    return "".join(out)


def _html_text(html: str) -> str:
    from bs4 import BeautifulSoup, MarkupResemblesLocatorWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MarkupResemblesLocatorWarning)
        soup = BeautifulSoup(html, "html.parser")
    for tag in soup(["script", "style"]):
        tag.decompose()
    return soup.get_text().strip()


def render_markdown(source: str) -> tuple[str, str | None]:
    """Markdown source -> (plain text, title); the title is the first level-1 heading, else the first heading."""
    md = MarkdownIt("commonmark").enable(["table", "strikethrough"])
    tokens = md.parse(source)
    blocks: list[str] = []  # finished blocks, joined with separators below
    seps: list[str] = []  # separator before each block
    lists: list[list[int]] = []  # per open list: [next number or -1 for bullets]
    prefix = ""  # list marker waiting for the next block of a list item
    row: list[str] | None = None
    rows: list[str] = []
    title: str | None = None
    first_heading: str | None = None
    heading_level = 0
    new_list = False  # the next block starts a top-level list: a blank line before it

    def emit(text: str) -> None:
        nonlocal prefix, new_list
        text = text.strip("\n")
        if not text.strip():
            return
        if prefix:
            indent = " " * len(prefix)
            text = prefix + text.replace("\n", "\n" + indent)
            prefix = ""
        elif lists:
            text = "  " * len(lists) + text
        seps.append("\n" if lists and not new_list else "\n\n")
        new_list = False
        blocks.append(text)

    for tok in tokens:
        t = tok.type
        if t == "heading_open":
            heading_level = int(tok.tag[1])
        elif t == "inline" and row is not None:
            row.append(_inline_text(tok).replace("\n", " ").strip())
        elif t == "inline":
            text = _inline_text(tok)
            if heading_level:
                heading = " ".join(text.split())
                if first_heading is None:
                    first_heading = heading
                if heading_level == 1 and title is None:
                    title = heading
                heading_level = 0
            emit(text)
        elif t in ("bullet_list_open", "ordered_list_open"):
            start = tok.attrGet("start")
            new_list = new_list or not lists
            lists.append(
                [int(start) if start is not None else 1] if t == "ordered_list_open" else [-1]
            )
        elif t in ("bullet_list_close", "ordered_list_close"):
            lists.pop()
        elif t == "list_item_open":
            counter = lists[-1]
            marker = "- " if counter[0] < 0 else f"{counter[0]}. "
            if counter[0] >= 0:
                counter[0] += 1
            prefix = "  " * (len(lists) - 1) + marker
        elif t in ("fence", "code_block"):
            emit(tok.content.rstrip())
        elif t == "html_block":
            emit(_html_text(tok.content))
        elif t == "tr_open":
            row = []
        elif t == "tr_close" and row is not None:
            rows.append(" | ".join(row))
            row = None
        elif t == "table_close":
            emit("\n".join(rows))
            rows = []
    parts: list[str] = []
    for i, (sep, block) in enumerate(zip(seps, blocks)):
        parts.append(block if i == 0 else sep + block)
    return "".join(parts), title or first_heading


def parse_markdown(data: bytes, filename: str) -> ParsedDocument:
    """A Markdown file: decoded like plain text, then rendered; no pages."""
    source, _ = decode_text(data, filename)
    text, title = render_markdown(normalize_newlines(source))
    return ParsedDocument(text=text, pages=single_page(text), media_type="markdown", title=title)
