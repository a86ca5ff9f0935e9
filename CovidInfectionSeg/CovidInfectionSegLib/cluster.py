"""A batch on a Ray cluster: :func:`run_ray_batch` spreads :func:`batch.run_scan` over a pool of Ray actors.

The driver (this process) does what a local batch does, with batch.py's own functions: it holds the
output folder's lock and ``summary.csv`` (:func:`batch.batch_summary`), decides what to skip
(:func:`batch.decide`) and writes each row as it arrives, so an interrupted run resumes. Each actor
loads the model once, on the device Ray assigned to it (CUDA when it was given GPUs, else the CPU),
and segments scans that it reads from and writes to shared storage (the same paths on every node):
only scan names go out to the workers and summary rows come back, no volume passes the driver.

A worker process that dies (killed, out of memory, crashed) costs only its scan: a new actor takes
its place and the scan is tried again, up to ``retries`` more times, then reported ``failed`` with
the reason; the other scans go on. A scan's outputs are written all or nothing (:mod:`.atomic`), so
a worker killed while writing leaves the previous result as it was.

Ray is an optional dependency (``pip install -e ".[distributed]"``): importing this module does not
need it, :func:`import_ray` says what to install.

Test-only hook, inert unless set (the driver forwards both variables to its workers):
``$COVIDSEG_TEST_KILL_WORKER=<scan name>`` makes a worker kill its own process (SIGKILL) once that
scan's outputs are staged and before they are moved in, every time; with
``$COVIDSEG_TEST_KILL_WORKER_ONCE=<file>`` only the first time (the worker creates the file, then dies;
a worker finding the file there goes on).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import math
import os
import re
import signal
import socket
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from .atomic import pause_point
from .batch import Scan, batch_summary, decide, expected_outputs, run_scan, segment_and_write_files
from .inference import SegmentationCancelled, is_cancelled
from .model_package import ModelError, ModelPackage, load_model_package
from .outputs import ensure_output_dir

INSTALL_HINT = 'pip install -e ".[distributed]" in the covidseg source folder, or pip install "ray>=2.60"'
DEFAULT_CPUS_PER_WORKER = 2.0
DEFAULT_RETRIES = 2
KILL_WORKER_ENV = "COVIDSEG_TEST_KILL_WORKER"
KILL_WORKER_ONCE_ENV = "COVIDSEG_TEST_KILL_WORKER_ONCE"
POLL_S = 0.2  # how often the driver looks at the cancel flag while it waits for workers
WAITING_HINT_S = 60.0  # say why nothing happens when no worker has started after this long
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


class ClusterError(RuntimeError):
    """Ray is missing, the cluster cannot be reached or is too small for one worker, or a worker cannot start."""


class RayNotInstalledError(ClusterError):
    """``--ray`` without Ray installed."""


@dataclass
class Worker:
    """One actor of the pool as the driver sees it: where it runs and what it did."""

    number: int
    host: str = ""
    pid: int = 0
    device: str = ""
    threads: int = 0
    scans: int = 0
    died: str = ""  # why its process died, when it did


@dataclass
class RayBatchReport:
    """What :func:`run_ray_batch` did: the summary rows, the workers, and the throughput."""

    rows: list[dict[str, Any]]
    workers: list[Worker] = field(default_factory=list)
    pool_size: int = 0
    processed: int = 0  # scans the workers finished, ok or failed (skipped ones are not counted)
    wall_s: float = 0.0  # from the pool's start (model loading included) to its last scan

    def scans_per_minute(self) -> float:
        return self.processed / (self.wall_s / 60) if self.wall_s > 0 else 0.0

    def lines(self) -> list[str]:
        """Readable lines: scans per minute in all and per worker, then each worker's share."""
        if not self.pool_size:
            return ["ray: no scan needed segmenting, no worker started"]
        rate = self.scans_per_minute()
        lines = [f"ray: {_count(self.processed, 'scan')} in {self.wall_s / 60:.1f} min on "
                 f"{_count(self.pool_size, 'worker')}: "
                 f"{rate:.2f} scans/min in all, {rate / self.pool_size:.2f} per worker (model loading included)"]
        for worker in self.workers:
            where = "did not start"
            if worker.host:
                where = f"{worker.host}, pid {worker.pid}, {worker.device}, {_count(worker.threads, 'thread')}"
            died = f"; {worker.died}" if worker.died else ""
            lines.append(f"  worker {worker.number} ({where}): {_count(worker.scans, 'scan')}{died}")
        return lines


@dataclass(frozen=True)
class WorkerSetup:
    """What every actor needs to segment scans: the model (a path every node sees, and its checksum) and
    the options of :func:`batch.segment_and_write_files`."""

    model_path: str
    model_sha256: str
    outputs: tuple[str, ...]
    preview: bool = True
    batch_size: int | None = None
    threads: int = 1
    options: dict[str, Any] = field(default_factory=dict)  # more segment_file options (e.g. precision)


@dataclass
class _Job:
    scan: Scan  # its path absolute, for the workers
    note: str
    name: str  # the path as the caller gave it, for warnings and measurements.json (as a local batch has it)
    attempts: int = 0
    deaths: list[str] = field(default_factory=list)
    started: float = 0.0


# ------------------------------------------------------------------------------------------ Ray access


def import_ray() -> Any:
    """The ``ray`` module, or :class:`RayNotInstalledError` saying what to install."""
    try:
        import ray
    except ImportError as error:
        raise RayNotInstalledError(f"--ray needs Ray, which is not installed here: {INSTALL_HINT}") from error
    return ray


def connect(address: str | None = None, forward_logs: bool = True) -> bool:
    """Connect this process to Ray: to ``address`` when given, else to ``$RAY_ADDRESS`` when set, else
    start a local Ray instance on this machine (``address="auto"``: a cluster started on this machine
    with ``ray start``). Returns True when it connected (the caller calls ``ray.shutdown()`` after),
    False when this process was already connected (that connection is used as it is). Raises
    :class:`ClusterError`."""
    ray = import_ray()
    if ray.is_initialized():
        return False
    target = address or os.environ.get("RAY_ADDRESS") or "local"
    settings: dict[str, Any] = {"logging_level": logging.WARNING, "log_to_driver": forward_logs}
    if target == "local":
        settings["include_dashboard"] = False
    try:
        ray.init(address=target, **settings)
    except (ConnectionError, RuntimeError, ValueError, TimeoutError) as error:
        raise ClusterError(
            f"cannot connect to the Ray cluster at {target}: {_ANSI.sub('', str(error)).strip()}; check that it is up "
            "('ray status' on its head) and, where it uses token authentication, that this machine has "
            "RAY_AUTH_MODE=token and the cluster's token (~/.ray/auth_token or RAY_AUTH_TOKEN)") from error
    return True


def pool_size(resources: dict[str, float], cpus_per_worker: float, gpus_per_worker: float,
              wanted: int | None, jobs: int) -> int:
    """How many workers to start: as many as the cluster's ``resources`` (``ray.cluster_resources()``)
    hold, at most ``wanted`` and ``jobs``. Raises :class:`ClusterError` when not even one fits."""
    cpus, gpus = resources.get("CPU", 0.0), resources.get("GPU", 0.0)
    fits = math.floor(cpus / cpus_per_worker + 1e-9)
    if gpus_per_worker > 0:
        fits = min(fits, math.floor(gpus / gpus_per_worker + 1e-9))
    if fits < 1:
        need = f"{cpus_per_worker:g} CPUs" + (f" and {gpus_per_worker:g} GPUs" if gpus_per_worker > 0 else "")
        raise ClusterError(f"the Ray cluster has {cpus:g} CPUs and {gpus:g} GPUs, not enough for one worker "
                           f"({need}); lower --cpus-per-worker / --gpus-per-worker or add nodes")
    return max(1, min(fits, wanted or fits, jobs))


def assigned_device(gpu_ids: Sequence[Any]) -> str:
    """The device of a worker that Ray gave ``gpu_ids`` (``ray.get_gpu_ids()``): ``cuda`` when it has
    GPUs (Ray sets CUDA_VISIBLE_DEVICES to them, so ``cuda`` is the first one assigned), else ``cpu``.
    Raises RuntimeError when Ray assigned GPUs that this node's PyTorch cannot use."""
    if not gpu_ids:
        return "cpu"
    if not torch.cuda.is_available():
        build = "a CPU-only build" if torch.version.cuda is None else f"CUDA {torch.version.cuda}, no device visible"
        raise RuntimeError(f"Ray assigned GPU {', '.join(map(str, gpu_ids))} to this worker, but PyTorch "
                           f"{torch.__version__} here cannot use it ({build}); install a CUDA build of torch on "
                           "this node")
    return "cuda"


def death_reason(error: BaseException) -> str:
    """A short reason from Ray's error for a dead worker process (its long advice left out)."""
    text = _ANSI.sub("", str(error))
    detail = re.search(r"Worker exit detail: (.*?)(?:\s+Some common causes|$)", text, re.DOTALL)
    pid, ip = re.search(r"\bpid: (\d+)", text), re.search(r"\bip: (\S+)", text)
    where = f" (pid {pid.group(1)} on {ip.group(1)})" if pid and ip else ""
    what = detail.group(1).strip() if detail else text.strip().splitlines()[0] if text.strip() else type(error).__name__
    if "unexpectedly exits" in what:
        what += " (killed, out of memory or crashed)"
    return f"worker process{where} died: {what}"


# -------------------------------------------------------------------------------------------- worker


class ScanWorker:
    """The body of one Ray actor: loads the model once, then segments scans with :func:`batch.run_scan`.

    A problem while starting (model missing or different, unusable GPU) is kept and reported by
    :meth:`describe` rather than raised, so the driver can stop the batch with the real reason."""

    def __init__(self, setup: WorkerSetup, gpu_ids: Sequence[Any] = ()):
        self.setup = setup
        self.device = "?"
        self.problem: tuple[str, str] | None = None
        try:
            self.device = assigned_device(gpu_ids)
            torch.set_num_threads(setup.threads)
            model = load_model_package(setup.model_path)
            if model.manifest["sha256"] != setup.model_sha256:
                raise ModelError(f"{setup.model_path} on this node is not the driver's model (sha256 "
                                 f"{model.manifest['sha256']}, the driver's {setup.model_sha256})")
        except ModelError as error:
            self.problem = ("model", str(error))
        except Exception as error:  # an unusable GPU, a broken install on this node: the driver says which
            self.problem = ("start", f"{type(error).__name__}: {error}")
        else:
            self._segment_and_write = functools.partial(
                segment_and_write_files, model=model, preview=setup.preview, device=self.device,
                batch_size=setup.batch_size, **setup.options)

    def describe(self) -> dict[str, Any]:
        return {"host": socket.gethostname(), "pid": os.getpid(), "device": self.device,
                "threads": torch.get_num_threads(), "problem": self.problem}

    def run(self, scan: Scan, outdir: str, note: str, name: str | None = None) -> dict[str, Any]:
        """Segment ``scan`` into ``outdir`` (all or nothing); its summary row. ``name`` is how warnings and
        ``measurements.json`` name the input (the path as the driver was given it; default the scan's)."""
        def write(scan: Scan, folder: Path, fingerprint: dict) -> Any:
            result = self._segment_and_write(scan, folder, fingerprint, name=name or str(scan.path))
            kill_point(scan.name)
            return result

        return run_scan(scan, outdir, write, self.setup.outputs, note)


class _RayScanWorker(ScanWorker):
    """:class:`ScanWorker` inside a Ray actor: its GPUs are those Ray assigned to it."""

    def __init__(self, setup: WorkerSetup):
        import ray

        super().__init__(setup, ray.get_gpu_ids())


def kill_point(scan_name: str) -> None:
    """Test-only hook, inert unless ``$COVIDSEG_TEST_KILL_WORKER`` is ``scan_name``: then kill this
    process with SIGKILL; with ``$COVIDSEG_TEST_KILL_WORKER_ONCE`` only when that file does not exist
    yet (it is created first, so exactly one worker dies)."""
    if os.environ.get(KILL_WORKER_ENV) != scan_name:
        return
    once = os.environ.get(KILL_WORKER_ONCE_ENV)
    if once:
        try:
            with open(once, "x", encoding="utf-8") as marker:
                marker.write(f"{os.getpid()}\n")
        except FileExistsError:
            return
    os.kill(os.getpid(), signal.SIGKILL)


# -------------------------------------------------------------------------------------------- driver


def run_ray_batch(
    scans: Sequence[Scan],
    outdir: str | Path,
    model: ModelPackage,
    *,
    address: str | None = None,
    gpus_per_worker: float = 0.0,
    cpus_per_worker: float = DEFAULT_CPUS_PER_WORKER,
    workers: int | None = None,
    retries: int = DEFAULT_RETRIES,
    preview: bool = True,
    batch_size: int | None = None,
    overwrite: bool = False,
    segment_options: dict[str, Any] | None = None,
    cancel: Callable[[], bool] | Any = None,
    on_row: Callable[[dict[str, Any]], None] | None = None,
    log: Callable[[str], None] | None = None,
    forward_logs: bool = True,
) -> RayBatchReport:
    """Segment ``scans`` into ``outdir`` (created if needed) on a Ray cluster; the same outputs, skip and
    resume rules and ``summary.csv`` as :func:`batch.run_local_batch`.

    Ray: this process's connection when it has one, else :func:`connect` to ``address``
    (``$RAY_ADDRESS``, else a local instance), shut down at the end. Workers: as many as the cluster
    holds with ``cpus_per_worker`` CPUs (torch threads) and ``gpus_per_worker`` GPUs each (fractions
    share a GPU), at most ``workers``. Each loads ``model`` from its manifest path, which every node
    must see (the same checksum is required). ``segment_options`` go to
    :func:`pipeline.segment_file` (``device`` is the worker's). The scans and ``outdir`` must be on
    storage every node sees at the same path. ``on_row`` gets each row as it arrives, ``log``
    informational lines. A worker that dies is replaced and its scan tried again, ``retries`` times at
    most, then reported ``failed``.

    Raises :class:`RayNotInstalledError` / :class:`ClusterError`, :class:`ModelError` (a worker cannot
    load the model), :class:`outputs.OutputError` (``outdir`` not writable),
    :class:`batch.FolderLockedError` / :class:`batch.SummaryError`, and
    :class:`SegmentationCancelled` when ``cancel`` fires (the workers are stopped at once; their
    half-written outputs are cleaned up by the next run), after writing the summary of the scans done.
    """
    ray = import_ray()
    if not cpus_per_worker > 0 or gpus_per_worker < 0 or retries < 0 or (workers is not None and workers < 1):
        raise ValueError("cpus_per_worker must be > 0, gpus_per_worker >= 0, retries >= 0 and workers >= 1")
    say = log or (lambda text: None)
    outdir = ensure_output_dir(os.path.abspath(outdir))  # absolute: workers do not share our working folder
    outputs = tuple(expected_outputs(preview))
    rows: list[dict[str, Any]] = []
    with batch_summary(outdir, scans) as summary:

        def record(row: dict[str, Any]) -> None:
            rows.append(row)
            summary.add(row)
            if on_row is not None:
                on_row(row)

        # The recorded settings a re-run must match; those not given keep decide's defaults.
        recorded = {key: bool(value) for key, value in (segment_options or {}).items()
                    if key in ("flip_tta", "nodule_check")}
        todo = []
        for scan in scans:
            if is_cancelled(cancel):
                raise SegmentationCancelled("cancelled before the workers started")
            decision = decide(scan, outdir, outputs, overwrite, {"name": model.name, "version": model.version},
                              **recorded)
            if decision.redo:
                absolute = dataclasses.replace(scan, path=Path(os.path.abspath(scan.path)))
                todo.append(_Job(absolute, decision.note, str(scan.path)))
            else:
                record(decision.row)
        if not todo:
            return RayBatchReport(rows)
        started_here = connect(address, forward_logs)
        try:
            resources = ray.cluster_resources()
            size = pool_size(resources, cpus_per_worker, gpus_per_worker, workers, len(todo))
            say(_pool_line(ray, resources, size, cpus_per_worker, gpus_per_worker, workers, len(todo)))
            setup = WorkerSetup(
                model_path=str(model.manifest_path.resolve()), model_sha256=model.manifest["sha256"],
                outputs=outputs, preview=preview, batch_size=batch_size,
                threads=max(1, math.floor(cpus_per_worker)), options=dict(segment_options or {}))
            actor_options = {"num_cpus": cpus_per_worker, "num_gpus": gpus_per_worker, "max_restarts": 0,
                             "max_task_retries": 0}
            forwarded = {name: os.environ[name] for name in (KILL_WORKER_ENV, KILL_WORKER_ONCE_ENV)
                         if name in os.environ}
            if forwarded:
                actor_options["runtime_env"] = {"env_vars": forwarded}
            pool = _Pool(ray, ray.remote(_RayScanWorker), setup, actor_options, size, say)
            report = pool.run(todo, str(outdir), retries, cancel, record)
        finally:
            if started_here:
                ray.shutdown()
    report.rows = rows
    return report


def _pool_line(ray: Any, resources: dict[str, float], size: int, cpus_per_worker: float, gpus_per_worker: float,
               wanted: int | None, jobs: int) -> str:
    nodes = sum(1 for node in ray.nodes() if node.get("Alive"))
    each = _count(cpus_per_worker, "CPU") + (f", {_count(gpus_per_worker, 'GPU')}" if gpus_per_worker > 0 else "")
    line = (f"ray: {_count(nodes, 'node')}, {_count(resources.get('CPU', 0), 'CPU')}, "
            f"{_count(resources.get('GPU', 0), 'GPU')}; {_count(size, 'worker')} of {each} for {_count(jobs, 'scan')}")
    if wanted is not None and wanted > size and jobs > size:
        line += f" (asked for {wanted}, the cluster holds {size})"
    if gpus_per_worker == 0 and resources.get("GPU", 0) > 0:
        line += "; the cluster has GPUs: --gpus-per-worker puts workers on them"
    return line


class _Pool:
    """The actors of one batch: keeps ``size`` of them busy, replaces those whose process dies."""

    def __init__(self, ray: Any, actor_class: Any, setup: WorkerSetup, actor_options: dict[str, Any], size: int,
                 say: Callable[[str], None]):
        self.ray, self.actor_class, self.setup, self.actor_options = ray, actor_class, setup, actor_options
        self.size, self.say = size, say
        self.workers: list[Worker] = []
        self.handles: list[Any] = []
        self.starting: dict[Any, tuple[Any, Worker]] = {}
        self.idle: deque[tuple[Any, Worker]] = deque()
        self.busy: dict[Any, tuple[Any, Worker, _Job]] = {}

    def run(self, todo: list[_Job], outdir: str, retries: int, cancel: Any,
            record: Callable[[dict[str, Any]], None]) -> RayBatchReport:
        from ray.exceptions import RayActorError, RayTaskError, WorkerCrashedError

        pending = deque(todo)
        processed = 0
        hinted = False
        started = time.monotonic()
        try:
            for _ in range(self.size):
                self._start()
            while pending or self.busy:
                if is_cancelled(cancel):
                    raise SegmentationCancelled("cancelled: the workers were stopped")
                while self.idle and pending:
                    handle, worker = self.idle.popleft()
                    job = pending.popleft()
                    job.attempts += 1
                    job.started = job.started or time.monotonic()
                    self.busy[handle.run.remote(job.scan, outdir, job.note, job.name)] = (handle, worker, job)
                if pending and len(self.starting) + len(self.busy) + len(self.idle) < self.size:
                    self._start()
                if not hinted and time.monotonic() - started > WAITING_HINT_S and not any(w.host for w in self.workers):
                    hinted = True
                    self.say(f"ray: no worker has started after {WAITING_HINT_S:g} s: the CPUs or GPUs they need "
                             "may be taken by other jobs on the cluster ('ray status' shows them); still waiting")
                ready, _ = self.ray.wait([*self.starting, *self.busy], num_returns=1, timeout=POLL_S)
                for ref in ready:
                    if ref in self.starting:
                        self._started(ref)
                        continue
                    handle, worker, job = self.busy.pop(ref)
                    try:
                        row = self.ray.get(ref)
                    except (RayActorError, WorkerCrashedError) as error:
                        worker.died = death_reason(error)
                        job.deaths.append(worker.died)
                        if job.attempts <= retries:
                            pending.appendleft(job)  # a new worker takes it first
                            continue
                        row = {"scan": job.scan.name, "status": "failed",
                               "error": f"its worker died on each of {job.attempts} tries; last: {job.deaths[-1]}",
                               "seconds": round(time.monotonic() - job.started, 2), "note": job.note}
                    except RayTaskError as error:  # an exception run_scan does not turn into a failed row
                        self.idle.append((handle, worker))
                        row = {"scan": job.scan.name, "status": "failed", "error": _task_error(error),
                               "seconds": round(time.monotonic() - job.started, 2), "note": job.note}
                    else:
                        self.idle.append((handle, worker))
                        worker.scans += 1
                    if job.deaths and row["status"] == "ok":
                        retried = f"segmented on try {job.attempts}; before: " + "; ".join(job.deaths)
                        row["note"] = "; ".join(filter(None, (row.get("note"), retried)))
                    processed += 1
                    record(row)
                    pause_point("ray-row")
        finally:
            for handle in self.handles:
                with contextlib.suppress(Exception):
                    self.ray.kill(handle, no_restart=True)
        return RayBatchReport([], self.workers, self.size, processed, time.monotonic() - started)

    def _start(self) -> None:
        worker = Worker(number=len(self.workers) + 1)
        self.workers.append(worker)
        handle = self.actor_class.options(**self.actor_options).remote(self.setup)
        self.handles.append(handle)
        self.starting[handle.describe.remote()] = (handle, worker)

    def _started(self, ref: Any) -> None:
        from ray.exceptions import RayActorError

        handle, worker = self.starting.pop(ref)
        try:
            info = self.ray.get(ref)
        except RayActorError as error:
            raise ClusterError(f"worker {worker.number} could not start: {death_reason(error)}") from error
        worker.host, worker.pid = info["host"], info["pid"]
        worker.device, worker.threads = info["device"], info["threads"]
        if info["problem"] is not None:
            kind, message = info["problem"]
            text = f"worker {worker.number} on {worker.host}: {message}"
            raise ModelError(text) if kind == "model" else ClusterError(text)
        self.say(f"ray: worker {worker.number} ready on {worker.host} (pid {worker.pid}, {worker.device}, "
                 f"{_count(worker.threads, 'thread')})")
        self.idle.append((handle, worker))


def _count(number: float, noun: str) -> str:
    return f"{number:g} {noun}" + ("" if number == 1 else "s")


def _task_error(error: BaseException) -> str:
    cause = getattr(error, "cause", None)
    if isinstance(cause, BaseException):
        return f"{type(cause).__name__}: {cause}"
    lines = [line for line in _ANSI.sub("", str(error)).splitlines() if line.strip()]
    return lines[-1].strip() if lines else type(error).__name__
