"""Warm starts for the suite's training runs: a fork server with torch, megatron-core and transformers
already imported.

Why: a tiny CPU run of pretrain_let.py spends most of its CPU importing (torch + megatron-core ~3 s,
transformers another ~2.4 s), and the suite starts some 400 of them, plus a torchrun agent (~1.6 s)
per multi-process run. Here one server per pytest-xdist worker imports them once; each run is a
``fork`` of it that becomes ``python -u <script> <args>`` (one process per rank, with the variables
torchrun sets), so the code under test runs unchanged, in real separate processes over gloo, only
without the imports. Three clients:

- tests/launch.py:run_script (the runs a test starts itself; its output captured in files);
- tests/warm_python, a ``python`` for shell scripts that honour $PYTHON (examples/reproduce/run.sh,
  the launchers' dry run): ``warm_python script.py args`` runs warm with the caller's
  stdin/stdout/stderr (passed over the socket), forwards stop signals and exits with the script's
  code; anything else (``-c``, ``-m``, no server) it hands to the real interpreter;
- tests/warm_torchrun, a ``torchrun`` for the launchers ($TORCHRUN): a single-node command line
  runs its ranks warm, anything else (a rendezvous, more nodes) runs torch.distributed.run.

A run starts cold when its environment differs from the server's in a variable a module may read
at import (IMPORT_TIME: interpreter, torch/Triton/CUDA, Hugging Face, threading libraries, locale,
home and cache folders); and wherever a test needs a real launch (the launchers' own agent,
signals and kills through the process chain, SLURM, import-time behaviour, the quick start as a
user runs it), it starts one. tests/test_warm_start.py checks that a
warm run prints and writes what a cold torchrun run does. MEGATRON_LET_TEST_COLD_START=1 turns warm
starts off for a whole session.

The server stays single-threaded and never computes with torch (a forked OpenMP or gloo thread pool
would hang the child): it only imports, accepts requests and forks.
"""

from __future__ import annotations

import atexit
import ctypes
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

PR_SET_PDEATHSIG = 1
# Variables a module may read while it is imported (so the server's imports would be wrong for a run
# that sets them differently): names starting with any of these.
IMPORT_TIME = ("PYTHON", "TRITON", "TORCH", "CUDA", "NVIDIA", "CUBLAS", "HF_", "HUGGINGFACE",
               "TRANSFORMERS", "TOKENIZERS", "SAFETENSORS", "WANDB", "OMP_", "KMP_", "GOMP", "MKL",
               "OPENBLAS", "LD_", "LANG", "LC_", "HOME", "XDG_", "TMPDIR", "USER")
THREADS_ENV = "OMP_NUM_THREADS"  # read by OpenMP when the server loaded torch: applied per run instead
# $PYTHON, $TORCHRUN: the commands shell scripts run (tests/warm_python, tests/warm_torchrun)
RUN_TIME = {THREADS_ENV, "PYTHON", "TORCHRUN"}
# Set by a library's import with os.environ.setdefault, so present in a pytest worker that imported
# it (scikit-learn, via lm-eval) and passed on by base_env: no difference when it has this value.
LIBRARY_DEFAULTS = {"KMP_DUPLICATE_LIB_OK": "True"}
COLD_ENV = "MEGATRON_LET_TEST_COLD_START"
SOCKET_ENV = "MEGATRON_LET_WARM_SOCKET"  # where tests/warm_python finds the server
REAL_PYTHON_ENV = "MEGATRON_LET_REAL_PYTHON"  # what tests/warm_python runs when it cannot start warm
STOP_GRACE_S = 30.0  # torchrun's grace between SIGTERM and SIGKILL for the others after one failed
FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2, signal.SIGHUP)


class _BecomeRank(BaseException):
    """Unwinds the server's frames in a forked child before it runs the script (not an Exception:
    nothing on the way may catch it)."""

    def __init__(self, request: dict, rank: int, fds: list):
        super().__init__()
        self.request, self.rank, self.fds = request, rank, fds


def _die_with_parent() -> None:
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)


def differing_keys(env: dict, server_env: dict, set_by_imports: dict | None = None) -> list:
    """Import-time variables whose values differ between a run and the server (Transformer Engine's
    only where the server imported it). ``set_by_imports``: what the server's imports set, as they
    would in the run (missing there, or the same, is no difference)."""
    prefixes = IMPORT_TIME + (("NVTE",) if "transformer_engine" in sys.modules else ())
    set_by_imports = set_by_imports or {}

    def differs(key: str) -> bool:
        value = env.get(key)
        if not key.startswith(prefixes) or key in RUN_TIME or value == server_env.get(key):
            return False
        if key == "PYTHONPATH" and _search_path(value) == _search_path(server_env.get(key)):
            return False  # the launchers prepend the repository, already there: the same path
        if key in set_by_imports and value in (None, set_by_imports[key]):
            return False
        return not (key not in server_env and LIBRARY_DEFAULTS.get(key) == value)

    return sorted(filter(differs, set(env) | set(server_env)))


def _search_path(value) -> list:
    return list(dict.fromkeys(p for p in (value or "").split(os.pathsep) if p))


def send_message(conn: socket.socket, message: dict, fds=()) -> None:
    data = json.dumps(message).encode() + b"\n"
    if fds:
        socket.send_fds(conn, [data], list(fds))
    else:
        conn.sendall(data)


def read_message(conn: socket.socket, buffer: bytearray, max_fds: int = 0) -> tuple:
    """The next newline-terminated JSON message (and any descriptors sent with it)."""
    fds = []
    while b"\n" not in buffer:
        if max_fds:
            data, got, _, _ = socket.recv_fds(conn, 1 << 16, max_fds)
            fds += got
        else:
            data = conn.recv(1 << 16)
        if not data:
            raise ConnectionError("the warm-start connection closed")
        buffer += data
    line, _, rest = bytes(buffer).partition(b"\n")
    buffer[:] = rest
    return json.loads(line), fds


# ---------------------------------------------------------------------------------------------
# server
# ---------------------------------------------------------------------------------------------


def _preload() -> None:
    import megatron_let  # noqa: F401  (first: installs the jit-fusion hook, as in a real process)
    import megatron_let.training.trainer  # noqa: F401  (torch, megatron-core)
    import megatron_let.training.arguments  # noqa: F401
    import megatron_let.teacher.hf_teacher  # noqa: F401
    import transformers.modeling_utils  # noqa: F401
    import transformers.models.llama.modeling_llama  # noqa: F401  (the tiny teachers' class)

    threads = len(os.listdir("/proc/self/task"))
    if threads != 1:  # fork copies only the calling thread
        raise RuntimeError(f"the warm-start server has {threads} threads after its imports; it must have 1")


def _rank_env(request: dict, rank: int) -> dict:
    env = dict(request["env"])
    nproc = request["nproc"]
    if request["torchrun"]:  # what torch.distributed.run sets for a single-node job
        env.update(RANK=str(rank), LOCAL_RANK=str(rank), GROUP_RANK="0", ROLE_RANK=str(rank),
                   ROLE_NAME="default", WORLD_SIZE=str(nproc), LOCAL_WORLD_SIZE=str(nproc),
                   ROLE_WORLD_SIZE=str(nproc), GROUP_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(request["port"]), TORCHELASTIC_RESTART_COUNT="0",
                   TORCHELASTIC_MAX_RESTARTS="0", TORCHELASTIC_RUN_ID=f"warm-{request['port']}",
                   TORCHELASTIC_USE_AGENT_STORE="False", TORCH_NCCL_ASYNC_ERROR_HANDLING="1")
    return env


def _signal(pids, codes, sig) -> None:
    for pid in pids:
        if pid not in codes:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass


def _wait_ranks(pids: list, timeout) -> tuple:
    """Wait like torchrun: the first rank to fail ends the run (the others get SIGTERM, then SIGKILL
    after STOP_GRACE_S). Returns ({pid: exit code}, timed_out)."""
    codes, kill_at = {}, None
    deadline = None if timeout is None else time.monotonic() + timeout
    while len(codes) < len(pids):
        for pid in pids:
            if pid not in codes:
                done, status = os.waitpid(pid, os.WNOHANG)
                if done:
                    codes[pid] = os.waitstatus_to_exitcode(status)
                    if codes[pid] != 0 and kill_at is None and len(pids) > 1:
                        kill_at = time.monotonic() + STOP_GRACE_S
                        _signal(pids, codes, signal.SIGTERM)
        now = time.monotonic()
        if deadline is not None and now > deadline:
            _signal(pids, codes, signal.SIGKILL)
            for pid in pids:
                if pid not in codes:
                    codes[pid] = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
            return codes, True
        if kill_at is not None and now > kill_at:
            _signal(pids, codes, signal.SIGKILL)
        time.sleep(0.02)
    return codes, False


def _supervise(conn: socket.socket, request: dict, fds: list) -> None:
    """In a child of the server: fork the ranks, report their pids, wait, answer, exit."""
    _die_with_parent()
    for sig in FORWARDED:
        signal.signal(sig, signal.SIG_DFL)
    pids = []
    for rank in range(request["nproc"]):
        pid = os.fork()
        if pid == 0:
            conn.close()
            raise _BecomeRank(request, rank, fds)
        pids.append(pid)
    for fd in fds:
        os.close(fd)
    send_message(conn, {"pids": pids})
    codes, timed_out = _wait_ranks(pids, request["timeout"])
    if request["torchrun"]:
        rc = 1 if any(codes.values()) else 0  # torchrun's own exit code when a worker fails
    else:
        rc = codes[pids[0]]
    send_message(conn, {"returncode": rc, "timed_out": timed_out})
    conn.close()
    os._exit(0)


def _serve(path: str, server_env: dict, added: dict) -> None:
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(64)
    listener.settimeout(1.0)
    client = os.getppid()
    print("ready", flush=True)
    while os.getppid() == client:  # ends with the pytest worker that started it (polled: a
        # PR_SET_PDEATHSIG would fire when the worker's starting thread ends, not the worker)
        try:
            conn, _ = listener.accept()
        except socket.timeout:
            conn = None
        while True:  # reap finished supervisors
            try:
                pid, _ = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
        if conn is None:
            continue
        fds = []
        try:  # a client that went away must not end the server
            conn.settimeout(10.0)
            request, fds = read_message(conn, bytearray(), max_fds=3)
            conn.settimeout(None)
            differing = differing_keys(request["env"], server_env, added)
            if differing or len(fds) != 3:
                print(f"cold start for {request['script']}: {differing or 'no standard streams'}",
                      file=sys.stderr, flush=True)
                send_message(conn, {"cold": differing or ["(no standard streams)"]})
            elif os.fork() == 0:  # the supervisor: never back into this loop
                listener.close()
                request["env"] = {**added, **request["env"]}
                try:
                    _supervise(conn, request, fds)
                except Exception as e:  # noqa: BLE001  (a rank's _BecomeRank passes: BaseException)
                    print(f"supervisor failed: {e!r}", file=sys.stderr, flush=True)
                    os._exit(1)
        except Exception as e:  # noqa: BLE001  (logged; the client sees its connection close)
            print(f"bad request: {e!r}", file=sys.stderr, flush=True)
        for fd in fds:
            os.close(fd)
        conn.close()


def _become_rank(request: dict, rank: int, fds: list) -> None:
    """In a forked rank: turn into ``python -u script args`` with the run's streams, folder and
    environment; then return into the interpreter's normal end (thread joins, atexit, exit code)."""
    import random
    import runpy

    import numpy as np
    import torch

    _die_with_parent()
    for sig in FORWARDED:
        signal.signal(sig, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    for target, fd in enumerate(fds):
        os.dup2(fd, target)
    for fd in fds:
        if fd > 2:
            os.close(fd)
    sys.stdout.reconfigure(line_buffering=True, write_through=True)  # python -u, as torchrun runs it
    sys.stderr.reconfigure(line_buffering=True, write_through=True)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(_rank_env(request, rank))
    if THREADS_ENV in os.environ:
        torch.set_num_threads(int(os.environ[THREADS_ENV]))
    random.seed()  # a fresh process's unseeded generators differ from run to run
    np.random.seed()
    script = request["script"]
    sys.argv = [script, *request["args"]]
    sys.path[0] = os.path.dirname(script)
    runpy.run_path(script, run_name="__main__")


def server_main(path: str) -> None:
    started_with = dict(os.environ)
    try:
        _preload()
        # what the imports themselves set (torch's inductor: TORCHINDUCTOR_CACHE_DIR), as they
        # would in a cold run: added to each run's environment
        added = {k: v for k, v in os.environ.items() if k not in started_with}
        _serve(path, started_with, added)
    except _BecomeRank as become:
        _become_rank(become.request, become.rank, become.fds)


# ---------------------------------------------------------------------------------------------
# clients
# ---------------------------------------------------------------------------------------------

_server = None  # (Popen, socket path, its environment)


def _stop_server(proc: subprocess.Popen, folder: str) -> None:
    proc.kill()
    proc.wait()
    shutil.rmtree(folder, ignore_errors=True)


_unavailable = None  # why this worker's server could not start: its runs start cold


def server_socket() -> str | None:
    """This pytest worker's server (started on first use, with tests/launch.py's base_env); None when
    warm starts are off or the server could not start (then every run starts cold, which is slower,
    not wrong; tests/test_warm_start.py fails with the reason)."""
    global _server, _unavailable
    if os.environ.get(COLD_ENV) == "1" or not sys.platform.startswith("linux") or _unavailable:
        return None
    if _server is None or _server[0].poll() is not None:
        from launch import ROOT, base_env

        folder = tempfile.mkdtemp(prefix="warm-start-")
        path = os.path.join(folder, "socket")
        env = {k: v for k, v in base_env().items() if k != "PYTEST_CURRENT_TEST"}
        log = open(os.path.join(folder, "server.log"), "w")
        proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), path], env=env,
                                stdout=subprocess.PIPE, stderr=log, text=True, cwd=ROOT)
        if proc.stdout.readline().strip() != "ready":
            proc.kill()
            proc.wait()
            _unavailable = ("the warm-start server did not start:\n"
                            + open(os.path.join(folder, "server.log")).read()[-4000:])
            shutil.rmtree(folder, ignore_errors=True)
            return None
        atexit.register(_stop_server, proc, folder)
        _server = (proc, path, env)
    return _server[1]


def request_run(path: str, request: dict, fds, on_pids=None) -> dict | None:
    """Send one run to the server at ``path``; None when it must start cold, else its last reply."""
    buffer = bytearray()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.connect(path)
        send_message(conn, request, fds)
        reply, _ = read_message(conn, buffer)
        if "cold" in reply:
            return None
        if on_pids is not None:
            on_pids(reply["pids"])
        reply, _ = read_message(conn, buffer)
    return reply


def run(script: str, args: list, nproc: int, env: dict, cwd: str, timeout: float, cmd: list,
        torchrun: bool, port: int = 0):
    """Run ``script`` warm (tests/launch.py:run_script); None when it must start cold. Returns a
    CompletedProcess like subprocess.run(capture_output=True, text=True)."""
    path = server_socket()
    if path is None:
        return None
    with tempfile.TemporaryDirectory(prefix="warm-run-") as folder:
        out, err = os.path.join(folder, "stdout"), os.path.join(folder, "stderr")
        streams = [os.open(os.devnull, os.O_RDONLY), os.open(out, os.O_WRONLY | os.O_CREAT | os.O_APPEND),
                   os.open(err, os.O_WRONLY | os.O_CREAT | os.O_APPEND)]
        request = dict(script=script, args=[str(a) for a in args], nproc=nproc, env=env, cwd=cwd,
                       timeout=timeout, torchrun=torchrun, port=port)
        try:
            reply = request_run(path, request, streams)
        finally:
            for fd in streams:
                os.close(fd)
        if reply is None:
            return None
        stdout = open(out, errors="replace").read()
        stderr = open(err, errors="replace").read()
    if reply["timed_out"]:
        raise subprocess.TimeoutExpired(cmd, timeout, output=stdout, stderr=stderr)
    return subprocess.CompletedProcess(cmd, reply["returncode"], stdout, stderr)


def python_env(env: dict) -> dict:
    """``env`` for a shell script to run its ``$PYTHON`` scripts warm: PYTHON=tests/warm_python,
    which finds this worker's server (or, without one, the real interpreter). A PYTHONPATH that only
    lacks some of the server's folders gets them (they hold the editable package and the hidden
    optional imports, which a cold run of the suite sees too)."""
    path = server_socket()
    if path is None:
        return env
    server_path = _server[2].get("PYTHONPATH", "").split(os.pathsep)
    if set(env.get("PYTHONPATH", "").split(os.pathsep)) - {""} <= set(server_path):
        env = dict(env, PYTHONPATH=os.pathsep.join(server_path))
    here = os.path.dirname(os.path.abspath(__file__))
    return dict(env, PYTHON=os.path.join(here, "warm_python"), **{SOCKET_ENV: path,
                                                                 REAL_PYTHON_ENV: sys.executable})


def torchrun_env(env: dict) -> dict:
    """``env`` for a launcher (examples/common.sh honours $TORCHRUN) to start its ranks warm:
    TORCHRUN=tests/warm_torchrun, which takes single-node command lines and hands the rest to
    torchrun; $PYTHON (the launcher's dry run) warm too."""
    env = python_env(env)
    if SOCKET_ENV not in env:
        return env
    return dict(env, TORCHRUN=os.path.join(os.path.dirname(os.path.abspath(__file__)), "warm_torchrun"))


def _torchrun_request(argv: list) -> dict | None:
    """A single-node torchrun command line (``--nproc_per_node N --nnodes 1 --node_rank 0
    --master_addr localhost --master_port P script args``) as a request; None for anything else
    (a rendezvous, another option), which the real torchrun runs."""
    options, i = {}, 0
    while i + 1 < len(argv) and argv[i].startswith("--"):
        name, eq, value = argv[i][2:].partition("=")
        options[name.replace("-", "_")] = value if eq else argv[i + 1]
        i += 1 if eq else 2
    if i >= len(argv) or not argv[i].endswith(".py") or not os.path.isfile(argv[i]):
        return None
    allowed = {"nproc_per_node", "nnodes", "node_rank", "master_addr", "master_port"}
    if set(options) - allowed or not options.get("nproc_per_node", "").isdigit() \
            or options.get("nnodes", "1") != "1" or options.get("node_rank", "0") != "0" \
            or options.get("master_addr", "localhost") not in ("localhost", "127.0.0.1") \
            or not options.get("master_port", "").isdigit():
        return None
    return dict(script=os.path.abspath(argv[i]), args=argv[i + 1:], nproc=int(options["nproc_per_node"]),
                env=dict(os.environ), cwd=os.getcwd(), timeout=None, torchrun=True,
                port=int(options["master_port"]))


def client_main(argv: list, torchrun: bool = False) -> None:
    """tests/warm_python: ``python script.py args`` warm when the server takes it, else the real
    interpreter with the same arguments."""
    real = os.environ.get(REAL_PYTHON_ENV) or sys.executable
    path = os.environ.get(SOCKET_ENV)
    request = None
    if torchrun:
        request = _torchrun_request(argv)
    elif argv and argv[0].endswith(".py") and os.path.isfile(argv[0]):
        request = dict(script=os.path.abspath(argv[0]), args=argv[1:], nproc=1, env=dict(os.environ),
                       cwd=os.getcwd(), timeout=None, torchrun=False, port=0)
    if path and request is not None:
        pids = []

        def forward(signum, frame):
            for pid in pids:
                os.kill(pid, signum)

        for sig in FORWARDED:
            signal.signal(sig, forward)
        try:
            reply = request_run(path, request, [0, 1, 2], on_pids=pids.extend)
        except OSError:  # no server (any more): start cold
            reply = None
        if reply is not None:
            code = reply["returncode"]
            if code < 0:  # killed by a signal: so is the caller's python
                signal.signal(-code, signal.SIG_DFL)
                os.kill(os.getpid(), -code)
            sys.exit(code)
    if torchrun:
        argv = ["-m", "torch.distributed.run", *argv]
    os.execv(real, [real, *argv])


if __name__ == "__main__":
    if sys.argv[1] in ("--client", "--torchrun-client"):
        client_main(sys.argv[2:], torchrun=sys.argv[1] == "--torchrun-client")
    else:
        server_main(sys.argv[1])
