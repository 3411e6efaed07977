"""The content of a solution's last ``\\boxed{...}``, braces matched.

Its own module, free of torch and math-verify, so that the prompts (and through them the
embedded model's data code) can read boxes the way the answer checker does.
"""

from __future__ import annotations

import re

# `\boxed` / `\fbox`, but not `\boxedfoo`.
_BOX_RE = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")


def extract_boxed(text: str | None) -> str | None:
    """Content of the last complete ``\\boxed{...}`` / ``\\fbox{...}`` / ``\\boxed x``.

    Braces are matched (escaped ``\\{`` ``\\}`` skipped) so nested LaTeX such as
    ``\\frac{1}{2}`` survives. A box left unclosed by a truncated generation is skipped in
    favour of the previous complete one. Returns None when there is no box.
    """
    if not text:
        return None
    for match in reversed(list(_BOX_RE.finditer(text))):
        content = _box_content(text, match.end())
        if content is not None:
            return content
    return None


def _box_content(text: str, start: int) -> str | None:
    """Argument of a box command whose name ends at ``start``; None if malformed."""
    i = start
    while i < len(text) and text[i].isspace():
        i += 1
    if i >= len(text):
        return None
    if text[i] != "{":
        # `\boxed 5`: TeX takes one token; only valid after a space.
        token = re.match(r"[^\s$]+", text[i:]) if i > start else None
        return token.group(0) if token else None
    depth = 0
    j = i
    while j < len(text):
        ch = text[j]
        if ch == "\\":
            j += 2  # `\{` and `\}` are literal braces, not grouping
            continue
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return text[i + 1 : j]
        j += 1
    return None
