"""Executors of a comparison's runs: local processes, or Ray tasks on a cluster.

Every run is the same command, ``python -m tether.cli train --recipe R --task T --seed S --steps N
--out DIR [--resume] key=value ...`` (``control train --recipe R --env E ...`` for a control run), so
a run launched by the arena is exactly a ``tether train`` (or ``tether control train``).

- :class:`LocalExecutor`: subprocesses on this machine, at most ``max_workers`` at once (default:
  the cores divided by the threads of one run). A run's stderr is captured; a non-zero exit is
  reported with its error (``error.txt`` in the run directory) and does not stop the others.
- :class:`RayExecutor`: one ``ray.remote(num_cpus=threads)`` task per run on a Ray cluster
  (``address="auto"``, ``"ray://host:port"``) or on a fresh local instance (``"local"``). A task on
  the driver's node writes to the run directory directly; elsewhere (or with ``return_files=True``)
  it trains into a scratch directory and returns the run's small files (summary, metrics, config,
  alarms, samples), which the driver writes to the run directory.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any, Protocol

from tether.arena.compare import Job, Listener, RunResult, RunSpec, Status
from tether.errors import TetherError

# The files of a run that a remote task sends back (checkpoints and the model stay remote).
RETURNED_FILES = ("summary.json", "metrics.jsonl", "config.yaml", "alarms.jsonl", "samples.jsonl")
# Environment variables forwarded to every run (model cache, Hugging Face offline switches).
_FORWARDED_ENV_PREFIXES = ("TETHER_", "HF_", "TRANSFORMERS_")
_ERROR_TAIL = 6000


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def default_workers(threads: int = 1) -> int:
    """Runs at once on this machine: the cores divided by the threads of one run (at least 1)."""
    return max(1, available_cores() // max(1, threads))


def train_command(spec: RunSpec, resume: bool, out: str | Path | None = None) -> list[str]:
    """The subprocess command of a run: ``python -m tether.cli train ...`` (``control train ...``)."""
    return [sys.executable, "-m", "tether.cli", *spec.train_args(resume=resume, out=out)]


def run_env(threads: int, base: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ if base is None else base)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        env[var] = str(threads)
    return env


def error_text(returncode: int, stderr: str, command: Sequence[str]) -> tuple[str, str]:
    """(one-line error, full text for error.txt) of a failed run."""
    lines = [ln for ln in stderr.strip().splitlines() if ln.strip()]
    if returncode < 0:
        short = f"killed by signal {-returncode}"
    else:
        short = lines[-1].strip() if lines else f"exit status {returncode}"
    tail = stderr[-_ERROR_TAIL:]
    full = (
        f"{short}\n\ncommand: {' '.join(command)}\nexit status: {returncode}\n\n--- stderr (tail) ---\n{tail}"
    )
    return short, full


class Board(Protocol):
    def update(self, spec: RunSpec, status: Status, error: str | None = None) -> None: ...


class Executor(Protocol):
    """Runs jobs and reports each change of status to ``board``; one result per job."""

    def run(self, jobs: Sequence[Job], board: Board) -> list[RunResult]: ...


# ----------------------------------------------------------------------------------- progress
class ProgressBoard:
    """Status, elapsed time and error of every run: a rich live table, or one line per change."""

    def __init__(
        self, specs: Sequence[RunSpec], live: bool | None = None, listener: Listener | None = None
    ) -> None:
        from rich.console import Console

        self.specs = list(specs)
        self.console = Console(stderr=False)
        self.live_mode = self.console.is_terminal if live is None else live
        self.listener = listener
        self.status: dict[Path, str] = {s.run_dir: "pending" for s in self.specs}
        self.errors: dict[Path, str] = {}
        self.started: dict[Path, float] = {}
        self.elapsed: dict[Path, float] = {}
        self._live: Any = None

    def __enter__(self) -> ProgressBoard:
        if self.live_mode:
            from rich.live import Live

            self._live = Live(
                get_renderable=self.table, console=self.console, refresh_per_second=2, transient=False
            )
            self._live.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._live is not None:
            self._live.update(self.table())
            self._live.__exit__(*exc)
            self._live = None

    def seconds(self, spec: RunSpec) -> float:
        if spec.run_dir in self.elapsed:
            return self.elapsed[spec.run_dir]
        start = self.started.get(spec.run_dir)
        return time.monotonic() - start if start is not None else 0.0

    def update(self, spec: RunSpec, status: Status, error: str | None = None) -> None:
        key = spec.run_dir
        if status == "running":
            self.started[key] = time.monotonic()
        elif status in ("finished", "resumed", "failed") and key in self.started:
            self.elapsed[key] = time.monotonic() - self.started[key]
        self.status[key] = status
        if error:
            self.errors[key] = error
        if self.listener is not None:
            self.listener(spec, status, error)
        if not self.live_mode:
            done = sum(s in ("finished", "resumed", "reused", "failed") for s in self.status.values())
            extra = f" ({self.seconds(spec):.1f}s)" if status in ("finished", "resumed", "failed") else ""
            why = f": {error}" if error else ""
            self.console.print(
                f"[{done}/{len(self.specs)}] {spec.label} {status}{extra}{why}", markup=False, highlight=False
            )

    def table(self) -> Any:
        from rich.table import Table

        colors = {
            "failed": "red",
            "finished": "green",
            "resumed": "green",
            "reused": "cyan",
            "running": "yellow",
        }
        done = sum(s in ("finished", "resumed", "reused", "failed") for s in self.status.values())
        table = Table(title=f"tether compare: {done}/{len(self.specs)} runs done")
        for col in ("run", "status", "elapsed", "error"):
            table.add_column(col, overflow="fold")
        for spec in self.specs:
            st = self.status[spec.run_dir]
            secs = self.seconds(spec)
            color = colors.get(st)
            table.add_row(
                spec.label,
                f"[{color}]{st}[/]" if color else st,
                f"{secs:.1f}s" if secs else "-",
                (self.errors.get(spec.run_dir) or "")[:120],
            )
        return table


# ------------------------------------------------------------------------------------ local
def _stop_with_parent() -> None:  # pragma: no cover - runs in the child, between fork and exec
    """Linux: the run gets SIGINT when the comparison process dies (even by SIGKILL), so it stops at
    a step boundary with a checkpoint instead of running on beside a re-run of the comparison."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGINT)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def stop_runs(procs: Sequence[subprocess.Popen[bytes]], grace_seconds: float) -> None:
    """Stop runs gracefully: SIGINT (each finishes its step and saves it, as on Ctrl-C), then
    after ``grace_seconds`` SIGTERM, then SIGKILL. Their checkpoints let them resume."""
    alive = [p for p in procs if p.poll() is None]
    for p in alive:
        with contextlib.suppress(ProcessLookupError):
            p.send_signal(signal.SIGINT)
    deadline = time.monotonic() + grace_seconds
    for p in alive:
        try:
            p.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.terminate()
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()


class LocalExecutor:
    """Subprocesses on this machine, at most ``max_workers`` at once. Interrupted, it stops its
    runs with SIGINT (a checkpoint at the step boundary) before harder signals; a run also gets
    SIGINT when the comparison process is killed."""

    def __init__(
        self, max_workers: int | None = None, poll_seconds: float = 0.2, grace_seconds: float = 60.0
    ) -> None:
        if max_workers is not None and max_workers < 1:
            raise TetherError(f"--workers {max_workers}: must be >= 1")
        self.max_workers = max_workers
        self.poll_seconds = poll_seconds
        self.grace_seconds = grace_seconds

    def run(self, jobs: Sequence[Job], board: Board) -> list[RunResult]:
        threads = max((j.spec.threads for j in jobs), default=1)
        workers = self.max_workers or default_workers(threads)
        pending = list(jobs)
        running: list[tuple[Job, subprocess.Popen[bytes], IO[bytes], list[str], float]] = []
        results: list[RunResult] = []
        try:
            while pending or running:
                while pending and len(running) < workers:
                    job = pending.pop(0)
                    cmd = train_command(job.spec, job.resume)
                    job.spec.run_dir.mkdir(parents=True, exist_ok=True)
                    log: IO[bytes] = tempfile.TemporaryFile()
                    proc = subprocess.Popen(
                        cmd,
                        stdout=subprocess.DEVNULL,
                        stderr=log,
                        stdin=subprocess.DEVNULL,
                        env=run_env(job.spec.threads),
                        preexec_fn=_stop_with_parent,
                    )
                    running.append((job, proc, log, cmd, time.monotonic()))
                    board.update(job.spec, "running")
                still: list[tuple[Job, subprocess.Popen[bytes], IO[bytes], list[str], float]] = []
                for item in running:
                    job, proc, err, cmd, t0 = item
                    rc = proc.poll()
                    if rc is None:
                        still.append(item)
                        continue
                    err.seek(0)
                    stderr = err.read().decode("utf-8", "replace")
                    err.close()
                    seconds = time.monotonic() - t0
                    if rc == 0:
                        status: Status = "resumed" if job.resume else "finished"
                        results.append(RunResult(job.spec, status, None, seconds))
                        board.update(job.spec, status)
                    else:
                        short, full = error_text(rc, stderr, cmd)
                        results.append(RunResult(job.spec, "failed", full, seconds))
                        board.update(job.spec, "failed", short)
                running = still
                if running:
                    time.sleep(self.poll_seconds)
        finally:  # interrupted (Ctrl-C): stop the runs; their checkpoints let them resume
            stop_runs([proc for _, proc, _, _, _ in running], self.grace_seconds)
            for _, _, err, _, _ in running:
                err.close()
        return results


# -------------------------------------------------------------------------------------- ray
def _ray_train(
    command_args: list[str],
    run_dir: str,
    driver_node: str | None,
    return_files: bool,
    threads: int,
    env: dict[str, str],
) -> dict[str, Any]:
    """Body of a run's Ray task: the ``tether train`` subprocess, in the run directory when it is
    on this node, else in a scratch directory whose small files are returned."""
    import ray

    node = ray.get_runtime_context().get_node_id()
    remote = return_files or (driver_node is not None and node != driver_node)
    scratch = tempfile.mkdtemp(prefix="tether-run-") if remote else None
    out = os.path.join(scratch, "run") if scratch else run_dir
    args = list(command_args)
    args[args.index("--out") + 1] = out
    if remote and "--resume" in args:  # the checkpoints stayed with the driver's run: start again
        args.remove("--resume")
    cmd = [sys.executable, "-m", "tether.cli", *args]
    if not remote:
        Path(run_dir).mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    proc = subprocess.run(
        cmd,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        env=run_env(threads, {**os.environ, **env}),
        check=False,
    )
    seconds = time.monotonic() - t0
    files: dict[str, bytes] = {}
    if scratch is not None:
        for name in RETURNED_FILES:
            p = Path(out) / name
            if p.is_file():
                files[name] = p.read_bytes()
        import shutil

        shutil.rmtree(scratch, ignore_errors=True)
    stderr = proc.stderr.decode("utf-8", "replace")
    if proc.returncode == 0:
        return {
            "ok": True,
            "error": None,
            "short": None,
            "files": files,
            "seconds": seconds,
            "remote": remote,
        }
    short, full = error_text(proc.returncode, stderr, cmd)
    return {"ok": False, "error": full, "short": short, "files": files, "seconds": seconds, "remote": remote}


class RayExecutor:
    """One Ray task (``num_cpus`` = the run's threads) per run.

    ``address``: ``"auto"`` (the cluster this machine belongs to), ``"ray://host:port"`` (Ray
    client) or ``"local"`` (a fresh local instance; ``init_kwargs`` such as ``num_cpus`` go to
    ``ray.init``). An already initialized Ray is used as it is. ``return_files``: always send
    the run files back (``None``: when the task runs on another node than the driver, and always
    through Ray client).
    """

    def __init__(
        self,
        address: str = "auto",
        return_files: bool | None = None,
        init_kwargs: dict[str, Any] | None = None,
        poll_seconds: float = 0.5,
    ) -> None:
        self.address = address
        self.return_files = return_files
        self.init_kwargs = dict(init_kwargs or {})
        self.poll_seconds = poll_seconds

    def _init(self) -> Any:
        try:
            import ray
        except ImportError:
            raise TetherError("the Ray executor needs Ray: pip install 'tether[ray]'") from None
        if not ray.is_initialized():
            address = None if self.address in ("local", "", None) else self.address
            # options of a new instance only: Ray refuses them when connecting to a cluster
            fresh = {"include_dashboard": False} if address is None else {}
            kwargs = {**fresh, "log_to_driver": False, **self.init_kwargs}
            try:
                ray.init(address=address, **kwargs)
            except (ConnectionError, RuntimeError, ValueError) as err:
                raise TetherError(f"cannot connect to Ray at {self.address!r}: {err}") from None
        return ray

    def run(self, jobs: Sequence[Job], board: Board) -> list[RunResult]:
        ray = self._init()
        client = self.address.startswith("ray://")
        return_files = bool(self.return_files) or client
        driver_node = None if client else ray.get_runtime_context().get_node_id()
        env = {k: v for k, v in os.environ.items() if k.startswith(_FORWARDED_ENV_PREFIXES)}
        refs: dict[Any, tuple[Job, float]] = {}
        for job in jobs:
            task = ray.remote(num_cpus=job.spec.threads, max_retries=0)(_ray_train)
            ref = task.remote(
                job.spec.train_args(resume=job.resume),
                str(job.spec.run_dir.resolve()),
                driver_node,
                return_files,
                job.spec.threads,
                env,
            )
            refs[ref] = (job, time.monotonic())
            board.update(job.spec, "running")
        results: list[RunResult] = []
        waiting = list(refs)
        try:
            while waiting:
                ready, waiting = ray.wait(waiting, num_returns=1, timeout=self.poll_seconds)
                for ref in ready:
                    job, t0 = refs[ref]
                    results.append(self._collect(ray, ref, job, t0, board))
        finally:
            for ref in waiting:  # interrupted: cancel what is left
                ray.cancel(ref, force=True)
        return results

    def _collect(self, ray: Any, ref: Any, job: Job, t0: float, board: Board) -> RunResult:
        try:
            out = ray.get(ref)
        except Exception as err:  # the task itself failed (worker died, Ray error)
            text = f"{type(err).__name__}: {err}"
            short = text.strip().splitlines()[0] if text.strip() else type(err).__name__
            board.update(job.spec, "failed", short)
            return RunResult(job.spec, "failed", text, time.monotonic() - t0)
        if out["files"]:
            run_dir = job.spec.run_dir
            run_dir.mkdir(parents=True, exist_ok=True)
            for name, data in out["files"].items():
                if name in RETURNED_FILES:
                    (run_dir / name).write_bytes(data)
        seconds = float(out["seconds"])
        if out["ok"]:
            status: Status = "resumed" if job.resume and not out["remote"] else "finished"
            board.update(job.spec, status)
            return RunResult(job.spec, status, None, seconds)
        board.update(job.spec, "failed", out["short"])
        return RunResult(job.spec, "failed", out["error"], seconds)
