"""The repository stands on its own: no tracked file cites a document outside the checkout, and every
`CONTRACT.md D14` / `CONTRACT.md §6` / `CONTRACT.md R3` (or `CONTRACT.md#d14` link) names an anchor
that docs/CONTRACT.md really has.

Old citation forms are translated by the appendix of docs/CONTRACT.md ("Citation map"), which names
them and is therefore not scanned; neither is this file, which names them too. Binary and data files
are skipped. Reads every tracked text file once (~150 files, well under a second).
"""
import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

CONTRACT = "docs/CONTRACT.md"
SELF = "tests/test_docs_citations.py"
DATA_SUFFIXES = (".npy", ".npz", ".png", ".jpg", ".jpeg", ".gif", ".svg", ".csv", ".jsonl", ".parquet",
                 ".fvecs", ".ivecs", ".bin", ".vdb", ".gz", ".zst", ".sqlite3", ".pdf")

# Documents outside the checkout: the product spec, the v2.1 reference notes, the v2.1 runbook, the
# style guide.
OUT_OF_REPO = re.compile("|".join([
    r"SPEC D\d", r"SPEC §", r"SPEC section", r"shared/SPEC", r"shared/reference",
    r"\bapi\.md", r"\bengine\.md", r"\bcore\.md", r"\btests\.md",
    r"RUNBOOK_v2", r"STYLE\.md", r"\bSTYLE \([a-z]\)",
]))

_REF = r"(?:[DR]\d+|§\d+(?:\.\d+)?)"
# "CONTRACT.md D3, D12, D20", "CONTRACT.md §4.5, §7.1", "CONTRACT.md §6 (soak gate)", "CONTRACT.md R6".
CITATION = re.compile(rf"CONTRACT\.md ({_REF}(?:(?:, | and | / |/){_REF})*)")
LINK = re.compile(r"CONTRACT\.md#([A-Za-z0-9-]+)")
IN_PAGE_LINK = re.compile(r"\]\(#([A-Za-z0-9-]+)\)")
ANCHOR = re.compile(r'<a id="([^"]+)"></a>')
HEADING = re.compile(r"^#{2,3} §(\d+(?:\.\d+)?) ", re.M)


def _tracked_texts():
    try:
        out = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        pytest.skip("not a git checkout")
    texts = {}
    for rel in out.stdout.decode().split("\0"):
        if not rel or rel == SELF or rel.lower().endswith(DATA_SUFFIXES):
            continue
        path = REPO / rel
        if not path.is_file():
            continue  # deleted in the working tree
        raw = path.read_bytes()
        if b"\0" in raw:
            continue
        try:
            texts[rel] = raw.decode("utf-8")
        except UnicodeDecodeError:
            continue
    assert CONTRACT in texts, f"{CONTRACT} is not tracked"
    return texts


@pytest.fixture(scope="module")
def texts():
    return _tracked_texts()


def _contract_body(text: str) -> str:
    """docs/CONTRACT.md without its citation-map appendix (which names the old forms on purpose)."""
    cut = text.find('<a id="citation-map"></a>')
    assert cut > 0, "docs/CONTRACT.md lost its citation-map anchor"
    return text[:cut]


def _anchor_of(ref: str) -> str:
    """D14 -> d14, R3 -> r3, §1.4 -> s1-4, §6 -> s6."""
    if ref.startswith("§"):
        return "s" + ref[1:].replace(".", "-")
    return ref.lower()


def _line_of(text: str, pos: int) -> int:
    return text.count("\n", 0, pos) + 1


def test_no_citation_points_outside_the_checkout(texts):
    found = []
    for rel, text in texts.items():
        body = _contract_body(text) if rel == CONTRACT else text
        for m in OUT_OF_REPO.finditer(body):
            found.append(f"{rel}:{_line_of(body, m.start())}: {m.group(0)!r}")
    assert not found, ("citations of documents outside the repo (translate them with the citation map at the "
                       "end of docs/CONTRACT.md):\n" + "\n".join(found))


def test_contract_anchors_and_headings_agree(texts):
    body = _contract_body(texts[CONTRACT])
    anchors = ANCHOR.findall(body)
    assert len(anchors) == len(set(anchors)), "duplicate anchors in docs/CONTRACT.md"
    for number in HEADING.findall(body):
        assert _anchor_of("§" + number) in anchors, f"heading §{number} has no <a id> anchor"
    missing = sorted({a for a in IN_PAGE_LINK.findall(texts[CONTRACT]) if a not in anchors
                      and a != "citation-map"})
    assert not missing, f"docs/CONTRACT.md links to anchors it does not have: {missing}"


def test_every_contract_citation_names_an_existing_anchor(texts):
    anchors = set(ANCHOR.findall(texts[CONTRACT]))
    bad, seen = [], 0
    for rel, text in texts.items():
        body = _contract_body(text) if rel == CONTRACT else text
        for m in CITATION.finditer(body):
            for ref in re.findall(_REF, m.group(1)):
                seen += 1
                if _anchor_of(ref) not in anchors:
                    bad.append(f"{rel}:{_line_of(body, m.start())}: CONTRACT.md {ref}")
        for m in LINK.finditer(body):
            seen += 1
            if m.group(1) not in anchors:
                bad.append(f"{rel}:{_line_of(body, m.start())}: CONTRACT.md#{m.group(1)}")
    assert seen > 50, f"only {seen} CONTRACT.md citations found: is the pattern still right?"
    assert not bad, "citations of docs/CONTRACT.md sections that do not exist:\n" + "\n".join(bad)
