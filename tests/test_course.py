"""The course's machinery: exercises that are graded by exactly the tests they name, and a worked
example whose numbers can be checked on paper."""
import hashlib
import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "course"))
import exercises  # noqa: E402
import worked_example  # noqa: E402


def test_the_solution_passes_every_graded_test():
    """losses.py as it is fails none of test_losses.py (nor, so, any exercise's tests)."""
    assert exercises.failing_tests(exercises.SOLUTION.read_text()) == []


@pytest.mark.parametrize("exercise", exercises.EXERCISES, ids=lambda e: f"exercise{e.number}")
def test_a_blanked_function_fails_exactly_the_tests_named_for_it(exercise):
    """With one body removed, the tests that fail are the exercise's list, no more and no fewer:
    the list is what grades the exercise."""
    source = exercises.blanked(exercises.SOLUTION.read_text(), exercise.function, exercise.number)
    assert f'raise NotImplementedError("exercise {exercise.number}' in source
    assert exercises.failing_tests(source) == sorted(exercise.tests)


def test_make_then_grade_and_the_solution_is_never_touched(tmp_path, capsys):
    """make writes the file with all five bodies gone (and will not overwrite it); an answer to
    exercise 1 passes exercise 1; losses.py is byte for byte what it was."""
    before = hashlib.sha256(exercises.SOLUTION.read_bytes()).hexdigest()
    mine = tmp_path / "my_losses.py"
    exercises.main(["make", "--file", str(mine)])
    text = mine.read_text()
    assert all(f"exercise {e.number}: write {e.function}" in text for e in exercises.EXERCISES)
    with pytest.raises(SystemExit, match="exists"):
        exercises.main(["make", "--file", str(mine)])
    assert exercises.grade(mine, {1}) == 0                                  # still blank: fails
    answer = exercises.spliced(text, exercises.SOLUTION.read_text(), "faulty_positive_weights")
    mine.write_text(answer)                                                 # a student's correct W(s)
    assert exercises.grade(mine, {1}) == 1
    assert "exercise 1 (faulty_positive_weights" in capsys.readouterr().out
    mine.write_text(answer.replace("def soft_cross_entropy(logits, targets, mask=None):", "def soft_cross_entropy(logits,"))
    assert exercises.grade(mine, {1, 3}) == 0                               # a file that does not parse: each says so
    assert capsys.readouterr().out.count("does not parse: line") == 2
    assert hashlib.sha256(exercises.SOLUTION.read_bytes()).hexdigest() == before


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
