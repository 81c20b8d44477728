"""Dolly-style response extraction, incremental detokenization and stop strings.

Most tests use a toy vocabulary (each token id is a string), so they run in milliseconds and can
put marker text exactly where a case needs it; the last ones use the embedded model's real
tokenizer, where `### End` spans two tokens and `<|im_end|>` is one.
"""

from __future__ import annotations

import itertools

import pytest
from corral.inference.extraction import (
    IncrementalDetokenizer,
    ResponseMarkers,
    StopStringMatcher,
    cut_at_stop_strings,
    extract_response,
)
from hypothesis import given, settings
from hypothesis import strategies as st

# A toy tokenizer: the id is the index into VOCAB; decoding concatenates the pieces.
VOCAB = [
    "<end>",  # 0: a special single-token end marker
    "<resp>",  # 1: a special single-token response marker
    "###",
    " End",
    " Response",
    ":",
    "\n",
    " the",
    " cat",
    " sat",
    " on",
    " mat",
    ".",
    "Hello",
    " world",
    "#",
    "##",
    " En",
    "d",
]
ID = {piece: i for i, piece in enumerate(VOCAB)}
WORDS = [ID[w] for w in (" the", " cat", " sat", " on", " mat", ".", "Hello", " world", "\n")]


def decode(ids) -> str:
    return "".join(VOCAB[i] for i in ids)


def encode(*pieces: str) -> list[int]:
    return [ID[p] for p in pieces]


SPECIAL = ResponseMarkers(
    "<resp>", "<end>", response_marker_id=ID["<resp>"], end_marker_id=ID["<end>"]
)
SPLIT = ResponseMarkers("### Response:", "### End")  # neither marker is a single token


def test_single_token_end_marker_cuts_on_token_ids():
    generated = encode("Hello", " world", "<end>", " the", " cat")
    result = extract_response(generated, decode, SPECIAL)
    assert result.text == "Hello world"
    assert result.end_marker_found and result.finish_reason == "stop"


def test_end_marker_split_across_tokens_found_by_text():
    generated = encode(" the", " cat", "\n", "\n", "###", " End", "\n", " mat")
    result = extract_response(generated, decode, SPLIT)
    assert result.text == "the cat"
    assert result.end_marker_found


def test_end_marker_split_differently_than_its_own_tokenization():
    # "### End" produced as "##" + "#" + " En" + "d": no token-level match is possible.
    generated = encode(" sat", "##", "#", " En", "d", " the")
    assert extract_response(generated, decode, SPLIT).text == "sat"


def test_no_end_marker_returns_text_so_far():
    generated = encode(" the", " cat", " sat")
    result = extract_response(generated, decode, SPECIAL)
    assert result.text == "the cat sat"
    assert not result.end_marker_found and result.finish_reason == "length"


def test_no_response_marker_in_generation_returns_everything_flagged():
    generated = encode(" the", " cat", "<end>")
    result = extract_response(generated, decode, SPECIAL, prompt_ends_with_response_marker=False)
    assert result.text == "the cat"
    assert not result.response_marker_found


def test_response_marker_generated_by_the_model_starts_the_answer():
    as_token = encode(" mat", "<resp>", " the", " cat", "<end>")
    result = extract_response(as_token, decode, SPECIAL, prompt_ends_with_response_marker=False)
    assert result.text == "the cat" and result.response_marker_found
    as_text = encode(" mat", "###", " Response", ":", "\n", " sat", "###", " End")
    result = extract_response(as_text, decode, SPLIT, prompt_ends_with_response_marker=False)
    assert result.text == "sat" and result.response_marker_found


def test_marker_text_inside_the_instruction_is_never_searched():
    # The user's instruction contains both markers; only the generated part is passed in.
    prompt = encode(
        "Hello", "###", " End", "###", " Response", ":", "\n", "###", " Response", ":", "\n"
    )
    generated = encode(" the", " cat", "###", " End")
    result = extract_response(generated, decode, SPLIT)
    assert result.text == "the cat"
    assert decode(prompt) not in result.text and "Hello" not in result.text


def test_stop_strings_cut_the_answer():
    generated = encode(" the", " cat", ".", " sat")
    result = extract_response(generated, decode, SPECIAL, stop=["."])
    assert result.text == "the cat" and result.end_marker_found


piece_ids = st.lists(st.sampled_from(WORDS), max_size=12)


@settings(max_examples=200, deadline=None)
@given(answer=piece_ids, tail=st.lists(st.sampled_from(range(len(VOCAB))), max_size=8))
def test_property_single_token_answer_is_exactly_what_precedes_the_end_token(answer, tail):
    result = extract_response(answer + [ID["<end>"]] + tail, decode, SPECIAL)
    assert result.text == decode(answer).strip()
    assert result.end_marker_found


@settings(max_examples=200, deadline=None)
@given(answer=piece_ids, tail=st.lists(st.sampled_from(range(2, len(VOCAB))), max_size=8))
def test_property_split_marker_answer_never_contains_the_marker(answer, tail):
    generated = answer + encode("###", " End") + tail
    result = extract_response(generated, decode, SPLIT)
    assert result.text == decode(answer).strip()
    assert "### End" not in result.text


@settings(max_examples=200, deadline=None)
@given(
    generated=st.lists(st.sampled_from(range(len(VOCAB))), max_size=16),
    markers=st.sampled_from([SPECIAL, SPLIT]),
)
def test_property_answer_is_a_piece_of_the_generation(generated, markers):
    result = extract_response(generated, decode, markers)
    # The answer is cut from the generated text only, and never holds the end marker.
    assert result.text in decode(generated)
    assert markers.end_marker not in result.text
    assert result.end_marker_found == (markers.end_marker in decode(generated))


@settings(max_examples=200, deadline=None)
@given(ids=st.lists(st.sampled_from(range(len(VOCAB))), max_size=20))
def test_property_incremental_detokenizer_concatenates_to_full_decode(ids):
    detokenizer = IncrementalDetokenizer(decode)
    text = "".join(detokenizer.push(i) for i in ids) + detokenizer.flush()
    assert text == decode(ids)


def test_incremental_detokenizer_holds_back_partial_utf8():
    # Byte-level tokens: "é" is two bytes; the first alone decodes to U+FFFD.
    pieces = [b"caf", b"\xc3", b"\xa9", b"!"]

    def byte_decode(ids):
        return b"".join(pieces[i] for i in ids).decode("utf-8", errors="replace")

    detokenizer = IncrementalDetokenizer(byte_decode)
    deltas = [detokenizer.push(i) for i in range(4)]
    assert deltas == ["caf", "", "é", "!"]


@settings(max_examples=300, deadline=None)
@given(
    text=st.text(alphabet="ab.X\n", max_size=30),
    cuts=st.lists(st.integers(min_value=0, max_value=30), max_size=6),
    stop=st.lists(st.text(alphabet="ab.X\n", min_size=1, max_size=4), min_size=1, max_size=3),
)
def test_property_stop_matcher_streams_exactly_the_text_before_the_first_stop(text, cuts, stop):
    bounds = sorted({0, len(text), *[min(c, len(text)) for c in cuts]})
    deltas = [text[a:b] for a, b in itertools.pairwise(bounds)]
    matcher = StopStringMatcher(stop)
    streamed = ""
    for delta in deltas:
        piece = matcher.push(delta)
        streamed += piece
        # Nothing emitted may be part of a stop string that is only now completing.
        assert not any(s in streamed for s in stop)
        if matcher.stopped:
            break
    if not matcher.stopped:
        streamed += matcher.flush()
    expected, found = cut_at_stop_strings(text, stop)
    assert streamed == expected
    assert matcher.stopped == found


@pytest.fixture(scope="module")
def real_tokenizer(embedded_tokenizer):
    return embedded_tokenizer


def _real_decode(tokenizer):
    return lambda ids: tokenizer.decode(list(ids), skip_special_tokens=False)


def test_real_tokenizer_dolly_end_marker_spans_tokens(real_tokenizer):
    from corral.templates import get_template

    template = get_template("dolly", real_tokenizer)
    assert len(real_tokenizer.encode(template.end_marker, add_special_tokens=False)) > 1
    prompt = template.format_prompt("Reply with '### End' and '### Response:' please")
    completion = template.format_completion("Sure: ### Resp is not it.") + "\nmore text"
    prompt_ids = real_tokenizer(prompt)["input_ids"]
    full = real_tokenizer(prompt + completion)["input_ids"]
    assert full[: len(prompt_ids)] == prompt_ids
    markers = ResponseMarkers(template.response_marker, template.end_marker)
    result = extract_response(full[len(prompt_ids) :], _real_decode(real_tokenizer), markers)
    assert result.text == "Sure: ### Resp is not it."
    assert result.end_marker_found


def test_real_tokenizer_alpaca_end_marker_is_one_special_token(real_tokenizer):
    from corral.templates import get_template

    template = get_template("alpaca", real_tokenizer)
    end_ids = real_tokenizer.encode(template.end_marker, add_special_tokens=False)
    assert end_ids == [real_tokenizer.eos_token_id]
    answer_ids = real_tokenizer.encode("Paris is the capital.", add_special_tokens=False)
    after = real_tokenizer.encode(" ### Instruction: again", add_special_tokens=False)
    markers = ResponseMarkers(
        template.response_marker, template.end_marker, end_marker_id=end_ids[0]
    )
    result = extract_response(answer_ids + end_ids + after, _real_decode(real_tokenizer), markers)
    assert result.text == "Paris is the capital."


def test_overlapping_stops_cut_at_the_first_one_completed_however_the_text_arrives():
    """Found by the property test: stops `a` and `XaX` on `XaX` arriving as `Xa`, `X`."""
    assert cut_at_stop_strings("XaX", ["a", "XaX"]) == ("X", True)
    assert cut_at_stop_strings("zXaXz", ["XaXz", "aX"]) == ("zX", True)
    assert cut_at_stop_strings("zXaXz", ["XaX", "aX"]) == ("z", True)
    assert cut_at_stop_strings("abc", ["bc", "abc"]) == ("", True)  # same end: the longer one
    for deltas in (["XaX"], ["Xa", "X"], ["X", "a", "X"]):
        matcher = StopStringMatcher(["a", "XaX"])
        assert "".join(matcher.push(d) for d in deltas) == "X" and matcher.stopped
