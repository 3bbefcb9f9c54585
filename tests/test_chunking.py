"""Properties of the chunker (worker/chunking.py)."""

import base64
import random
import re

import pytest

from worker.chunking import MAX_CHARS_PER_TOKEN, _sections, iter_chunks, split_text


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


# -- cost: the text counted grows linearly with the document, whatever its shape -----------------
_FAKE_WORD = re.compile(r"\w+|[^\w\s]")


class CountingTokenizer:
    """A BERT-like stand-in for the embedding model's tokenizer: [CLS] and [SEP], words split at
    whitespace and punctuation, a token per three characters of a word (so not additive inside
    a word). It counts its calls and the characters it was given."""

    def __init__(self):
        self.calls = 0
        self.chars = 0

    def __call__(self, text: str) -> int:
        self.calls += 1
        self.chars += len(text)
        return 2 + sum((len(w) + 2) // 3 for w in _FAKE_WORD.findall(text))


def prose(n: int, seed: int = 1, one_line: bool = False) -> str:
    rng = random.Random(seed)
    vocabulary = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda".split()
    out, size = [], 0
    while size < n:
        sentence = " ".join(rng.choices(vocabulary, k=rng.randint(5, 30)))
        sentence += ", " if one_line else rng.choice([". ", "! ", ".\n\n"])
        out.append(sentence)
        size += len(sentence)
    return "".join(out)[:n]


HOSTILE = {
    "base64": lambda n: base64.b64encode(random.Random(2).randbytes(n)).decode()[:n],
    "prose": prose,
    "one line, no sentence ends": lambda n: prose(n, one_line=True),
    "one character repeated": lambda n: "a" * n,
    "emoji": lambda n: "😀" * n,
    "CJK without spaces": lambda n: "漢字" * (n // 2),
    "a heading per line": lambda n: ("# h\n" * n)[:n],
    "deep nested list": lambda n: "".join("  " * (i % 200) + "- item\n" for i in range(n))[:n],
    "deep block quotes": lambda n: "".join("> " * (i % 100) + "x\n" for i in range(n))[:n],
    "unclosed code fence": lambda n: ("```\n" + prose(n))[:n],
    "huge blank gaps": lambda n: ("a" + "\n" * 997 + "b ") * (n // 1000),
}


@pytest.mark.parametrize("kind", HOSTILE)
def test_text_counted_grows_linearly(kind):
    """Quadratic chunking (16.6 s for 32 KiB of base64 before) re-counted growing prefixes: now
    each character is counted a bounded number of times, at any size."""
    per_char = {}
    for size in (32 << 10, 256 << 10):
        text = HOSTILE[kind](size)
        tokenizer = CountingTokenizer()
        chunks = split_text(text, 100, tokenizer)
        check_invariants(text, 100, CountingTokenizer(), chunks)
        per_char[size] = tokenizer.chars / len(text)
        assert per_char[size] <= 4, f"{kind}: {per_char[size]:.1f} characters counted per character"
        assert tokenizer.calls <= len(text) // 2 + 10
    assert per_char[256 << 10] <= per_char[32 << 10] * 1.1 + 0.05


@pytest.mark.parametrize("kind", ["base64", "one line, no sentence ends", "a heading per line"])
def test_work_before_the_first_chunk_does_not_depend_on_the_length(kind):
    """A chunk job runs a slice at a time: the first chunk of 2 MiB costs what that of 64 KiB does."""
    text = HOSTILE[kind](2 << 20)
    counted = []
    for doc in (text[:64 << 10], text):
        tokenizer = CountingTokenizer()
        first = next(iter_chunks(doc, 100, tokenizer))
        counted.append((first, tokenizer.calls, tokenizer.chars))
    assert counted[0] == counted[1]
    assert counted[0][2] <= 100 * MAX_CHARS_PER_TOKEN * 8


def test_chunks_are_bounded_in_characters_too():
    """A tokenizer may give a whole run of unknown characters one token ([UNK]): a chunk still
    holds at most capacity * MAX_CHARS_PER_TOKEN characters."""
    text = "😀" * 100_000 + " end"
    chunks = split_text(text, 20, lambda s: 2 + len(s.split()))
    assert max(map(len, chunks)) <= 20 * MAX_CHARS_PER_TOKEN
    assert squeeze("".join(chunks)) == squeeze(text)


def superadditive(text: str) -> int:
    """Counts that grow faster than the sum of the pieces' (every fourth word costs two): the
    packing estimate is then too low, and the real count of each chunk must catch it."""
    n = len(text.split())
    return n + n // 4


@pytest.mark.parametrize("seed", range(20))
def test_estimate_too_low_is_caught_by_the_real_count(seed):
    text = random_markdown(random.Random(seed))
    for capacity in (1, 3, 7, 20):
        check_invariants(text, capacity, superadditive, split_text(text, capacity, superadditive))


def test_chunks_come_lazily():
    calls = []
    chunks = iter_chunks("one two three four five six", 2, lambda s: calls.append(s) or len(s.split()))
    assert calls == []
    assert next(chunks) == "one two"
    assert next(chunks) == "three four"
