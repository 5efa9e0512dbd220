"""Many short runs of train_inversion_dpo.py, each forked from a process that imported the libraries once.

A run of the trainer on a tiny model spends most of its seconds importing torch, diffusers, transformers, accelerate,
DeepSpeed and datasets (about 9 of 12 s on a 2-core machine). The test suite and the toy studies start hundreds of
such runs. `ForkedRuns` starts a server process that imports them once; each run is a child forked from it, with its
own arguments, environment, working folder and output files, so it starts as a fresh process would with the imports
already done. Several processes (`processes=2`) are forked as torchrun would start them (RANK, LOCAL_RANK,
WORLD_SIZE, MASTER_ADDR/PORT), without the elastic agent.

What a child does not get anew: what the libraries read from the environment when imported (HF_HUB_OFFLINE,
TORCH_LOGS, OMP_NUM_THREADS for OpenMP's pool, ...) is the server's; start a server with that environment, or run
cold (a plain subprocess) where a run needs another. Launchers themselves (`accelerate launch`, torchrun, signals
sent to them) are tested with real launches.

    with ForkedRuns(env) as runs:
        result = runs.run(["train_inversion_dpo.py", "--output_dir", ...], timeout=600)  # a CompletedProcess
"""

import json
import os
import select
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent
# what a tiny run imports: the trainer's own imports, then what it imports while running (accelerate imports
# DeepSpeed where it is installed; datasets imports pandas; the model classes load lazily)
PRELOAD = ("train_inversion_dpo", "deepspeed", "datasets", "peft.tuners.lora", "torch.distributed.checkpoint",
           "torch.distributed.elastic.multiprocessing", "diffusers.models.unets.unet_2d_condition",
           "diffusers.models.autoencoders.autoencoder_kl", "diffusers.models.transformers.transformer_sd3",
           "diffusers.models.transformers.transformer_flux", "transformers.models.clip.modeling_clip",
           "transformers.models.t5.modeling_t5", "matplotlib.pyplot")


class ForkedRuns:
    """A server that imported `preload` once (in `env`, with `cwd` as its folder), forking one child per run. Runs
    from several threads at once are served by as many servers (each started on first need)."""

    def __init__(self, env=None, cwd=ROOT, preload=PRELOAD):
        self.env = dict(os.environ if env is None else env)
        self.cwd, self.preload = str(cwd), list(preload)
        self._free, self._all, self._lock = [], [], threading.Lock()
        self._outputs = tempfile.TemporaryDirectory(prefix="forked-runs-")

    def run(self, argv, env=None, cwd=None, processes=1, timeout=None):
        """`python argv...` (argv[0] a script path) in a child of the server, `processes` of them for a distributed
        run; returns a subprocess.CompletedProcess with the children's stdout and stderr (every process's, in the
        order written, as torchrun shows them). `env`: variables to set on top of the server's (read when the run
        reads them, not at import). Raises subprocess.TimeoutExpired after killing the children."""
        with self._lock:
            server = self._free.pop() if self._free else None
        if server is None:
            server = _Server(self.env, self.cwd, self.preload)
            with self._lock:
                self._all.append(server)
        try:
            return server.run(list(map(str, argv)), env or {}, str(cwd or self.cwd), processes, timeout,
                              Path(self._outputs.name))
        finally:
            with self._lock:
                if server.alive():
                    self._free.append(server)
                else:
                    self._all.remove(server)
            if not server.alive():
                server.close()

    def close(self):
        with self._lock:
            servers, self._all, self._free = self._all, [], []
        for server in servers:
            server.close()
        self._outputs.cleanup()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


_SHARED, _SHARED_LOCK = {}, threading.Lock()


def shared(key, env, cwd=ROOT):
    """This process's ForkedRuns for `key`, started with `env` on first use and closed at exit (one per environment
    the libraries must read at import, such as a thread count)."""
    with _SHARED_LOCK:
        if key not in _SHARED:
            import atexit

            _SHARED[key] = ForkedRuns(env, cwd=cwd)
            atexit.register(_SHARED[key].close)
        return _SHARED[key]


class _Server:
    def __init__(self, env, cwd, preload):
        self.log = tempfile.NamedTemporaryFile(prefix="forked-runs-server-", suffix=".log", delete=False)
        self.process = subprocess.Popen([sys.executable, __file__, "--serve", *preload], cwd=cwd, env=env,
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True)
        self.count, self.buffer = 0, b""

    def alive(self):
        return self.process.poll() is None

    def _reply(self, deadline):
        """The server's next line (a JSON object); None when `deadline` (time.monotonic()) passes first. Read with
        os.read into a buffer of its own: a buffered reader could hold a second line that select() no longer sees."""
        fd = self.process.stdout.fileno()
        while b"\n" not in self.buffer:
            wait = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not select.select([fd], [], [], wait)[0]:
                return None
            chunk = os.read(fd, 65536)
            if not chunk:
                self.log.flush()
                raise RuntimeError(f"the forked-runs server ended ({self.process.wait()}); its log: "
                                   f"{Path(self.log.name).read_text()[-3000:]}")
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\n", 1)
        return json.loads(line)

    def run(self, argv, env, cwd, processes, timeout, outputs):
        self.count += 1
        out, err = (outputs / f"{os.getpid()}-{id(self)}-{self.count}.{name}" for name in ("out", "err"))
        request = dict(argv=argv, env=env, cwd=cwd, processes=processes, stdout=str(out), stderr=str(err))
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        pids = self._reply(None)["pids"]
        deadline = None if timeout is None else time.monotonic() + timeout
        reply = self._reply(deadline)
        if reply is None:  # too long: the children and whatever they started go, then the server reports them
            for pid in pids:
                kill_tree(pid)
            self._reply(None)
        stdout, stderr = (path.read_text(errors="replace") if path.exists() else "" for path in (out, err))
        for path in (out, err):
            path.unlink(missing_ok=True)
        command = [sys.executable, *argv]
        if reply is None:
            raise subprocess.TimeoutExpired(command, timeout, stdout, stderr)
        return subprocess.CompletedProcess(command, reply["returncode"], stdout, stderr)

    def close(self):
        if self.alive():
            self.process.stdin.close()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
        self.process.stdout.close()
        self.log.close()
        os.unlink(self.log.name)


def kill_tree(pid):
    """Kill a process and every process it started (torchrun starts its workers in sessions of their own, so they
    are found as descendants, not by process group)."""
    import psutil  # a dependency of accelerate

    try:
        parent = psutil.Process(pid)
        for process in [*parent.children(recursive=True), parent]:
            process.kill()
    except psutil.NoSuchProcess:
        pass


# ---------------------------------------------------------------------------------------------------------------
# The server (`python forked_runs.py --serve MODULE...`): one request per line on stdin, two replies per request
# ---------------------------------------------------------------------------------------------------------------

def _serve(preload):
    import importlib

    # the protocol keeps the pipes it was started with; the server's own fd 1 and 2 go to its log (stderr)
    requests, replies = os.fdopen(os.dup(0), "r"), os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
    sys.path.insert(0, str(ROOT))
    for name in preload:
        try:
            importlib.import_module(name)
        except ImportError as error:  # optional packages (DeepSpeed, matplotlib)
            print(f"not preloaded: {name} ({error})", file=sys.stderr)
    protocol = (requests.fileno(), replies.fileno())
    for line in requests:
        request = json.loads(line)
        n = request["processes"]
        port = str(_free_port()) if n > 1 else None
        ranks = [dict(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(n), LOCAL_WORLD_SIZE=str(n), GROUP_RANK="0",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=port) for r in range(n)] if n > 1 else [{}]
        pids = []
        sys.stdout.flush()
        sys.stderr.flush()
        for extra in ranks:
            pid = os.fork()
            if pid == 0:
                _child(request, extra, protocol)  # never returns
            pids.append(pid)
        replies.write(json.dumps({"pids": pids}) + "\n")
        replies.flush()
        replies.write(json.dumps({"returncode": _wait(pids)}) + "\n")
        replies.flush()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(pids):
    """Every child's end; the run's code is the first failure's (as torchrun, which then stops the others)."""
    code, left = 0, set(pids)
    while left:
        pid, status = os.wait()
        if pid not in left:
            continue
        left.discard(pid)
        exit_code = os.waitstatus_to_exitcode(status)
        if exit_code != 0 and code == 0:
            code = exit_code
            for other in left:
                try:
                    os.kill(other, signal.SIGTERM)
                except ProcessLookupError:
                    pass
    return code


def _child(request, extra, protocol):
    code = 1
    try:
        for fd in protocol:
            os.close(fd)
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_DFL)
        for fd, path in ((1, request["stdout"]), (2, request["stderr"])):
            os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644), fd)
        os.chdir(request["cwd"])
        os.environ.update(request["env"], **extra)
        if "OMP_NUM_THREADS" in os.environ:
            import torch

            torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
        import runpy

        script = os.path.abspath(request["argv"][0])
        sys.argv = [script, *request["argv"][1:]]
        sys.path[0] = os.path.dirname(script)  # as `python script` has it
        try:
            runpy.run_path(script, run_name="__main__")
            code = 0
        except SystemExit as stop:
            code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
            if not isinstance(stop.code, (int, type(None))):
                print(stop.code, file=sys.stderr)
        import atexit

        atexit._run_exitfuncs()
    except BaseException:  # as Python reports an uncaught exception: the traceback on stderr, code 1
        traceback.print_exc()
        code = 1
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:
                pass
        os._exit(code)


if __name__ == "__main__" and sys.argv[1:2] == ["--serve"]:
    _serve(sys.argv[2:])
