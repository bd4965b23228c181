"""Exercises graded by the tests: write the functions that are the method, check them with the
tests that pin the equations down.

    python course/exercises.py make             # writes course/my_losses.py: losses.py with 5 bodies removed
    python course/exercises.py grade            # grades every exercise of course/my_losses.py
    python course/exercises.py grade 1 3        # only exercises 1 and 3
    python course/exercises.py list             # the exercises and the tests that grade each

Each exercise is graded on its own: a copy of the solution (losses.py, which train.py uses and
which this script never changes) gets your version of that one function, and the tests named for
the exercise run against it in a temporary folder. So exercise 3 can pass while 1 is still blank.
Only the function itself is taken from your file: write any helper inside it. Each docstring says
what to compute (for W(s) it is the formula itself: the exercise is to write it with tensors).
"""
import argparse
import ast
import itertools
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import NamedTuple

ROOT = Path(__file__).resolve().parent.parent
SOLUTION, TESTS = ROOT / "losses.py", ROOT / "test_losses.py"
DEFAULT_FILE = ROOT / "course" / "my_losses.py"

class Exercise(NamedTuple):
    number: int
    function: str        # in losses.py; Class.method for a method
    what: str
    pins: list           # the tests that check this equation directly (test_losses.py)
    uses: list           # the other tests that fail while it is blank: they run the loss through it

    @property
    def tests(self):
        return self.pins + self.uses


def each(test, *axes):
    """The ids pytest gives a parametrized test: each(t, ["a", "b"], ["x"]) -> ["t[a-x]", "t[b-x]"]."""
    return [f"{test}[{'-'.join(combo)}]" for combo in itertools.product(*axes)]


STRATEGIES, LAMS = ["bootstrap", "swapped", "neighbor", "cycle"], ["0.0", "0.3", "1.0"]
ALWAYS = ["test_gradients_reach_embeddings_not_banks_or_weights", "test_negatives_are_distinct_and_reproducible_from_state",
          "test_stable_at_small_temperature", "test_stable_under_autocast"]  # they run the default Robust-xID loss
# Found by blanking each function in turn and running test_losses.py; test_course.py checks that
# the blanked file fails exactly these tests and the solution none.
EXERCISES = [
    Exercise(1, "faulty_positive_weights", "W(s), the faulty-positive weight of Weighted-xID",
             pins=["test_weight_function_shape", "test_weights_come_from_bank_scores"],
             uses=ALWAYS + each("test_loss_and_gradient_match_loop", STRATEGIES, ["weighted", "robust"])
             + each("test_targets_are_distributions", LAMS, STRATEGIES)
             + ["test_equal_weights_is_xid", "test_w_min_one_is_xid", "test_weights_find_mismatched_pairs"]),
    Exercise(2, "soft_targets", "T(j|i) = (1 - λ)·1[j = i] + λ·S(j|i), the soft targets of Soft-xID",
             pins=["test_soft_targets_mix_the_one_hot_and_S"],
             uses=ALWAYS + each("test_loss_and_gradient_match_loop", STRATEGIES, ["soft", "robust"])
             + each("test_targets_are_distributions", ["0.3", "1.0"], STRATEGIES)
             + each("test_lambda_one_is_pure_S", STRATEGIES)
             + ["test_class_oracle_spreads_lambda_over_the_own_class"]),
    Exercise(3, "soft_cross_entropy", "-Σ_j T(j|i) log P(j|i), the loss of one row",
             pins=["test_soft_cross_entropy_by_hand"],
             uses=ALWAYS + each("test_loss_and_gradient_match_loop", STRATEGIES, ["xid", "weighted", "soft", "robust"])
             + each("test_targets_are_distributions", LAMS, STRATEGIES) + each("test_lambda_one_is_pure_S", STRATEGIES)
             + ["test_equal_weights_is_xid", "test_lambda_zero_is_xid", "test_w_min_one_is_xid", "test_warmup_is_xid",
                "test_weights_come_from_bank_scores", "test_class_oracle_spreads_lambda_over_the_own_class"]),
    Exercise(4, "_cycle_scores", "S(j|i) ∝ P(ā_j|v̄_i)·P(v̄_i|ā_j), the cycle-consistent softening scores",
             pins=each("test_softening_scores_match_loop", ["0.07", "0.5"], ["cycle"]),
             uses=ALWAYS + each("test_loss_and_gradient_match_loop", ["cycle"], ["soft", "robust"])
             + each("test_targets_are_distributions", ["0.3", "1.0"], ["cycle"]) + ["test_lambda_one_is_pure_S[cycle]"]),
    Exercise(5, "MemoryBank.update", "v̄_i <- normalize(m·v̄_i + (1-m)·v_i), the memory banks' momentum update "
             "(call self.check_index(index) first: a test expects its IndexError; a multi-GPU gather is not asked for)",
             pins=["test_bank_update_momentum_unit_norm_only_batch_slots"],
             uses=["test_bank_rejects_out_of_range_index", "test_weights_find_mismatched_pairs"]),
]


def function_span(source, qualname):
    """(first line of the body after the docstring, last line) of a function, 1-based, or a class's
    method given as Class.method."""
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


def blanked(source, qualname, number):
    """The source with one function's body (all but its docstring) replaced by a NotImplementedError."""
    fn, start, end = function_span(source, qualname)
    lines = source.splitlines(keepends=True)
    indent = " " * (fn.body[0].col_offset)
    stub = f'{indent}raise NotImplementedError("exercise {number}: write {qualname}")\n'
    return "".join(lines[:start - 1] + [stub] + lines[end:])


def spliced(solution, student, qualname):
    """The solution with one function replaced by the student's version of it (the whole def)."""
    def span(src):
        fn, _, end = function_span(src, qualname)
        first = min([d.lineno for d in fn.decorator_list] + [fn.lineno])
        return first, end
    s_first, s_end = span(solution)
    t_first, t_end = span(student)
    sol, stu = solution.splitlines(keepends=True), student.splitlines(keepends=True)
    return "".join(sol[:s_first - 1] + stu[t_first - 1:t_end] + sol[s_end:])


def failing_tests(losses_source, tests=None, timeout=600):
    """Run test_losses.py (or the given test ids) against losses_source in a temporary folder;
    returns the ids of the tests that fail."""
    with tempfile.TemporaryDirectory() as tmp:
        Path(tmp, "losses.py").write_text(losses_source)
        shutil.copy(TESTS, tmp)
        ids = [f"test_losses.py::{t}" for t in tests] if tests else ["test_losses.py"]
        try:
            proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfE", *ids],
                                  cwd=tmp, capture_output=True, text=True, timeout=timeout,
                                  env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})
        except subprocess.TimeoutExpired:
            return [f"(every test: they did not finish within {timeout} s, an endless loop?)"]
        failed = [line.split("::", 1)[1].split(" - ")[0].strip() for line in proc.stdout.splitlines()
                  if line.startswith(("FAILED test_losses.py::", "ERROR test_losses.py::"))]
        if proc.returncode not in (0, 1) or (proc.returncode == 1 and not failed):
            raise RuntimeError(f"pytest could not run the tests (exit {proc.returncode}):\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
        return sorted(failed)


def make(path, force):
    if path.exists() and not force:
        raise SystemExit(f"{path} exists (your work?): give another --file, or --force to overwrite it")
    source = SOLUTION.read_text()
    for e in EXERCISES:
        source = blanked(source, e.function, e.number)
    path.write_text(source)
    print(f"wrote {path}: losses.py with {len(EXERCISES)} function bodies removed; fill them in, then run\n"
          f"    python course/exercises.py grade --file {os.path.relpath(path)}")


def grade(path, numbers):
    if not path.exists():
        raise SystemExit(f"{path} does not exist: run `python course/exercises.py make` first")
    solution, student = SOLUTION.read_text(), path.read_text()
    passed = 0
    for e in EXERCISES:
        if numbers and e.number not in numbers:
            continue
        try:  # the student's file is read anew for each exercise: one that does not parse fails them all, each said
            failed = failing_tests(spliced(solution, student, e.function), e.tests)
        except SyntaxError as err:
            print(f"exercise {e.number} ({e.function}): FAIL, {path} does not parse: line {err.lineno}: {err.msg}")
            continue
        except LookupError as err:
            print(f"exercise {e.number} ({e.function}): FAIL, {err}")
            continue
        passed += not failed
        print(f"exercise {e.number} ({e.function}: {e.what}): {'FAIL' if failed else 'PASS'} "
              f"({len(e.tests) - len(failed)} of {len(e.tests)} tests pass)")
        for t in failed:
            print(f"    failed: test_losses.py::{t}{'   <- pins the equation' if t in e.pins else ''}")
    return passed


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    m = sub.add_parser("make", help="write the exercise file")
    m.add_argument("--file", type=Path, default=DEFAULT_FILE)
    m.add_argument("--force", action="store_true", help="overwrite an existing exercise file")
    g = sub.add_parser("grade", help="grade the exercise file")
    g.add_argument("numbers", type=int, nargs="*", help="exercises to grade (default: all)")
    g.add_argument("--file", type=Path, default=DEFAULT_FILE)
    sub.add_parser("list", help="the exercises and their tests")
    args = p.parse_args(argv)
    if args.command == "make":
        make(args.file, args.force)
    elif args.command == "grade":
        unknown = set(args.numbers) - {e.number for e in EXERCISES}
        if unknown:
            p.error(f"no exercise {sorted(unknown)}: there are {len(EXERCISES)}")
        grade(args.file, set(args.numbers))
    else:
        for e in EXERCISES:
            print(f"{e.number}. {e.function}: {e.what}\n   pinned by: {', '.join(e.pins)}\n"
                  f"   and {len(e.uses)} tests that use it")


if __name__ == "__main__":
    main()
