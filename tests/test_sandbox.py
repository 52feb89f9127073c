"""
sandbox.py against hostile programs: no ordinary exit path scores a pass, and inside bubblewrap a
program cannot write outside its work dir, outlive its run, read the harness's environment, reach the
network or signal a process outside; loops, memory and output floods are contained. The in-process
guard of the --unsafe-sandbox fallback is checked on the attacks it was built for.

bwrap tests are skipped where bubblewrap cannot sandbox, except under BALORA_REQUIRE_BWRAP=1 (.ci/run
sets it), where that is a failure.
"""

import os
import secrets
import socket
import subprocess
import sys
import time

import pytest

import sandbox

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
needs_bwrap = pytest.mark.skipif(sandbox.bwrap_problem() is not None, reason=str(sandbox.bwrap_problem()))
ISOLATIONS = [pytest.param("bwrap", marks=needs_bwrap), "guard"]


def run(solution, tests="", isolation="bwrap", **limits):
    return sandbox.run_program(solution, tests, isolation=isolation, **{"timeout": 10, **limits})


def test_bwrap_sandboxes_here_when_required():
    if os.environ.get("BALORA_REQUIRE_BWRAP") != "1":
        pytest.skip("BALORA_REQUIRE_BWRAP=1 is not set")
    assert sandbox.bwrap_problem() is None


@needs_bwrap
def test_an_interpreter_in_a_venv_under_tmp_still_runs_in_the_sandbox(tmp_path):
    # the work dir is a tmpfs on /tmp: without the read-only re-bind, a venv in /tmp (pytest's tmp_path
    # is one) disappears inside the sandbox and bwrap cannot exec its python
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", "--system-site-packages", str(venv)], check=True)
    code = ("import sys; sys.path.insert(0, %r); import sandbox; print(sandbox.bwrap_problem()); "
            "print(sandbox.run_program('def f():\\n    return 1\\n', 'assert f() == 1\\n')['status'])" % ROOT)
    out = subprocess.run([str(venv / "bin" / "python"), "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["None", "passed"], out.stdout + out.stderr


def test_a_missing_bwrap_is_reported(monkeypatch):
    monkeypatch.setattr(sandbox.shutil, "which", lambda name: None)
    sandbox.bwrap_problem.cache_clear()
    try:
        assert "not installed" in sandbox.bwrap_problem()
        with pytest.raises(RuntimeError, match="not installed"):
            sandbox.run_program("pass\n", "")
    finally:
        sandbox.bwrap_problem.cache_clear()


# -----------------------------------------------------------------------------
# A pass is the verdict the wrapper writes after the tests, not an exit status

@pytest.mark.parametrize("isolation", ISOLATIONS)
def test_passing_and_failing_solutions(isolation):
    solution = "def add(a, b):\n    return a + b\nprint('ok')\n"
    passed = run(solution, "assert add(2, 3) == 5\n", isolation)
    assert passed["status"] == "passed" and passed["passed"] and "ok" in passed["output"]
    failed = run(solution, "assert add(2, 3) == 6\n", isolation)
    assert failed["status"] == "failed" and not failed["passed"] and "AssertionError" in failed["output"]
    broken = run("def add(a, b)\n    return a + b\n", "assert add(2, 3) == 5\n", isolation)
    assert broken["status"] == "failed" and "SyntaxError" in broken["output"]


# Each is a wrong solution (f() should be 1) that stops the run early in one ordinary way, or hides
# the failing tests behind `if __name__ == "__main__"`: exit status 0, which an exit-status harness
# that runs the program as __main__ scores as passed.
EXITS_EARLY = {
    "sys.exit(0)": "import sys\nsys.exit(0)\n",
    "raise SystemExit": "raise SystemExit\n",
    "os._exit(0)": "import os\nos._exit(0)\n",
    "unittest.main() under __main__": "import unittest\nif __name__ == '__main__':\n    unittest.main()\n",
    "unittest.main()": "import unittest\nunittest.main(argv=['x'])\n",
    "exit inside the tested call": "import sys\ndef f():\n    sys.exit(0)\n",
    "os._exit inside the tested call": "import os\ndef f():\n    os._exit(0)\n",
    "forged verdict": ("import os\ndef f():\n    for fd in range(3, 64):\n        try:\n"
                       "            os.write(fd, b'passed\\n')\n        except OSError:\n            pass\n"
                       "    os._exit(0)\n"),
}


@pytest.mark.parametrize("isolation", ISOLATIONS)
@pytest.mark.parametrize("name", list(EXITS_EARLY))
def test_exiting_early_is_a_failure(name, isolation):
    result = run("def f():\n    return 0\n" + EXITS_EARLY[name], "assert f() == 1\n", isolation)
    assert result["status"] == "failed" and not result["passed"], result


# -----------------------------------------------------------------------------
# bwrap: what the program can reach

@needs_bwrap
def test_no_write_outside_the_work_dir_even_with_os_exit_replaced(tmp_path):
    name = f".sandbox-escape-{secrets.token_hex(4)}"
    targets = [str(tmp_path / name), os.path.join(ROOT, name), "/dev/shm/" + name, "/dev/" + name]
    solution = f"""
import os
os._exit = lambda code: None  # what disarmed the old in-process guard
for path in {targets!r}:
    for attempt in (lambda: open(path, "w").write("x"), lambda: os.mkfifo(path), lambda: os.symlink("/", path),
                    lambda: os.mknod(path), lambda: os.mkdir(path)):
        try:
            attempt()
        except OSError:
            pass
open("scratch.txt", "w").write("inside")
print("attempted", open("scratch.txt").read())
"""
    try:
        result = run(solution)
        assert result["status"] == "passed" and "attempted inside" in result["output"], result
        assert [path for path in targets if os.path.lexists(path)] == []
    finally:
        for path in targets:
            if os.path.isdir(path) and not os.path.islink(path):
                os.rmdir(path)
            elif os.path.lexists(path):
                os.remove(path)


def processes_with(marker):
    """Host pids whose command line holds `marker`."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if marker.encode() in f.read():
                    found.append(int(pid))
        except OSError:
            pass
    return found


@needs_bwrap
def test_forked_setsid_child_dies_with_the_run():
    marker = f"balora-straggler-{secrets.token_hex(4)}"
    solution = f"""
import os, sys, time
if os.fork() == 0:
    os.setsid()  # its own session: out of reach of a kill of the run's process group
    print("child alive", flush=True)
    os.execv(sys.executable, [sys.executable, "-S", "-c", "import time; time.sleep(60)", {marker!r}])
time.sleep(0.5)
"""
    started = time.monotonic()
    result = run(solution)
    assert result["status"] == "passed" and "child alive" in result["output"], result
    deadline = time.monotonic() + 2  # the kernel kills the PID namespace as its first process exits
    while processes_with(marker) and time.monotonic() < deadline:
        time.sleep(0.05)
    stragglers = processes_with(marker)
    for pid in stragglers:
        os.kill(pid, 9)
    assert stragglers == [] and time.monotonic() - started < 10


@needs_bwrap
def test_harness_environment_is_unreadable(monkeypatch):
    monkeypatch.setenv("BALORA_SECRET", "s3cret")
    solution = f"""
import os
seen = repr(dict(os.environ))
for pid in ["self", "1", str(os.getppid()), "{os.getpid()}"] + [p for p in os.listdir("/proc") if p.isdigit()]:
    try:
        seen += open(f"/proc/{{pid}}/environ", "rb").read().decode(errors="replace")
    except OSError:
        pass
print("LEAKED" if "BALORA" + "_SECRET" in seen else "CLEAN", os.getppid())
"""
    result = run(solution)
    assert result["status"] == "passed" and "CLEAN" in result["output"] and "LEAKED" not in result["output"], result


@needs_bwrap
def test_no_network():
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    solution = f"""
import socket
try:
    socket.create_connection(("127.0.0.1", {port}), timeout=2)
    print("connected")
except OSError as error:
    print("refused:", error)
"""
    try:
        result = run(solution)
        assert result["status"] == "passed" and "refused" in result["output"], result
        listener.settimeout(0.2)
        with pytest.raises(socket.timeout):
            listener.accept()
        socket.create_connection(("127.0.0.1", port), timeout=2).close()  # the listener does accept this process
        listener.accept()[0].close()
    finally:
        listener.close()


@needs_bwrap
def test_no_signal_to_a_process_outside():
    # The sleeper has a session and process group of its own: should the sandbox ever let these
    # signals through, they reach the sleeper only (no kill(-1) or group of the test's own here).
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
    solution = f"""
import os, signal
for name, attempt in [("kill", lambda: os.kill({sleeper.pid}, 9)),
                      ("pidfd", lambda: signal.pidfd_send_signal(os.pidfd_open({sleeper.pid}), 9)),
                      ("killpg", lambda: os.killpg({sleeper.pid}, 9))]:
    try:
        attempt()
        print(name, "sent")
    except OSError as error:
        print(name, type(error).__name__)
"""
    try:
        result = run(solution)
        time.sleep(0.2)
        assert sleeper.poll() is None, result
        for name in ("kill", "pidfd", "killpg"):
            assert f"{name} ProcessLookupError" in result["output"], result
    finally:
        sleeper.kill()
        sleeper.wait()


# -----------------------------------------------------------------------------
# bwrap: what the program can use up

@needs_bwrap
def test_infinite_loop_times_out():
    started = time.monotonic()
    result = run("while True:\n    pass\n", timeout=2)
    assert result["status"] == "timeout" and not result["passed"] and time.monotonic() - started < 5


@needs_bwrap
def test_memory_bomb_fails():
    result = run("chunks = []\nwhile True:\n    chunks.append(bytearray(1 << 20))\n", memory_mb=128)
    assert result["status"] == "failed" and "MemoryError" in result["output"]


@needs_bwrap
@pytest.mark.parametrize("flood", ["import sys\nsys.stdout.write('x' * (100 << 20))\n",
                                   "for _ in range(100):\n    print('y' * (1 << 20))\n"])
def test_100_mb_of_output_fails_and_is_not_read_back(flood):
    result = run(flood, "assert False, 'never reached'\n")
    # The 16 MB file-size limit stops the program (SIGXFSZ); only the ends of stdout/stderr are read.
    assert result["status"] == "failed" and len(result["output"]) <= 2 * sandbox.OUTPUT_BYTES


@needs_bwrap
def test_work_dir_is_small_and_limits_hold():
    solution = """
import resource
written = 0
try:
    for i in range(16):
        with open(f"f{i}", "wb") as f:
            f.write(bytes(1 << 20))
        written += 1
except OSError as error:
    print("stopped:", error)
print("MiB written", written)
"""
    tests = ("import resource\n"
             "assert resource.getrlimit(resource.RLIMIT_AS) == (256 << 20, 256 << 20)\n"
             "assert resource.getrlimit(resource.RLIMIT_CPU) == (4, 4)\n"  # ceil(timeout) + 1
             "assert resource.getrlimit(resource.RLIMIT_FSIZE) == (4 << 20, 4 << 20)\n"
             f"assert resource.getrlimit(resource.RLIMIT_NPROC) == ({sandbox.MAX_PROCESSES}, {sandbox.MAX_PROCESSES})\n")
    result = run(solution, tests, timeout=3, memory_mb=256, file_mb=4)
    # a 4 MiB tmpfs holds at most 4 files of 1 MiB (file_mb sizes it, not only each file)
    assert result["status"] == "passed" and "No space left" in result["output"], result
    assert int(result["output"].split("MiB written")[1].split()[0]) <= 4


# -----------------------------------------------------------------------------
# The --unsafe-sandbox fallback: the audit-hook guard, best-effort

@pytest.mark.parametrize("source", [
    "import subprocess\nsubprocess.run(['true'])\n",
    "import os\nos.system('true')\n",
    "import os\nos.kill(os.getpid(), 0)\n",  # harmless targets: a guard that broke must not hurt the harness
    "import os\nif os.fork() == 0:\n    os._exit(0)\n",
    "import socket\nsocket.create_connection(('127.0.0.1', 80), timeout=1)\n",
    "import ctypes\n",
    "import resource\nresource.setrlimit(resource.RLIMIT_AS, (64 << 20, 64 << 20))\n",
])
def test_guard_blocks_escapes(source):
    assert run(source, isolation="guard")["status"] == "blocked", source


def test_guard_blocks_writes_outside_its_directory(tmp_path):
    target = tmp_path / "escaped.txt"
    # Catching the refusal does not help: the guard ends the process; nor does replacing os._exit.
    source = f"import os\nos._exit = lambda code: None\ntry:\n    open({str(target)!r}, 'w').write('x')\nexcept Exception:\n    pass\n"
    assert run(source, isolation="guard")["status"] == "blocked" and not target.exists()
    fd_escape = f"import os\nfd = os.open({str(tmp_path)!r}, os.O_RDONLY)\nos.open('escaped.txt', os.O_WRONLY | os.O_CREAT, dir_fd=fd)\n"
    assert run(fd_escape, isolation="guard")["status"] == "blocked" and not target.exists()
    inside = run("open('scratch.txt', 'w').write('x')\nassert open('scratch.txt').read() == 'x'\n", isolation="guard")
    assert inside["status"] == "passed"


def test_guard_has_an_empty_environment(monkeypatch):
    monkeypatch.setenv("BALORA_SECRET", "leak")
    assert run("import os\nassert 'BALORA_SECRET' not in os.environ\n", isolation="guard")["status"] == "passed"
