"""Tests for ipcbus.subjects: syntax, the reference matcher and SubjectIndex.

The index is checked against brute force over :func:`matches` on subjects
and patterns drawn from a tiny token alphabet, so that matches are common.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from ipcbus import subjects
from ipcbus.errors import BadSubject, IpcBusError
from ipcbus.subjects import (
    MAX_SUBJECT_LENGTH,
    SubjectIndex,
    matches,
    validate_pattern,
    validate_subject,
)

WHITESPACE = [chr(c) for c in range(sys.maxunicode + 1) if chr(c).isspace()]

# --------------------------------------------------------------------------- syntax

VALID_SUBJECTS = [
    "a",
    "a.b.c",
    "orders.eu.created",
    "_INBOX.x9F.17",
    "a*",  # a token that merely contains a wildcard character is a literal
    "*a.b>",
    ">>",
    "**",
    "a-b_c:d/e",
    "ünï.cødé",
    "x" * MAX_SUBJECT_LENGTH,
    ".".join(["ab"] * ((MAX_SUBJECT_LENGTH + 1) // 3)),  # exactly 4096 characters
]

VALID_PATTERNS_ONLY = ["*", ">", "a.*", "a.>", "*.*.>", "*.b.*", "a.*.c.>"]


@pytest.mark.parametrize("subject", VALID_SUBJECTS)
def test_valid_subjects_are_returned_unchanged(subject: str) -> None:
    assert validate_subject(subject) == subject
    assert validate_subject(subject) == subject  # second call comes from the cache
    assert validate_pattern(subject) == subject


@pytest.mark.parametrize("pattern", VALID_PATTERNS_ONLY)
def test_wildcard_patterns_are_valid_patterns(pattern: str) -> None:
    assert validate_pattern(pattern) == pattern


BOTH = (validate_subject, validate_pattern)
PUBLISH = (validate_subject,)

INVALID: list[tuple[object, str, tuple[Callable[[str], str], ...]]] = [
    ("", "empty subject", BOTH),
    (".", "empty token (consecutive dots or leading/trailing dot)", BOTH),
    (".a", "empty token (consecutive dots or leading/trailing dot): the subject starts", BOTH),
    ("a.", "empty token (consecutive dots or leading/trailing dot): the subject ends", BOTH),
    (
        "a..b",
        "empty token (consecutive dots or leading/trailing dot): two dots in a row at index 1",
        BOTH,
    ),
    ("a.b...c", "two dots in a row at index 3", BOTH),
    ("a.*..>", "two dots in a row at index 3", BOTH),
    ("a b", "whitespace in subject (' ' at index 1)", BOTH),
    ("a.b\t", "whitespace in subject ('\\t' at index 3)", BOTH),
    ("\n", "whitespace in subject", BOTH),
    ("a.\u00a0", "whitespace in subject ('\\xa0' at index 2)", BOTH),
    ("a.\u3000.b", "whitespace in subject", BOTH),
    (" ", "whitespace in subject", BOTH),
    ("a.>.b", "'>' must be the last token", (validate_pattern,)),
    (">.>", "'>' must be the last token", (validate_pattern,)),
    (">.a", "'>' must be the last token", (validate_pattern,)),
    ("*", "wildcard '*' not allowed in a published subject", PUBLISH),
    ("a.*.c", "wildcard '*' not allowed in a published subject", PUBLISH),
    (">", "wildcard '>' not allowed in a published subject", PUBLISH),
    ("a.>", "wildcard '>' not allowed in a published subject", PUBLISH),
    # For publishing, any '>' is wrong: say so rather than "must be the last token".
    ("a.>.b", "wildcard '>' not allowed in a published subject", PUBLISH),
    ("x" * (MAX_SUBJECT_LENGTH + 1), "subject is 4097 characters long; the maximum is 4096", BOTH),
    (None, "subject must be a str, not NoneType", BOTH),
    (5, "subject must be a str, not int", BOTH),
    (b"a.b", "subject must be a str, not bytes", BOTH),
    (["a"], "subject must be a str, not list", BOTH),
    ({"a": 1}, "subject must be a str, not dict", BOTH),
]


@pytest.mark.parametrize(
    ("func", "value", "reason"),
    [
        pytest.param(func, value, reason, id=f"{func.__name__}-{value!r:.30}")
        for value, reason, funcs in INVALID
        for func in funcs
    ],
)
def test_invalid_forms_raise_bad_subject(
    func: Callable[[object], str], value: object, reason: str
) -> None:
    for _ in range(2):  # failures are never cached
        with pytest.raises(BadSubject) as info:
            func(value)
        assert info.value.subject is value
        assert reason in info.value.reason
        assert reason in str(info.value)
        assert isinstance(info.value, ValueError)
        assert isinstance(info.value, IpcBusError)


def test_a_long_bad_subject_is_cut_in_the_message_not_in_the_exception() -> None:
    subject = "x " * 2500
    with pytest.raises(BadSubject) as info:
        validate_subject(subject)
    assert info.value.subject == subject
    assert len(str(info.value)) < 300 and "(5000 characters)" in str(info.value)


def test_published_wildcard_error_says_what_to_do() -> None:
    with pytest.raises(BadSubject, match="wildcards are for subscriptions"):
        validate_subject("a.*")


def test_validate_subject_cache_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(subjects, "_valid_subjects", {})
    monkeypatch.setattr(subjects, "SUBJECT_CACHE_SIZE", 8)
    for i in range(50):
        assert validate_subject(f"s.{i}") == f"s.{i}"
        assert len(subjects._valid_subjects) <= 8
    assert "s.49" in subjects._valid_subjects
    # Invalid subjects never enter the cache.
    with pytest.raises(BadSubject):
        validate_subject("s.*")
    assert "s.*" not in subjects._valid_subjects


def _model_pattern_error(s: str) -> bool:
    """Reference validity rules for a pattern, written as plainly as possible."""
    if not s or len(s) > MAX_SUBJECT_LENGTH or any(c.isspace() for c in s):
        return True
    tokens = s.split(".")
    return any(t == "" for t in tokens) or any(t == ">" for t in tokens[:-1])


SYNTAX_TEXT = st.text(alphabet=st.sampled_from(["a", "b", ".", "*", ">", " ", "\t", "\u2028"]))


@given(SYNTAX_TEXT)
def test_validation_agrees_with_model(s: str) -> None:
    pattern_ok = not _model_pattern_error(s)
    subject_ok = pattern_ok and not {"*", ">"} & set(s.split("."))
    try:
        assert validate_pattern(s) == s
    except BadSubject:
        assert not pattern_ok
    else:
        assert pattern_ok
    try:
        assert validate_subject(s) == s
    except BadSubject:
        assert not subject_ok
    else:
        assert subject_ok


@given(SYNTAX_TEXT, st.text(alphabet=st.sampled_from(["a", "7", "\u00e9", "*", ">", " ", "."])))
def test_reply_subjects_agree_with_model(middle: str, token: str) -> None:
    # Reply subjects (``_INBOX.<node>.<token>``) take a path that caches only
    # the prefix; it must accept and refuse exactly what the model does.
    s = f"_INBOX.{middle}.{token}"
    subject_ok = not _model_pattern_error(s) and not {"*", ">"} & set(s.split("."))
    try:
        assert validate_subject(s) == s
    except BadSubject as exc:
        assert not subject_ok
        assert exc.subject == s  # the error names the whole subject, not its prefix
    else:
        assert subject_ok


def test_reply_subjects_do_not_fill_the_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(subjects, "_valid_subjects", {})
    for i in range(1000):
        validate_subject(f"_INBOX.node1.{i:x}")
    assert list(subjects._valid_subjects) == ["_INBOX.node1"]


@given(st.text())
def test_arbitrary_text_raises_only_bad_subject(s: str) -> None:
    for func in BOTH:
        try:
            assert func(s) == s
        except BadSubject as exc:
            assert exc.subject == s and exc.reason


@given(
    st.lists(st.sampled_from(["a", "bc", "*", "x>"]), min_size=1, max_size=4),
    st.sampled_from(WHITESPACE),
    st.data(),
)
def test_every_whitespace_character_is_rejected(
    tokens: list[str], space: str, data: st.DataObject
) -> None:
    subject = ".".join(tokens)
    at = data.draw(st.integers(0, len(subject)))
    bad = subject[:at] + space + subject[at:]
    for func in BOTH:
        with pytest.raises(BadSubject, match=r"whitespace in subject") as info:
            func(bad)
        assert f"at index {at})" in info.value.reason


# --------------------------------------------------------------------------- matches

MATCH_TABLE = [
    ("a", "a", True),
    ("a", "b", False),
    ("a.b", "a.b", True),
    ("a.b", "a", False),
    ("a", "a.b", False),
    ("*", "a", True),
    ("*", "a.b", False),
    ("a.*", "a.b", True),
    ("a.*", "a", False),
    ("a.*", "a.b.c", False),
    ("*.b.*", "a.b.c", True),
    ("*.b.*", "a.c.c", False),
    (">", "a", True),
    (">", "a.b.c", True),
    ("a.>", "a", False),  # '>' needs at least one token
    ("a.>", "a.b", True),
    ("a.>", "a.b.c", True),
    ("a.>", "b.c", False),
    ("*.>", "a", False),
    ("*.>", "a.b", True),
    ("a*", "a*", True),  # literal token containing '*'
    ("a*", "ab", False),
    ("*", "a*", True),
    ("x>", "x>", True),
    ("x>", "x.y", False),
]


@pytest.mark.parametrize(("pattern", "subject", "expected"), MATCH_TABLE)
def test_matches_table(pattern: str, subject: str, expected: bool) -> None:
    assert matches(pattern, subject) is expected
    index: SubjectIndex[str] = SubjectIndex()
    index.add(pattern, "x")
    assert index.match(subject) == (("x",) if expected else ())
    assert index.has_match(subject) is expected


@pytest.mark.parametrize(
    ("pattern", "subject", "reason"),
    [
        ("a..b", "a.b", "empty token"),
        ("a.>.b", "a.b", "'>' must be the last token"),
        ("a.*", "a.*", "wildcard '*' not allowed"),
        ("a.>", "a.>", "wildcard '>' not allowed"),
        ("a", "", "empty subject"),
    ],
)
def test_matches_validates_both_arguments(pattern: str, subject: str, reason: str) -> None:
    with pytest.raises(BadSubject, match=re.escape(reason)):
        matches(pattern, subject)


# --------------------------------------------------------------------------- SubjectIndex

TOKENS = ["a", "b", "c"]
subject_st = st.lists(st.sampled_from(TOKENS), min_size=1, max_size=4).map(".".join)
pattern_st = st.builds(
    lambda tokens, tail: ".".join(tokens + tail),
    st.lists(st.sampled_from([*TOKENS, "*"]), min_size=0, max_size=4),
    st.sampled_from([[], [">"]]),
).filter(bool)
item_st = st.integers(0, 5)


def brute_force(
    registrations: list[tuple[str, int]], first_seen: list[int], subject: str
) -> tuple[int, ...]:
    """Items with a matching registration, in order of first registration."""
    hits = {item for pattern, item in registrations if matches(pattern, subject)}
    return tuple(item for item in first_seen if item in hits)


def test_basic_add_match_remove() -> None:
    index: SubjectIndex[str] = SubjectIndex()
    assert len(index) == 0 and index.patterns() == [] and index.match("a.b") == ()
    index.add("a.b", "lit")
    index.add("a.*", "star")
    index.add("a.>", "full")
    index.add(">", "all")
    index.add("b", "other")
    assert index.match("a.b") == ("lit", "star", "full", "all")
    assert index.match("a.c") == ("star", "full", "all")
    assert index.match("a.b.c") == ("full", "all")
    assert index.match("a") == ("all",)
    assert index.match("b") == ("all", "other")  # "all" was registered first
    assert index.match("c.d") == ("all",)
    assert len(index) == 5
    assert index.patterns() == ["a.b", "a.*", "a.>", ">", "b"]
    assert "5 registrations" in repr(index)


def test_items_appear_once_even_if_several_patterns_match() -> None:
    index: SubjectIndex[str] = SubjectIndex()
    for pattern in ("a.b", "a.*", "*.b", "*.*", "a.>", ">"):
        index.add(pattern, "sub")
    index.add("a.b", "sub")  # a second registration of the same pair
    assert index.match("a.b") == ("sub",)
    assert len(index) == 7


def test_order_is_first_registration_of_the_item() -> None:
    index: SubjectIndex[str] = SubjectIndex()
    index.add(">", "first")
    index.add("a.b", "second")
    index.add("a.*", "third")
    index.add("a.b", "first")  # an extra pattern does not move "first"
    assert index.match("a.b") == ("first", "second", "third")
    # An item that loses every registration and returns counts as new.
    assert index.remove(">", "first") and index.remove("a.b", "first")
    index.add("a.>", "first")
    assert index.match("a.b") == ("second", "third", "first")


def test_add_twice_needs_remove_twice() -> None:
    index: SubjectIndex[str] = SubjectIndex()
    index.add("a.*", "x")
    index.add("a.*", "x")
    assert len(index) == 2
    assert index.remove("a.*", "x") is True
    assert index.match("a.b") == ("x",) and len(index) == 1
    assert index.remove("a.*", "x") is True
    assert index.match("a.b") == () and len(index) == 0
    assert index.remove("a.*", "x") is False
    assert index.patterns() == []


@pytest.mark.parametrize("pattern", ["a.b", "b.*", "a..b", "", "a b", 5, ["unhashable"]])
def test_remove_absent_returns_false_and_changes_nothing(pattern: str) -> None:
    index: SubjectIndex[str] = SubjectIndex()
    index.add("a.*", "x")
    assert index.remove(pattern, "x") is False
    assert index.remove("a.*", "y") is False
    assert len(index) == 1 and index.patterns() == ["a.*"] and index.match("a.b") == ("x",)


@pytest.mark.parametrize(
    ("pattern", "reason"),
    [
        ("", "empty subject"),
        ("a..b", "empty token"),
        ("a.>.b", "last token"),
        ("a b", "whitespace"),
        (None, "must be a str"),
        (["a"], "must be a str"),
    ],
)
def test_add_rejects_invalid_patterns(pattern: str, reason: str) -> None:
    index: SubjectIndex[str] = SubjectIndex()
    with pytest.raises(BadSubject, match=re.escape(reason)):
        index.add(pattern, "x")
    assert len(index) == 0 and index.patterns() == []


@pytest.mark.parametrize(
    ("subject", "reason"),
    [
        ("a..b", "empty token"),
        ("a.*", "wildcard '*'"),
        ("a.>", "wildcard '>'"),
        ("", "empty"),
        ("a b", "whitespace"),
        (None, "must be a str"),
        (["a"], "must be a str"),
    ],
)
def test_match_rejects_invalid_subjects(subject: str, reason: str) -> None:
    index: SubjectIndex[str] = SubjectIndex()
    index.add("a.*.b", "x")  # "a..b" would reach it through '*' if it were not validated
    index.add(">", "y")
    for _ in range(2):  # errors are not cached
        with pytest.raises(BadSubject, match=re.escape(reason)):
            index.match(subject)
        with pytest.raises(BadSubject, match=re.escape(reason)):
            index.has_match(subject)


def test_removing_everything_prunes_the_trie() -> None:
    index: SubjectIndex[int] = SubjectIndex()
    patterns = ["a.b.c", "a.*.c", "a.>", "*.>", ">", "a.b.>", "*", "a.b"]
    for i, pattern in enumerate(patterns):
        index.add(pattern, i)
    for i, pattern in reversed(list(enumerate(patterns))):
        assert index.remove(pattern, i)
    root = index._root
    assert root.is_empty(), (root.children, root.star, root.items, root.full)
    assert index._refs == {} and index._order == {}


def test_cache_is_invalidated_by_add_and_remove() -> None:
    index: SubjectIndex[str] = SubjectIndex()
    assert index.match("a.b") == ()
    assert index.has_match("a.b") is False
    index.add("a.*", "x")
    assert index.match("a.b") == ("x",)  # a stale () would fail here
    index.add("a.>", "y")
    assert index.match("a.b") == ("x", "y")
    index.add("a.>", "y")  # repeat registration also invalidates (harmlessly)
    assert index.remove("a.*", "x")
    assert index.match("a.b") == ("y",)
    assert index.remove("a.>", "y")
    assert index.match("a.b") == ("y",)  # one registration of y remains
    assert index.remove("a.>", "y")
    assert index.match("a.b") == () and index.has_match("a.b") is False
    # A failed remove changes nothing, so whatever is cached stays right.
    assert index.remove("a.>", "y") is False
    assert index.match("a.b") == ()


def test_cache_serves_repeats_and_is_bounded() -> None:
    index: SubjectIndex[str] = SubjectIndex(cache_size=4)
    index.add("a.*", "x")
    first = index.match("a.b")
    assert index.match("a.b") is first  # the very same cached tuple
    for i in range(20):
        assert index.match(f"a.{i}") == ("x",)
        assert len(index._cache) <= 4


def test_cache_can_be_disabled() -> None:
    index: SubjectIndex[str] = SubjectIndex(cache_size=0)
    index.add("a.*", "x")
    assert index.match("a.b") == ("x",) and index.match("a.b") == ("x",)
    assert index._cache == {}


@pytest.mark.parametrize(
    ("size", "error", "reason"),
    [
        (-1, ValueError, "cache_size must be >= 0"),
        (1.5, TypeError, "must be an int, not float"),
        (True, TypeError, "must be an int, not bool"),
        ("8", TypeError, "not str"),
    ],
)
def test_bad_cache_size(size: object, error: type[Exception], reason: str) -> None:
    with pytest.raises(error, match=re.escape(reason)):
        SubjectIndex(cache_size=size)  # type: ignore[arg-type]


@settings(max_examples=300)
@given(st.lists(st.tuples(pattern_st, item_st), max_size=12), st.lists(subject_st, max_size=10))
def test_index_matches_brute_force(registrations: list[tuple[str, int]], probes: list[str]) -> None:
    index: SubjectIndex[int] = SubjectIndex()
    for pattern, item in registrations:
        index.add(pattern, item)
    first_seen = list(dict.fromkeys(item for _, item in registrations))
    for subject in probes:
        expected = brute_force(registrations, first_seen, subject)
        got = index.match(subject)
        assert got == expected
        assert len(set(got)) == len(got)
        assert index.match(subject) == expected  # cached answer is the same
        assert index.has_match(subject) is bool(expected)
    assert len(index) == len(registrations)
    assert sorted(index.patterns()) == sorted({p for p, _ in registrations})


@settings(max_examples=200)
@given(st.data())
def test_random_add_remove_sequences_match_brute_force(data: st.DataObject) -> None:
    index: SubjectIndex[int] = SubjectIndex(cache_size=data.draw(st.sampled_from([0, 3, 4096])))
    registrations: list[tuple[str, int]] = []
    first_seen: list[int] = []
    probes = data.draw(st.lists(subject_st, min_size=1, max_size=5))
    for _ in range(data.draw(st.integers(1, 25))):
        remove_one: bool = bool(registrations) and data.draw(st.booleans())
        if remove_one:
            pair = data.draw(st.sampled_from(registrations))
            assert index.remove(*pair)
            registrations.remove(pair)
            if all(item != pair[1] for _, item in registrations):
                first_seen.remove(pair[1])
        else:
            pair = data.draw(st.tuples(pattern_st, item_st))
            index.add(*pair)
            if all(item != pair[1] for _, item in registrations):
                first_seen.append(pair[1])
            registrations.append(pair)
        for subject in probes:
            assert index.match(subject) == brute_force(registrations, first_seen, subject)
    assert len(index) == len(registrations)


class IndexMachine(RuleBasedStateMachine):
    """Drive a SubjectIndex and a plain list model with the same operations."""

    def __init__(self) -> None:
        super().__init__()
        self.index: SubjectIndex[int] = SubjectIndex(cache_size=8)
        self.registrations: list[tuple[str, int]] = []
        self.first_seen: list[int] = []

    @rule(pattern=pattern_st, item=item_st)
    def add(self, pattern: str, item: int) -> None:
        self.index.add(pattern, item)
        if all(i != item for _, i in self.registrations):
            self.first_seen.append(item)
        self.registrations.append((pattern, item))

    @rule(pattern=pattern_st, item=item_st)
    def remove(self, pattern: str, item: int) -> None:
        present = (pattern, item) in self.registrations
        assert self.index.remove(pattern, item) is present
        if present:
            self.registrations.remove((pattern, item))
            if all(i != item for _, i in self.registrations):
                self.first_seen.remove(item)

    @rule(data=st.data())
    def remove_existing(self, data: st.DataObject) -> None:
        if self.registrations:
            pattern, item = data.draw(st.sampled_from(self.registrations))
            self.remove(pattern, item)

    @rule(subject=subject_st)
    def match(self, subject: str) -> None:
        expected = brute_force(self.registrations, self.first_seen, subject)
        assert self.index.match(subject) == expected
        assert self.index.has_match(subject) is bool(expected)

    @invariant()
    def sizes_agree(self) -> None:
        assert len(self.index) == len(self.registrations)
        assert set(self.index.patterns()) == {p for p, _ in self.registrations}


IndexMachine.TestCase.settings = settings(max_examples=100, stateful_step_count=40)
TestIndexMachine = IndexMachine.TestCase
