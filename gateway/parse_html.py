"""HTML mail as plain text: inscriptis lays tables out as rows, so a two-cell row
`<td>Numer seryjny:</td><td>SN-1</td>` becomes the line `Numer seryjny:  SN-1`."""

from __future__ import annotations

import html as html_lib
import logging
import re
from typing import cast

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
# What lxml parses but refuses to write back into a tree (drop_tree moves a tail text):
# C0 controls other than tab/LF/CR, and lone surrogates. No reader sees them anyway.
_XML_INCOMPATIBLE = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")
_TAG = re.compile(r"<[^<>]*>")
_CONFIG = ParserConfig(css=CSS_PROFILES["strict"])
_LOWER = "translate({}, 'ABCDEFGHIJKLMNOPQRSTUVWXYZ', 'abcdefghijklmnopqrstuvwxyz')"
# A style attribute lower-cased and without blanks: "border-top: solid #E1E1E1" matches too.
_STYLE = "translate(@style, 'ABCDEFGHIJKLMNOPQRSTUVWXYZ \t', 'abcdefghijklmnopqrstuvwxyz')"


def _has_class(name: str) -> str:
    return f"contains(concat(' ', normalize-space(@class), ' '), ' {name} ')"


# Quoted history that mail clients mark up as such, dropped where it stands: Thunderbird
# and Apple Mail (`type=cite`, also nested in divs), Gmail, Yahoo, and the border-left
# blockquotes of mail.ru, Zimbra and most webmails.
_QUOTE_XPATH = (
    "//blockquote[" + _LOWER.format("@type") + "='cite'"
    " or " + _has_class("gmail_quote") + " or " + _has_class("yahoo_quoted")
    + " or contains(" + _STYLE + ", 'border-left:')]"
    " | //div[" + _has_class("gmail_quote") + " or " + _has_class("gmail_quote_container")
    + " or " + _has_class("yahoo_quoted") + " or starts-with(@id, 'yahoo_quoted')]"
)
# Where clients start the history without marking it up as a quote: Outlook.com/Hotmail
# (`appendonsend`, `divRplyFwdMsg`), new Outlook, Outlook desktop and Windows Mail (the
# header block's border-top div), Zimbra (`hr#zwchr`), Lotus Notes/Domino (its history
# sections). A marker line goes before the first of them, so the text below is history for
# `parse_text.split_quoted` (and still readable as an inline forward).
_HISTORY_XPATH = (
    "//*[@id='appendonsend' or @id='divRplyFwdMsg' or @id='mail-editor-reference-message-container'"
    " or @id='zwchr' or " + _has_class("OutlookMessageHeader") + " or " + _has_class("domino-section")
    + " or (self::div and (contains(" + _STYLE + ", 'border-top:solid#e1e1e1')"
    " or contains(" + _STYLE + ", 'border-top:solid#b5c4df')))]"
)
HISTORY_MARKER = "-----Original Message-----"
_BLOCKS = ("p", "div", "br", "tr", "li", "h1", "h2", "h3", "h4", "h5", "h6", "table", "pre")


def _plain_walk(doc: lxml.html.HtmlElement) -> str:
    for element in doc.iter(*_BLOCKS):
        element.tail = "\n" + (element.tail or "")
    for cell in doc.iter("td", "th"):
        cell.tail = "  " + (cell.tail or "")
    return etree.tostring(doc, method="text", encoding="unicode")


# XPath over a large tree costs ~1 µs an element: run it only when the HTML names a marker.
_HISTORY_HINTS = ("appendonsend", "divrplyfwdmsg", "mail-editor-reference", "zwchr",
                  "outlookmessageheader", "domino-section", "border-top")
_QUOTE_HINTS = ("blockquote", "gmail_quote", "yahoo_quoted")


def _mark_history(doc: lxml.html.HtmlElement) -> None:
    """A HISTORY_MARKER line before the first element that starts unmarked history."""
    starts = doc.xpath(_HISTORY_XPATH)
    if not starts or starts[0].getparent() is None:
        return
    marker = lxml.html.Element("div")
    marker.text = HISTORY_MARKER
    starts[0].addprevious(marker)


def html_to_text(html: str, max_elements: int = MAX_LAYOUT_ELEMENTS) -> tuple[str, int]:
    """The readable text of an HTML body, quoted `<blockquote>` history left out; and how
    many elements it laid out with inscriptis (at most `max_elements`, else none)."""
    html = _XML_INCOMPATIBLE.sub("", _XML_DECLARATION.sub("", html[:MAX_HTML_CHARS]))
    if not html.strip():
        return "", 0
    try:
        doc = lxml.html.document_fromstring(html)
    except (etree.ParserError, ValueError) as exc:
        log.debug("HTML not parsed (%s): tags stripped", exc)
        return html_lib.unescape(_TAG.sub(" ", html)), 0
    lowered = html.lower()
    # Element paths and tag filters on an HTML document yield HtmlElements (the stubs
    # type xpath() and iter() for any result and any tree).
    quotes = (cast(list[lxml.html.HtmlElement], doc.xpath(_QUOTE_XPATH))
              if any(h in lowered for h in _QUOTE_HINTS) else [])
    for element in quotes + cast(list[lxml.html.HtmlElement],
                                 list(doc.iter("style", "script", "head"))):
        if element.getparent() is not None:
            element.drop_tree()
    if any(h in lowered for h in _HISTORY_HINTS):
        _mark_history(doc)
    # As doc.iter() counts (elements, comments, PIs), but in C: no element proxies.
    # XPath's count() is always a number (a float)
    elements = int(cast(float, doc.xpath("count(//*|//comment()|//processing-instruction())")))
    if elements <= max_elements:
        try:
            return Inscriptis(doc, _CONFIG).get_text(), elements
        except (RecursionError, ValueError, TypeError, AttributeError) as exc:
            log.debug("inscriptis failed (%r): plain text walk", exc)
    return _plain_walk(doc), 0
