"""How answers and sources are drawn: text the model wrote shown as it is (Markdown cannot swallow
it), inline [n] markers tied to the answer's citations, a "stopped" mark, and a cited page with
its passage highlighted."""

from __future__ import annotations

import base64
import html
import re

# what a stored answer ends with when it did not finish on its own (kept in the stored text, so a
# reopened conversation shows the same mark)
STOPPED = " …(stopped)"
TOKEN_LIMIT = " …(token limit)"
MARKS = {
    STOPPED: "stopped: you stopped this answer",
    TOKEN_LIMIT: "stopped: the answer reached the token limit",
}
DONE = '<span class="kb-done"></span>'  # a stored answer, drawn: Stop leaves it unmarked
_MD_PUNCT = re.compile(r"([\\`*_{}\[\]()#+\-.!|~>=:$^])")
_WORD = re.compile(r"[A-Za-z0-9][A-Za-z0-9'-]{2,}|\d+")
_SENTENCE_END = re.compile(r"[.!?](?=\s|$)|\n")


def split_mark(text: str) -> tuple[str, str | None]:
    """A stored answer's text and its stop mark's words (None when it finished)."""
    for suffix, words in MARKS.items():
        if text.endswith(suffix):
            return text[: -len(suffix)], words
    return text, None


def plain_markdown(text: str) -> str:
    """Markdown that renders as exactly `text`: HTML and every Markdown sign escaped, leading
    spaces kept as spaces (so indented text is no code block and "#" no empty heading)."""
    out = []
    for line in text.split("\n"):
        body = line.lstrip(" \t")
        indent = line[: len(line) - len(body)].replace("\t", "    ")
        escaped = _MD_PUNCT.sub(r"\\\1", html.escape(body, quote=False))
        out.append("&nbsp;" * len(indent) + escaped)
    return "\n".join(out)


def _words(text: str) -> set[str]:
    return {w.lower() for w in _WORD.findall(text)}


def marker_places(answer: str, passages: list[str]) -> list[int]:
    """Where each citation's marker goes in the answer: after the sentence sharing the most words
    with its passage (the answer's end when none does)."""
    ends = [m.end() for m in _SENTENCE_END.finditer(answer)]
    if not ends or ends[-1] < len(answer.rstrip()):
        ends.append(len(answer.rstrip()))
    starts = [0] + ends[:-1]
    sentences = [_words(answer[a:b]) for a, b in zip(starts, ends)]
    places = []
    for passage in passages:
        want = _words(passage)
        scores = [len(want & s) for s in sentences]
        best = max(range(len(scores)), key=lambda i: (scores[i], i)) if scores else None
        places.append(ends[best] if best is not None and scores[best] else ends[-1])
    return places


def _marker(ref: str, n: int) -> str:
    # the ref rides in a class: the chat's HTML sanitizer drops data- attributes
    return f'<sup class="kb-cite kb-ref-{ref}" title="open source [{n}]">[{n}]</sup>'


def cite_label(n: int, c: dict) -> str:
    page = f", page {c['page']}" if c.get("page") else ""
    return f"[{n}] {c['document']}{page}"


def answer_markdown(text: str, citations: list[dict], refs: list[str]) -> str:
    """An answer drawn safely, with marker [n] for citation n (its source-list value in `refs`)
    after the sentence it supports, the citation list under it, and a stop mark if it stopped."""
    text, mark = split_mark(text)
    body = text.rstrip()
    places = marker_places(body, [c["text"] for c in citations]) if citations else []
    at: dict[int, list[int]] = {}
    for i, p in enumerate(places):
        at.setdefault(p, []).append(i)
    out, last = [], 0
    for p in sorted(at):
        out.append(plain_markdown(body[last:p]))
        out.append("".join(_marker(refs[i], i + 1) for i in at[p]))
        last = p
    out.append(plain_markdown(body[last:]))
    md = "".join(out) + DONE
    if mark:
        md += f'\n\n<span class="kb-stopped">⏹ {html.escape(mark)}</span>'
    if citations:
        items = " · ".join(
            f'<span class="kb-cite kb-ref-{refs[i]}">{html.escape(cite_label(i + 1, c))}</span>'
            for i, c in enumerate(citations)
        )
        md += f'\n\n<div class="kb-sources">Sources: {items}</div>'
    return md


def source_html(page, image_png: bytes | None = None) -> str:
    """The source viewer: document and page, the page drawn (a PDF) and its text with the
    passage highlighted."""
    where = f"page {page.page} of {page.pages}" if page.page else "text around the passage"
    head = f"<h4>{html.escape(page.document)} · {where}</h4>"
    img = ""
    if image_png:
        data = base64.b64encode(image_png).decode()
        img = f'<img class="kb-page" alt="page {page.page}" src="data:image/png;base64,{data}">'
    text = page.text
    if page.highlight:
        a, b = page.highlight
        body = (
            html.escape(text[:a])
            + f'<mark id="kb-passage">{html.escape(text[a:b])}</mark>'
            + html.escape(text[b:])
        )
    else:
        body = html.escape(text)
    note = "" if page.highlight else "<p><em>The passage is no longer in this text.</em></p>"
    before = "…" if page.clipped_before else ""
    after = "…" if page.clipped_after else ""
    return f'{head}{note}{img}<pre class="kb-page-text">{before}{body}{after}</pre>'
