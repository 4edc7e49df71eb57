"""A Narrative's ``div`` (FHIR R4 narrative.html, txt-1 and txt-2): the XHTML subset or refused.

txt-1: only the basic HTML formatting elements and attributes of HTML 4.0 chapters 7-11 and 12,
``<a>`` (name or href), images and style attributes; no scripts, forms, event handlers, frames,
objects. txt-2: some non-whitespace content. The div is an XHTML ``div`` in the XHTML
namespace. The element and attribute lists are the ones the FHIR validator
(org.hl7.fhir.validation XhtmlValidator) enforces, so what it accepts is accepted here.

Parsed with the stdlib's expat as a stream (no tree is built), safely: a narrative may not
carry a DTD, so a DOCTYPE, an entity declaration or a processing instruction stops the parse
before anything is expanded; nesting and length are bounded. Messages name the element or
attribute, never the content (it is PHI).
"""

from __future__ import annotations

import re
from xml.parsers import expat

XHTML_NS = "http://www.w3.org/1999/xhtml"
XML_NS = "http://www.w3.org/XML/1998/namespace"
MAX_CHARS = 4 * 1024 * 1024  # bounded anyway by the body limit; a narrative is far smaller
MAX_DEPTH = 64
ELEMENTS = frozenset("""
    p br div h1 h2 h3 h4 h5 h6 a span b em i strong small big tt dfn q var abbr acronym cite blockquote hr
    address bdo kbd sub sup ul ol li dl dt dd pre table caption colgroup col thead tr tfoot tbody th td code
    samp img map area""".split())
ATTRIBUTES = frozenset("""
    title style class id lang dir accesskey tabindex span width align valign char charoff abbr axis headers
    scope rowspan colspan""".split())
ELEMENT_ATTRIBUTES = frozenset("""
    a.href a.name a.charset a.type a.hreflang a.rel a.rev a.shape a.coords img.src img.alt img.longdesc
    img.height img.width img.usemap img.ismap img.border map.name area.shape area.coords area.href area.nohref
    area.alt blockquote.cite q.cite table.summary table.width table.border table.frame table.rules
    table.cellspacing table.cellpadding td.nowrap""".split())
URL_ATTRIBUTES = frozenset({"href", "src", "cite", "longdesc", "usemap"})
# A URL is relative, a fragment, or one of these schemes; data: only for an image's own bytes.
SAFE_SCHEMES = frozenset({"http", "https", "mailto", "tel", "urn", "ftp"})
_SCHEME = re.compile(r"^\s*([A-Za-z][A-Za-z0-9+.\-]*):")
_CONTROL = re.compile(r"[\x00-\x20\x7f]+")
_BAD_STYLE = re.compile(r"expression\s*\(|javascript:|vbscript:|@import|behavior\s*:|-moz-binding|url\s*\(",
                        re.IGNORECASE)


class _Refused(Exception):
    pass


def problems(div: str) -> list[str]:
    """What breaks txt-1/txt-2 or the XHTML div rule in ``div``, as short texts (empty: fine)."""
    if len(div) > MAX_CHARS:
        return [f"longer than {MAX_CHARS} characters"]
    found: list[str] = []
    state = {"depth": 0, "content": False}
    parser = expat.ParserCreate(namespace_separator=" ")

    def refuse(what: str) -> None:
        raise _Refused(what)

    def start(name: str, attrs: dict[str, str]) -> None:
        ns, _, local = name.rpartition(" ")
        depth = state["depth"] = state["depth"] + 1
        if depth > MAX_DEPTH:
            refuse(f"elements nest more than {MAX_DEPTH} levels deep")
        if ns != XHTML_NS:
            refuse(f"<{local}> is not in the XHTML namespace {XHTML_NS}" if depth > 1 else
                   f"the root element must be an XHTML div (xmlns=\"{XHTML_NS}\")")
        if depth == 1 and local != "div":
            refuse(f"the root element must be a div, not <{local}>")
        if local not in ELEMENTS:
            found.append(f"<{local}> is not allowed in a narrative (txt-1)")
        if local == "img":
            state["content"] = True
        for key, value in attrs.items():
            ans, _, aname = key.rpartition(" ")
            if ans == XML_NS and aname in ("lang", "space"):
                continue
            if ans or (aname not in ATTRIBUTES and f"{local}.{aname}" not in ELEMENT_ATTRIBUTES):
                what = "an event handler" if aname.lower().startswith("on") else "not allowed"
                found.append(f"attribute {aname} on <{local}> is {what} (txt-1)")
            elif aname in URL_ATTRIBUTES and not _safe_url(value, image=local == "img" and aname == "src"):
                found.append(f"attribute {aname} on <{local}> has a URL scheme that is not allowed (txt-1)")
            elif aname == "style" and _BAD_STYLE.search(value):
                found.append(f"the style on <{local}> loads or runs something (txt-1 allows formatting only)")
        if len(found) >= 10:
            raise _Refused("")

    def end(name: str) -> None:
        state["depth"] -= 1

    def text(data: str) -> None:
        if not state["content"] and data.strip():
            state["content"] = True

    parser.StartElementHandler = start
    parser.EndElementHandler = end
    parser.CharacterDataHandler = text
    parser.StartDoctypeDeclHandler = lambda *a: refuse("a DOCTYPE is not allowed in a narrative")
    parser.EntityDeclHandler = lambda *a: refuse("entity declarations are not allowed in a narrative")
    parser.ProcessingInstructionHandler = lambda *a: refuse("processing instructions are not allowed in a narrative")
    parser.ExternalEntityRefHandler = lambda *a: refuse("external entities are not allowed in a narrative")
    parser.SetParamEntityParsing(expat.XML_PARAM_ENTITY_PARSING_NEVER)
    try:
        parser.Parse(div, True)
    except _Refused as e:
        if str(e):
            found.append(str(e))
        return found
    except expat.ExpatError as e:
        return [f"not well-formed XHTML ({expat.ErrorString(e.code)}, line {e.lineno} column {e.offset})"]
    if not found and not state["content"]:
        found.append("the narrative has no non-whitespace content (txt-2)")
    return found


def _safe_url(value: str, *, image: bool) -> bool:
    m = _SCHEME.match(_CONTROL.sub("", value))  # "java\tscript:" is javascript: to a browser
    if m is None:
        return True  # relative or a fragment (#contained)
    scheme = m.group(1).lower()
    if scheme == "data":
        media = _CONTROL.sub("", value)[5:].lower()
        return image and media.startswith("image/") and not media.startswith("image/svg")  # svg: script
    return scheme in SAFE_SCHEMES


__all__ = ["problems"]
