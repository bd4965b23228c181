"""The course's exercises: the command that makes the student edition, and the grader.

    python course/exercises.py handout ../robust-xid-student   # teacher: write the student edition
    python course/exercises.py list                            # the exercises and what checks each
    python course/exercises.py grade                           # student: grade every exercise
    python course/exercises.py grade 1 6                       # only exercises 1 and 6

The student edition is a copy of this project in which the bodies of the exercises' functions are
gone: five in losses.py itself (the method; once they pass, train.py trains with the student's
W(s), T(j|i) and bank update) and three in course/derivations.py (results to derive on paper
first). It holds no answers: the teacher's edition (course/TEACHER.md), the measured findings
(RESULTS.md and its figures) and the tests of this machinery are left out, and the exercises'
docstrings say what to compute and where the equation is, not the formula.

The grader runs, for each exercise, the checks that need that function alone (so exercise 3 can pass
while 1 is still blank), and prints each failing check's message: what the equation expected and
what the student's function gave. When every exercise passes it runs the whole test files: the loss
put together. In the teacher's edition it grades the solutions, which pass.
"""
import argparse
import ast
import contextlib
import io
import itertools
import os
import re
import shutil
import subprocess
import sys
import tempfile
import textwrap
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import NamedTuple

ROOT = Path(__file__).resolve().parent.parent
TEACHER = ROOT / "course" / "TEACHER.md"  # only the teacher's edition has it
# What the student edition leaves out: answers, measured findings, and the tests of this machinery
# (they need the solutions).
LEFT_OUT = ("course/TEACHER.md", "RESULTS.md", "tests/test_course.py")
FINDINGS = "## What the embedded dataset shows"  # the README's section of measured findings


class Exercise(NamedTuple):
    number: int
    file: str            # relative to the project's folder
    function: str        # Class.method for a method
    what: str
    task: str            # the docstring the student edition gets ("" keeps the solution's)
    checks: list         # pytest ids of the checks that need this function alone: they grade it


def each(test, *axes):
    """The ids pytest gives a parametrized test: each(t, ["a", "b"], ["x"]) -> ["t[a-x]", "t[b-x]"]."""
    return [f"{test}[{'-'.join(combo)}]" for combo in itertools.product(*axes)]


L, D = "test_losses.py::", "course/test_derivations.py::"
EXERCISES = [
    Exercise(1, "losses.py", "faulty_positive_weights", "W(s), the faulty-positive weight of Weighted-xID",
             '''Exercise 1: W(s), Weighted-xID's weight of a positive pair whose alignment score is s
    (METHOD.md, "Weighted-xID": the equation and what each parameter does).

    s: scores, a tensor of any shape; mu, sigma: 0-d tensors, the mean and standard deviation of the
    scores over the bank; delta, kappa, w_min: floats. Returns a tensor shaped like s with values in
    [w_min, 1]: near w_min for a pair whose audio is unlike its video, near 1 for an aligned one.''',
             checks=[L + "test_weight_function_shape"]),
    Exercise(2, "losses.py", "soft_targets", "T(j|i), the soft targets of Soft-xID",
             '''Exercise 2: the soft targets T(j|i) of Soft-xID (METHOD.md, "Soft-xID").

    S: (B, 1+K) softening scores S(j|i), each row a distribution over the row's candidates, the
    positive in column 0; lam: λ in [0, 1]. Returns T, (B, 1+K). λ = 0 must give xID's target
    (one_hot_targets above makes it), λ = 1 the scores alone.''',
             checks=[L + "test_soft_targets_mix_the_one_hot_and_S"]),
    Exercise(3, "losses.py", "soft_cross_entropy", "the loss of one row, -Σ_j T(j|i) log P(j|i)",
             '''Exercise 3: the loss of each row, the cross-entropy between the targets T(j|i) and the
    model's P(j|i), the softmax of the row's logits over its candidates (METHOD.md, "Soft-xID").

    logits, targets: (B, 1+K), the positive in column 0. mask: (B, K) bool or None, True where a
    negative is the row's own instance: no candidate, so its P is 0 and, its T being 0 too, it must
    cost nothing. Returns (B,). _masked_log_softmax above gives log P.''',
             checks=[L + "test_soft_cross_entropy_by_hand"]),
    Exercise(4, "losses.py", "_cycle_scores", "S(j|i) ∝ P(ā_j|v̄_i)·P(v̄_i|ā_j), the cycle-consistent scores",
             '''Exercise 4: the cycle-consistent softening scores of one direction, S_x(j|i) ∝ P(y_j | x_i) ·
    P(x_i | y_j): j is a target when the cycle x_i -> y_j -> x_i closes (METHOD.md, "Soft-xID").

    x_pos, y_pos: (B, d) the rows' own bank entries; x_neg, y_neg: (K, d) the negatives'; tau_s: τ_s.
    Both factors are over the candidates C_i of the row: P(y_j | x_i) a softmax over the y's of C_i,
    P(x_i | y_j) a softmax over the x's of C_i, {x_i} ∪ the negatives (x_i counted once, also when
    it is one of the negatives). lse_neg (K,): lse_neg[n] = log Σ_m exp(y_n·x_m / τ_s) over the
    negatives m, the same for every row (computed once by the caller). mask (B, K) or None: True
    where a negative is the row's own instance, no candidate: its S is exactly 0. Returns S (B, 1+K),
    each row summing to 1, the positive in column 0. candidate_logits and _masked_log_softmax above
    help; the checks compare your S with test_losses.py's loop ref_softening.''',
             checks=[L + t for t in each("test_softening_scores_match_loop", ["0.07", "0.5"], ["cycle"])]),
    Exercise(5, "losses.py", "MemoryBank.move_slots", "the memory banks' momentum update",
             '''Exercise 5: after a step, move the slots in index towards the new embeddings v, a (B, d)
    with momentum m (METHOD.md, "Notation"). m = 0 writes v and a as they are; every slot
    stays a unit vector; afterwards self.s holds v̄_i·ā_i for the slots moved. Call
    self.check_index(index) first: a wrong index is a bug upstream and must raise, never wrap.''',
             checks=[L + "test_bank_update_momentum_unit_norm_only_batch_slots",
                     L + "test_bank_rejects_out_of_range_index"]),
    Exercise(6, "course/derivations.py", "weight_gradient", "∂L/∂w_i: why the weights are not learned", "",
             checks=[D + "test_weight_gradient_matches_autograd", D + "test_weight_gradient_of_two_rows_by_hand"]),
    Exercise(7, "course/derivations.py", "own_instance_floor", "a row's own instance among its negatives", "",
             checks=[D + t for t in each("test_own_instance_floor_is_the_limit_of_a_perfect_model", ["0", "1", "2", "5"])]),
    Exercise(8, "course/derivations.py", "blind_share_auc", "how far detection goes when some faulty pairs look clean", "",
             checks=[D + t for t in each("test_blind_share_auc_matches_a_simulated_detector", ["0.0", "0.1", "0.3", "0.5", "1.0"])]),
]
WHOLE = ["test_losses.py", "course/test_derivations.py"]  # what `grade` runs once every exercise passes


# ----------------------------------------------------------------------------------------------
# The student edition
# ----------------------------------------------------------------------------------------------
def function_span(source, qualname):
    """(the function's node, first line of its body after the docstring, its last line), 1-based,
    for a function or a class's method given as Class.method."""
    tree = ast.parse(source)
    *outer, name = qualname.split(".")
    scope = tree.body
    for cls in outer:
        found = [n for n in scope if isinstance(n, ast.ClassDef) and n.name == cls]
        if not found:
            raise LookupError(f"class {cls} is not defined in the file")
        scope = found[0].body
    fn = next((n for n in scope if isinstance(n, ast.FunctionDef) and n.name == name), None)
    if fn is None:
        raise LookupError(f"{qualname} is not defined in the file")
    body = fn.body
    has_doc = isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str)
    start = body[1].lineno if has_doc and len(body) > 1 else (body[0].end_lineno + 1 if has_doc else body[0].lineno)
    return fn, start, fn.end_lineno


def blanked(source, exercise):
    """The source with the exercise's function body replaced by a NotImplementedError, and its
    docstring by the exercise's task when it has one."""
    fn, start, end = function_span(source, exercise.function)
    lines = source.splitlines(keepends=True)
    indent = " " * fn.body[0].col_offset
    stub = [f'{indent}raise NotImplementedError("exercise {exercise.number}: write {exercise.function}")\n']
    doc_first = fn.body[0].lineno if start > fn.body[0].lineno else start
    head = lines[:doc_first - 1] if exercise.task else lines[:start - 1]
    if exercise.task:  # the task's lines after the first at the body's indentation
        first, _, rest = exercise.task.partition("\n")
        doc = first + "\n" + textwrap.indent(textwrap.dedent(rest), indent) if rest else first
        stub = [f'{indent}"""{doc}"""\n'] + stub
    return "".join(head + stub + lines[end:])


def project_files():
    """The project's files as git tracks them (their content as it is on disk now)."""
    try:
        out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError) as err:
        raise SystemExit(f"the handout is made from a git clone of the project ({ROOT}): `git ls-files` "
                         f"lists what it copies, and it failed: {err}")
    return sorted(f for f in out.split("\0") if f and (ROOT / f).is_file())


def student_markdown(text, name):
    """A document of the student edition: links to what it leaves out become plain text, and the
    README's findings become the question the labs ask."""
    text = re.sub(r"\[([^\]]*)\]\((?:RESULTS\.md|course/TEACHER\.md|TEACHER\.md)(?:#[^)]*)?\)",
                  r"\1 (teacher's edition)", text)
    if name == "README.md":
        title, _, rest = text.partition("\n")
        text = (title + "\n\n**The student edition.** `python train.py`, the labs and the tests need the "
                "functions of exercises 1-5 of [COURSE.md](COURSE.md), which are yours to write; "
                "`python course/exercises.py grade` says which pass.\n" + rest)
    if name == "README.md" and FINDINGS in text:
        head, rest = text.split(FINDINGS, 1)
        tail = rest[rest.index("\n## "):] if "\n## " in rest else "\n"
        text = (head + FINDINGS + "\n\nWhat the method does on this data is what the labs of "
                "[COURSE.md](COURSE.md) ask you to find out.\n" + tail)
    return text


def broken_links(docs, files):
    """(document, target) for each relative link of the student documents whose target the edition
    lacks: a picture the guide shows must travel with it."""
    have = set(files)
    missing = []
    for doc, text in docs.items():
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            path = target.split("#")[0]
            if not path or re.match(r"[a-z]+:", path):  # an anchor in the same page, or a URL
                continue
            path = os.path.normpath(os.path.join(os.path.dirname(doc), path))
            if path not in have and not any(f.startswith(path + "/") for f in have):
                missing.append((doc, target))
    return missing


def handout(dest):
    dest = Path(dest).resolve()
    if dest == ROOT or ROOT in dest.parents:
        raise SystemExit(f"{dest} is inside the project: give a folder outside it")
    if dest.exists() and any(dest.iterdir()):
        raise SystemExit(f"{dest} exists and is not empty: give a new folder")
    files = [f for f in project_files() if f not in LEFT_OUT]
    docs = {f: student_markdown((ROOT / f).read_text(), f) for f in files if f.endswith(".md")}
    shown = set(re.findall(r"\]\(((?:figures|course)/[^)#\s]+)\)", "".join(docs.values())))
    # RESULTS.md's figures are measured findings: only the pictures a student document shows go
    files = [f for f in files if not f.startswith("figures/") or f in shown]
    missing = broken_links(docs, files)
    if missing:
        raise SystemExit("the student edition would link to files it does not have (it copies what "
                         "`git ls-files` lists: add and commit them first):\n"
                         + "\n".join(f"  {doc}: {target}" for doc, target in missing))
    for f in files:
        (dest / f).parent.mkdir(parents=True, exist_ok=True)
        if f in docs:
            (dest / f).write_text(docs[f])
        else:
            shutil.copy2(ROOT / f, dest / f)
    for name in sorted({e.file for e in EXERCISES}):
        source = (ROOT / name).read_text()
        for e in EXERCISES:
            if e.file == name:
                source = blanked(source, e)
        (dest / name).write_text(source)
    # the worked example runs the exercises' functions: the edition gets what it prints now
    sys.path.insert(0, str(ROOT / "course"))
    import worked_example
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        worked_example.main()
    (dest / "course" / "worked_example.txt").write_text(printed.getvalue())
    changed = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                             capture_output=True, text=True).stdout.splitlines()
    if changed:  # the edition holds them as they are on disk, which no commit records
        print(f"note: {len(changed)} tracked files differ from the last commit "
              f"({', '.join(c[3:] for c in changed[:5])}{', ...' if len(changed) > 5 else ''}); "
              f"the edition has them as they are on disk.")
    print(f"wrote the student edition to {dest}: {len(files)} files.\n"
          f"Blank, for the students to write: "
          + "; ".join(f"{e.number}. {e.file}: {e.function}" for e in EXERCISES) + ".\n"
          f"Left out: {', '.join(LEFT_OUT)}, and RESULTS.md's figures; the README's findings section "
          f"and the links to what is left out are replaced.\n"
          f"Students grade their work there with `python course/exercises.py grade`.")


# ----------------------------------------------------------------------------------------------
# The grader
# ----------------------------------------------------------------------------------------------
def run_checks(ids, root=ROOT, timeout=600):
    """Run pytest on the given ids in the project's folder, one process per test file (a file that
    does not import then fails its own checks, not the others'); {id: None if passed, else the
    message of its failure} for every id."""
    results = {}
    for name in dict.fromkeys(i.split("::")[0] for i in ids):
        mine = [i for i in ids if i.split("::")[0] == name]
        results.update(run_file_checks(name, mine, root, timeout))
    return results


def run_file_checks(name, ids, root, timeout):
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.xml"
        try:
            proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                                   f"--junitxml={report}", *ids], cwd=root, capture_output=True, text=True,
                                  timeout=timeout, env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})
        except subprocess.TimeoutExpired:
            return {i: f"{name}'s checks did not finish within {timeout} s (an endless loop?)" for i in ids}
        results = {}
        if report.exists():
            for case in ET.parse(report).iter("testcase"):
                key = f"{case.get('classname', '').replace('.', '/')}.py::{case.get('name')}"
                bad = case.find("failure")
                bad = bad if bad is not None else case.find("error")
                results[key] = None if bad is None else explain(bad.get("message") or bad.text or "")
        missing = [i for i in ids if ("::" in i and i not in results) or (i == name and not results)]
        if missing:  # pytest could not collect them: say why
            said = [line[4:] for line in proc.stdout.splitlines() if line.startswith("E   ")]
            why = "\n      ".join(said[-6:]) or (proc.stdout + proc.stderr)[-1500:]
            for i in missing:
                results[i] = f"{name} could not be run, so its checks were not: \n      {why}"
        return results


def explain(message):
    """The part of a failure a student should read: the check's own sentence, not pytest's
    introspection of the assert."""
    if "NotImplementedError: exercise" in message:
        return "not written yet"
    text = message.split("\nassert ")[0].strip()
    text = re.sub(r"^AssertionError: ", "", text)
    return text if len(text) < 1500 else text[:1500] + " ..."


def grade(numbers=()):
    chosen = [e for e in EXERCISES if not numbers or e.number in numbers]
    if TEACHER.exists():
        print("(the teacher's edition: this grades the solutions)")
    broken = {}
    for name in sorted({e.file for e in chosen}):
        try:
            ast.parse((ROOT / name).read_text())
        except SyntaxError as err:
            broken[name] = f"{name} does not parse: line {err.lineno}: {err.msg}"
    runnable = [e for e in chosen if e.file not in broken]
    results = run_checks([c for e in runnable for c in e.checks]) if runnable else {}
    passed = 0
    for e in chosen:
        if e.file in broken:
            print(f"exercise {e.number} ({e.function}): FAIL, {broken[e.file]}")
            continue
        failed = [(c, results.get(c, "was not run: is it still in the test file?")) for c in e.checks]
        failed = [(c, m) for c, m in failed if m is not None]
        passed += not failed
        print(f"exercise {e.number} ({e.file}: {e.function}, {e.what}): "
              f"{'FAIL' if failed else 'PASS'} ({len(e.checks) - len(failed)} of {len(e.checks)} checks)")
        if failed and all(m == "not written yet" for _, m in failed):
            print("    not written yet")
            continue
        for c, message in failed[:3]:
            print(f"    {c.split('::')[1]}: {message}")
        if len(failed) > 3:
            print(f"    ... and {len(failed) - 3} more checks of the same function")
    print(f"{passed} of {len(chosen)} exercises pass.")
    if passed == len(EXERCISES):
        whole = run_checks(WHOLE)
        bad = [k for k, m in whole.items() if m is not None]
        print(f"All together: {len(whole) - len(bad)} of {len(whole)} tests of {' and '.join(WHOLE)} pass."
              + ("" if bad else " train.py now trains with your functions: python train.py"))
        for k in bad[:5]:
            print(f"    {k}: {whole[k]}")
    return passed


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    h = sub.add_parser("handout", help="write the student edition to a new folder")
    h.add_argument("dest", type=Path)
    g = sub.add_parser("grade", help="grade the exercises")
    g.add_argument("numbers", type=int, nargs="*", help="exercises to grade (default: all)")
    sub.add_parser("list", help="the exercises and the checks that grade each")
    args = p.parse_args(argv)
    if args.command == "handout":
        handout(args.dest)
    elif args.command == "grade":
        unknown = set(args.numbers) - {e.number for e in EXERCISES}
        if unknown:
            p.error(f"no exercise {sorted(unknown)}: there are {len(EXERCISES)}")
        grade(set(args.numbers))
    else:
        for e in EXERCISES:
            print(f"{e.number}. {e.file}: {e.function}, {e.what}\n   checked by: "
                  + ", ".join(c.split("::")[1] for c in e.checks))


if __name__ == "__main__":
    main()
