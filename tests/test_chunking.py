"""Properties of store.chunking.split_text."""

import random

import pytest

from store import split_text
from store.chunking import _sections


def words(text):
    return len(text.split())


def squeeze(text):
    return "".join(text.split())


def check_invariants(text, capacity, count_tokens, chunks):
    assert all(chunk.strip() for chunk in chunks), "empty chunk"
    assert all(chunk == chunk.strip() for chunk in chunks)
    assert all(count_tokens(chunk) <= capacity for chunk in chunks), "chunk over capacity"
    assert squeeze("".join(chunks)) == squeeze(text), "text not preserved"


def random_markdown(rng):
    vocabulary = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "https://x.io/" + "q" * 30]
    blocks = []
    for _ in range(rng.randint(1, 12)):
        kind = rng.random()
        if kind < 0.25:
            blocks.append("#" * rng.randint(1, 3) + " " + " ".join(rng.choices(vocabulary, k=rng.randint(1, 4))))
        elif kind < 0.35:
            blocks.append("```\n# comment\n" + " ".join(rng.choices(vocabulary, k=5)) + "\n```")
        else:
            sentences = [
                " ".join(rng.choices(vocabulary, k=rng.randint(1, 15))) + rng.choice([".", "!", "?", ""])
                for _ in range(rng.randint(1, 6))
            ]
            blocks.append(rng.choice([" ", "\n"]).join(sentences))
    return rng.choice(["\n\n", "\n", "\n\n\n"]).join(blocks)


def test_empty_text_gives_no_chunks():
    assert split_text("", 10, words) == []
    assert split_text(" \n\n\t ", 10, words) == []


def test_short_text_is_one_chunk():
    assert split_text("  Hello world.\n", 10, words) == ["Hello world."]


def test_capacity_must_be_positive():
    with pytest.raises(ValueError):
        split_text("text", 0, words)


def test_capacity_too_small_for_one_character():
    with pytest.raises(ValueError):
        split_text("text", 1, lambda s: 2 * len(s))


@pytest.mark.parametrize("seed", range(40))
def test_random_documents_keep_invariants(seed):
    rng = random.Random(seed)
    text = random_markdown(rng)
    for capacity in (1, 2, 3, 5, 8, 20, 100):
        check_invariants(text, capacity, words, split_text(text, capacity, words))
    for capacity in (10, 40, 200):
        check_invariants(text, capacity, len, split_text(text, capacity, len))


def test_each_section_is_one_chunk_when_sections_fit_one_at_a_time():
    sections = [
        "# Install\nRun the installer. Then reboot.",
        "## Configure\nEdit the file. Save it now.",
        "## Run\nStart the server and open the page.",
    ]
    text = "\n\n".join(sections)
    assert split_text(text, 9, words) == sections


def test_small_sections_are_packed_together():
    text = "# A\none\n\n# B\ntwo\n\n# C\nthree"
    assert split_text(text, 8, words) == ["# A\none\n\n# B\ntwo", "# C\nthree"]


def test_heading_starts_a_chunk_with_its_section():
    body = " ".join(f"word{i}." for i in range(30))
    text = f"Intro text here.\n\n# Big section\n{body}\n\n# Next\nfinal words"
    chunks = split_text(text, 7, words)
    check_invariants(text, 7, words, chunks)
    for heading in ("# Big section", "# Next"):
        [chunk] = [c for c in chunks if heading in c]
        assert chunk.startswith(heading)
        assert chunk != heading, "heading separated from its section"


def test_heading_kept_with_start_of_an_oversized_first_sentence():
    text = "# Title\n" + " ".join(["w"] * 20) + "."
    chunks = split_text(text, 5, words)
    check_invariants(text, 5, words, chunks)
    assert chunks[0] == "# Title\nw w w"


def test_paragraphs_then_sentences():
    text = "One two three. Four five six.\n\nSeven eight nine ten."
    assert split_text(text, 4, words) == ["One two three.", "Four five six.", "Seven eight nine ten."]
    assert split_text(text, 6, words) == ["One two three. Four five six.", "Seven eight nine ten."]


def test_plain_text_lines_and_words():
    text = "first line without stop\nsecond line also without stop"
    assert split_text(text, 5, words) == ["first line without stop", "second line also without stop"]
    assert split_text("a b c d e f g", 3, words) == ["a b c", "d e f", "g"]


def test_overlong_word_is_split_by_characters():
    text = "short " + "x" * 35 + " end"
    chunks = split_text(text, 10, len)
    assert chunks == ["short", "x" * 10, "x" * 10, "x" * 10, "x" * 5 + " end"]


def test_code_fence_comments_are_not_headings():
    text = "# Real\ntext\n```\n# not a heading\n```\n## Also real\nmore"
    starts = [text[start:end].splitlines()[0] for start, end in _sections(text, 0, len(text))]
    assert starts == ["# Real", "## Also real"]


def test_hash_without_space_is_not_a_heading():
    text = "#hashtag one\n# Heading\ntwo"
    starts = [text[start:end].splitlines()[0] for start, end in _sections(text, 0, len(text))]
    assert starts == ["#hashtag one", "# Heading"]


def test_chunks_keep_original_formatting():
    text = "# Title\n\n- item one\n- item two\n\n```py\nx = 1\n```"
    assert split_text(text, 100, words) == [text]
