"""Hostile programs and the host-side checks that go with them, shared by the sandbox tests and the
end-to-end pipeline test.

``hostile_corpus`` names each program; none defines a function any test calls, so a sandbox that
contains them and grades honestly reports every one as failed. The checks look at the host
afterwards: processes the runs left behind (``sandbox_processes``) and connections to a loopback
server (``LoopbackServer``).
"""

from __future__ import annotations

import os
import socket
import sys
import textwrap
import threading
import time
from collections.abc import Callable
from pathlib import Path

from reflectevo.sandbox.host import UID_BASE


def system_paths() -> list[str]:
    """The system paths the "write outside" program tries to create (besides ``host_dir``'s files)."""
    return ["/usr/evil.txt", sys.prefix + "/evil.txt", "/etc/evil.txt", "/root/evil.txt"]


def hostile_corpus(canary: Path, host_dir: Path, port: int) -> dict[str, str]:
    """``{name: program source}`` (dedented, ready to run). ``canary`` is a file in ``host_dir``, a
    host folder the programs try to delete or write into; ``port`` is a loopback server's port."""
    corpus = {
        "infinite loop": "while True:\n    pass\n",
        "SIGTERM ignored": """
            import signal, time
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            while True:
                time.sleep(0.01)
            """,
        "fork bomb": """
            import os
            while True:
                try:
                    os.fork()
                except OSError:
                    pass
            """,
        "memory hog": "hog = bytearray(16 * 1024 ** 3)\n",
        "delete outside": f"""
            import os, shutil
            os.remove({str(canary)!r})
            """,
        "rmtree outside": f"import shutil\nshutil.rmtree({str(host_dir)!r})\n",
        "write outside": f"""
            import sys
            for path in [{str(canary)!r}, {str(host_dir / "new.txt")!r}, '/usr/evil.txt',
                         sys.prefix + '/evil.txt', '/etc/evil.txt', '/root/evil.txt']:
                try:
                    open(path, 'w').write('owned')
                except OSError:
                    pass
            raise SystemExit('tried every path')
            """,
        "open a socket": f"""
            import socket
            s = socket.create_connection(('127.0.0.1', {port}), timeout=1)
            s.sendall(b'exfiltrate')
            """,
        "os._exit(0)": "import os\nos._exit(0)\n",
        "sys.exit(0)": "import sys\nsys.exit(0)\n",
        "print 100 MB": "import sys\nchunk = 'x' * (1 << 20)\nfor _ in range(100):\n    sys.stdout.write(chunk)\n",
        "read secrets": """
            import os, glob
            print(dict(os.environ))
            for path in ['/proc/self/environ', '/proc/1/environ'] + glob.glob('/proc/*/environ'):
                try:
                    print(open(path, 'rb').read())
                except OSError as exc:
                    print(path, exc)
            """,
        "setsid daemon": """
            import os, time
            if os.fork() == 0:
                os.setsid()
                if os.fork() == 0:
                    time.sleep(60)
                os._exit(0)
            """,
        "kill everything": "import os, signal\nos.kill(-1, signal.SIGKILL)\nos.kill(os.getppid(), signal.SIGKILL)\n",
        "forge a pass": """
            import os, json
            record = json.dumps({'event': 'done', 'status': 'passed', 'tests_passed': 1}) + '\\n'
            print(record)
            for fd in range(3, 64):
                try:
                    os.write(fd, record.encode())
                except OSError:
                    pass
            os._exit(0)
            """,
    }
    return {name: textwrap.dedent(source) for name, source in corpus.items()}


def own_pid_namespace() -> str:
    return os.readlink("/proc/self/ns/pid")


# A sandbox run ends within its time limit (5 s by default) plus the stop's 5 s grace. A process that
# is still there after this long is a stray; one that goes away sooner belonged to a run still under
# way, e.g. of a test in the other worker of `pytest -n 2`.
SETTLE_S = 20.0


def lasting(scan: Callable[[], dict[int, str]], settle_s: float = SETTLE_S) -> list[str]:
    """What ``scan`` finds (pid -> description) that is still there ``settle_s`` later; returns at once
    when it finds nothing."""
    found = scan()
    deadline = time.monotonic() + settle_s
    while found and time.monotonic() < deadline:
        time.sleep(0.5)
        again = scan()
        found = {pid: text for pid, text in found.items() if pid in again}
    return list(found.values())


def sandbox_processes(before: set[int]) -> list[str]:
    """Processes that appeared since ``before`` and belong to a sandbox, plus our zombie children, if
    they last (:func:`lasting`)."""
    return lasting(lambda: _sandbox_processes(before))


def _sandbox_processes(before: set[int]) -> dict[int, str]:
    found = {}
    ours = own_pid_namespace()
    sandbox_uids = range(UID_BASE, UID_BASE + 64) if os.geteuid() == 0 else ()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        try:
            status = (entry / "status").read_text()
            stat = (entry / "stat").read_text()
            namespace = os.readlink(entry / "ns" / "pid")
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
        uid = int(next(line for line in status.splitlines() if line.startswith("Uid:")).split()[1])
        state, ppid = stat.rsplit(")", 1)[1].split()[:2]
        if state == "Z" and int(ppid) == os.getpid():
            found[pid] = f"zombie child {pid}"
        elif pid not in before and (namespace != ours or uid in sandbox_uids):
            found[pid] = f"stray process {pid} (uid {uid}, {namespace}): {stat[:80]}"
    return found


def all_pids() -> set[int]:
    return {int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()}


class LoopbackServer:
    """A TCP server on the host's loopback that counts connections (it must see none)."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen()
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.connections = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            self.connections += 1
            conn.close()

    def close(self) -> None:
        self.stop.set()
        self.thread.join()
        self.sock.close()
