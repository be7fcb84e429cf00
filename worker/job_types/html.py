"""A page's title, main text and links, with selectolax (Lexbor): one 1.6 MB wheel with no dependencies, where
trafilatura's better main-text heuristics bring 17 packages and 20 MB (lxml, babel, dateparser...). Imported by the
scrape job when it runs, never by the web process."""

from __future__ import annotations

from dataclasses import dataclass

import httpx
from selectolax.lexbor import LexborHTMLParser

MAX_LINKS = 1_000  # per page, in document order
MAX_TEXT_CHARS = 50_000  # per page: the rest is cut, and the page says so
# Not the page's content: navigation, chrome and code.
NOISE = "script, style, noscript, template, svg, canvas, iframe, nav, header, footer, aside, form, [hidden]"
# Elements that end a line of text (the rest run on, as a reader sees them).
BLOCKS = (
    "p, div, section, article, main, li, dt, dd, h1, h2, h3, h4, h5, h6, br, tr, blockquote, pre, figcaption, table"
)

BREAK = "\u2029"  # the paragraph separator: marks where a block ended, before whitespace is collapsed


@dataclass(frozen=True)
class Extract:
    title: str | None
    text: str
    truncated: bool
    links: list[str]


def extract(html: str, url: str) -> Extract:
    """What a reader gets from the page at `url`: links made absolute against it (or its <base href>), http(s)
    only, fragments dropped, each once; the text of <main> (or <article>, or the body) without its chrome."""
    tree = LexborHTMLParser(html)
    title_node = tree.css_first("title")
    title = _clean(title_node.text(strip=True)) if title_node is not None else ""
    base = httpx.URL(url)
    base_node = tree.css_first("base[href]")
    if base_node is not None:
        base = _join(base, base_node.attributes.get("href") or "") or base
    links: dict[str, None] = {}
    for anchor in tree.css("a[href]"):
        link = _join(base, anchor.attributes.get("href") or "")
        if link is not None and link.scheme in ("http", "https") and link.host and "%" not in link.host:
            links.setdefault(_clean(str(link.copy_with(fragment=None))))
            if len(links) >= MAX_LINKS:
                break
    for node in tree.css(NOISE):
        node.decompose()
    root = tree.css_first("main") or tree.css_first("article") or tree.css_first("[role=main]") or tree.body
    text = ""
    if root is not None:
        for node in root.css(BLOCKS):
            node.insert_after(BREAK)
        # The source's own line breaks are whitespace, as a browser shows them; a block's end is a line's
        lines = (" ".join(line.split()) for line in root.text(separator="", strip=False).split(BREAK))
        text = _clean("\n".join(line for line in lines if line))
    return Extract(title or None, text[:MAX_TEXT_CHARS], len(text) > MAX_TEXT_CHARS, list(links))


def _join(base: httpx.URL, href: str) -> httpx.URL | None:
    try:
        return base.join(href.strip())
    except (httpx.InvalidURL, ValueError, UnicodeError):
        return None


def _clean(text: str) -> str:
    """PostgreSQL's jsonb takes no NUL: a page that holds one loses that character, not its result."""
    return text.replace("\x00", "")
