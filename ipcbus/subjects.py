"""Subject syntax, wildcard matching and the subscription index (NATS semantics).

A *subject* is a string of dot-separated tokens: ``orders.eu.created``.  Every
token is non-empty and no character anywhere may be whitespace (anything for
which :meth:`str.isspace` is true).  A subject is at most
:data:`MAX_SUBJECT_LENGTH` characters long.

A *pattern* (what a subscription listens to) may also use two wildcards, each
only as a whole token:

* ``*`` matches exactly one token: ``orders.*.created`` matches
  ``orders.eu.created`` but not ``orders.created`` or ``orders.eu.x.created``;
* ``>`` matches one or more trailing tokens and may only be the last token:
  ``orders.>`` matches ``orders.eu`` and ``orders.eu.created`` but not
  ``orders`` itself.

A token that merely *contains* ``*`` or ``>`` (``a*``, ``>b``) is an ordinary
literal.  Published subjects never contain wildcard tokens.

:class:`SubjectIndex` answers "who is interested in this subject?" for the
reactor on every message, so it is a token trie with a result cache: the cost
of a lookup depends on the subject's length and on the subscriptions that
could match it, not on how many others exist, and a subject seen before costs
one dict lookup.

Nothing here is thread-safe; each node uses its index from its event loop only.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Final, Generic, TypeVar

from ipcbus.errors import BadSubject

__all__ = [
    "MATCH_CACHE_SIZE",
    "MAX_SUBJECT_LENGTH",
    "SUBJECT_CACHE_SIZE",
    "SubjectIndex",
    "matches",
    "validate_name",
    "validate_pattern",
    "validate_subject",
]

MAX_SUBJECT_LENGTH: Final = 4096
"""Longest subject or pattern accepted, in characters."""

SUBJECT_CACHE_SIZE: Final = 4096
"""How many distinct valid published subjects :func:`validate_subject` remembers."""

MATCH_CACHE_SIZE: Final = 4096
"""Default number of subjects whose match result a :class:`SubjectIndex` remembers."""

T = TypeVar("T", bound=Hashable)

# Valid published subjects seen recently, each mapped to itself.  Bounded,
# because request inboxes make an endless stream of one-off subjects; when it
# fills up it is simply cleared (a dict has no cheap "drop the oldest": popping
# from the front leaves dead slots that every later next(iter()) rescans).
_valid_subjects: dict[str, str] = {}


def _type_error(subject: object, what: str = "subject") -> BadSubject:
    return BadSubject(subject, f"{what} must be a str, not {type(subject).__name__}", what)


def _check(subject: object, *, publish: bool, what: str = "subject") -> str:
    """Validate ``subject`` (uncached) and return it; raise :class:`BadSubject`.

    ``what`` names it in the error (``"queue group name"``): the same syntax.
    """
    if not isinstance(subject, str):
        raise _type_error(subject, what)
    if not subject:
        raise BadSubject(subject, f"empty {what}", what)
    length = len(subject)
    if length > MAX_SUBJECT_LENGTH:
        raise BadSubject(
            subject,
            f"{what} is {length} characters long; the maximum is {MAX_SUBJECT_LENGTH}",
            what,
        )
    # str.split() with no argument splits on exactly the characters for which
    # str.isspace() is true, in C: one piece as long as the subject means none.
    pieces = subject.split()
    if len(pieces) != 1 or len(pieces[0]) != length:
        index, char = next((i, c) for i, c in enumerate(subject) if c.isspace())
        raise BadSubject(
            subject,
            f"whitespace in {what} ({char!r} at index {index}); "
            "tokens may contain any character except whitespace",
            what,
        )
    if not subject.isascii():
        try:
            subject.encode()
        except UnicodeEncodeError as exc:
            raise BadSubject(
                subject,
                f"character at index {exc.start} cannot be encoded as UTF-8 ({exc.reason}, "
                "a lone surrogate?); subjects travel as UTF-8 text",
                what,
            ) from None
    tokens = subject.split(".")
    if "" in tokens:
        i = tokens.index("")
        if i == 0:
            where = f"the {what} starts with a dot"
        elif i == len(tokens) - 1:
            where = f"the {what} ends with a dot"
        else:
            where = f"two dots in a row at index {sum(len(t) + 1 for t in tokens[:i]) - 1}"
        raise BadSubject(
            subject, f"empty token (consecutive dots or leading/trailing dot): {where}", what
        )
    if publish:
        for wildcard in ("*", ">"):
            if wildcard in tokens:
                raise BadSubject(
                    subject,
                    f"wildcard {wildcard!r} not allowed in a published subject; "
                    "publish to a concrete subject (wildcards are for subscriptions)"
                    if what == "subject"
                    else f"wildcard {wildcard!r} not allowed in a {what}",
                    what,
                )
    elif ">" in tokens[:-1]:
        raise BadSubject(
            subject,
            "'>' must be the last token (it matches all remaining tokens); "
            "use '*' to match a single token in the middle",
        )
    return subject


def validate_subject(subject: str) -> str:
    """Check a subject to publish to and return it unchanged.

    Raises :class:`~ipcbus.errors.BadSubject` if ``subject`` is not a str, is
    empty, longer than :data:`MAX_SUBJECT_LENGTH`, contains whitespace or an
    empty token, or contains a wildcard token (``*`` or ``>``).  Valid subjects
    are remembered (up to :data:`SUBJECT_CACHE_SIZE` of them), so validating
    a subject again costs one dict lookup.
    """
    try:
        known = _valid_subjects.get(subject)
    except TypeError:  # unhashable, so certainly not a str
        raise _type_error(subject) from None
    if known is not None:
        return known
    if type(subject) is str and subject.startswith("_INBOX."):
        # One-off reply subjects (``_INBOX.<node>.<token>``) would churn the
        # cache.  A subject is valid when everything before its last dot is,
        # and its last token is a non-empty run of letters and digits (no
        # whitespace, no wildcard): remember the prefix, not the subject.
        dot = subject.rfind(".")
        if dot > 0 and len(subject) <= MAX_SUBJECT_LENGTH and subject[dot + 1 :].isalnum():
            if subject[:dot] in _valid_subjects:
                return subject
            try:
                _remember(subject[:dot])
            except BadSubject:
                pass  # the full check below names the problem
            else:
                return subject
    return _remember(subject)


def _remember(subject: str) -> str:
    """Validate ``subject`` fully, caching the result (see :func:`validate_subject`)."""
    try:
        return _valid_subjects[subject]
    except (KeyError, TypeError):
        pass
    checked = _check(subject, publish=True)
    if len(_valid_subjects) >= SUBJECT_CACHE_SIZE:
        _valid_subjects.clear()
    _valid_subjects[checked] = checked
    return checked


def validate_name(name: str, what: str) -> str:
    """Check a name with subject syntax and no wildcard (a queue group, a reply
    subject) and return it; the :class:`~ipcbus.errors.BadSubject` names ``what``."""
    try:
        return validate_subject(name)
    except BadSubject:
        _check(name, publish=True, what=what)  # raises, naming `what`
        raise


def validate_pattern(pattern: str) -> str:
    """Check a subscription pattern and return it unchanged.

    The same rules as :func:`validate_subject`, except that ``*`` may be any
    token and ``>`` may be the last token.  Raises
    :class:`~ipcbus.errors.BadSubject`.
    """
    return _check(pattern, publish=False)


def matches(pattern: str, subject: str) -> bool:
    """Tell whether subscription ``pattern`` matches published ``subject``.

    The plain token-by-token definition, used as the reference the fast
    :class:`SubjectIndex` is tested against.  Both arguments are validated
    (:class:`~ipcbus.errors.BadSubject` if either is invalid).
    """
    pattern_tokens = validate_pattern(pattern).split(".")
    subject_tokens = validate_subject(subject).split(".")
    for i, token in enumerate(pattern_tokens):
        if token == ">":
            return len(subject_tokens) > i
        if i >= len(subject_tokens):
            return False
        if token != "*" and token != subject_tokens[i]:
            return False
    return len(pattern_tokens) == len(subject_tokens)


class _Node(Generic[T]):
    """One trie node: the patterns that reach it, token by token."""

    __slots__ = ("children", "full", "items", "star")

    def __init__(self) -> None:
        self.children: dict[str, _Node[T]] = {}  # literal next tokens
        self.star: _Node[T] | None = None  # '*' as the next token
        # item -> registration count, for the pattern that ends here ...
        self.items: dict[T, int] = {}
        # ... and for the pattern that ends here followed by '>'.
        self.full: dict[T, int] = {}

    def is_empty(self) -> bool:
        return not (self.children or self.star is not None or self.items or self.full)


class SubjectIndex(Generic[T]):
    """Map subscription patterns to items; find the items whose patterns match a subject.

    Items are any hashable values (subscription ids, links...).  Registrations
    are counted: ``add(p, x)`` twice records two registrations, and it takes
    ``remove(p, x)`` twice before ``x`` stops matching through ``p``.
    ``len(index)`` is the number of registrations.

    :meth:`match` returns each matching item once, however many of its patterns
    match, ordered by when the item was first registered (an item that loses
    every registration and is added again counts as new).  Results are cached
    per subject, up to ``cache_size`` subjects (0 disables the cache); any
    :meth:`add` or :meth:`remove` clears the cache.
    """

    __slots__ = ("_cache", "_cache_size", "_count", "_order", "_patterns", "_refs", "_root", "_seq")

    def __init__(self, cache_size: int = MATCH_CACHE_SIZE) -> None:
        """Create an empty index whose match cache holds up to ``cache_size`` subjects."""
        if not isinstance(cache_size, int) or isinstance(cache_size, bool):
            raise TypeError(f"cache_size must be an int, not {type(cache_size).__name__}")
        if cache_size < 0:
            raise ValueError(f"cache_size must be >= 0 (0 disables the cache), not {cache_size}")
        self._cache_size = cache_size
        self._cache: dict[str, tuple[T, ...]] = {}
        self._root: _Node[T] = _Node()
        # pattern -> the item-count dict of its trie node (the same dict object);
        # a pattern is a key only while it has at least one registration.
        self._patterns: dict[str, dict[T, int]] = {}
        self._refs: dict[T, int] = {}  # item -> registrations over all patterns
        self._order: dict[T, int] = {}  # item -> sequence number of first registration
        self._seq = 0
        self._count = 0

    def add(self, pattern: str, item: T) -> None:
        """Register ``item`` under ``pattern`` (validated; :class:`~ipcbus.errors.BadSubject`).

        Adding the same ``(pattern, item)`` again adds another registration.
        """
        validate_pattern(pattern)  # also rejects unhashable non-strings
        counts = self._patterns.get(pattern)
        if counts is None:
            tokens = pattern.split(".")
            node = self._root
            for token in tokens[:-1]:
                node = self._child(node, token)
            last = tokens[-1]
            counts = node.full if last == ">" else self._child(node, last).items
            self._patterns[pattern] = counts
        counts[item] = counts.get(item, 0) + 1
        refs = self._refs.get(item, 0)
        if not refs:
            self._order[item] = self._seq
            self._seq += 1
        self._refs[item] = refs + 1
        self._count += 1
        self._cache.clear()

    def remove(self, pattern: str, item: T) -> bool:
        """Remove one registration of ``item`` under ``pattern``.

        Returns False (and changes nothing) if there is none, including when
        ``pattern`` is not even a valid pattern.
        """
        try:
            counts = self._patterns.get(pattern)
        except TypeError:  # unhashable: never added
            return False
        if counts is None:
            return False
        n = counts.get(item, 0)
        if not n:
            return False
        if n > 1:
            counts[item] = n - 1
        else:
            del counts[item]
            if not counts:
                del self._patterns[pattern]
                self._prune(pattern)
        refs = self._refs[item]
        if refs > 1:
            self._refs[item] = refs - 1
        else:
            del self._refs[item]
            del self._order[item]
        self._count -= 1
        self._cache.clear()
        return True

    def match(self, subject: str) -> tuple[T, ...]:
        """Return the distinct items registered under a pattern matching ``subject``.

        ``subject`` must be a valid published subject
        (:class:`~ipcbus.errors.BadSubject` otherwise).  Items come in order of
        first registration.  A cached subject costs one dict lookup.
        """
        try:
            return self._cache[subject]
        except (KeyError, TypeError):  # TypeError: unhashable; validation rejects it
            pass
        result = self._lookup(validate_subject(subject))
        cache = self._cache
        if len(cache) >= self._cache_size:
            cache.clear()
        if self._cache_size:
            cache[subject] = result
        return result

    def has_match(self, subject: str) -> bool:
        """Tell whether any pattern in the index matches ``subject`` (validated, cached)."""
        return bool(self.match(subject))

    def patterns(self) -> list[str]:
        """Return the patterns with at least one registration, oldest first."""
        return list(self._patterns)

    def __len__(self) -> int:
        """Return the number of ``(pattern, item)`` registrations, counting repeats."""
        return self._count

    def __repr__(self) -> str:
        """Summarise the index: registrations, patterns and items."""
        return (
            f"<SubjectIndex {self._count} registrations, {len(self._patterns)} patterns, "
            f"{len(self._refs)} items>"
        )

    @staticmethod
    def _child(node: _Node[T], token: str) -> _Node[T]:
        """Return ``node``'s child for ``token``, creating it if needed."""
        if token == "*":
            if node.star is None:
                node.star = _Node()
            return node.star
        child = node.children.get(token)
        if child is None:
            child = node.children[token] = _Node()
        return child

    def _prune(self, pattern: str) -> None:
        """Detach the trie nodes on ``pattern``'s path that no pattern needs any more."""
        tokens = pattern.split(".")
        if tokens[-1] == ">":
            tokens.pop()
        path: list[tuple[_Node[T], str, _Node[T]]] = []
        node = self._root
        for token in tokens:
            child = node.star if token == "*" else node.children.get(token)
            assert child is not None, f"trie is missing the path of {pattern!r}"
            path.append((node, token, child))
            node = child
        for parent, token, child in reversed(path):
            if not child.is_empty():
                break
            if token == "*":
                parent.star = None
            else:
                del parent.children[token]

    def _lookup(self, subject: str) -> tuple[T, ...]:
        """Walk the trie for a valid subject (the uncached half of :meth:`match`)."""
        tokens = subject.split(".")
        last = len(tokens)
        node = self._root
        i = 0
        # Fast path: while no wildcard branches off, there is a single candidate
        # node per token, so follow literal children without building lists.
        while node.star is None and not node.full:
            if i == last:
                found = node.items
                if len(found) > 1:
                    return tuple(sorted(found, key=self._order.__getitem__))
                return tuple(found)
            child = node.children.get(tokens[i])
            if child is None:
                return ()
            node = child
            i += 1
        # General case: the set of nodes reached by the tokens so far.
        found = {}
        nodes = [node]
        while i < last:
            token = tokens[i]
            i += 1
            following: list[_Node[T]] = []
            for node in nodes:
                if node.full:  # '>' here matches this token and all after it
                    found.update(node.full)
                child = node.children.get(token)
                if child is not None:
                    following.append(child)
                if node.star is not None:
                    following.append(node.star)
            if not following:
                break
            nodes = following
        else:
            for node in nodes:
                if node.items:
                    found.update(node.items)
        if len(found) > 1:
            return tuple(sorted(found, key=self._order.__getitem__))
        return tuple(found)
