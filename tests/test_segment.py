"""The segmenter: boundaries it prefers, and properties that hold for any text and any segment length."""

from __future__ import annotations

import functools

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from kb.ingest import IngestError, PageSpan, ParsedDocument, cut_segments, page_of

CORPUS = [
    "The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs.",
    "Knowledge bases answer questions from documents.\n\nEach corpus is cut into segments.",
    "Grüße aus Köln! Ελληνικά, русский, 中文文本 and numbers 12345.",
]


@functools.cache
def byte_bpe() -> PreTrainedTokenizerFast:
    """A byte-level BPE like GPT-2's or Llama 3's: unseen characters split into byte tokens."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator(CORPUS * 4, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok)


@functools.cache
def word_level() -> PreTrainedTokenizerFast:
    """Whitespace-split words with [UNK]; a normalizer, so offsets must still point into the raw text."""
    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(
        CORPUS, trainers.WordLevelTrainer(special_tokens=["[UNK]"], show_progress=False)
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")


TOKENIZERS = {"byte_bpe": byte_bpe, "word_level": word_level}


def whole(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def check_invariants(doc: ParsedDocument, tokenizer, segment_len: int) -> list:
    """Every property the contract promises; returns the segments for further checks."""
    segments = cut_segments(doc, tokenizer, segment_len)
    ids = whole(tokenizer, doc.text)
    assert [i for s in segments for i in s.token_ids] == ids  # every token in exactly one segment
    prev_end = 0
    for k, s in enumerate(segments):
        assert s.index == k
        assert 1 <= len(s.token_ids) <= segment_len
        assert (
            0 <= prev_end <= s.char_start <= s.char_end <= len(doc.text)
        )  # ordered, non-overlapping
        assert doc.text[prev_end : s.char_start].strip() == ""  # only whitespace between segments
        assert s.text == doc.text[s.char_start : s.char_end]
        assert s.page_start == page_of(doc, s.char_start)
        prev_end = s.char_end
    assert doc.text[prev_end:].strip() == ""
    return segments


def plain(text: str) -> ParsedDocument:
    return ParsedDocument(text=text, pages=[PageSpan(None, 0, len(text))])


PARAGRAPHS = "\n\n".join(
    f"Paragraph {i} starts here. It has a second sentence. And a third one to make it longer."
    for i in range(6)
)


@pytest.mark.parametrize("name", TOKENIZERS)
def test_cuts_at_paragraph_breaks(name: str) -> None:
    tokenizer = TOKENIZERS[name]()
    paragraph_tokens = len(whole(tokenizer, PARAGRAPHS.split("\n\n")[0]))
    segments = check_invariants(plain(PARAGRAPHS), tokenizer, int(paragraph_tokens * 2.5))
    assert len(segments) == 3
    for s in segments:  # two whole paragraphs each
        assert s.text.strip().startswith("Paragraph") and s.text.strip().endswith("longer.")
        assert s.text.strip().count("\n\n") == 1


@pytest.mark.parametrize("name", TOKENIZERS)
def test_cuts_at_sentence_end_inside_long_paragraph(name: str) -> None:
    tokenizer = TOKENIZERS[name]()
    text = " ".join(f"Sentence number {i} has several plain words." for i in range(20))
    sentence_tokens = len(whole(tokenizer, "Sentence number 1 has several plain words."))
    segments = check_invariants(plain(text), tokenizer, sentence_tokens * 3 + 2)
    assert len(segments) > 1
    for s in segments[:-1]:
        assert s.text.rstrip().endswith(".")


def test_hard_cut_without_any_boundary() -> None:
    tokenizer = byte_bpe()
    text = (
        "x" * 500 + "é" * 50
    )  # one word: no whitespace anywhere, multi-byte characters at the end
    segments = check_invariants(plain(text), tokenizer, 7)
    assert len(segments) > 1


def test_character_split_across_segments() -> None:
    """Four byte tokens of one emoji cannot all fit: later segments get empty, clamped spans."""
    segments = check_invariants(plain("😀😀"), byte_bpe(), 1)
    assert len(segments) == len(whole(byte_bpe(), "😀😀"))
    assert "".join(s.text for s in segments) == "😀😀"


def test_pages_follow_the_source_map() -> None:
    tokenizer = word_level()
    page_texts = [f"Page {p} words go here and continue for a while." for p in (1, 2, 3)]
    text = "\n\n".join(page_texts)
    pages, pos = [], 0
    for number, t in enumerate(page_texts, start=1):
        pages.append(PageSpan(number, pos, pos + len(t)))
        pos += len(t) + 2
    doc = ParsedDocument(text=text, pages=pages, media_type="pdf")
    one_page = len(whole(tokenizer, page_texts[0]))
    segments = check_invariants(doc, tokenizer, one_page)
    assert [(s.page_start, s.page_end) for s in segments] == [(1, 1), (2, 2), (3, 3)]
    spanning = check_invariants(doc, tokenizer, one_page * 3)
    assert [(s.page_start, s.page_end) for s in spanning] == [(1, 3)]


def test_accepts_a_bare_tokenizers_tokenizer() -> None:
    hf = byte_bpe()
    bare = hf.backend_tokenizer
    a = cut_segments(plain(PARAGRAPHS), hf, 40)
    b = cut_segments(plain(PARAGRAPHS), bare, 40)
    assert [(s.token_ids, s.char_start, s.char_end) for s in a] == [
        (s.token_ids, s.char_start, s.char_end) for s in b
    ]


@pytest.mark.parametrize("text", ["", "   ", "\n\n\t "])
def test_no_text(text: str) -> None:
    with pytest.raises(IngestError) as info:
        cut_segments(plain(text), word_level(), 16)
    assert info.value.code == "no_text"


def test_segment_len_must_be_positive() -> None:
    with pytest.raises(ValueError):
        cut_segments(plain("some words"), word_level(), 0)


# --- properties -------------------------------------------------------------------------------

_pieces = st.one_of(
    st.sampled_from(
        ["The", "fox", "jumps", "quick", "Köln", "中文", "😀", "e\u0301", "12345", "corpus"]
    ),
    st.sampled_from(
        [" ", "  ", "\n", "\n\n", "\t", ". ", "! ", "? ", ", ", ".\n\n", "\u00a0", "\u3002"]
    ),
    st.text(min_size=1, max_size=8),
)
texts = st.lists(_pieces, min_size=1, max_size=80).map("".join).filter(lambda t: t.strip() != "")


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    text=texts,
    segment_len=st.integers(min_value=1, max_value=40),
    name=st.sampled_from(sorted(TOKENIZERS)),
)
def test_property_segments_partition_the_tokenization(
    text: str, segment_len: int, name: str
) -> None:
    tokenizer = TOKENIZERS[name]()
    if not whole(tokenizer, text):  # e.g. only characters the word-level pre-tokenizer drops
        with pytest.raises(IngestError):
            cut_segments(plain(text), tokenizer, segment_len)
        return
    check_invariants(plain(text), tokenizer, segment_len)


@settings(max_examples=60, deadline=None)
@given(
    page_texts=st.lists(texts, min_size=1, max_size=5),
    segment_len=st.integers(min_value=2, max_value=30),
)
def test_property_pages_are_monotonic(page_texts: list[str], segment_len: int) -> None:
    text, pages, pos = "", [], 0
    for number, t in enumerate(page_texts, start=1):
        if text:
            text += "\n\n"
            pos += 2
        text += t
        pages.append(PageSpan(number, pos, pos + len(t)))
        pos += len(t)
    doc = ParsedDocument(text=text, pages=pages, media_type="pdf")
    segments = check_invariants(doc, byte_bpe(), segment_len)
    for s in segments:
        assert 1 <= s.page_start <= s.page_end <= len(page_texts)
    starts = [s.page_start for s in segments]
    assert starts == sorted(starts)
