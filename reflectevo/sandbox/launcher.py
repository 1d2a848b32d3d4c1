"""Start one untrusted program inside the sandbox.

Run as its own interpreter (``python -I -S launcher.py``) with a JSON configuration on stdin; it
uses the standard library only and never imports reflectevo. The host side is
``reflectevo/sandbox/__init__.py``, which explains the layers. Process tree in the namespace modes:

    launcher (host namespaces)                      writes the uid/gid maps of the child
      └─ setup   unshare(user?, mount, pid, net)    dies with the launcher (PDEATHSIG)
           └─ init   pid 1 of the new pid namespace: builds the read-only root, then reaps
                └─ program   drops uid, sets rlimits, execs python runner.py

When ``init`` exits the kernel kills every process left in the namespace, including ones that
called setsid() or double-forked, so nothing outlives a run.
"""

import ctypes
import json
import os
import platform
import resource
import select
import signal
import sys

CLONE_NEWNS = 0x00020000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 0x1, 0x2, 0x4, 0x8
MS_REMOUNT, MS_BIND, MS_MOVE, MS_REC, MS_PRIVATE = 0x20, 0x1000, 0x2000, 0x4000, 0x40000
MS_NOATIME, MS_NODIRATIME, MS_RELATIME = 0x400, 0x800, 0x200000
MNT_DETACH = 2
PR_SET_PDEATHSIG, PR_SET_CHILD_SUBREAPER, PR_SET_NO_NEW_PRIVS = 1, 36, 38
AT_FDCWD, AT_RECURSIVE = -100, 0x8000
MOUNT_ATTR_RDONLY, MOUNT_ATTR_NOSUID, MOUNT_ATTR_NODEV = 0x1, 0x2, 0x4
SYSCALLS = {"x86_64": {"pivot_root": 155}, "aarch64": {"pivot_root": 41}}
SYS_MOUNT_SETATTR = 442  # the same number on every architecture (added in Linux 5.12)
SETUP_FAILED = 125  # exit code when the sandbox could not be built (not the program's fault)
SANDBOX_UID = 1000  # the program's uid inside the user namespace
WORKDIR = "/.sandbox/work"  # inside the sandbox: the private tmpfs, the program's cwd and HOME
RUNNER = "/.sandbox/runner.py"

libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long


class MountAttr(ctypes.Structure):
    _fields_ = [(name, ctypes.c_uint64) for name in ("attr_set", "attr_clr", "propagation", "userns_fd")]


def _check(result, what):
    if result != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"{what}: {os.strerror(errno)}")


def _bytes(value):
    return None if value is None else os.fsencode(value)


def unshare(flags):
    _check(libc.unshare(ctypes.c_int(flags)), "unshare")


def mount(source, target, fstype, flags, data=None):
    _check(
        libc.mount(_bytes(source), _bytes(target), _bytes(fstype), ctypes.c_ulong(flags), _bytes(data)),
        f"mount {target}",
    )


def prctl(option, value):
    _check(
        libc.prctl(
            ctypes.c_int(option), ctypes.c_ulong(value), ctypes.c_ulong(0), ctypes.c_ulong(0), ctypes.c_ulong(0)
        ),
        "prctl",
    )


def die_with_parent(lifeline):
    """SIGKILL this process when its parent dies; exit at once if that already happened.

    ``lifeline`` is the read end of a pipe whose write end only the parent holds: it reads as
    end-of-file once the parent is gone. (getppid() cannot tell across a pid namespace.)
    """
    prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if select.select([lifeline], [], [], 0)[0]:
        os._exit(SETUP_FAILED)
    os.close(lifeline)


class Status:
    """JSON lines to the host on an inherited pipe. Closed before the program starts."""

    def __init__(self, fd):
        self.fd = fd

    def send(self, **message):
        if self.fd is not None:
            os.write(self.fd, (json.dumps(message) + "\n").encode())

    def close(self):
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


# ---- the read-only file system --------------------------------------------------------------

_LOCKED_FLAGS = (
    (os.ST_NODEV, MS_NODEV),
    (os.ST_NOEXEC, MS_NOEXEC),
    (os.ST_NOSUID, MS_NOSUID),
    (os.ST_NOATIME, MS_NOATIME),
    (os.ST_NODIRATIME, MS_NODIRATIME),
    (os.ST_RELATIME, MS_RELATIME),
)


def make_read_only(path, nodev=True):
    """Read-only, nosuid (and nodev) for the mount at ``path`` and every mount below it."""
    flags = MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID | (MOUNT_ATTR_NODEV if nodev else 0)
    attr = MountAttr(flags, 0, 0, 0)
    result = libc.syscall(
        ctypes.c_long(SYS_MOUNT_SETATTR),
        ctypes.c_long(AT_FDCWD),
        _bytes(path),
        ctypes.c_uint(AT_RECURSIVE),
        ctypes.byref(attr),
        ctypes.c_size_t(ctypes.sizeof(attr)),
    )
    if result == 0:
        return "mount_setattr"
    # Older kernels: remount the top mount only. In a user namespace the flags the mount already
    # had are locked and must be repeated, or the kernel refuses the remount.
    kept = os.statvfs(path).f_flag
    extra = sum(ms for st, ms in _LOCKED_FLAGS if kept & st)
    mount(None, path, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | (MS_NODEV if nodev else 0) | extra)
    return "remount"


def _mirror(root, path):
    return os.path.join(root, path.lstrip("/"))


BASE_CANDIDATES = ("/tmp", "/mnt", "/media", "/srv", "/opt", "/var/tmp", "/run", "/home")


def choose_base(binds):
    """A directory to mount the new root on that hides none of the paths still to be bound.

    The tmpfs covers whatever lies below its mount point (in our private mount namespace only),
    so a Python living under /tmp needs the new root to be assembled somewhere else.
    """
    for base in BASE_CANDIDATES:
        if (
            os.path.isdir(base)
            and not os.path.islink(base)
            and not any(entry["path"] == base or entry["path"].startswith(base + "/") for entry in binds)
        ):
            return base
    raise RuntimeError(f"every candidate mount point {BASE_CANDIDATES} holds a path the program needs")


def build_root(config, layers):
    """Assemble the program's file system in a fresh tmpfs and switch to it."""
    root = choose_base(config["binds"])  # a mount point in our private mount namespace; the host's copy is untouched
    mount(None, "/", None, MS_REC | MS_PRIVATE)  # nothing we mount propagates back to the host
    mount("tmpfs", root, "tmpfs", MS_NOSUID | MS_NODEV, "size=16m,mode=755")
    method = None
    for entry in config["binds"]:  # parents before children; the host sorted and de-duplicated them
        target = _mirror(root, entry["path"])
        os.makedirs(os.path.dirname(target), exist_ok=True)
        if entry["kind"] == "symlink":
            os.symlink(entry["target"], target)
            continue
        if entry["kind"] == "dir":
            os.makedirs(target, exist_ok=True)
        else:
            open(target, "w").close()
        mount(entry["path"], target, None, MS_BIND | MS_REC)
        method = make_read_only(target)
    dev = _mirror(root, "/dev")
    os.makedirs(dev, exist_ok=True)
    for node in ("null", "zero", "full", "random", "urandom"):
        open(os.path.join(dev, node), "w").close()
        mount("/dev/" + node, os.path.join(dev, node), None, MS_BIND)
    for name, target in (
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
    ):
        os.symlink(target, os.path.join(dev, name))
    # the only writable place: a private, size-limited tmpfs owned by the program's uid
    # (under /.sandbox, a name no host path is expected to use, so no bind mount collides)
    work = _mirror(root, WORKDIR)
    os.makedirs(work)
    uid, gid = config["program_uid"], config["program_gid"]
    mount("tmpfs", work, "tmpfs", MS_NOSUID | MS_NODEV, f"size={config['workdir_mb']}m,mode=700,uid={uid},gid={gid}")
    if not os.path.lexists(_mirror(root, "/tmp")):
        os.symlink(WORKDIR, _mirror(root, "/tmp"))
    with open(_mirror(root, RUNNER), "w") as handle:
        handle.write(config["runner_source"])
    job_path = os.path.join(work, ".job.json")
    with open(job_path, "w") as handle:
        json.dump(config["job"], handle)
    os.chown(job_path, uid, gid)
    os.chmod(job_path, 0o600)
    proc = _mirror(root, "/proc")
    os.makedirs(proc)
    try:  # a proc of the new pid namespace shows only the sandbox's own processes
        mount("proc", proc, "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
        layers["private_proc"] = True
    except OSError:  # some containers forbid a new proc: hide the host's instead
        mount("tmpfs", proc, "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, "size=4k,mode=555")
        layers["private_proc"] = False
    old = _mirror(root, "/.oldroot")
    os.makedirs(old)
    try:
        _check(
            libc.syscall(ctypes.c_long(SYSCALLS[platform.machine()]["pivot_root"]), _bytes(root), _bytes(old)),
            "pivot_root",
        )
        os.chdir("/")
        _check(libc.umount2(b"/.oldroot", ctypes.c_int(MNT_DETACH)), "umount /.oldroot")
        os.rmdir("/.oldroot")
        layers["root_switch"] = "pivot_root"
    except (OSError, KeyError):  # no pivot_root (e.g. an initramfs root): move the mount and chroot
        os.chdir(root)
        mount(root, "/", None, MS_MOVE)
        os.chroot(".")
        os.chdir("/")
        layers["root_switch"] = "chroot"
    mount(None, "/", None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV)
    layers["read_only_root"] = True
    layers["read_only_method"] = method


# ---- the program process ----------------------------------------------------------------------


def exec_program(config, workdir, runner_path, job_path, drop_to):
    """Become the untrusted program: drop privileges, apply limits, exec the runner."""
    try:
        if drop_to is not None:
            uid, gid = drop_to
            try:
                os.setgroups([])
            except PermissionError:
                if config["mode"] != "userns" or os.geteuid() == 0:
                    raise  # only an ordinary user's namespace has setgroups denied
            os.setresgid(gid, gid, gid)
            os.setresuid(uid, uid, uid)
        limits = config["limits"]
        for name, value in (
            ("RLIMIT_CPU", limits["cpu_s"]),
            ("RLIMIT_AS", limits["address_space_bytes"]),
            ("RLIMIT_FSIZE", limits["file_size_bytes"]),
            ("RLIMIT_NPROC", limits["processes"]),
            ("RLIMIT_NOFILE", limits["open_files"]),
            ("RLIMIT_CORE", 0),
        ):
            # the CPU hard limit one second above the soft one: SIGXCPU first, then SIGKILL
            hard = value + 1 if name == "RLIMIT_CPU" else value
            resource.setrlimit(getattr(resource, name), (value, hard))
        prctl(PR_SET_NO_NEW_PRIVS, 1)  # setuid binaries cannot raise privileges again
        os.chdir(workdir)
        env = {
            "PATH": "/usr/local/bin:/usr/bin:/bin",
            "HOME": workdir,
            "TMPDIR": workdir,
            "LANG": "C.UTF-8",
            "PYTHONHASHSEED": "0",
            "PYTHONDONTWRITEBYTECODE": "1",
        }
        os.execve(config["python"], [config["python"], "-s", "-B", runner_path, job_path], env)
    except BaseException as exc:  # noqa: BLE001
        os.write(2, f"sandbox: could not start the program: {exc}\n".encode())
    os._exit(SETUP_FAILED)


def forward_stop_to(pid, signum):
    """On SIGTERM from the host, send ``signum`` to ``pid`` and keep waiting for it.

    Stopping child-first lets every process reap its own child, so a killed run leaves no
    zombies behind even under an init that does not reap orphans.
    """

    def stop(_signum, _frame):
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass

    signal.signal(signal.SIGTERM, stop)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})


def _exit_code(status):
    # relay the program's fate: its exit code, or 128 + the signal that killed it
    return os.waitstatus_to_exitcode(status) if os.WIFEXITED(status) else 128 + os.WTERMSIG(status)


def run_init(config, status, lifeline):
    """pid 1 of the new pid namespace: build the root, start the program, reap until it exits."""
    die_with_parent(lifeline)
    layers = {
        "pid_namespace": True,
        "mount_namespace": True,
        "network_namespace": True,
        "user_namespace": config["mode"] == "userns",
    }
    try:
        build_root(config, layers)
        layers["unprivileged_uid"] = config["host_program_uid"] != 0
    except Exception as exc:  # noqa: BLE001
        status.send(event="setup_failed", error=f"{type(exc).__name__}: {exc}")
        os._exit(SETUP_FAILED)
    status.send(event="ready", layers=layers)
    status.close()
    program = os.fork()
    if program == 0:
        drop = (config["program_uid"], config["program_gid"])
        exec_program(config, WORKDIR, RUNNER, WORKDIR + "/.job.json", drop)
    while True:  # orphans are re-parented to pid 1: reap them too
        pid, wait_status = os.wait()
        if pid == program:
            os._exit(_exit_code(wait_status))


def write_id_maps(pid, config):
    host_uid, host_gid = config["host_program_uid"], config["host_program_gid"]
    if os.geteuid() == 0:
        # root: keep root for the set-up process, and map the program's uid to an unprivileged host uid
        uid_map, gid_map = f"0 0 1\n{SANDBOX_UID} {host_uid} 1\n", f"0 0 1\n{SANDBOX_UID} {host_gid} 1\n"
    else:
        # an ordinary user may map only itself, and must give up setgroups first
        with open(f"/proc/{pid}/setgroups", "w") as handle:
            handle.write("deny")
        uid_map, gid_map = f"{SANDBOX_UID} {os.geteuid()} 1\n", f"{SANDBOX_UID} {os.getegid()} 1\n"
    with open(f"/proc/{pid}/uid_map", "w") as handle:
        handle.write(uid_map)
    with open(f"/proc/{pid}/gid_map", "w") as handle:
        handle.write(gid_map)


def run_namespaced(config, status):
    userns = config["mode"] == "userns"
    flags = CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWNET | (CLONE_NEWUSER if userns else 0)
    to_parent_r, to_parent_w = os.pipe()
    to_child_r, to_child_w = os.pipe()
    setup_lifeline, launcher_holds = os.pipe()
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})  # no stop request before handlers exist
    setup = os.fork()
    if setup == 0:
        os.close(to_parent_r)
        os.close(to_child_w)
        os.close(launcher_holds)
        die_with_parent(setup_lifeline)
        try:
            unshare(flags)
        except OSError as exc:
            status.send(event="setup_failed", error=f"unshare: {exc}")
            os._exit(SETUP_FAILED)
        os.write(to_parent_w, b"1")
        if os.read(to_child_r, 1) != b"1":  # the launcher could not write our id maps
            os._exit(SETUP_FAILED)
        init_lifeline, setup_holds = os.pipe()
        init = os.fork()  # the first child in the new pid namespace is its pid 1
        if init == 0:
            os.close(setup_holds)
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
            run_init(config, status, init_lifeline)
        os.close(init_lifeline)
        status.close()
        # asked to stop: kill pid 1, which takes the whole namespace with it, and reap it
        forward_stop_to(init, signal.SIGKILL)
        _, wait_status = os.waitpid(init, 0)
        os._exit(_exit_code(wait_status))
    os.close(to_parent_w)
    os.close(to_child_r)
    os.close(setup_lifeline)
    forward_stop_to(setup, signal.SIGTERM)
    if os.read(to_parent_r, 1) == b"1":
        try:
            if userns:
                write_id_maps(setup, config)
            os.write(to_child_w, b"1")
        except OSError as exc:
            status.send(event="setup_failed", error=f"uid/gid map: {exc}")
    os.close(to_child_w)
    status.close()
    _, wait_status = os.waitpid(setup, 0)
    return _exit_code(wait_status)


def kill_leftovers():
    """Kill and reap every process the program left behind.

    As a child subreaper we inherit every orphan of the program's process tree, including those
    that called setsid() or double-forked, so killing our children until none are left ends them all.
    Each round reaps only one child before looking again: killing a child re-parents its living
    children to us, and those must be killed, not waited for.
    """
    me = os.getpid()
    while True:
        try:
            with open(f"/proc/{me}/task/{me}/children") as handle:
                children = [int(pid) for pid in handle.read().split()]
        except OSError:  # no /proc children file: fall back to scanning for our children
            children = []
            for entry in os.listdir("/proc"):
                if entry.isdigit():
                    try:
                        with open(f"/proc/{entry}/stat") as handle:
                            if int(handle.read().rsplit(")", 1)[1].split()[1]) == me:
                                children.append(int(entry))
                    except (OSError, ValueError, IndexError):
                        pass
        if not children:
            return
        for pid in children:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            os.waitpid(-1, 0)  # returns at once: every child was just sent SIGKILL
        except ChildProcessError:
            return


def run_plain(config, status):
    """No namespaces: a new session, and an unprivileged uid when we are root ("uid" mode)."""
    prctl(PR_SET_CHILD_SUBREAPER, 1)  # orphans of the program become our children, not init's
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    program = os.fork()
    if program == 0:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
        os.setsid()  # its own session and process group, so the host can kill the group
        drop = (config["host_program_uid"], config["host_program_gid"]) if config["mode"] == "uid" else None
        status.close()
        workdir = config["host_workdir"]
        exec_program(config, workdir, os.path.join(workdir, "runner.py"), os.path.join(workdir, ".job.json"), drop)
    layers = {
        "pid_namespace": False,
        "mount_namespace": False,
        "network_namespace": False,
        "user_namespace": False,
        "private_proc": False,
        "read_only_root": False,
        "unprivileged_uid": config["mode"] == "uid",
        "root_switch": None,
    }
    status.send(event="ready", layers=layers, program_pid=program)
    status.close()
    forward_stop_to(-program, signal.SIGKILL)  # the program's whole process group
    _, wait_status = os.waitpid(program, 0)
    kill_leftovers()
    return _exit_code(wait_status)


def main():
    config = json.loads(sys.stdin.read())
    null = os.open("/dev/null", os.O_RDONLY)
    os.dup2(null, 0)  # the program reads nothing from the host
    os.close(null)
    status = Status(config["status_fd"])
    runner = run_namespaced if config["mode"] in ("userns", "rootns") else run_plain
    os._exit(runner(config, status))


if __name__ == "__main__":
    main()
