"""A fork server that makes each mutant's pytest run cost its tests, not the imports.

cosmic-ray runs its test command once per mutant. Importing torch, transformers and matplotlib takes
5-10 s on the reference machine, the tests of one module about 1 s. So:

    python mutation/forkserver.py serve SOCKET           # imports the third-party libraries once, then waits
    MUTATION_FORKSERVER=SOCKET python mutation/forkserver.py run -- PYTEST_ARGS...   # cosmic-ray's test command

For each ``run``, the server forks a child that runs ``pytest.main(PYTEST_ARGS)`` in the client's working
directory and reports its exit code and output. The server never imports ``crosscoder_pl`` nor the tests,
so every child imports the package fresh from disk: the mutated file of that moment. Byte-code caching
is off (``sys.dont_write_bytecode``): a mutant of the same size written within the same second as the
original could otherwise be served from a stale ``.pyc``. Third-party pytest plugins are not loaded and the
imported libraries are kept out of garbage collection (``gc.freeze``): together they made up most of
the remaining seconds. Each child runs under its own alarm, so a
mutant that loops forever is killed even if the client is gone.

cosmic-ray splits its test command without a shell, so the socket comes from the environment
(``MUTATION_FORKSERVER``), which cosmic-ray passes on. When it is unset or the server cannot be reached,
``run`` falls back to a plain ``python -m pytest`` subprocess: slower,
never wrong (a refused connection must not count as a killed mutant).
"""

from __future__ import annotations

import gc
import json
import os
import signal
import socket
import struct
import sys
import tempfile

HEAVY = ("torch", "numpy", "matplotlib", "matplotlib.figure", "matplotlib.backends.backend_agg", "torchmetrics",
         "safetensors.torch", "transformers", "tqdm.auto", "pytest", "lightning")


def _send(sock: socket.socket, payload: dict) -> None:
    data = json.dumps(payload).encode()
    sock.sendall(struct.pack("!I", len(data)) + data)


def _recv(sock: socket.socket) -> dict:
    def exactly(n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            chunk = sock.recv(n - len(buf))
            if not chunk:
                raise ConnectionError("connection closed")
            buf += chunk
        return buf

    (size,) = struct.unpack("!I", exactly(4))
    return json.loads(exactly(size))


def _child(request: dict, log_path: str) -> None:
    """In the forked child: run pytest with stdout/stderr into ``log_path``; never returns."""
    code = 3
    try:
        fd = os.open(log_path, os.O_WRONLY | os.O_TRUNC)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        signal.alarm(int(request["timeout"]))
        os.chdir(request["cwd"])
        sys.path[:0] = [request["cwd"]]
        import pytest
        import torch

        torch.set_num_threads(1)
        code = int(pytest.main(request["args"]))
    except BaseException as exc:  # noqa: BLE001 - report anything as a failed run
        print(f"forkserver child error: {exc!r}", flush=True)
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def serve(path: str) -> None:
    sys.dont_write_bytecode = True
    os.environ["PYTHONDONTWRITEBYTECODE"] = "1"
    os.environ.setdefault("MPLBACKEND", "Agg")
    # Third-party pytest plugins (hypothesis, benchmark) cost seconds per run and no test here uses them.
    os.environ["PYTEST_DISABLE_PLUGIN_AUTOLOAD"] = "1"
    for name in HEAVY:
        try:
            __import__(name)
        except ImportError:
            pass
    # pytest runs gc.collect() several times per session; the imported libraries' objects never die, so
    # keep them out of every collection (seconds per run otherwise).
    gc.collect()
    gc.freeze()
    if os.path.exists(path):
        os.unlink(path)
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(1)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    print(f"forkserver ready on {path} (pid {os.getpid()})", flush=True)
    try:
        while True:
            conn, _ = server.accept()
            with conn:
                try:
                    request = _recv(conn)
                except (ConnectionError, ValueError):
                    continue
                with tempfile.NamedTemporaryFile("r", suffix=".log", delete=False) as log:
                    log_path = log.name
                pid = os.fork()
                if pid == 0:
                    server.close()
                    _child(request, log_path)
                _, status = os.waitpid(pid, 0)
                code = os.waitstatus_to_exitcode(status)
                with open(log_path, errors="replace") as handle:
                    output = handle.read()[-20000:]
                os.unlink(log_path)
                try:
                    _send(conn, {"code": code, "output": output})
                except OSError:
                    pass
    finally:
        server.close()
        if os.path.exists(path):
            os.unlink(path)


def run(path: str | None, args: list[str], timeout: int = 45) -> int:
    """Run pytest through the server at ``path``; ``timeout`` must stay below cosmic-ray's own."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        if not path:
            raise OSError("no fork server")
        sock.connect(path)
    except OSError:
        sock.close()
        os.execvp(sys.executable, [sys.executable, "-B", "-m", "pytest", *args])
    with sock:
        _send(sock, {"args": args, "cwd": os.getcwd(), "timeout": timeout})
        reply = _recv(sock)
    sys.stdout.write(reply["output"])
    code = reply["code"]
    return code if 0 <= code < 256 else 1  # killed by a signal (alarm): a failed run


if __name__ == "__main__":
    command, *rest = sys.argv[1:] or [""]
    if command == "serve" and len(rest) == 1:
        serve(rest[0])
    elif command == "run":
        pytest_args = rest[1:] if rest[:1] == ["--"] else rest
        sys.exit(run(os.environ.get("MUTATION_FORKSERVER"), pytest_args))
    else:
        sys.exit("usage: forkserver.py serve SOCKET | forkserver.py run -- PYTEST_ARGS...")
