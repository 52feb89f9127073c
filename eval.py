"""
Evaluate a base model, or a base model + BA-LoRA adapter, on the paper's benchmarks (Appendix B.2,
C.6, C.7):

  gsm8k, math        accuracy of greedy chain-of-thought answers (MetaMath's "The answer is: ..." format)
  humaneval, mbpp    pass@k of generated code, each program run in a sandboxed subprocess
  glue               accuracy / Matthews / Pearson / Spearman / F1 of a classifier adapter (train_nlu.py)
  ppl                strided sliding-window perplexity (Wikitext-2 recipe, Table 13)
  cluster            silhouette scores (cosine) and minority-class recall of a classifier (Table 12)

    python eval.py gsm8k                                  # bundled tiny model + toy data, offline
    python eval.py gsm8k --model meta-llama/Llama-2-7b-hf-dir --adapter out/nlg/adapter \\
        --data openai/gsm8k --dtype bf16 --device cuda
    python eval.py humaneval --model DIR --data openai_humaneval --allow-code-execution
    python eval.py ppl --model DIR --data wikitext --max-length 4096 --stride 512
    python eval.py glue --model deberta-v3-base-dir --adapter out/nlu/adapter --task rte --data glue
    python eval.py cluster --model DIR --adapter DIR --task mnli --data glue --minority-label 2

Results are printed as a table and written as JSON to --out (default out/eval/<command>.json).
--data is a local .json/.jsonl/.parquet file or a Hugging Face hub dataset name (for glue and cluster:
"glue" reads the task's split of nyu-mll/glue).
"""

import argparse
import json
import math
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import warnings
from concurrent.futures import ThreadPoolExecutor
from fractions import Fraction
from functools import cache

import torch
import torch.nn.functional as F
from tqdm import tqdm

import balora
from data import PROMPT_FORMATS, DebertaTokenizer, Tokenizer, load_records, prompt_ids, resolve_prompt_format
from model import DebertaClassifier, Llama, read_config
from train_nlg import shown
from train_nlu import TASKS, accuracy, collate, compute_metrics, encode_split, load_split

ASSETS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets")

# -----------------------------------------------------------------------------
# Data: a local file or a hub dataset, as a list of dict records

# Hub datasets whose default configuration is not the one the paper evaluates on.
HUB_CONFIGS = {
    "gsm8k": "main", "openai/gsm8k": "main",
    "wikitext": "wikitext-2-raw-v1", "Salesforce/wikitext": "wikitext-2-raw-v1",
    "mbpp": "full", "google-research-datasets/mbpp": "full",
}


def read_records(args):
    """The --data rows of a benchmark: `--split` (default test) of a hub dataset, with its usual config."""
    return load_records(args.data, args.limit, args.split, args.data_config or HUB_CONFIGS.get(args.data))


def field(record, names, flag="--data"):
    """The value of the first of `names` present in `record` (datasets name the same thing differently)."""
    for name in names:
        if name in record:
            return record[name]
    raise ValueError(f"{flag}: a record has none of the fields {list(names)} (it has {sorted(record)})")


# -----------------------------------------------------------------------------
# GSM8K: the number after "The answer is" (MetaMath) or "####" (GSM8K references), compared exactly

# A number as written in word problems: "-3", "1,234", "$18.00", ".5", "7." (the period ends the
# sentence). Not preceded by a letter, digit or point, so the "3" of "2-3 days" is not read as -3.
NUMBER = re.compile(r"(?<![\w.])(-|\u2212)?\$?(\d{1,3}(?:,\d{3})+|\d+)?(\.\d+)?")


def parse_number(text):
    """Fraction of the first number in `text` ("$1,234.50." -> 2469/2), None if there is none."""
    for match in NUMBER.finditer(text):
        sign, whole, decimals = match.groups()
        if whole is None and decimals is None:
            continue
        value = Fraction((whole or "0").replace(",", "") + (decimals or ""))
        return -value if sign else value
    return None


def extract_gsm8k_answer(text):
    """
    The number a GSM8K completion or reference commits to, as a Fraction (None if it commits to none).
    The first number after the first "The answer is" (MetaMath's training format) or "####" (the GSM8K
    reference format); without a marker, the last number of the text (a model that never learned the
    format still gets credit for a final number).
    """
    marker = re.search(r"the answer is|####", text, flags=re.IGNORECASE)
    if marker:
        return parse_number(text[marker.end():])
    numbers = [m for m in NUMBER.finditer(text) if m.group(2) or m.group(3)]
    return parse_number(numbers[-1].group(0)) if numbers else None


# -----------------------------------------------------------------------------
# MATH: the last \boxed{...}, normalized the way the MATH grader (Hendrycks et al. 2021) does


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
    """A MATH completion's final answer: after "The answer is:" (MetaMath) or else its last \\boxed{}."""
    marker = re.search(r"The answer is:?", text)
    if marker:
        answer = text[marker.end():].strip().split("\n")[0].strip()
        return last_boxed(answer) or answer
    return last_boxed(text)


def _brace_argument(argument):
    """'1' -> '{1}', '{12}' -> '{12}': the argument of \\frac or \\sqrt in braces."""
    return argument if argument.startswith("{") else "{" + argument + "}"


def strip_math(answer):
    """
    Canonical string of a LaTeX answer, so that notational variants compare equal:
    "\\left( \\dfrac12, 5\\text{ cm}\\right)" and "(\\frac{1}{2},5)" both become "(\\frac{1}{2},5)".
    """
    s = answer.strip().replace("\n", "").replace("\\!", "").replace("\\\\", "\\")
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = s.replace("\\left", "").replace("\\right", "")
    for degree in ("^{\\circ}", "^\\circ", "\u00b0"):
        s = s.replace(degree, "")
    s = s.replace("\\$", "").replace("$", "").replace("\\%", "").replace("%", "")
    # A lone \text{...} is the answer itself ("\text{(A)}"); any other \text{...} is units ("5\text{ cm}").
    whole_text = re.fullmatch(r"\s*\\(?:text|textbf|mbox)\{([^{}]*)\}\s*", s)
    s = whole_text.group(1) if whole_text else re.sub(r"\\(?:text|mbox)\{[^{}]*\}", "", s)
    s = s.replace("\\textbf", "")
    # Drop a short left-hand side, "x = 5" -> "5" (an equation with a longer one, "x+y=5", stays whole).
    sides = s.split("=")
    if len(sides) == 2 and len(sides[0].strip()) <= 2:
        s = sides[1]
    s = s.replace(" ", "").rstrip(".")
    s = re.sub(r"(^|[^\d])\.(\d)", r"\g<1>0.\2", s)  # ".5" -> "0.5"
    s = re.sub(r"\\sqrt(\{[^{}]*\}|\w)", lambda m: "\\sqrt" + _brace_argument(m.group(1)), s)
    s = re.sub(r"\\frac(\{[^{}]*\}|\w)(\{[^{}]*\}|\w)",
               lambda m: "\\frac" + _brace_argument(m.group(1)) + _brace_argument(m.group(2)), s)
    if re.fullmatch(r"-?\d{1,3}(,\d{3})+(\.\d+)?", s):  # "1,000" is a number, "(1,2)" is not
        s = s.replace(",", "")
    slash = re.fullmatch(r"(-?\d+)/(\d+)", s)
    if slash:
        s = f"\\frac{{{slash.group(1)}}}{{{slash.group(2)}}}"
    return s


def math_number(s):
    """A stripped answer that is a plain rational number ("-3", "2.50", "\\frac{1}{2}", "-\\frac{3}{4}") as a Fraction."""
    if re.fullmatch(r"-?\d+(\.\d+)?", s):
        return Fraction(s)
    frac = re.fullmatch(r"(-?)\\frac\{(-?\d+)\}\{(-?\d+)\}", s)
    if frac and int(frac.group(3)) != 0:
        value = Fraction(int(frac.group(2)), int(frac.group(3)))
        return -value if frac.group(1) else value
    return None


def math_equiv(prediction, reference):
    """MATH answer equivalence: equal canonical strings, or equal rational values ("0.5" == "\\frac12")."""
    if prediction is None or reference is None:
        return False
    a, b = strip_math(prediction), strip_math(reference)
    if a == b:
        return True
    x, y = math_number(a), math_number(b)
    return x is not None and x == y


def math_reference(record):
    """The reference answer of a MATH record: an explicit answer field, else the solution's last box."""
    if "answer" in record:
        return str(record["answer"])
    return last_boxed(field(record, ("solution", "output", "response")))


# -----------------------------------------------------------------------------
# Code: pass@k (Chen et al. 2021) of programs run in a sandbox


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


# Exit status of a program the guard stopped: an escape attempt, scored as a failure it cannot catch.
BLOCKED_EXIT_CODE = 111

# Run inside the sandboxed interpreter before the program: a CPython audit hook (PEP 578; it cannot be
# removed once added) that ends the process on any write outside the working directory, process
# creation, signal to another process, network use, native code loading or resource-limit change.
SANDBOX_GUARD = r"""
import os, sys

def install_guard(root):
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC
    path_events = {"os.remove": (0,), "os.rmdir": (0,), "os.mkdir": (0,), "os.rename": (0, 1),
                   "os.link": (0, 1), "os.symlink": (1,), "os.chmod": (0,), "os.chown": (0,),
                   "os.truncate": (0,), "os.utime": (0,), "os.chflags": (0,), "os.setxattr": (0,),
                   "os.removexattr": (0,), "sqlite3.connect": (0,)}
    forbidden = {"os.fork", "os.forkpty", "os.system", "os.exec", "os.posix_spawn", "os.spawn",
                 "subprocess.Popen", "os.kill", "os.killpg", "signal.pthread_kill",
                 "resource.setrlimit", "resource.prlimit", "gc.get_objects", "gc.get_referrers",
                 "gc.get_referents", "sys.remote_exec", "webbrowser.open"}
    forbidden_imports = {"ctypes", "_ctypes", "_posixsubprocess", "multiprocessing"}

    def outside(path):
        if isinstance(path, int):  # an already open descriptor: only stdin/out/err are inherited
            return False
        full = os.path.realpath(os.fsdecode(path))
        return full != root and not full.startswith(root + os.sep)

    def refuse(event, args):
        sys.stderr.write(f"sandbox: blocked {event} {args!r}\n")
        sys.stderr.flush()
        os._exit(EXIT_CODE)

    def audit(event, args):
        if event == "open":
            path, mode, flags = args
            writes = (mode is not None and any(c in mode for c in "wax+")) or bool((flags or 0) & write_flags)
            # An outside directory's descriptor is refused too: calls relative to it (dir_fd=) reach
            # this hook as plain relative paths, which would look inside.
            if outside(path) and (writes or os.path.isdir(path)):
                refuse(event, args)
        elif event in path_events:
            if any(args[i] is not None and outside(args[i]) for i in path_events[event]):
                refuse(event, args)
        elif event == "import":
            if args[0] in forbidden_imports:
                refuse(event, args[:1])
        elif event in forbidden or event.startswith(("socket.", "ctypes.")):
            refuse(event, args)

    sys.addaudithook(audit)

install_guard(os.path.realpath(os.getcwd()))
del install_guard
with open("program.py") as source_file:
    source = source_file.read()
exec(compile(source, "program.py", "exec"), {"__name__": "__main__"})
""".replace("EXIT_CODE", str(BLOCKED_EXIT_CODE))


@cache
def network_isolation():
    """['unshare', '-n'] when this machine lets us give a process an empty network namespace, else []."""
    if shutil.which("unshare") is None:
        return []
    probe = subprocess.run(["unshare", "-n", "true"], capture_output=True)
    return ["unshare", "-n"] if probe.returncode == 0 else []


def limit_resources(cpu_seconds, memory_bytes, file_bytes):
    """preexec_fn of a sandboxed program: hard limits it cannot raise (the guard also forbids trying)."""
    resource.setrlimit(resource.RLIMIT_CPU, (cpu_seconds, cpu_seconds))
    resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
    resource.setrlimit(resource.RLIMIT_FSIZE, (file_bytes, file_bytes))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    # No new processes or threads (the count is per user, and this one already exists). Not enforced
    # for root, where the audit hook's process-creation ban is what stops a fork bomb.
    resource.setrlimit(resource.RLIMIT_NPROC, (1, 1))


def _tail(path, size=2000):
    with open(path, "rb") as f:
        f.seek(max(0, os.path.getsize(path) - size))
        return f.read().decode("utf-8", errors="replace")


def run_program(source, timeout=10.0, memory_mb=1024, file_mb=16):
    """
    Run the Python program `source` in a sandbox and report {"status", "passed", "returncode", "output"}.
    status: "passed" (exit 0), "failed" (non-zero exit, crash, limit hit), "timeout", or "blocked"
    (the guard stopped an escape attempt). Never raises because of what the program does.

    Layers: `python -I -B` (no env, user site or bytecode writes) in a fresh temporary directory with an
    empty environment; the audit-hook guard above; rlimits on CPU time, address space, file size and
    process count; its own session, whose whole process group is killed after the wall-clock timeout;
    no network when `unshare -n` works here (else only the guard's socket ban); stdout/stderr go to
    size-limited files outside the working directory, never into this process's memory.
    Not a security boundary against a determined attacker (e.g. one that writes and loads a shared
    library); evaluate untrusted models inside a container or VM, as the HumanEval authors advise.
    """
    scratch = tempfile.mkdtemp(prefix="balora-sandbox-")
    workdir = os.path.join(scratch, "work")
    os.mkdir(workdir)
    with open(os.path.join(workdir, "program.py"), "w") as f:
        f.write(source)
    stdout_path, stderr_path = os.path.join(scratch, "stdout"), os.path.join(scratch, "stderr")
    argv = network_isolation() + [sys.executable, "-I", "-B", "-c", SANDBOX_GUARD]
    cpu_seconds = math.ceil(timeout) + 1
    try:
        with open(stdout_path, "wb") as stdout, open(stderr_path, "wb") as stderr:
            process = subprocess.Popen(
                argv, cwd=workdir, env={}, stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr,
                start_new_session=True,
                preexec_fn=lambda: limit_resources(cpu_seconds, memory_mb << 20, file_mb << 20))
            try:
                returncode, timed_out = process.wait(timeout=timeout), False
            except subprocess.TimeoutExpired:
                returncode, timed_out = None, True
            finally:
                try:  # the session's process group: the program and anything it managed to start
                    os.killpg(process.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                process.wait()
        output = _tail(stdout_path) + _tail(stderr_path)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    if timed_out:
        status = "timeout"
    elif returncode == BLOCKED_EXIT_CODE:
        status = "blocked"
    else:
        status = "passed" if returncode == 0 else "failed"
    return {"status": status, "passed": status == "passed", "returncode": returncode, "output": output}


def extract_code(completion):
    """The code of a completion: its first ```-fenced block if it has one, else all of it."""
    fence = re.search(r"```[\w+-]*\n(.*?)(```|$)", completion, flags=re.DOTALL)
    return fence.group(1) if fence else completion


def humaneval_query(record):
    return f"Create a Python script for this problem:\n{record['prompt']}"


def humaneval_program(record, completion):
    """
    HumanEval check program: prompt + generated code + unit tests. The prompt comes first whether the
    model continued it (an indented body) or restated the function (the restated def replaces the
    prompt's docstring-only one); either way its imports and helper functions are defined.
    """
    return f"{record['prompt']}\n{extract_code(completion)}\n\n{record['test']}\n\ncheck({record['entry_point']})\n"


def mbpp_query(record):
    tests = "\n".join(record["test_list"])
    return f"{field(record, ('text', 'prompt'))}\nYour code should pass these tests:\n\n{tests}"


def mbpp_program(record, completion):
    """MBPP check program: setup code / imports, the generated code, then the asserts."""
    setup = record.get("test_setup_code") or "\n".join(record.get("test_imports") or [])
    tests = "\n".join(record["test_list"])
    return f"{setup}\n{extract_code(completion)}\n\n{tests}\n"


CODE_TASKS = {"humaneval": (humaneval_query, humaneval_program), "mbpp": (mbpp_query, mbpp_program)}


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
    (N, 2) points and the method used: t-SNE as Appendix B.3 (perplexity 30, seed 42) when scikit-learn
    is installed, else (or with method="pca") the top-2 principal components.
    """
    x = torch.as_tensor(features, dtype=torch.float64)
    if method == "tsne":
        try:
            from sklearn.manifold import TSNE

            perplexity = min(30.0, (len(x) - 1) / 3)  # t-SNE needs perplexity < N
            return TSNE(2, perplexity=perplexity, random_state=42, init="pca").fit_transform(x.numpy()), "t-SNE"
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
    axes.set_title(f"{method} of classifier features")
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
def perplexity(model, token_ids, max_length, stride):
    """exp(sum of token NLLs / number of scored tokens) of `token_ids` (a list) under a causal LM."""
    device = next(model.parameters()).device
    ids = torch.tensor(token_ids, dtype=torch.long, device=device)
    nll_sum, num_scored = 0.0, 0
    windows = list(sliding_windows(len(ids), max_length, stride))
    for begin, end, first_target in tqdm(windows, desc="ppl", leave=False):
        # logits at position t predict token t + 1: only the positions before the scored targets are
        # needed, so the LM head runs on those (stride rows, not the whole window)
        scored = torch.zeros(1, end - begin, dtype=torch.bool, device=device)
        scored[0, first_target - begin - 1:end - begin - 1] = True
        predicted = model(ids[begin:end][None], output_mask=scored).float()
        targets = ids[first_target:end]
        nll_sum += F.cross_entropy(predicted, targets, reduction="sum").double().item()
        num_scored += len(targets)
    if num_scored == 0:
        raise ValueError("--data has fewer than 2 tokens: nothing to score")
    return {"perplexity": math.exp(nll_sum / num_scored), "nll_sum": nll_sum, "tokens": num_scored}


# -----------------------------------------------------------------------------
# Models: base weights (+ adapter, merged so evaluation runs at base-model speed)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def apply_adapter(model, adapter):
    """Put the BA-LoRA adapter directory `adapter` (balora.save_adapter) onto `model` and merge it."""
    if adapter is not None:
        balora.load_adapter(model, adapter)
        balora.merge_lora(model)
    return model.eval()


def load_llama(args):
    """The model (+ merged adapter) and its tokenizer; resolves --prompt-format against the checkpoint."""
    tokenizer = Tokenizer(args.model)
    if hasattr(args, "prompt_format"):  # generation commands (ppl scores raw text)
        args.prompt_format = resolve_prompt_format(args.prompt_format, tokenizer)
        print(f"prompt format: {args.prompt_format}")
    model = Llama.from_pretrained(args.model, dtype=DTYPES[args.dtype], device=args.device)
    return apply_adapter(model, args.adapter), tokenizer


def load_classifier(args, task):
    """DebertaClassifier with the adapter's LoRA factors, pooler and classification head."""
    model = DebertaClassifier.from_pretrained(args.model, num_labels=task.num_labels,
                                              dtype=DTYPES[args.dtype], device=args.device)
    return apply_adapter(model, args.adapter), DebertaTokenizer(args.model)


@torch.no_grad()
def generate_completions(model, tokenizer, prompts, max_new_tokens, batch_size, temperature=0.0, seed=0):
    """
    Completions (strings) of `prompts` (lists of token ids, data.prompt_ids), batched with left padding
    through the KV-cache generate. A completion ends before the first of the checkpoint's end ids
    (tokenizer.eos_ids: EOS and end-of-turn tokens). Prompts are batched longest first, so similar
    lengths share a batch (less padding) and an out-of-memory error shows up in the first batch.
    """
    device = next(model.parameters()).device
    generator = torch.Generator(device).manual_seed(seed) if temperature > 0 else None
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    completions = [None] * len(prompts)
    for start in tqdm(range(0, len(order), batch_size), desc="generate", leave=False):
        batch = order[start:start + batch_size]
        input_ids, attention_mask = tokenizer.pad_batch([prompts[i] for i in batch], padding_side="left")
        output = model.generate(input_ids.to(device), attention_mask.to(device), max_new_tokens=max_new_tokens,
                                eos_token_id=tokenizer.eos_ids, temperature=temperature, generator=generator)
        for row, i in enumerate(batch):
            new_ids = output[row, input_ids.shape[1]:].tolist()
            stop = next((n for n, token in enumerate(new_ids) if token in tokenizer.eos_ids), len(new_ids))
            completions[i] = tokenizer.decode(new_ids[:stop])  # generate fills finished rows with an end id
    return completions


# -----------------------------------------------------------------------------
# Commands: each returns (metrics dict, per-sample records)


def score_answers(args, queries, references, extract, equivalent):
    """Greedy completion of each query's prompt; accuracy of the extracted answers against the references."""
    if any(reference is None for reference in references):
        raise ValueError(f"--data {args.data!r}: a record's reference answer could not be read")
    model, tokenizer = load_llama(args)
    prompts = [prompt_ids(tokenizer, query, args.prompt_format) for query in queries]  # as the model was trained
    completions = generate_completions(model, tokenizer, prompts, args.max_new_tokens, args.batch_size)
    samples = []
    for query, completion, reference in zip(queries, completions, references):
        prediction = extract(completion)
        samples.append({"query": query, "completion": completion, "prediction": None if prediction is None else str(prediction),
                        "reference": str(reference), "correct": prediction is not None and equivalent(prediction, reference)})
    correct = sum(sample["correct"] for sample in samples)
    return {"accuracy": correct / len(samples), "correct": correct, "total": len(samples)}, samples


def eval_gsm8k(args):
    records = read_records(args)
    queries = [field(record, ("question", "query", "instruction")) for record in records]
    references = [extract_gsm8k_answer(str(field(record, ("answer", "response", "output")))) for record in records]
    return score_answers(args, queries, references, extract_gsm8k_answer, lambda a, b: a == b)


def eval_math(args):
    if args.data is None:
        raise ValueError("math needs --data: a MATH test file (MetaMath's MATH_test.jsonl) or a hub dataset name")
    records = read_records(args)
    queries = [field(record, ("problem", "instruction", "question", "query")) for record in records]
    references = [math_reference(record) for record in records]
    return score_answers(args, queries, references, extract_math_answer, math_equiv)


def eval_code(args):
    """HumanEval / MBPP: n samples per problem, each program sandboxed, unbiased pass@k averaged over problems."""
    if not args.allow_code_execution:
        raise SystemExit(
            f"{args.command} runs model-generated code. It is sandboxed (see run_program) but not fully isolated; "
            "read the code and rerun with --allow-code-execution to accept that.")
    ks = [int(k) for k in args.k.split(",")]
    if max(ks) > args.num_samples:
        raise ValueError(f"--k {args.k}: every k must be <= --num-samples {args.num_samples}")
    if args.num_samples > 1 and args.temperature == 0:
        raise ValueError("--num-samples > 1 needs --temperature > 0 (greedy decoding gives n identical samples)")
    make_query, make_program = CODE_TASKS[args.command]
    records = read_records(args)
    model, tokenizer = load_llama(args)
    prompts = [prompt_ids(tokenizer, make_query(record), args.prompt_format)
               for record in records for _ in range(args.num_samples)]
    completions = generate_completions(model, tokenizer, prompts, args.max_new_tokens, args.batch_size,
                                       temperature=args.temperature, seed=args.seed)
    programs = [make_program(records[i // args.num_samples], completion) for i, completion in enumerate(completions)]
    # Each program waits on its own subprocess, so threads are enough to run --workers of them at once.
    with ThreadPoolExecutor(args.workers) as pool:
        runs = list(tqdm(pool.map(lambda p: run_program(p, args.timeout, args.memory_mb), programs),
                         total=len(programs), desc="execute", leave=False))
    samples, passed_per_problem = [], []
    for i, record in enumerate(records):
        mine = range(i * args.num_samples, (i + 1) * args.num_samples)
        passed_per_problem.append(sum(runs[j]["passed"] for j in mine))
        samples += [{"task_id": record.get("task_id", i), "completion": completions[j], "status": runs[j]["status"],
                     "output": runs[j]["output"]} for j in mine]
    metrics = {f"pass@{k}": sum(pass_at_k(args.num_samples, c, k) for c in passed_per_problem) / len(records) for k in ks}
    metrics.update(problems=len(records), samples_per_problem=args.num_samples)
    return metrics, samples


@torch.no_grad()
def classifier_outputs(model, tokenizer, task, args):
    """(logits (N, D), pooled features (N, H), labels (N,)) of the classifier on --data."""
    split = args.split or task.validation_splits[0]
    data_file = None if args.data in ("glue", "nyu-mll/glue") else args.data  # None: train_nlu reads the hub
    input_ids, labels = encode_split(load_split(args.task, split, data_file), args.task, tokenizer, args.max_length,
                                     args.data)
    if args.limit is not None:
        input_ids, labels = input_ids[:args.limit], labels[:args.limit]
    device = next(model.parameters()).device
    logits, pooled = [], []
    for start in tqdm(range(0, len(input_ids), args.batch_size), desc="classify", leave=False):
        indices = list(range(start, min(start + args.batch_size, len(input_ids))))
        batch_ids, attention_mask, _ = collate(input_ids, labels, indices, tokenizer.pad_id)
        batch_logits, batch_pooled = model(batch_ids.to(device), attention_mask=attention_mask.to(device), return_pooled=True)
        logits.append(batch_logits.float().cpu())
        pooled.append(batch_pooled.float().cpu())
    return torch.cat(logits), torch.cat(pooled), labels


def eval_glue(args):
    task = TASKS[args.task]
    if args.adapter is None:
        warnings.warn("eval.py glue without --adapter scores a randomly initialised classification head "
                      "(pooler + classifier are trained by train_nlu.py): expect chance-level metrics")
    model, tokenizer = load_classifier(args, task)
    logits, _, labels = classifier_outputs(model, tokenizer, task, args)
    metrics = compute_metrics(task, logits, labels)
    metrics["total"] = len(labels)
    predictions = logits[:, 0] if task.num_labels == 1 else logits.argmax(-1)
    samples = [{"prediction": p, "label": y} for p, y in zip(predictions.tolist(), labels.tolist())]
    return metrics, samples


def eval_cluster(args):
    """
    Table 12: silhouette scores (cosine distance, true labels) in the logit space (the paper computes
    them there, before any projection) and of the pooled [CLS] features, globally and for the minority
    class, plus the minority class's recall; a 2-D plot of the pooled features.
    """
    task = TASKS[args.task]
    if task.num_labels < 2:
        raise ValueError(f"--task {args.task}: cluster needs a classification task, not regression")
    model, tokenizer = load_classifier(args, task)
    logits, pooled, labels = classifier_outputs(model, tokenizer, task, args)
    minority = args.minority_label
    if minority is None:  # the rarest class of the evaluated data (on the paper's balanced MNLI, pass it)
        present, counts = torch.unique(labels, return_counts=True)
        minority = int(present[counts.argmin()])
    if not (labels == minority).any():
        raise ValueError(f"--minority-label {minority}: no example of that class in --data")
    predictions = logits.argmax(-1)
    logit_silhouette, feature_silhouette = silhouette_report(logits, labels), silhouette_report(pooled, labels)
    metrics = {
        "global_silhouette": logit_silhouette["global"],
        "minority_silhouette": logit_silhouette["per_class"][minority],
        "minority_recall": (predictions[labels == minority] == minority).double().mean().item(),
        "accuracy": accuracy(predictions, labels),
        "minority_label": minority,
        "pooled_global_silhouette": feature_silhouette["global"],
        "pooled_minority_silhouette": feature_silhouette["per_class"][minority],
    }
    for label, value in logit_silhouette["per_class"].items():
        metrics[f"silhouette_class_{label}"] = value
    method = plot_2d(pooled, labels, args.plot, args.projection)
    if method is not None:
        metrics["plot"] = f"{args.plot} ({method})"
    samples = [{"prediction": p, "label": y} for p, y in zip(predictions.tolist(), labels.tolist())]
    return metrics, samples


def eval_ppl(args):
    """C.7: perplexity of a text file, or of a dataset's "text" column joined by blank lines (Wikitext-2)."""
    if os.path.isfile(args.data) and args.data.endswith(".txt"):
        with open(args.data) as f:
            text = f.read()
    else:
        records = read_records(args)
        text = "\n\n".join(str(field(record, ("text",))) for record in records)
    max_length = args.max_length or read_config(args.model)["max_position_embeddings"]
    stride = args.stride or max(1, max_length // 2)
    model, tokenizer = load_llama(args)
    token_ids = tokenizer.encode(text)  # the checkpoint's BOS rule, as tokenizer(text) in HF's perplexity recipe
    metrics = perplexity(model, token_ids, max_length, stride)
    metrics.update(max_length=max_length, stride=stride)
    return metrics, []


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

    def command(name, help, model, data, split="test", adapter_help="balora adapter directory (save_adapter)"):
        sub = commands.add_parser(name, help=help, description=help, formatter_class=DefaultsHelpFormatter)
        sub.add_argument("--model", default=model, help="Hugging Face-format model directory")
        sub.add_argument("--adapter", default=None, help=adapter_help + "; merged into the weights before evaluating")
        sub.add_argument("--data", default=data, help=".json/.jsonl/.parquet file or datasets hub name")
        sub.add_argument("--data-config", default=None, help="hub dataset configuration (e.g. main, wikitext-2-raw-v1)")
        sub.add_argument("--split", default=split, help="hub dataset split")
        sub.add_argument("--limit", type=int, default=None, help="evaluate the first N examples only")
        sub.add_argument("--out", default=os.path.join("out", "eval", f"{name}.json"), help="results JSON")
        sub.add_argument("--dtype", default="fp32", choices=list(DTYPES), help="dtype the model weights are loaded and run in")
        sub.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                         help="cpu | cuda (default: cuda when available, else cpu)")
        sub.add_argument("--batch-size", type=int, default=16, help="examples per forward pass")
        return sub

    def prompt_format_flag(sub):
        sub.add_argument("--prompt-format", default=None, choices=list(PROMPT_FORMATS),
                         help="alpaca: the Alpaca prompt train_nlg.py trains with by default on base models; chat: "
                              "the checkpoint's chat template (default: chat when the checkpoint has one, else alpaca)")

    llama, data = os.path.join(ASSETS, "tiny-llama"), os.path.join(ASSETS, "data")
    for name in ("gsm8k", "math"):
        sub = command(name, f"{name.upper()} accuracy", llama, os.path.join(data, "gsm8k_test.jsonl") if name == "gsm8k" else None)
        sub.add_argument("--max-new-tokens", type=int, default=512, help="generation length cap per answer")
        prompt_format_flag(sub)
    for name, hub_name in (("humaneval", "openai_humaneval"), ("mbpp", "mbpp")):
        sub = command(name, f"{name} pass@k (runs generated code)", llama, hub_name)
        sub.add_argument("--max-new-tokens", type=int, default=512, help="generation length cap per completion")
        prompt_format_flag(sub)
        sub.add_argument("--allow-code-execution", action="store_true", help="required: generated code is executed")
        sub.add_argument("--num-samples", type=int, default=1, help="samples per problem (n of pass@k)")
        sub.add_argument("--k", default="1", help="comma-separated k values of pass@k")
        sub.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
        sub.add_argument("--seed", type=int, default=0, help="sampling seed (temperature > 0)")
        sub.add_argument("--timeout", type=float, default=10.0, help="wall-clock seconds per program")
        sub.add_argument("--memory-mb", type=int, default=1024, help="address-space limit per program")
        sub.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="programs run at once")
    sub = command("ppl", "strided sliding-window perplexity", llama, os.path.join(data, "ppl.txt"))
    sub.add_argument("--max-length", type=int, default=None, help="tokens per window (default: the model's max_position_embeddings)")
    sub.add_argument("--stride", type=int, default=None, help="tokens the window advances by (default: --max-length / 2)")
    for name in ("glue", "cluster"):
        sub = command(name, "GLUE metrics of a classifier" if name == "glue" else "silhouette / minority recall (Table 12)",
                      os.path.join(ASSETS, "tiny-deberta"), os.path.join(data, "nli_validation.jsonl"), split=None,
                      adapter_help="adapter directory written by train_nlu.py (LoRA + pooler + classifier)")
        sub.add_argument("--task", default="nli", choices=list(TASKS), help="the adapter's GLUE task (nli: the toy task)")
        sub.add_argument("--max-length", type=int, default=128, help="tokens per example")
        if name == "cluster":
            sub.add_argument("--minority-label", type=int, default=None, help="default: the rarest label in --data")
            sub.add_argument("--plot", default=os.path.join("out", "eval", "cluster.png"), help="2-D projection PNG")
            sub.add_argument("--projection", default="tsne", choices=["tsne", "pca"], help="tsne needs scikit-learn (else pca)")
    return parser.parse_args(argv)


COMMANDS = {"gsm8k": eval_gsm8k, "math": eval_math, "humaneval": eval_code, "mbpp": eval_code,
            "glue": eval_glue, "cluster": eval_cluster, "ppl": eval_ppl}


def main(argv=None):
    args = parse_args(argv)
    metrics, samples = COMMANDS[args.command](args)
    print_table(f"{args.command}: {args.model}" + (f" + {args.adapter}" if args.adapter else ""), metrics)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"command": args.command, "args": vars(args), "metrics": metrics, "samples": samples}, f, indent=1)
    print(f"results in {args.out}")
    return metrics


if __name__ == "__main__":
    main()
