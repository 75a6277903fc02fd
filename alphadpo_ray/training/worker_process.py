"""What every Ray worker process of an alphadpo-ray job sets up as it starts (Ray runs `setup` as the job's
``runtime_env`` ``worker_process_setup_hook``, `launch.WORKER_SETUP_HOOK`; the trial and Train-worker entry
points call it too, for jobs whose Ray someone else started).

- `exit_on_a_swallowed_exit`: a SIGTERM that Python swallows in a callback exits the process instead of
  printing a traceback.
- `state_api_on_this_cluster`: Ray's state API, given no address, asks this process's own cluster, never
  another Ray instance on the same machine.
"""

from __future__ import annotations

import os
import sys
import threading


def setup() -> None:
    """Both of the below. Idempotent."""
    exit_on_a_swallowed_exit()
    state_api_on_this_cluster()


def exit_on_a_swallowed_exit() -> None:
    """Call in a Ray worker process. Ray's workers answer SIGTERM (the raylet ending an actor: a finished
    trial's, a stopped worker group's) by raising `SystemExit` wherever the main thread is. Inside a weakref
    callback or a ``__del__`` Python cannot raise it: it prints "Exception ignored in …" and a traceback, which
    Ray forwards to the driver's console, and the process carries on until the raylet kills it. Here such a
    swallowed exit does what it was raised for: the process flushes its output and exits at once with its code,
    printing nothing. Other unraisable exceptions go to the hook before. Idempotent."""
    previous = sys.unraisablehook
    if getattr(previous, "_alphadpo_exits", False):
        return

    def hook(unraisable) -> None:
        if issubclass(unraisable.exc_type, SystemExit) and threading.current_thread() is threading.main_thread():
            code = getattr(unraisable.exc_value, "code", 1)
            for stream in (sys.stdout, sys.stderr):
                try:
                    stream.flush()
                except (OSError, ValueError, AttributeError):
                    pass
            os._exit(code if isinstance(code, int) else int(code is not None))
        previous(unraisable)

    hook._alphadpo_exits = True
    sys.unraisablehook = hook


def state_api_on_this_cluster() -> None:
    """Call in a Ray worker process: sets ``RAY_ADDRESS`` to this process's own cluster (its GCS address) where
    neither it nor ``RAY_API_SERVER_ADDRESS`` is set. Ray's state API, given no address, otherwise guesses:
    with several Ray instances on the machine it takes the last one ``ray start`` recorded, or fails, and with
    one it asks the dashboard address that cluster advertises. Ray Train's placement-group cleaner asks it, once
    a second, whether the run's controller is alive, and takes "not found" for dead: asked on another
    instance, it removed the run's placement group and the raylet killed the run's worker (seen in CI, beside
    another test's Ray). Worker processes only: a driver's RAY_ADDRESS chooses the cluster it joins."""
    import ray

    if os.environ.get("RAY_ADDRESS") or os.environ.get("RAY_API_SERVER_ADDRESS") or not ray.is_initialized():
        return
    os.environ["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address
