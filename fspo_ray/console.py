"""The console is for people: a job prints its stage lines and progress bars on stdout; what Ray and the
libraries write to stderr (INFO lines, warnings, progress bars, C++ logs) and everything Ray's workers
print go to the job's log file instead. `verbose=true` leaves them all on the console.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading

WORKER_OUTPUT = "ray_print_logs"  # Ray's handler that prints its workers' stdout/stderr on the driver's console
LOG_FILE_OUTPUT = "fspo_log_file"  # ours, writing them to the log file


@contextlib.contextmanager
def job_console(log_path: str, verbose: bool = False):
    """Run a job: join the Ray of the caller or of RAY_ADDRESS, else start a local one (shut down at exit).
    Unless `verbose`, this process's stderr and Ray workers' output go to `log_path` meanwhile."""
    import ray

    started = not ray.is_initialized()
    if not verbose:
        _quiet_deepspeed_on_cpus()
    if verbose:
        ray.init(ignore_reinit_error=True)
        try:
            yield
        finally:
            if started:
                ray.shutdown()
        return
    os.makedirs(os.path.dirname(os.path.abspath(log_path)), exist_ok=True)
    log = open(log_path, "a", buffering=1)
    sys.stderr.flush()
    console_stderr, python_stderr = os.dup(2), sys.stderr
    os.dup2(log.fileno(), 2)  # what C++ code and child processes write ...
    sys.stderr = log  # ... and Python's writers, wherever its sys.stderr pointed (a test's capture, say)
    try:
        if started:
            ray.init()  # honours RAY_ADDRESS
        undo = _worker_output_to(log)
        try:
            yield
        finally:
            if started:
                ray.shutdown()
            undo()
    finally:
        sys.stderr = python_stderr
        os.dup2(console_stderr, 2)
        os.close(console_stderr)
        log.close()


def _quiet_deepspeed_on_cpus() -> None:
    """DeepSpeed warns on stdout, where a redirect of stderr cannot catch it, each time a process finds no
    GPU ("Setting accelerator to CPU"). Naming the CPU accelerator up front says the same without the
    warning, for this process and the local Ray's workers (they inherit it); a GPU machine is untouched."""
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


def _worker_output_to(log):
    """Send what Ray's workers print to the file `log` instead of the console; return the undo.

    Ray forwards its workers' stdout/stderr to the driver through one dispatcher (log_to_driver); its
    default handler prints them. Ours writes them, with the worker's pid, to the log file."""
    import ray
    from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

    lock = threading.Lock()

    def to_log(data: dict) -> None:
        source = data.get("actor_name") or data.get("task_name") or "worker"
        with lock:
            log.writelines(f"({source} pid={data.get('pid')}) {line}\n" for line in data.get("lines", []))

    printers = [pair for pair in dispatcher.handlers if pair[0] == WORKER_OUTPUT]
    dispatcher.remove_handler(WORKER_OUTPUT)
    dispatcher.add_handler(LOG_FILE_OUTPUT, to_log)

    def undo() -> None:
        dispatcher.remove_handler(LOG_FILE_OUTPUT)
        if ray.is_initialized():  # a Ray started here has been shut down, and its printer with it
            for pair in printers:
                dispatcher.add_handler(*pair)

    return undo


@contextlib.contextmanager
def progress_bar(total: int, description: str):
    """A progress bar (with ETA) on the driver, fed from any Ray worker through the yielded queue of
    {"step": n, "text": "..."} items."""
    import ray
    from ray.util.queue import Empty, Queue
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
    from tqdm import tqdm

    # On the driver's node: a queue on another node would die with that node and take the run's bar with it.
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    queue = Queue(actor_options={"num_cpus": 0, "scheduling_strategy": here})
    done = threading.Event()
    bar = tqdm(total=total, desc=description, unit="step", dynamic_ncols=True, file=sys.stdout)

    def follow() -> None:
        while not done.is_set():
            try:
                item = queue.get(timeout=0.5)
            except Empty:
                continue
            bar.update(item["step"] - bar.n)
            bar.set_postfix_str(item.get("text", ""), refresh=True)

    follower = threading.Thread(target=follow, daemon=True)
    follower.start()
    try:
        yield queue
    finally:
        done.set()
        follower.join()
        bar.close()
        queue.shutdown()


def streamed_rows(dataset, total: int, label: str, unit: str = "prompt"):
    """A Ray Dataset's rows as its replicas finish them, counted on a progress bar (with ETA)."""
    from tqdm import tqdm

    with tqdm(total=total, desc=label, unit=unit, dynamic_ncols=True, file=sys.stdout) as bar:
        for row in dataset.iter_rows():
            bar.update()
            yield row
