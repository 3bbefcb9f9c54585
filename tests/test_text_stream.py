"""Stop strings and UTF-8 boundaries in streamed text (worker/text_stream.py)."""

from worker.text_stream import TextStream


def feed_all(stream: TextStream, pieces: list[bytes]) -> str:
    out = "".join(stream.feed(p) for p in pieces)
    return out + stream.finish()


def test_no_stop_passes_everything():
    assert feed_all(TextStream([]), [b"Hello", b" world"]) == "Hello world"


def test_split_multibyte_character_is_held_until_complete():
    s = TextStream([])
    data = "é".encode()
    assert s.feed(data[:1]) == ""
    assert s.feed(data[1:]) == "é"


def test_stop_string_inside_one_piece():
    s = TextStream(["STOP"])
    assert feed_all(s, [b"abcSTOPdef"]) == "abc"
    assert s.stopped


def test_stop_string_across_pieces_is_never_leaked():
    s = TextStream(["<end>"])
    released = [s.feed(p) for p in [b"Hi <", b"en", b"d> more"]]
    assert "".join(released) == "Hi "
    assert "<" not in "".join(released)
    assert s.stopped


def test_false_start_of_stop_string_is_released():
    s = TextStream(["<end>"])
    assert feed_all(s, [b"a <e", b"x> b"]) == "a <ex> b"
    assert not s.stopped


def test_earliest_of_several_stop_strings_wins():
    assert feed_all(TextStream(["world", "lo w"]), [b"hello world"]) == "hel"
