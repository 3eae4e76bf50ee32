"""The README links nothing outside the repository: every Markdown link, reference definition,
autolink, HTML href/src and bare URL is checked; a relative link must name a file or folder
in the repository (an #anchor must name one of the README's headings)."""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"

TARGETS = [
    r"\]\(\s*<?([^)\s>]+)",  # [text](target) and ![alt](target)
    r"^\s*\[[^\]]+\]:\s*<?(\S+?)>?\s*$",  # [ref]: target
    r"<((?:[a-z][a-z0-9+.-]*:|www\.)[^>\s]+)>",  # <scheme:...> autolinks
    r"(?:href|src)\s*=\s*[\"']([^\"']+)",  # HTML
]
BARE_URL = re.compile(r"\b(?:[a-z][a-z0-9+.-]*://|www\.)[^\s)>\]]+", re.I)


def anchors(text: str) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    heads = re.findall(r"^#{1,6}\s+(.+?)\s*$", text, flags=re.M)
    return {re.sub(r"\s", "-", re.sub(r"[^\w\s-]", "", h.lower())) for h in heads}


def problems(text: str) -> list[str]:
    found: list[str] = []
    prose = re.sub(r"```.*?```", "", text, flags=re.S)  # code blocks hold commands, not links
    targets = [t for pattern in TARGETS for t in re.findall(pattern, prose, flags=re.M | re.I)]
    for target in targets:
        path, _, anchor = target.partition("#")
        if re.match(r"[a-z][a-z0-9+.-]*:|//|www\.", target, flags=re.I):
            found.append(f"links outside the repository: {target}")
        elif path and not (README.parent / path).resolve().is_relative_to(ROOT):
            found.append(f"leaves the repository: {target}")
        elif path and not (README.parent / path).exists():
            found.append(f"no such file in the repository: {target}")
        elif not path and anchor and anchor not in anchors(text):
            found.append(f"no such heading: #{anchor}")
    for url in set(BARE_URL.findall(re.sub(r"`[^`]*`", "", prose))) - set(targets):
        found.append(f"bare URL outside the repository: {url}")
    return sorted(set(found))


def main() -> int:
    found = problems(README.read_text())
    for problem in found:
        print(f"README.md: {problem}", file=sys.stderr)
    if not found:
        print("README.md: every link stays in the repository")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
