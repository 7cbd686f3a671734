"""HTML: visible text with beautifulsoup4; scripts, styles and navigation dropped, blocks kept apart."""

from __future__ import annotations

import re
import warnings

from kb.ingest.document import ParsedDocument, normalize_newlines, single_page
from kb.ingest.errors import IngestError

DROP_TAGS = frozenset(
    {
        "script",
        "style",
        "nav",
        "noscript",
        "template",
        "svg",
        "canvas",
        "iframe",
        "object",
        "embed",
        "head",
        "button",
        "select",
        "datalist",
        "dialog",
    }
)
BLOCK_TAGS = frozenset(
    {
        "address",
        "article",
        "aside",
        "blockquote",
        "body",
        "caption",
        "dd",
        "details",
        "div",
        "dl",
        "dt",
        "fieldset",
        "figcaption",
        "figure",
        "footer",
        "form",
        "h1",
        "h2",
        "h3",
        "h4",
        "h5",
        "h6",
        "header",
        "hr",
        "html",
        "legend",
        "li",
        "main",
        "ol",
        "p",
        "pre",
        "section",
        "summary",
        "table",
        "tbody",
        "tfoot",
        "thead",
        "tr",
        "ul",
    }
)
CELL_TAGS = frozenset({"td", "th"})
_WS = re.compile(r"\s+")


def _parser() -> str:
    try:
        import lxml  # noqa: F401

        return "lxml"
    except ImportError:
        return "html.parser"


class _Writer:
    """Collects inline text into lines and lines into blocks separated by blank lines."""

    def __init__(self) -> None:
        self.blocks: list[str] = []
        self.line: list[str] = []
        self.lines: list[str] = []

    def text(self, s: str) -> None:
        self.line.append(s)

    def newline(self) -> None:
        line = _WS.sub(" ", "".join(self.line)).strip()
        if line:
            self.lines.append(line)
        self.line = []

    def raw(self, s: str) -> None:
        """Preformatted text: kept as one block with its own line breaks."""
        self.block()
        s = normalize_newlines(s).strip("\n")
        if s.strip():
            self.blocks.append(s.rstrip())

    def block(self) -> None:
        self.newline()
        if self.lines:
            self.blocks.append("\n".join(self.lines))
        self.lines = []


def html_to_text(soup) -> str:
    """The visible text of a parsed page, walked iteratively so deep nesting cannot overflow the stack."""
    from bs4 import Comment, NavigableString, Tag
    from bs4.element import Declaration, Doctype, ProcessingInstruction

    skip = (Comment, Declaration, Doctype, ProcessingInstruction)
    out = _Writer()
    stack: list[tuple[object, bool]] = [(soup, False)]
    while stack:
        node, closing = stack.pop()
        if isinstance(node, NavigableString):
            if not isinstance(node, skip):
                out.text(str(node))
            continue
        if not isinstance(node, Tag):
            continue
        name = (node.name or "").lower()
        if closing:
            if name in ("tr", "li", "dt", "dd"):
                out.newline()
            elif name in BLOCK_TAGS:
                out.block()
            elif name in CELL_TAGS:
                out.text(" | ")
            continue
        if name in DROP_TAGS or node.get("hidden") is not None:
            continue
        if name == "br":
            out.newline()
            continue
        if name == "pre":
            out.raw(node.get_text())
            continue
        if name in ("tr", "li", "dt", "dd"):
            out.newline()
            if name == "li":
                out.text("- ")
        elif name in BLOCK_TAGS:
            out.block()
        if name == "img" and node.get("alt"):
            out.text(f" {node['alt']} ")
        stack.append((node, True))
        for child in reversed(list(node.children)):
            stack.append((child, False))
    out.block()
    # a row's trailing cell separator is noise
    return "\n\n".join(re.sub(r"\s*\|\s*$", "", b, flags=re.M) for b in out.blocks)


def parse_html(data: bytes, filename: str) -> ParsedDocument:
    """An HTML page: encoding from BOM, <meta charset> or detection; visible text; title from <title> or <h1>."""
    from bs4 import BeautifulSoup, MarkupResemblesLocatorWarning

    try:
        with (
            warnings.catch_warnings()
        ):  # a short page that looks like a path or URL is still a page
            warnings.simplefilter("ignore", MarkupResemblesLocatorWarning)
            soup = BeautifulSoup(data, _parser())
    except Exception as e:
        raise IngestError(
            "corrupt_html", f"{filename} could not be parsed as HTML ({type(e).__name__})."
        ) from e
    title = None
    for tag in (soup.find("title"), soup.find("h1")):
        if tag is not None and tag.get_text().strip():
            title = " ".join(tag.get_text().split())
            break
    text = html_to_text(soup)
    return ParsedDocument(text=text, pages=single_page(text), media_type="html", title=title)
