"""Word counting and fence cleanup."""

from generator_service.text import count_words, strip_fences


def test_words_are_counted_on_the_text_not_the_tags() -> None:
    html = (
        '<h2 class="big title">CNC machining</h2>'
        '<p>The <a href="https://x.y/a-b-c">lathe</a> runs.</p>'
    )
    assert count_words(html) == 5


def test_scripts_and_styles_do_not_count() -> None:
    assert count_words("<p>one two</p><script>var a = b c d;</script><style>p {x: y}</style>") == 2


def test_contractions_hyphens_and_numbers_count_once_each() -> None:
    assert count_words("<p>CNC's high-speed spindle runs 3 shifts — really!</p>") == 7


def test_entities_and_adjacent_tags_separate_words() -> None:
    assert count_words("<li>alpha</li><li>beta</li>&nbsp;gamma&amp;delta") == 4


def test_html_fence_is_stripped() -> None:
    assert strip_fences("```html\n<p>hi</p>\n```") == "<p>hi</p>"


def test_bare_and_json_fences_are_stripped() -> None:
    assert strip_fences("```\n{}\n```") == "{}"
    assert strip_fences('  ```json\n{"a": 1}\n```  ') == '{"a": 1}'


def test_text_without_fence_is_unchanged_but_trimmed() -> None:
    assert strip_fences("  <p>keep ``` inside</p> ") == "<p>keep ``` inside</p>"
