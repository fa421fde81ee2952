"""The docs hold together: every relative link in README.md and docs/**/*.md points to a file or folder
that exists, and every #anchor into a markdown file to one of its headings, slugged as GitHub does."""

import glob
import os
import re

import pytest
from conftest import ROOT

FENCE = re.compile(r"^\s*(```|~~~)")
INLINE_CODE = re.compile(r"(`+)(.+?)\1")
# [text](target) or [text](target "title"), images too; text may hold one level of [brackets]
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*<?([^\s)>]*)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+.*)?$")  # [name]: target
HEADING = re.compile(r"^\s{0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
HTML_ANCHOR = re.compile(r"<a\s+(?:name|id)=\"([^\"]+)\"", re.IGNORECASE)


def markdown_files(root=ROOT):
    files = [os.path.join(root, "README.md"), *glob.glob(os.path.join(root, "docs", "**", "*.md"), recursive=True)]
    return sorted(f for f in files if os.path.isfile(f))


def prose_lines(text):
    """(line number, line) of a markdown text outside fenced code blocks, with inline code removed."""
    fenced = False
    for number, line in enumerate(text.splitlines(), 1):
        if FENCE.match(line):
            fenced = not fenced
        elif not fenced:
            yield number, INLINE_CODE.sub("", line)


def slug(heading):
    """GitHub's anchor for a heading: its text as rendered (links by their text, no markup), lowercased,
    every character but letters, digits, spaces, hyphens and underscores dropped, spaces as hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link or image reads as its text
    text = re.sub(r"<[^>]+>", "", text).replace("`", "")  # html tags, code marks
    text = re.sub(r"[^\w\- ]", "", text.strip().lower())
    return text.replace(" ", "-")


def anchors(path):
    """Every anchor a markdown file defines: its headings' slugs (a repeated one numbered -1, -2, ...
    as GitHub does) and explicit <a name=...> / <a id=...> anchors."""
    seen, found = {}, set()
    for _, line in prose_lines(open(path, encoding="utf-8").read()):
        found.update(HTML_ANCHOR.findall(line))
        m = HEADING.match(line)
        if m:
            base = slug(m.group(2))
            n = seen.get(base, 0)
            found.add(base if n == 0 else f"{base}-{n}")
            seen[base] = n + 1
    return found


def links(path):
    """(line number, target) of every link and image in a markdown file, outside code."""
    for number, line in prose_lines(open(path, encoding="utf-8").read()):
        for target in LINK.findall(line):
            yield number, target
        m = REFERENCE.match(line)
        if m:
            yield number, m.group(1)


def broken_links(path, root=ROOT):
    """Messages for the relative links of one markdown file that point nowhere."""
    problems = []
    for number, target in links(path):
        if not target or re.match(r"^[a-z][a-z0-9+.-]*:", target, re.IGNORECASE):  # http:, https:, mailto:
            continue
        where, _, anchor = target.partition("#")
        if where.startswith("/"):
            resolved = os.path.join(root, where.lstrip("/"))
        else:
            resolved = os.path.normpath(os.path.join(os.path.dirname(path), where)) if where else path
        name = f"{os.path.relpath(path, root)}:{number}: {target}"
        if not os.path.exists(resolved):
            problems.append(f"{name}: {os.path.relpath(resolved, root)} does not exist")
        elif anchor and resolved.endswith(".md") and anchor not in anchors(resolved):
            problems.append(f"{name}: no heading #{anchor} in {os.path.relpath(resolved, root)}")
    return problems


def test_the_docs_are_found():
    files = [os.path.relpath(f, ROOT) for f in markdown_files()]
    assert "README.md" in files and any(f.startswith("docs" + os.sep) for f in files)


@pytest.mark.parametrize("path", markdown_files(), ids=lambda p: os.path.relpath(p, ROOT))
def test_every_relative_link_resolves(path):
    assert broken_links(path) == []


@pytest.mark.parametrize("heading, expected", [
    ("Quick start", "quick-start"),
    ("dtype=auto on CPUs", "dtypeauto-on-cpus"),
    ("Resume, faults and interrupts", "resume-faults-and-interrupts"),
    ("The `bench.py` tables", "the-benchpy-tables"),
    ("S3: more experts (S2-bytes, seeds 1337-1338)", "s3-more-experts-s2-bytes-seeds-1337-1338"),
    ("What **moe_kernels.py** does", "what-moe_kernelspy-does"),
    ("[Links](x.md) read as text", "links-read-as-text"),
])
def test_slugs_follow_github(heading, expected):
    assert slug(heading) == expected


def test_a_broken_link_or_anchor_is_reported(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "page.md").write_text("# A page\n\n## Some part\n\n## Some part\n")
    (tmp_path / "README.md").write_text(
        "[ok](docs/page.md) [ok](docs/page.md#some-part) [ok](docs/page.md#some-part-1) [ok](#top) "
        "[web](https://example.com/x.md) `[code](nowhere.md)`\n"
        "<a name=\"top\"></a>\n"
        "```\n[fenced](nowhere.md)\n```\n"
        "[missing](docs/gone.md) [bad anchor](docs/page.md#no-such-part) ![img](docs/gone.png)\n"
        "[ref]: docs/also_gone.md\n")
    problems = broken_links(str(tmp_path / "README.md"), root=str(tmp_path))
    assert [p.split(": ")[1] for p in problems] == [
        "docs/gone.md", "docs/page.md#no-such-part", "docs/gone.png", "docs/also_gone.md"]


def test_readme_states_the_test_commands_ci_runs():
    """The README's Tests section gives the commands CI (.ci/run) runs: `pytest -q`, which pyproject's addopts
    make `-m 'not soak'`, and `pytest -q -m soak`."""
    readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    tests = readme.split("\n## Tests\n", 1)[1].split("\n## ", 1)[0]
    commands = [line.split("#")[0].strip() for line in tests.split("```bash", 1)[1].split("```", 1)[0].splitlines()]
    assert "python -m pytest -q" in commands and "python -m pytest -q -m soak" in commands
    ci = open(os.path.join(ROOT, ".ci", "run"), encoding="utf-8").read()
    assert 'python -m pytest -q -m "not soak"' in ci and "python -m pytest -q -m soak" in ci
    assert "addopts = \"-m 'not soak'\"" in open(os.path.join(ROOT, "pyproject.toml"), encoding="utf-8").read()
