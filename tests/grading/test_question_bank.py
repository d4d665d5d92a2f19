"""The question bank as a learner meets it: keys nobody can guess, options that match the page.

Every choice question's right key is spread over the letters (per chapter and overall), no
multi-select answer is the leading block of its options, the notebook states each option with the
bank's own text, answers are accepted in the forms a learner types, and no question lets learner
code run longer than the cap.
"""

from __future__ import annotations

from collections import Counter

import nbformat
import pytest

from perfcourse.config import repo_root
from perfcourse.grading.bank import GRADED_CALL, MAX_TIME_LIMIT, questions
from perfcourse.grading.checkers import Choice, MultiChoice

from .kit import fails, passes

SINGLE = [q for q in questions() if isinstance(q.checker, Choice)]
MULTI = [q for q in questions() if isinstance(q.checker, MultiChoice)]
CHAPTERS = sorted({q.chapter for q in SINGLE})


def _normal(text: str) -> str:
    return " ".join(text.replace("`", "").split()).casefold()


def _question_markdown(folders=("solutions",)) -> dict[str, str]:
    """Per graded question id, the markdown cell that states it (the last one before its check)."""
    found = {}
    for path in sorted(p for folder in folders for p in (repo_root() / folder).glob("*.ipynb")):
        markdown = ""
        for cell in nbformat.read(path, as_version=4).cells:
            if cell.cell_type == "markdown":
                markdown = cell.source
            elif cell.cell_type == "code":
                for qid in GRADED_CALL.findall(cell.source):
                    found[qid] = markdown
    return found


MARKDOWN = _question_markdown()
LEARNER_MARKDOWN = _question_markdown(("notebooks", "labs"))


@pytest.mark.parametrize("chapter", CHAPTERS)
def test_right_keys_spread_over_the_letters_in_each_chapter(chapter):
    keys = [q.checker.correct for q in SINGLE if q.chapter == chapter]
    letters = min(len(q.checker.options) for q in SINGLE if q.chapter == chapter)
    most = max(Counter(keys).values())
    assert most <= -(-len(keys) // letters), f"chapter {chapter}: right keys {keys}"


def test_right_keys_spread_over_the_letters_overall():
    counts = Counter(q.checker.correct for q in SINGLE)
    letters = "abcd"
    spread = [counts.get(k, 0) for k in letters]
    assert max(spread) - min(spread) <= 1, f"right keys per letter: {dict(counts)}"


@pytest.mark.parametrize("q", MULTI, ids=lambda q: q.id)
def test_a_multiselect_answer_is_not_the_leading_block(q):
    letters = list(q.checker.options)
    right = q.checker.correct
    assert set(letters[: len(right)]) != right, f"{q.id}: right options {sorted(right)} lead"
    assert len(set(letters) - right) >= 2, f"{q.id}: fewer than two wrong options"


@pytest.mark.parametrize("q", SINGLE + MULTI, ids=lambda q: q.id)
def test_every_wrong_option_has_its_own_explanation(q):
    wrong = set(q.checker.options) - ({q.checker.correct} if isinstance(q.checker, Choice) else q.checker.correct)
    missing = sorted(wrong - set(q.checker.explanations))
    assert not missing, f"{q.id}: no explanation for wrong options {missing}"
    texts = [q.checker.explanations[k] for k in wrong]
    assert len(set(texts)) == len(texts), f"{q.id}: two wrong options share one explanation"


@pytest.mark.parametrize("pages", [MARKDOWN, LEARNER_MARKDOWN], ids=["master", "learner"])
@pytest.mark.parametrize("q", SINGLE + MULTI, ids=lambda q: q.id)
def test_the_notebook_states_each_option_as_the_bank_grades_it(q, pages):
    assert q.id in pages, f"{q.id} is checked in no notebook of this kind"
    page = _normal(pages[q.id])
    for key, text in q.checker.options.items():
        assert f"({key}) {_normal(text)}" in page, (
            f"{q.id}: the page does not say option ({key}) as the bank grades it: {text!r}")


@pytest.mark.parametrize("q", SINGLE, ids=lambda q: q.id)
def test_a_choice_is_accepted_as_learners_type_it(q):
    key = q.checker.correct
    for typed in (key, key.upper(), f" {key} ", f"({key})"):
        passes(q.id, typed)


@pytest.mark.parametrize("q", MULTI, ids=lambda q: q.id)
def test_a_multiselect_is_accepted_as_learners_type_it(q):
    right = sorted(q.checker.correct)
    for typed in (set(right), [k.upper() for k in right], ", ".join(right), " ".join(right),
                  ", ".join(right).upper()):
        passes(q.id, typed)
    fails(q.id, set(right[:-1]), "more")


WRONG_KEYS = [(q, key) for q in SINGLE + MULTI for key in q.checker.options
              if key not in ({q.checker.correct} if isinstance(q.checker, Choice) else q.checker.correct)]


@pytest.mark.parametrize(("q", "key"), WRONG_KEYS, ids=[f"{q.id}-{key}" for q, key in WRONG_KEYS])
def test_every_wrong_option_is_refused_with_its_own_explanation(q, key):
    """Typed alone (a choice, in upper case) or added to the right set (a multi-select)."""
    answer = key.upper() if isinstance(q.checker, Choice) else {*q.checker.correct, key}
    fails(q.id, answer, q.checker.explanations[key][:40])


def test_no_question_lets_learner_code_run_past_the_cap():
    over = {q.id: q.time_limit for q in questions() if q.time_limit > MAX_TIME_LIMIT}
    assert not over, f"time limits above {MAX_TIME_LIMIT:g} s: {over}"


def test_the_cap_is_what_a_runaway_answer_meets(monkeypatch):
    """A question asking for more than the cap still stops learner code at the cap."""
    from perfcourse.grading import FunctionCheck, Question, bank, register, unregister

    def reference(n):
        return n

    def runaway(n):
        while True:
            try:
                pass
            except BaseException:  # noqa: BLE001 - what a learner writes
                pass

    monkeypatch.setattr(bank, "MAX_TIME_LIMIT", 0.3)
    register(Question(id="99.q7", title="cap", checker=FunctionCheck(reference, lambda rng: [1]),
                      time_limit=60), replace=True)
    try:
        fails("99.q7", runaway, "stopped after 0.3 s")
    finally:
        unregister("99.q7")




def test_no_two_multiselects_share_a_pattern_of_right_letters():
    """A learner who spotted "a, c, d, f, h" once must not be able to reuse it."""
    patterns = Counter("".join(sorted(q.checker.correct)) for q in MULTI)
    shared = {p: n for p, n in patterns.items() if n > 1}
    assert not shared, f"right-letter patterns used more than once: {shared}"
