"""Real English text available offline: sentences from Python's bundled documentation.

``pydoc_data.topics.topics`` (part of the standard library) holds the text of the
language reference's help topics (``assert``, ``assignment``, ``exceptions``, ...). This
module cuts that prose into sentences deterministically:

1. topics are taken in sorted order and split into paragraphs at blank lines;
2. indented paragraphs (code, grammar rules) and headings (a line underlined with
   ``*``, ``=`` or ``-``) are dropped;
3. a paragraph's lines are joined and split into sentences after ``.``, ``!`` or ``?``
   followed by whitespace and a capital letter or quote;
4. sentences of 6 to 40 words that end in ``.``, ``!`` or ``?`` are kept, duplicates
   dropped (first occurrence wins).

The split is by topic, so the two sets share no sentence and no paragraph: every third
topic in sorted order (positions 2, 5, 8, ...) is held out for evaluation, the rest is
calibration data. About 1,200 sentences in all (Python 3.11: 689 calibration, 501
evaluation).

Example:
  >>> calib = sentences("calibration")[:128]
  >>> held_out = sentences("evaluation", limit=200)
"""

from __future__ import annotations

import re

__all__ = ["SPLITS", "sentences"]

SPLITS = ("calibration", "evaluation")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'(])")
_UNDERLINE = set("*=-")


def _topic_sentences(text: str) -> list[str]:
    out = []
    for para in re.split(r"\n\s*\n", text):
        lines = [ln for ln in para.split("\n") if ln.strip()]
        if not lines or any(ln.startswith((" ", "\t")) for ln in lines):
            continue
        if len(lines) > 1 and set(lines[-1].strip()) <= _UNDERLINE:
            continue
        joined = " ".join(ln.strip() for ln in lines)
        for s in _SENTENCE_END.split(joined):
            s = s.strip()
            if 6 <= len(s.split()) <= 40 and s.endswith((".", "!", "?")):
                out.append(s)
    return out


def sentences(split: str, *, limit: int | None = None) -> list[str]:
    """Sentences of one split, in a fixed order.

    Args:
      split: ``"calibration"`` or ``"evaluation"`` (disjoint; see the module docstring).
      limit: keep only the first ``limit`` sentences (``None`` for all).

    Returns:
      A list of ``str``; the same list on every call with the same Python version.
    """
    if split not in SPLITS:
        raise ValueError(f"split={split!r}; choose one of {SPLITS}")
    if limit is not None and (not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit={limit!r} must be a positive int or None")
    from pydoc_data.topics import topics

    seen: set[str] = set()
    picked = []
    for pos, name in enumerate(sorted(topics)):
        held_out = pos % 3 == 2
        for s in _topic_sentences(topics[name]):
            if s in seen:
                continue
            seen.add(s)
            if held_out == (split == "evaluation"):
                picked.append(s)
    return picked[:limit] if limit is not None else picked
