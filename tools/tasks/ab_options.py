"""A/B questions and their options, as CAA steering rows write them (tools/tasks/steering.py):
the last options block of a question ("(A) ...", "(B) ...", up to eight, an option's text
running to the next option line), its stem, swapping two options' texts, the check of a
(question, matching, not_matching) row, and the layout a generated row is read from."""

from __future__ import annotations

import re

from tools.errors import DataError

_OPTION = re.compile(r"^[ \t]*\(([A-Z])\)[ \t]?", re.MULTILINE)
_LETTER = re.compile(r"\(([A-Z])\)")
_CHOICES = re.compile(r"(?:^|\n)[ \t]*Choices:\s*$")


def _option_spans(question: str) -> list[tuple[str, int, int]]:
    """(letter, start, end) of each option's text in the question's last options block: the
    last line that opens with "(A)", then the lines opening "(B)", "(C)", ... in order. An
    option's text runs to the next option line (it may span lines); bounds exclude the
    whitespace around it."""
    marks = list(_OPTION.finditer(question))
    firsts = [i for i, m in enumerate(marks) if m.group(1) == "A"]
    if not firsts:
        return []
    block = marks[firsts[-1]:]
    spans: list[tuple[str, int, int]] = []
    for j, m in enumerate(block):
        if m.group(1) != chr(ord("A") + j):
            break
        end = block[j + 1].start() if j + 1 < len(block) else len(question)
        text = question[m.end():end]
        start = m.end() + len(text) - len(text.lstrip())
        spans.append((m.group(1), start, m.end() + len(text.rstrip())))
    return spans


def options(question: str) -> dict[str, str]:
    """Letter ("A") -> option text of the question's options block ({} when it has none)."""
    return {letter: question[a:b] for letter, a, b in _option_spans(question)}


def stem(question: str) -> str:
    """The question without its options block and a "Choices:" line before it."""
    marks = list(_OPTION.finditer(question))
    firsts = [m for m in marks if m.group(1) == "A"]
    head = question[: firsts[-1].start()] if firsts else question
    return _CHOICES.sub("", head.rstrip()).rstrip()


def swap_options(question: str, a: str, b: str) -> str:
    """The question with the texts of options `a` and `b` (letters, "A") exchanged."""
    spans = {letter: (s, e) for letter, s, e in _option_spans(question)}
    if a not in spans or b not in spans or a == b:
        raise DataError(f"cannot swap options ({a}) and ({b}): the question's options are "
                        f"{', '.join(f'({x})' for x in spans) or 'none'}")
    (s1, e1), (s2, e2) = sorted([spans[a], spans[b]])
    q = question
    return q[:s1] + q[s2:e2] + q[e1:s2] + q[s1:e1] + q[e2:]


def option_letter(value: str) -> str | None:
    """The letter of an option label like "(A)" (whitespace around it allowed), or None."""
    m = _LETTER.fullmatch(value.strip())
    return m.group(1) if m else None


def check_pair(question: str, matching: str, not_matching: str) -> tuple[str, str] | None:
    """(the field at fault, why) when (question, matching, not_matching) is not a valid
    steering pair; None when it is."""
    if not question.strip():
        return "question", "is empty"
    letters = [option_letter(x) for x in (matching, not_matching)]
    for name, value, letter in zip(("matching", "not_matching"), (matching, not_matching),
                                   letters, strict=True):
        if letter is None:
            return name, f"is {value!r}, not an option letter like \"(A)\""
    found = options(question)
    if not found:
        return "question", ("lists no options; end it with lines like \" (A) Yes\" and "
                            "\" (B) No\"")
    if letters[0] == letters[1]:
        return "not_matching", f"is {not_matching.strip()}, the same as 'matching'"
    for name, letter in zip(("matching", "not_matching"), letters, strict=True):
        if letter not in found:
            return name, (f"is ({letter}) but the question's options are "
                          f"{', '.join(f'({x})' for x in found)}")
    return None


# -- the generation layout (SteeringTask.parse, .assemble) ------------------------------------

REPLY = re.compile(
    r"^[ \t*#]*Question[ \t*]*:[ \t*]*\n?(?P<q>.*?)\n[ \t*]*Behaviou?r answer[ \t*]*:[ \t*]*"
    r"\(?(?P<m>[A-Z])\)?[ \t*.]*(?:\n[ \t*]*Other answer[ \t*]*:[ \t*]*\(?(?P<n>[A-Z])\)?)?",
    re.IGNORECASE | re.DOTALL | re.MULTILINE)


ANSWER_LEAD = re.compile(r"^(?:answer\s*\d?\s*[:.]\s*|\(?[A-Z]\)\s*)", re.IGNORECASE)
"""A letter or an "Answer 1:" a generated answer may open with."""
