"""perfcourse.grading: check/reveal, every checker kind, and the grade runner end to end."""

from __future__ import annotations

import threading

import nbformat
import pytest
import sqlalchemy as sa
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship, selectinload
from sqlalchemy.pool import StaticPool

from perfcourse.grading import (
    Args,
    Checker,
    Choice,
    ExplainCheck,
    FunctionCheck,
    GraderError,
    MultiChoice,
    Number,
    QueryCheck,
    Question,
    UnknownQuestion,
    Value,
    check,
    graded_ids,
    load_bank,
    questions,
    register,
    reveal,
    unregister,
)


@pytest.fixture
def ask():
    """Register test-only questions (ids 99.qK) for one test; removed afterwards."""
    added = []

    def _register(checker, qid="99.q1", **kwargs):
        kwargs.setdefault("title", "A test question")
        q = register(Question(id=qid, checker=checker, **kwargs), replace=True)
        added.append(q.id)
        return q.id

    yield _register
    for qid in added:
        unregister(qid)


def hint_of(qid, answer) -> str:
    with pytest.raises(AssertionError) as info:
        check(qid, answer)
    # the grader's own traceback never chains onto the learner's error
    assert info.value.__cause__ is None and info.value.__suppress_context__
    return str(info.value)


# --- the bank -------------------------------------------------------------------------------


def test_bank_loads_every_chapter_module():
    bank = load_bank()
    assert {"00.q1", "00.q2", "00.q3"} <= set(bank)
    for qid, q in bank.items():
        assert qid == q.id and q.title and isinstance(q.checker, Checker)
        assert q.model_answer(), f"{qid} has no model answer"
    assert [q.id for q in questions("00")][:3] == ["00.q1", "00.q2", "00.q3"]


def test_unknown_question_is_a_clear_error():
    with pytest.raises(UnknownQuestion, match=r"No question 00\.q99 .*Chapter 00 has 00\.q1"):
        check("00.q99", "a")
    with pytest.raises(UnknownQuestion, match="ids look like"):
        reveal("chapter two")
    assert isinstance(UnknownQuestion("x"), LookupError)


def test_duplicate_and_malformed_ids_are_refused(ask):
    ask(Value(1))
    with pytest.raises(ValueError, match="defined twice"):
        register(Question(id="99.q1", title="again", checker=Value(1)))
    with pytest.raises(ValueError, match="must look like"):
        Question(id="2.3", title="bad", checker=Value(1))


def test_graded_ids_finds_check_calls():
    assert graded_ids('answer = ...\ncheck("02.q3", answer)\ncheck(\'02.q4\', x)') == ["02.q3", "02.q4"]
    assert graded_ids("print('no check here')  # check later") == []


# --- check and reveal -----------------------------------------------------------------------

CHOICE = Choice(options={"a": "SQLite", "b": "PostgreSQL"}, correct="a",
                explanations={"b": "PostgreSQL has to start first."})


def test_right_answer_confirms_with_model_answer(ask, capsys):
    qid = ask(CHOICE, explanation="It always works.")
    assert check(qid, " (A) ") is None
    out = capsys.readouterr().out
    assert out.startswith("✓ 99.q1 right: A test question.")
    assert "Model answer: (a) SQLite" in out and "Why: It always works." in out


def test_wrong_missing_and_ill_typed_choices(ask):
    qid = ask(CHOICE)
    assert hint_of(qid, "b") == "Not yet. PostgreSQL has to start first."
    assert hint_of(qid, ...).startswith("No answer yet")
    assert hint_of(qid, None).startswith("No answer yet")
    assert "as a string" in hint_of(qid, 1)
    assert "not an option" in hint_of(qid, "z")


def test_hints_come_one_more_per_attempt(ask):
    qid = ask(Value(3), hints=("First hint.", "Second hint."))
    assert hint_of(qid, 4).endswith("Hint: First hint.")
    assert hint_of(qid, 5).endswith("Hint: Second hint.")
    assert hint_of(qid, 6).endswith("Hint: Second hint.")


def test_reveal_prints_model_answer(ask, capsys):
    qid = ask(CHOICE, answer="SQLite, the file under data/", explanation="No server needed.")
    reveal(qid)
    out = capsys.readouterr().out
    assert "99.q1 A test question" in out
    assert "Model answer: SQLite, the file under data/" in out and "Why: No server needed." in out
    reveal("00.q3")
    assert "def mean_latency_ms" in capsys.readouterr().out


def test_grader_error_is_reported_not_leaked(ask):
    class Broken(Checker):
        def grade(self, answer):
            return {}["oops"]

    qid = ask(Broken())
    with pytest.raises(GraderError, match=r"grader error in 99\.q1, please report: KeyError") as info:
        check(qid, 1)
    assert info.value.__suppress_context__


# --- choices and values ---------------------------------------------------------------------


def test_multichoice(ask, capsys):
    qid = ask(MultiChoice(options={"a": "x", "b": "y", "c": "z"}, correct={"a", "c"},
                          explanations={"b": "y is not it."}))
    check(qid, {"a", "c"})
    check(qid, "a, c")
    check(qid, "ca")
    assert "✓" in capsys.readouterr().out
    assert hint_of(qid, {"a", "b"}) == "Not yet. y is not it."
    assert "1 more option" in hint_of(qid, ["a"])
    assert "set of option letters" in hint_of(qid, 3)


def test_number_with_tolerance(ask, capsys):
    qid = ask(Number(200, rel_tol=0.05, unit="ms"))
    check(qid, 205.0)
    import numpy as np

    check(qid, np.float64(199))
    assert "too high" in hint_of(qid, 300)
    assert "too low" in hint_of(qid, 100)
    assert "Answer with a number" in hint_of(qid, "200")
    assert "Answer with a number" in hint_of(qid, True)


def test_value(ask):
    qid = ask(Value("selectinload", also=("subqueryload",)))
    check(qid, "  SelectInLoad ")
    check(qid, "subqueryload")
    assert "is not right" in hint_of(qid, "joinedload")
    assert "Answer with a str" in hint_of(qid, 3)


# --- functions ------------------------------------------------------------------------------


def _p95(samples):
    ordered = sorted(samples)
    return ordered[max(0, int(round(0.95 * len(ordered))) - 1)]


def _samples(rng):
    yield ([5.0],)
    for _ in range(10):
        yield ([rng.uniform(0, 100) for _ in range(rng.randint(1, 40))],)


@pytest.fixture
def p95_question(ask):
    return ask(FunctionCheck(reference=_p95, cases=_samples), time_limit=0.5)


def test_function_right(p95_question, capsys):
    def p95(samples):
        s = sorted(samples)
        return s[max(0, int(round(0.95 * len(s))) - 1)]

    check(p95_question, p95)
    assert "✓ 99.q1 right" in capsys.readouterr().out


def test_function_wrong_shows_input_and_expected(p95_question):
    hint = hint_of(p95_question, lambda samples: max(samples))
    assert hint.startswith("Not yet. For the input [") and "expected" in hint


def test_function_stub_is_missing_not_wrong(p95_question):
    def p95(samples):
        raise NotImplementedError("Your code here")

    assert hint_of(p95_question, p95).startswith("Not written yet")
    assert hint_of(p95_question, ...).startswith("No answer yet")


def test_function_ill_typed_raising_and_forgotten_return(p95_question):
    assert "Pass the function itself" in hint_of(p95_question, 95.0)
    assert "Your code raised ZeroDivisionError: division by zero" in hint_of(
        p95_question, lambda samples: 1 / 0)

    def no_return(samples):
        sorted(samples)

    assert "did you forget `return`" in hint_of(p95_question, no_return)


def test_function_that_hangs_is_stopped(p95_question):
    def p95(samples):
        while True:
            pass

    assert "stopped after 0.5 s" in hint_of(p95_question, p95)


def test_function_that_hangs_is_stopped_outside_the_main_thread(p95_question):
    """No SIGALRM off the main thread: the thread fallback stops the runaway loop too."""
    hints = []

    def p95(samples):
        while True:
            pass

    def grade():
        try:
            check(p95_question, p95)
        except AssertionError as exc:
            hints.append(str(exc))

    worker = threading.Thread(target=grade)
    worker.start()
    worker.join(10)
    assert hints and "stopped after 0.5 s" in hints[0]


def test_function_inputs_are_copied_and_kwargs_supported(ask, capsys):
    def reference(values, *, scale=1):
        return sum(values) * scale

    qid = ask(FunctionCheck(reference=reference,
                            cases=lambda rng: [Args([1, 2], scale=3), ([rng.random()],)]))

    def mutating(values, *, scale=1):
        total = sum(values) * scale
        values.clear()  # would corrupt the reference's input without copies
        return total

    check(qid, mutating)
    assert "✓" in capsys.readouterr().out


# --- ORM loaders by query count -------------------------------------------------------------


class Base(DeclarativeBase):
    pass


class Author(Base):
    __tablename__ = "authors"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str]
    books: Mapped[list[Book]] = relationship(back_populates="author", order_by="Book.id")


class Book(Base):
    __tablename__ = "books"
    id: Mapped[int] = mapped_column(primary_key=True)
    title: Mapped[str]
    author_id: Mapped[int] = mapped_column(sa.ForeignKey("authors.id"))
    author: Mapped[Author] = relationship(back_populates="books")


@pytest.fixture(scope="module")
def library_engine():
    engine = sa.create_engine("sqlite://", poolclass=StaticPool,
                              connect_args={"check_same_thread": False})
    Base.metadata.create_all(engine)
    with engine.begin() as conn:
        conn.execute(sa.insert(Author), [{"id": i, "name": f"author {i}"} for i in range(1, 11)])
        conn.execute(sa.insert(Book), [{"id": i, "title": f"book {i}", "author_id": 1 + i % 10}
                                       for i in range(1, 41)])
    yield engine
    engine.dispose()


def _titles_per_author(authors):
    return [(a.name, [b.title for b in a.books]) for a in authors]


@pytest.fixture
def loader_question(ask, library_engine):
    def reference(session):
        return session.scalars(sa.select(Author).options(selectinload(Author.books))
                               .order_by(Author.id)).all()

    return ask(QueryCheck(reference=reference, engine=library_engine, max_queries=2,
                          use=_titles_per_author, hint="Load the books with the authors."))


def test_loader_right(loader_question, capsys):
    def load(session):
        return session.scalars(sa.select(Author).options(selectinload(Author.books))
                               .order_by(Author.id)).all()

    check(loader_question, load)
    assert "✓" in capsys.readouterr().out


def test_loader_with_n_plus_one_is_refused_by_query_count(loader_question):
    def load(session):
        return session.scalars(sa.select(Author).order_by(Author.id)).all()  # lazy books

    hint = hint_of(loader_question, load)
    assert "ran 11 queries" in hint and "at most 2 are needed" in hint
    assert "N+1" in hint and "Load the books with the authors." in hint


def test_loader_wrong_rows_raising_and_stub(loader_question):
    def wrong(session):
        return session.scalars(sa.select(Author).options(selectinload(Author.books))
                               .where(Author.id < 5)).all()

    assert "other rows than expected" in hint_of(loader_question, wrong)

    def broken(session):
        return session.scalars(sa.select(Author).where(sa.text("nope = 1"))).all()

    assert "Your code raised OperationalError" in hint_of(loader_question, broken)

    def stub(session):
        raise NotImplementedError("Your code here")

    assert hint_of(loader_question, stub).startswith("Not written yet")
    assert "Pass your loader function" in hint_of(loader_question, [1, 2])


# --- schema changes by EXPLAIN --------------------------------------------------------------


def _fresh_users_engine():
    engine = sa.create_engine("sqlite://", poolclass=StaticPool)
    with engine.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE users (id INTEGER PRIMARY KEY, email TEXT, active INT)")
        conn.exec_driver_sql("INSERT INTO users (email, active) VALUES ('a@x', 1), ('b@x', 0)")
    return engine


@pytest.fixture
def index_question(ask):
    return ask(ExplainCheck(statement="SELECT id FROM users WHERE email = :email",
                            params={"email": "a@x"}, engine=_fresh_users_engine,
                            hint="Index the column of the WHERE clause."))


def test_an_index_a_check_builds_on_the_models_does_not_outlive_the_check(index_question, capsys):
    from perfcourse.models import User

    before = set(User.__table__.indexes)

    def on_the_models(engine):  # right answer; attaches ix_course_email to the models' users table
        sa.Index("ix_course_email", User.__table__.c.email).create(engine)

    check(index_question, on_the_models)
    assert set(User.__table__.indexes) == before  # a later schema from the models will not have it
    with pytest.raises(AssertionError):  # and nothing left over makes a wrong answer pass
        check(index_question, "CREATE INDEX ix_active ON users (active)")


def test_index_right_in_every_answer_form(index_question, capsys):
    check(index_question, "CREATE INDEX ix_users_email ON users (email)")
    users = sa.Table("users", sa.MetaData(), sa.Column("id", sa.Integer, primary_key=True),
                     sa.Column("email", sa.String))
    check(index_question, sa.Index("ix_users_email", users.c.email))

    def migrate(engine):
        with engine.begin() as conn:
            conn.exec_driver_sql("CREATE UNIQUE INDEX ux_email ON users (email)")

    check(index_question, migrate)
    assert capsys.readouterr().out.count("✓") == 3


def test_index_wrong_raising_and_ill_typed(index_question):
    hint = hint_of(index_question, "CREATE INDEX ix_active ON users (active)")
    assert "still runs as a full scan" in hint and "Index the column" in hint
    assert "Your code raised OperationalError" in hint_of(index_question, "CREATE INDEX ON nothing")
    assert "CREATE INDEX statement" in hint_of(index_question, 42)
    assert hint_of(index_question, ...).startswith("No answer yet")


def test_index_name_is_checked_when_asked(ask):
    qid = ask(ExplainCheck(statement="SELECT id FROM users WHERE email = 'a@x'",
                           engine=_fresh_users_engine, index="ix_users_email"))
    assert "not the one this exercise asks for" in hint_of(
        qid, "CREATE INDEX other_name ON users (email)")


def _orders_join_engine():
    engine = _fresh_users_engine()
    with engine.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE orders (id INTEGER PRIMARY KEY, user_id INT, total INT)")
        conn.exec_driver_sql("INSERT INTO orders (user_id, total) VALUES (1, 10), (2, 20)")
    return engine


def test_index_on_one_side_of_a_join_is_not_enough(ask):
    qid = ask(ExplainCheck(
        statement="SELECT o.total FROM orders o JOIN users u ON u.id = o.user_id WHERE u.email = 'a@x'",
        engine=_orders_join_engine))
    # users found by its new index, but orders still read in full to find the user's rows
    hint = hint_of(qid, "CREATE INDEX ix_users_email ON users (email)")
    assert "reads o in full" in hint  # SQLite names the table by its alias
    check(qid, ["CREATE INDEX ix_users_email ON users (email)",
                "CREATE INDEX ix_orders_user ON orders (user_id)"])


# --- the grade runner, end to end (real kernels) ----------------------------------------------


def make_course(root, extra_cells=()):
    """A master with two graded questions (00.q1, 00.q3) and plain cells; its learner version."""
    from perfcourse.authoring import assign

    nb = new_notebook(metadata={"kernelspec": {"name": "python3", "display_name": "Python 3",
                                               "language": "python"}})
    nb.cells = [
        new_markdown_cell("# Grading demo"),
        new_code_cell("from perfcourse.grading import check"),
        new_code_cell('### BEGIN SOLUTION\nanswer = "c"\n### END SOLUTION\ncheck("00.q1", answer)'),
        new_code_cell("def mean_latency_ms(samples_s):\n    ### BEGIN SOLUTION\n"
                      "    return sum(samples_s) / len(samples_s) * 1000\n    ### END SOLUTION"),
        new_code_cell('check("00.q3", mean_latency_ms)'),
        new_code_cell('print("a plain cell", 6 * 7)'),
        *extra_cells,
    ]
    master = root / "solutions" / "00-grading-demo.ipynb"
    master.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, str(master))
    assign([master], root=root)
    return master, root / "notebooks" / "00-grading-demo.ipynb"


@pytest.fixture(scope="module")
def course(tmp_path_factory):
    return make_course(tmp_path_factory.mktemp("course"))


@pytest.mark.slow
def test_runner_master_scores_full(course, capsys):
    from perfcourse.grading.runner import main_grade

    master, _ = course
    assert main_grade([str(master), "--expect-full"]) == 0
    out = capsys.readouterr().out
    assert "00.q1" in out and "The default backend" in out and "score: 2/2" in out
    assert "other cells: 3 ran, 0 failed" in out


@pytest.mark.slow
def test_runner_untouched_learner_fails_every_check(course, capsys):
    from perfcourse.grading.runner import main_grade

    _, learner = course
    assert main_grade([str(learner), "--expect-untouched"]) == 0
    out = capsys.readouterr().out
    assert "score: 0/2" in out and "No answer yet" in out and "Not written yet" in out
    assert main_grade([str(learner), "--expect-full"]) == 1
    out = capsys.readouterr().out
    assert "expect-full: FAILED" in out


@pytest.mark.slow
def test_runner_default_mode_grades_folders_with_summary(course, capsys, monkeypatch):
    from perfcourse.grading.runner import main_grade

    master, learner = course
    monkeypatch.chdir(learner.parent.parent)
    assert main_grade([]) == 0  # notebooks/ and labs/ of the course folder
    out = capsys.readouterr().out
    assert "save your notebook first" in out and "score: 0/2" in out
    assert main_grade([str(master.parent), str(learner.parent)]) == 0
    out = capsys.readouterr().out
    assert "summary" in out and "total score: 2/4" in out


@pytest.mark.slow
def test_runner_untouched_mode_catches_a_broken_plain_cell(tmp_path, capsys):
    from perfcourse.grading.runner import main_grade

    # a plain cell that uses the learner's function: fine in the master, raises in the learner
    master, learner = make_course(tmp_path, [new_code_cell("print(mean_latency_ms([0.1]))")])
    assert main_grade([str(master), "--expect-full"]) == 0
    capsys.readouterr()
    assert main_grade([str(learner), "--expect-untouched"]) == 1
    out = capsys.readouterr().out
    assert ("a cell that is not graded failed: code cell 5 (print(mean_latency_ms([0.1]))): "
            "NotImplementedError: Your code here") in out
    # a master passes its checks, so it is not "untouched" either
    assert main_grade([str(master), "--expect-untouched"]) == 1
    assert "00.q1 passed in the learner version" in capsys.readouterr().out


@pytest.mark.slow
def test_runner_counts_a_deleted_check_cell_as_failed(tmp_path, capsys):
    from perfcourse.grading.runner import main_grade

    master, learner = make_course(tmp_path)
    nb = nbformat.read(str(learner), as_version=4)
    nb.cells = [c for c in nb.cells if 'check("00.q3"' not in c.source]
    nbformat.write(nb, str(learner))
    assert main_grade([str(learner)]) == 0
    out = capsys.readouterr().out
    assert "score: 0/2" in out and "no check cell for this question" in out


def test_loading_the_bank_keeps_the_questions_function():
    """The package ``perfcourse.grading.questions`` never shadows the function of that name."""
    import importlib

    import perfcourse.grading as grading

    load_bank()
    importlib.import_module("perfcourse.grading.questions")
    assert callable(grading.questions) and grading.questions("00")


def test_a_lab_check_without_its_lab_object_says_what_to_run():
    from perfcourse.grading.checkers import Incorrect, made_in_this_kernel

    lab = object()
    assert made_in_this_kernel(lab, "lab app", "run the setup cell.") is lab
    with pytest.raises(Incorrect, match=r"^No lab app in this kernel: run the setup cell\.$"):
        made_in_this_kernel(None, "lab app", "run the setup cell.")
