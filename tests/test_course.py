"""The course's machinery: the student edition holds no answers and blanks exactly the exercises,
each exercise is graded by checks that need its function alone, the grader's messages say what is
wrong in the paper's terms, and the worked example's numbers can be checked on paper."""
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "course"))
import exercises  # noqa: E402
import worked_example  # noqa: E402

ROOT = exercises.ROOT


@pytest.fixture(scope="module")
def student_edition(tmp_path_factory):
    dest = tmp_path_factory.mktemp("handout") / "robust-xid"
    exercises.main(["handout", str(dest)])
    return dest


def with_solution(edition, exercise):
    """The edition's file with one function taken from the solution (the whole def)."""
    def span(src):
        fn, _, end = exercises.function_span(src, exercise.function)
        return min([d.lineno for d in fn.decorator_list] + [fn.lineno]), end
    solution, student = (ROOT / exercise.file).read_text(), (edition / exercise.file).read_text()
    (s0, s1), (t0, t1) = span(solution), span(student)
    sol, stu = solution.splitlines(keepends=True), student.splitlines(keepends=True)
    return "".join(stu[:t0 - 1] + sol[s0 - 1:s1] + stu[t1:])


def grade(edition, *numbers):
    return subprocess.run([sys.executable, "course/exercises.py", "grade", *map(str, numbers)], cwd=edition,
                          capture_output=True, text=True, timeout=600).stdout


def test_the_student_edition_has_no_answers(student_edition):
    """No teacher's edition, no measured findings, no answers section; the exercises' bodies are
    gone, the W(s), T(j|i) and bank formulas are out of their docstrings; no link dangles."""
    files = {str(p.relative_to(student_edition)) for p in student_edition.rglob("*") if p.is_file()}
    assert not {"course/TEACHER.md", "RESULTS.md", "tests/test_course.py"} & files
    assert not any(f.startswith("figures/fig") for f in files)
    assert "figures/embedded_clip.png" in files                                  # the README shows it
    for e in exercises.EXERCISES:
        assert f'raise NotImplementedError("exercise {e.number}: write {e.function}")' in (student_edition / e.file).read_text()
    losses = (student_edition / "losses.py").read_text()
    assert "torch.sigmoid(" not in losses and "(1 - lam) *" not in losses
    for doc in ("losses.py", "course/derivations.py", "test_losses.py", "course/test_derivations.py"):
        text = (student_edition / doc).read_text()
        assert "math.log(1 + k)" not in text and "1 - q / 2" not in text and "(1 - m) *" not in text, doc
    assert "which are yours to write" in (student_edition / "README.md").read_text()
    for md in (p for p in files if p.endswith(".md")):
        text = (student_edition / md).read_text()
        assert "](RESULTS.md" not in text and "TEACHER.md)" not in text, md
        assert "Answers to the labs" not in text, md
    readme = (student_edition / "README.md").read_text()
    assert exercises.FINDINGS in readme and "fig1_delta_sweep" not in readme


def test_a_blank_edition_grades_every_exercise_not_written(student_edition):
    out = grade(student_edition)
    assert out.count("FAIL") == len(exercises.EXERCISES) and out.count("not written yet") == len(exercises.EXERCISES)
    assert f"0 of {len(exercises.EXERCISES)} exercises pass" in out


@pytest.mark.parametrize("parity", [1, 0], ids=["odd-written", "even-written"])
def test_each_exercise_is_graded_by_checks_that_need_it_alone(student_edition, tmp_path, parity):
    """With half the exercises written (the solution's functions: the odd ones, or the even ones)
    and the other half blank, the written ones' checks pass and the blank ones' fail: so a student
    can do them in any order (two editions rather than eight keep this test short)."""
    import shutil
    edition = tmp_path / "half"
    shutil.copytree(student_edition, edition)
    written = [e for e in exercises.EXERCISES if e.number % 2 == parity]
    for e in written:
        (edition / e.file).write_text(with_solution(edition, e))
    results = exercises.run_checks([c for e in exercises.EXERCISES for c in e.checks], root=edition)
    for e in exercises.EXERCISES:
        for c in e.checks:
            assert c in results, f"{c} was not run: the check's id is wrong"
            assert (results[c] is None) == (e in written), (c, results[c])


WRONG = {  # one plausible mistake per exercise, and what the grader must say about it
    1: ("return w_min + (1 - w_min) * torch.sigmoid(-(s - (mu + delta * sigma)) / (kappa * sigma))",
        "W(s) must grow with s"),
    2: ("return lam * one_hot_targets(S) + (1 - lam) * S", "λ = 0.4: expected [0.8, 0.12, 0.08], yours [0.7, 0.18, 0.12]"),
    3: ("return -(targets * logits.log_softmax(1)).sum(1)", "P(·|i) = (2/3, 1/3, 0)): expected [0.752], yours [1.0397]"),
    4: ("return _masked_log_softmax(2 * _masked_log_softmax(candidate_logits(x_pos, y_pos, y_neg) / tau_s, mask), mask).exp()",
        "cycle strategy, τ_s = 0.07, row 0 (instance 3) over its 13 candidates: expected [0.9863"),
    5: ("self.check_index(index); self.v_bar[index] = m * self.v_bar[index] + (1 - m) * v; "
        "self.a_bar[index] = m * self.a_bar[index] + (1 - m) * a; self.s[index] = (self.v_bar[index] * self.a_bar[index]).sum(1)",
        "slots: unit vectors"),
    6: ("return row_loss / w.sum()", "where L = 8: yours [3.0, 5.0]"),
    7: ("return math.log(k) if k else 0.0", "drawn 2 times among the K = 12 negatives, a model that puts the positive 120 logits above every other candidate has a row loss above the floor yours gives, 0.6931"),
    8: ("return 1 - q", "gives an AUC above yours, 0.900"),
}


def test_the_grader_says_what_is_wrong_in_the_papers_terms(student_edition, tmp_path):
    """A wrong answer to each exercise: FAIL, with the check's own sentence (expected against yours),
    never pytest's introspection."""
    import shutil
    edition = tmp_path / "wrong"
    shutil.copytree(student_edition, edition)
    for e in exercises.EXERCISES:
        path = edition / e.file
        text = path.read_text()
        stub = f'raise NotImplementedError("exercise {e.number}: write {e.function}")'
        path.write_text(text.replace(stub, WRONG[e.number][0]))
    out = grade(edition)
    assert "0 of 8 exercises pass" in out, out
    for number, (_, said) in WRONG.items():
        block = out.split(f"exercise {number} (")[1].split("\nexercise ")[0]
        assert "FAIL" in block and said in block, (number, block)
        assert "assert " not in block and "AssertionError" not in block, block
    # a derivation's result is the exercise: its value is never printed (ℓ = (6, 10) gives
    # ∂L/∂w = (-1, 1); ln(1 + 2) = 1.0986; 1 - 0.1/2 = 0.950)
    for number, value in {6: "[-1.0, 1.0]", 7: "1.0986", 8: "0.950"}.items():
        assert value not in out.split(f"exercise {number} (")[1].split("\nexercise ")[0], number


def test_the_handout_refuses_a_link_to_a_file_it_would_not_have():
    """A picture the guide shows travels with it: an uncommitted one is named, not silently lost."""
    docs = {"COURSE.md": "![a](course/figures/new.png) [b](METHOD.md#notation) [c](https://x.org) "
                         "[d](tests) [e](#lab-1)",
            "course/NOTES.md": "[f](../METHOD.md) [g](figures/old.png)"}
    files = ["METHOD.md", "tests/test_pipeline.py", "course/figures/old.png"]
    assert exercises.broken_links(docs, files) == [("COURSE.md", "course/figures/new.png")]


def test_a_file_that_does_not_parse_is_named_for_each_of_its_exercises(student_edition, tmp_path):
    import shutil
    edition = tmp_path / "broken"
    shutil.copytree(student_edition, edition)
    path = edition / "course/derivations.py"
    path.write_text(path.read_text().replace("def weight_gradient(row_loss, w):", "def weight_gradient(row_loss,"))
    out = grade(edition, 6, 7)
    assert out.count("course/derivations.py does not parse: line") == 2, out


def test_the_teachers_edition_grades_its_solutions():
    out = grade(ROOT)
    assert "teacher's edition" in out and f"{len(exercises.EXERCISES)} of {len(exercises.EXERCISES)} exercises pass" in out
    assert "train.py now trains with your functions" in out


def test_the_worked_example_is_paper_arithmetic(capsys):
    """The example's numbers, recomputed here with math alone: P(ā_j|v_0) is a softmax of cosines
    (τ = 1), μ and σ are the mean and sample std of the five s, W follows the sigmoid form, and the
    loss the training module returns equals the rows combined by hand."""
    r = worked_example.main()
    assert "4. The four losses" in capsys.readouterr().out
    cos = [0.8, 0.6, 0.6, -0.8]                                             # v_0 against ā_0, ā_1, ā_3, ā_4
    z = sum(math.exp(c) for c in cos)
    torch.testing.assert_close(r["P_v"][0], torch.tensor([math.exp(c) / z for c in cos]))
    s = [0.8, 0.8, 0.0, 0.96, 0.96]
    mu = sum(s) / 5
    sigma = math.sqrt(sum((x - mu) ** 2 for x in s) / 4)
    assert r["mu"].item() == pytest.approx(mu) and r["sigma"].item() == pytest.approx(sigma)
    w2 = 0.25 + 0.75 / (1 + math.exp(-(0.0 - (mu - sigma)) / (0.5 * sigma)))
    assert r["w"][1].item() == pytest.approx(w2, rel=1e-5)
    assert r["loss_rows_xid"][0].item() == pytest.approx(-math.log(math.exp(0.8) / z) - math.log(
        math.exp(0.6) / sum(math.exp(c) for c in [0.6, 0.8, 0.96, 0.28])), rel=1e-5)
    for mode in ("xid", "weighted", "soft", "robust"):
        assert r["trained"][mode].item() == pytest.approx(r["by_hand"][mode].item(), rel=1e-6)
    torch.testing.assert_close(r["T_v"].sum(1), torch.ones(2))
    for b, (forward, back) in enumerate(r["cycle_factors"]):                # the cycle's S_v, by its factors
        torch.testing.assert_close(forward * back / (forward * back).sum(), r["S_v"][b])
    z_back = sum(math.exp(c) for c in [0.6, 0.8, 0.96, 0.28])             # ā_1 against v̄_0, v̄_1, v̄_3, v̄_4
    assert r["cycle_factors"][0][1][1].item() == pytest.approx(math.exp(0.6) / z_back, rel=1e-5)


def guide_commands(script):
    """The argument lists of every `python SCRIPT ...` (or torchrun) line in COURSE.md's bash blocks,
    with the loop variable of lab 5 set to 0."""
    import re
    import shlex
    text = (Path(__file__).resolve().parent.parent / "COURSE.md").read_text()
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.splitlines():
            words = shlex.split(line.replace("$s", "0"), comments=True)
            if script in words:
                yield words[words.index(script) + 1:]


def test_the_guides_train_and_evaluate_commands_are_accepted_as_written(tmp_path):
    """Every train.py and evaluate.py command of the labs parses with the flags the scripts have now
    (train.py's checks of values included). The plots.py and tools/ commands are not checked here."""
    root = str(Path(__file__).resolve().parent.parent)
    sys.path.insert(0, root)
    import evaluate
    import train
    trained = [argv for argv in guide_commands("train.py")]
    assert len(trained) >= 12
    for argv in trained:
        if "--resume" in argv:  # needs the run it continues; the same flags without it are checked
            argv = [a for a in argv if a != "--resume"]
        train.get_args(argv + ["--out", str(tmp_path / "run")])  # a later --out wins: nothing of the clone's
    evaluated = list(guide_commands("evaluate.py"))
    assert len(evaluated) >= 9
    for argv in evaluated:
        evaluate.parser().parse_args(argv)
