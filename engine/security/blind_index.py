"""Blind indexes: search terms for PHI that the database can match without holding the PHI.

The store keeps no patient name, identifier or birth date in clear (docs/architecture.md,
"Encryption at rest"), yet FHIR search (``Patient?family=DOE``) and C-FIND
(``PatientName=DOE*``) must find rows at the speed of an index. So each searchable value is
reduced to keyed HMACs of its normalised form, and a query is reduced the same way: equal
terms match in SQL, nothing else is revealed to someone who holds the database but not the
key file.

Three kinds of term, each scoped (``scope`` names the field, e.g. ``"Patient.family"`` or
``"dicom.PatientName"``) so the same word in two fields gives two unrelated terms:

- ``exact``: the whole value, normalised (FHIR ``:exact`` after its own case check, DICOM
  single-value matching, identifiers);
- ``words``: each word of the value (FHIR string search matches any word of a name);
- ``prefixes``: every prefix of every word up to ``MAX_PREFIX`` characters, for FHIR's
  "starts with" and DICOM's trailing ``*``. A query prefix longer than ``MAX_PREFIX`` is
  looked up by its first ``MAX_PREFIX`` characters and the candidates are checked after
  decryption; so are ``:contains`` and DICOM wildcards elsewhere than at the end.

Normalisation follows FHIR string matching (R4 3.1.1.5.13): case-insensitive and
accent-insensitive, so ``Müller`` and ``MULLER`` give equal terms; DICOM PN component
separators (``^``, ``=``) and punctuation separate words.

What the terms reveal to a holder of the database alone: which rows share a value, a word
or a prefix (frequency analysis can guess common names), and how many words and prefix
characters (up to ``MAX_PREFIX``) a value has. Not the values. Keys rotate with the key file's
HMAC secrets; a changed secret needs the index rebuilt.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import unicodedata

MAX_PREFIX = 8
_SEPARATORS = re.compile(r"[\s\^=,.;:/\\\-_'\"()]+")


def normalise(value: str) -> str:
    """Case- and accent-folded form, separators collapsed to single spaces."""
    decomposed = unicodedata.normalize("NFKD", value)
    stripped = "".join(c for c in decomposed if not unicodedata.combining(c))
    return " ".join(_SEPARATORS.split(stripped.casefold())).strip()


def words(value: str) -> list[str]:
    """The normalised words of a value, in order, without repeats."""
    out: list[str] = []
    for w in normalise(value).split():
        if w not in out:
            out.append(w)
    return out


def term(key: bytes, scope: str, kind: str, text: str) -> str:
    """One blind term: a truncated keyed HMAC of ``kind``, ``scope`` and already normalised ``text``."""
    msg = f"{kind}\x1f{scope}\x1f{text}".encode()
    return hmac.new(key, msg, hashlib.sha256).hexdigest()[:32]


def exact_term(key: bytes, scope: str, value: str) -> str:
    return term(key, scope, "eq", normalise(value))


def word_terms(key: bytes, scope: str, value: str) -> set[str]:
    return {term(key, scope, "w", w) for w in words(value)}


def prefix_terms(key: bytes, scope: str, value: str) -> set[str]:
    """Terms for every prefix (1 to ``MAX_PREFIX`` characters) of every word of ``value``."""
    out: set[str] = set()
    for w in words(value):
        for n in range(1, min(len(w), MAX_PREFIX) + 1):
            out.add(term(key, scope, "p", w[:n]))
    return out


def index_terms(key: bytes, scope: str, value: str) -> set[str]:
    """Everything stored for one value: its exact term, its words and their prefixes."""
    if not normalise(value):
        return set()
    return {exact_term(key, scope, value)} | word_terms(key, scope, value) | prefix_terms(key, scope, value)


def prefix_query(key: bytes, scope: str, prefix: str) -> tuple[str | None, bool]:
    """The term that finds candidates whose some word starts with ``prefix``, and whether they
    must be re-checked after decryption (the prefix was longer than the index keeps, or had
    more than one word). ``(None, True)`` when the prefix normalises to nothing (match all)."""
    ws = normalise(prefix).split()
    if not ws:
        return None, True
    first = ws[0]
    recheck = len(ws) > 1 or len(first) > MAX_PREFIX
    return term(key, scope, "p", first[:MAX_PREFIX]), recheck


def start_terms(key: bytes, scope: str, value: str) -> set[str]:
    """Terms for the first 1 to ``MAX_PREFIX`` characters of the whole normalised value.

    For matching that anchors at the start of the value rather than of any word: a DICOM
    wildcard ``DOE*`` or ``DOE^J*`` matches ``DOE^JOHN`` but not ``O'DOE^JOHN``, whose
    second word also starts with ``DOE``.
    """
    n = normalise(value)
    return {term(key, scope, "s", n[:i]) for i in range(1, min(len(n), MAX_PREFIX) + 1)}


def stored_terms(key: bytes, scope: str, value: str, *, prefixes: bool = True, starts: bool = False) -> set[str]:
    """``exact_term`` | ``word_terms`` | (``prefix_terms``) | (``start_terms``) of one value, normalising
    it once (the index writes these for every new row, on the receive path)."""
    n = normalise(value)
    if not n:
        return set()
    ws = list(dict.fromkeys(n.split()))
    out = {term(key, scope, "eq", n)} | {term(key, scope, "w", w) for w in ws}
    if prefixes:
        out |= {term(key, scope, "p", w[:i]) for w in ws for i in range(1, min(len(w), MAX_PREFIX) + 1)}
    if starts:
        out |= {term(key, scope, "s", n[:i]) for i in range(1, min(len(n), MAX_PREFIX) + 1)}
    return out


def starts_with_terms(key: bytes, scope: str, literal: str) -> list[str] | None:
    """Terms (to AND) that every value beginning with ``literal`` has among its ``start_terms``
    and ``word_terms``: the start term of the literal's normalised form (cut at ``MAX_PREFIX``)
    and, for a longer literal, the word terms of the words it completes.

    Normalisation works character by character before it joins words with single spaces, so
    the normal form of a value that begins with the literal begins with the literal's normal
    form, and a word the literal closes with a separator is a whole word of the value. A
    necessary condition only: candidates are re-checked after decryption. ``None`` when the
    literal normalises to nothing (nothing to narrow by).
    """
    n = normalise(literal)
    if not n:
        return None
    out = [term(key, scope, "s", n[:MAX_PREFIX])]
    if len(n) > MAX_PREFIX:
        ws = n.split()
        closed = len(normalise(literal + "x").split()) > len(ws)  # a separator ends the last word
        out += [term(key, scope, "w", w) for w in (ws if closed else ws[:-1])]
    return out
