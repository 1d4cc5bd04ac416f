from __future__ import annotations

import bz2

from megatron_dmc.assets.wikitext import iter_wiki_articles, wikitext_to_plain

ARTICLE = """{{Infobox thing
| name = {{nested|x}}
}}
'''Alpha''' is a [[Greek alphabet|letter]] of the [[Greek alphabet]].<ref name=a>{{cite|x}}</ref> It is [http://example.org first].<!-- note -->
[[File:Alpha.png|thumb|The letter [[alpha]].]]

== History ==
{| class="wikitable"
| cell || cell
|}
* It came from &quot;aleph&quot;.

== Empty ==
{{stub}}

== Usage ==
Used in ''mathematics''.<br/>

== References ==
{{reflist}}
Trailing text.
"""


def test_wikitext_to_plain_keeps_prose_only():
    assert wikitext_to_plain(ARTICLE) == (
        "Alpha is a letter of the Greek alphabet. It is first.\n\n"
        "History\n\n"
        'It came from "aleph".\n\n'
        "Usage\n\n"
        "Used in mathematics."
    )


def test_dump_reader_skips_redirects_and_other_namespaces(tmp_path):
    page = "<page><title>{t}</title><ns>{ns}</ns>{r}<revision><text>{x}</text></revision></page>"
    xml = (
        '<mediawiki xmlns="http://www.mediawiki.org/xml/export-0.10/">'
        + page.format(t="A", ns=0, r="", x="body a")
        + page.format(t="B", ns=0, r='<redirect title="A" />', x="#REDIRECT [[A]]")
        + page.format(t="Talk:A", ns=1, r="", x="talk")
        + "</mediawiki>"
    )
    path = tmp_path / "dump.xml.bz2"
    path.write_bytes(bz2.compress(xml.encode()))
    assert list(iter_wiki_articles(path)) == [("A", "body a")]
