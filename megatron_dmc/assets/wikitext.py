"""MediaWiki XML dump -> plain-text articles (one document per article).

Keeps prose, headings and list items; drops templates, tables, references, files,
categories, HTML tags, and everything from the reference-like closing sections on.
"""

from __future__ import annotations

import bz2
import html
import re
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

CLOSING_SECTIONS = {
    "references",
    "notes",
    "see also",
    "external links",
    "further reading",
    "bibliography",
    "sources",
    "footnotes",
    "citations",
}
DROPPED_LINK_PREFIXES = ("file:", "image:", "category:", "media:")

_COMMENT = re.compile(r"<!--.*?-->", re.S)
_REF = re.compile(r"<ref[^>/]*/>|<ref[^>]*>.*?</ref>", re.S | re.I)
_BLOCK_TAGS = re.compile(
    r"<(math|gallery|timeline|score|syntaxhighlight)[^>]*>.*?</\1>", re.S | re.I
)
_TAG = re.compile(r"</?[a-zA-Z][^>]*>")
_TEMPLATE = re.compile(r"\{\{[^{}]*\}\}")
_TABLE = re.compile(r"\{\|(?:(?!\{\|).)*?\|\}", re.S)
_LINK = re.compile(r"\[\[([^\[\]]*)\]\]")
_EXTERNAL_LINK = re.compile(r"\[(?:https?:)?//[^\s\]]+(?: ([^\]]*))?\]")
_BOLD_ITALIC = re.compile(r"'{2,}")
_HEADING = re.compile(r"^(=+)\s*(.*?)\s*\1\s*$")
_LIST_MARK = re.compile(r"^[*#:;]+\s*")
_SPACES = re.compile(r"[ \t\u00a0]+")


def _remove_nested(pattern: re.Pattern[str], text: str) -> str:
    """Remove innermost matches until none is left (templates and tables nest)."""
    while True:
        text, count = pattern.subn("", text)
        if count == 0:
            return text


def _link_text(match: re.Match[str]) -> str:
    target, _, label = match.group(1).partition("|")
    if target.strip().lower().startswith(DROPPED_LINK_PREFIXES):
        return ""
    return (label or target).split("|")[-1]


def _remove_links(text: str) -> str:
    while True:  # innermost first: file captions hold links
        text, count = _LINK.subn(_link_text, text)
        if count == 0:
            return text


def _clean_lines(text: str) -> list[tuple[str, bool]]:
    """(line, is_heading) pairs of the prose, up to the first closing section."""
    lines: list[tuple[str, bool]] = []
    for raw in text.splitlines():
        line = raw.strip()
        heading = _HEADING.match(line)
        if heading and heading.group(2).strip().lower() in CLOSING_SECTIONS:
            break
        if heading:
            line = heading.group(2)
        line = _SPACES.sub(" ", _LIST_MARK.sub("", line)).strip()
        if line and not line.startswith(("|", "!", "{", "}", "[[", "__")):
            lines.append((line, heading is not None))
    return lines


def _drop_empty_sections(lines: list[tuple[str, bool]]) -> list[str]:
    """Headings followed by another heading (or nothing) lost their section to markup."""
    nxt_is_heading = [h for _, h in lines[1:]] + [True]
    return [line for (line, h), after in zip(lines, nxt_is_heading) if not (h and after)]


def wikitext_to_plain(wikitext: str) -> str:
    """Plain text of one article's wikitext, paragraphs separated by blank lines."""
    text = _COMMENT.sub("", wikitext)
    text = _BLOCK_TAGS.sub("", _REF.sub("", text))
    text = _remove_nested(_TABLE, _remove_nested(_TEMPLATE, text))
    text = _remove_links(text)
    text = _EXTERNAL_LINK.sub(lambda m: m.group(1) or "", text)
    text = _TAG.sub("", _BOLD_ITALIC.sub("", text))
    return "\n\n".join(_drop_empty_sections(_clean_lines(html.unescape(text))))


def iter_wiki_articles(dump_file: str | Path) -> Iterator[tuple[str, str]]:
    """(title, wikitext) of main-namespace, non-redirect pages of a (.bz2) XML dump."""
    opener = bz2.open if str(dump_file).endswith(".bz2") else open
    with opener(dump_file, "rb") as stream:
        for _, elem in ET.iterparse(stream):
            if _local(elem.tag) != "page":
                continue
            fields = {_local(child.tag): child for child in elem.iter()}
            ns, text = fields.get("ns"), fields.get("text")
            if "redirect" not in fields and ns is not None and ns.text == "0" and text is not None:
                yield fields["title"].text or "", text.text or ""
            elem.clear()


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def wiki_documents(dump_file: str | Path, min_chars: int = 200) -> list[str]:
    """Plain-text articles ("Title\\n\\nbody") with at least `min_chars` of body."""
    documents = []
    for title, wikitext in iter_wiki_articles(dump_file):
        body = wikitext_to_plain(wikitext)
        if len(body) >= min_chars:
            documents.append(f"{title}\n\n{body}")
    return documents
