"""Hostile markup a model could write (or be tricked into writing): none of it may reach a reader
as something that runs. Shared by the unit test of the sanitiser and the end-to-end export test."""

from html.parser import HTMLParser

PAYLOADS = [
    "<script>alert('xss-1')</script>",
    "<SCRIPT SRC=https://evil.example/x.js></SCRIPT>",
    "<img src=x onerror=alert('xss-3')>",
    '<img src="x" onerror="alert(\'xss-4\')"/>',
    "<svg onload=alert('xss-5')>",
    "<svg><script>alert('xss-6')</script></svg>",
    "<svg><a xlink:href=\"javascript:alert('xss-7')\"><text x=20 y=20>x</text></a></svg>",
    "<a href=\"javascript:alert('xss-8')\">click</a>",
    "<a href=\"JaVaScRiPt:alert('xss-9')\">click</a>",
    "<a href=\"&#106;avascript:alert('xss-10')\">click</a>",
    "<a href=\" javascript:alert('xss-11')\">click</a>",
    '<a href="data:text/html;base64,PHNjcmlwdD5hbGVydCgxKTwvc2NyaXB0Pg==">data</a>',
    '<iframe src="https://evil.example/"></iframe>',
    "<iframe srcdoc=\"<script>alert('xss-14')</script>\"></iframe>",
    "<style>body{background:url('javascript:alert(15)')}</style>",
    "<p style=\"background:url(javascript:alert('xss-16'))\">styled</p>",
    "<body onload=alert('xss-17')>",
    "<div onmouseover=\"alert('xss-18')\">hover</div>",
    '<object data="https://evil.example/x.swf"></object>',
    '<embed src="https://evil.example/x.swf">',
    '<form action="https://evil.example/"><input type=submit></form>',
    '<meta http-equiv="refresh" content="0;url=javascript:alert(\'xss-22\')">',
    '<base href="https://evil.example/">',
    '<link rel=stylesheet href="https://evil.example/x.css">',
    "<math><mtext><table><mglyph><style><img src=x onerror=alert('xss-25')>",
    "<img src=x onerror=alert('xss-26')//",
    "<<script>alert('xss-27')//<</script>",
    "<scr<script>ipt>alert('xss-28')</scr</script>ipt>",
    "<details open ontoggle=alert('xss-29')>",
    "<video><source onerror=\"alert('xss-30')\"></video>",
    "<noscript><p title=\"</noscript><img src=x onerror=alert('xss-31')>\"></noscript>",
    "<template><script>alert('xss-32')</script></template>",
    "<a href=\"vbscript:msgbox('xss-33')\">vb</a>",
    "\"><script>alert('xss-34')</script>",
]

DANGEROUS_TAGS = {
    "script", "iframe", "object", "embed", "form", "input", "svg", "math", "base", "meta", "link",
    "style", "template", "noscript", "video", "source", "details", "body",
}  # fmt: skip
DANGEROUS_SCHEMES = ("javascript:", "vbscript:", "data:")


class _Elements(HTMLParser):
    """Every start tag with its attributes, as a browser's tokenizer would see them."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.found: list[tuple[str, list[tuple[str, str | None]]]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.found.append((tag, attrs))

    handle_startendtag = handle_starttag


def active_content(html: str) -> list[str]:
    """What in `html` could run or restyle in a reader's browser: dangerous elements, event
    handler and style attributes, and script-like URL schemes. Empty when the page is clean.
    Text that merely reads like markup (escaped) is not active and is not reported."""
    parser = _Elements()
    parser.feed(html)
    parser.close()
    problems = []
    for tag, attrs in parser.found:
        if tag in DANGEROUS_TAGS:
            problems.append(f"<{tag}>")
        for name, value in attrs:
            url = "".join((value or "").split()).lower()
            if name.startswith("on") or name in ("style", "srcdoc", "formaction"):
                problems.append(f"<{tag} {name}=…>")
            elif url.startswith(DANGEROUS_SCHEMES):
                problems.append(f"<{tag} {name}={url[:20]}…>")
    return problems
