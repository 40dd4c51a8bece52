"""HTML mail as plain text: inscriptis lays tables out as rows, so a two-cell row
`<td>Numer seryjny:</td><td>SN-1</td>` becomes the line `Numer seryjny:  SN-1`."""

from __future__ import annotations

import html as html_lib
import logging
import re

import lxml.html
from inscriptis import Inscriptis
from inscriptis.css_profiles import CSS_PROFILES
from inscriptis.model.config import ParserConfig
from lxml import etree

log = logging.getLogger(__name__)

MAX_HTML_CHARS = 1024 * 1024
# inscriptis costs ~10 µs per element; beyond this (per mail) a plain walk keeps us in time.
MAX_LAYOUT_ELEMENTS = 20_000

_XML_DECLARATION = re.compile(r"^\s*<\?xml[^>]*\?>", re.I)
_TAG = re.compile(r"<[^<>]*>")
_CONFIG = ParserConfig(css=CSS_PROFILES["strict"])
# Quoted history that mail clients mark up as such (Thunderbird/Apple, Gmail).
_QUOTE_XPATH = "//blockquote[@type='cite' or contains(concat(' ', @class, ' '), ' gmail_quote ')]"
_BLOCKS = ("p", "div", "br", "tr", "li", "h1", "h2", "h3", "h4", "h5", "h6", "table", "pre")


def _plain_walk(doc: lxml.html.HtmlElement) -> str:
    for element in doc.iter(*_BLOCKS):
        element.tail = "\n" + (element.tail or "")
    for cell in doc.iter("td", "th"):
        cell.tail = "  " + (cell.tail or "")
    return etree.tostring(doc, method="text", encoding="unicode")


def html_to_text(html: str, max_elements: int = MAX_LAYOUT_ELEMENTS) -> tuple[str, int]:
    """The readable text of an HTML body, quoted `<blockquote>` history left out; and how
    many elements it laid out with inscriptis (at most `max_elements`, else none)."""
    html = _XML_DECLARATION.sub("", html[:MAX_HTML_CHARS])
    if not html.strip():
        return "", 0
    try:
        doc = lxml.html.document_fromstring(html)
    except (etree.ParserError, ValueError) as exc:
        log.debug("HTML not parsed (%s): tags stripped", exc)
        return html_lib.unescape(_TAG.sub(" ", html)), 0
    for element in doc.xpath(_QUOTE_XPATH) + list(doc.iter("style", "script", "head")):
        if element.getparent() is not None:
            element.drop_tree()
    elements = sum(1 for _ in doc.iter())
    if elements <= max_elements:
        try:
            return Inscriptis(doc, _CONFIG).get_text(), elements
        except (RecursionError, ValueError, TypeError, AttributeError) as exc:
            log.debug("inscriptis failed (%r): plain text walk", exc)
    return _plain_walk(doc), 0
