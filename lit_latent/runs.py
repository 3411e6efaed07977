"""The run folder and the error handling shared by the entry points."""

from __future__ import annotations

import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

from lit_latent.cli import to_yaml
from lit_latent.config import UserError


def prepare_run_dir(cfg: Any) -> Path:
    """Create (or reopen, to resume) the run folder and save the resolved config in it."""
    if cfg.run_dir is None:
        cfg.run_dir = str(Path("runs") / f"{time.strftime('%Y%m%d-%H%M%S')}-{cfg.config_name}")
    run_dir = Path(cfg.run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"config key run_dir: {run_dir} exists and is not a directory")
    run_dir.mkdir(parents=True, exist_ok=True)
    hold_lock(run_dir, "run_dir")
    saved = run_dir / "config.yaml"
    text = to_yaml(cfg)
    if saved.is_file() and saved.read_text(encoding="utf-8") != text:
        # a resumed run with other settings: keep the old config beside the new one
        saved.rename(run_dir / f"config.{time.strftime('%Y%m%d-%H%M%S')}.yaml")
    saved.write_text(text, encoding="utf-8")
    return run_dir


LOCK = "lock"
# set by the process that holds a folder's lock: the DDP ranks it launches (which inherit the
# environment) write into the same run, under that lock
LOCK_HOLDER_ENV = "LIT_LATENT_LOCK_HOLDER"
_held: dict[Path, int] = {}  # folder -> open lock file descriptor, kept open for the process's life


def hold_lock(folder: Path, key: str) -> None:
    """One writer per folder: an advisory ``flock`` on ``<folder>/lock``, held until this process
    exits (the kernel releases it then, so a killed run's lock never blocks a resume). A second
    process refuses in one line naming the folder and the holder's pid; the ranks of a DDP launch
    accept their launcher's lock. ``key``: the config key that named the folder."""
    import fcntl

    folder = Path(folder).resolve()
    if folder in _held:
        return
    path = folder / LOCK
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise OSError(e.errno, e.strerror, str(path)) from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "?"
        os.close(fd)
        if holder in os.environ.get(LOCK_HOLDER_ENV, "").split(","):
            return  # a rank of the launch that holds it
        raise UserError(f"config key {key}: {folder} is in use by another process (pid {holder}, {path}): "
                        "wait for it to finish or stop it; one process writes a run folder at a time") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
    _held[folder] = fd
    holders = [h for h in os.environ.get(LOCK_HOLDER_ENV, "").split(",") if h]
    if str(os.getpid()) not in holders:
        os.environ[LOCK_HOLDER_ENV] = ",".join(holders + [str(os.getpid())])


# what launchers (Lightning's, torchrun, SLURM) tell a rank about its launch
LAUNCH_ENV = ("RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
              "MASTER_PORT", "TORCHELASTIC_RUN_ID", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID", "SLURM_JOB_NAME")


def launched_as_rank_zero() -> bool:
    """Whether this process is global rank 0 of its launch, known before Lightning sets up the
    process group (``trainer.global_rank`` is 0 in every process until then): torchrun sets
    ``RANK``; Lightning's launcher sets ``NODE_RANK`` and ``LOCAL_RANK`` for the ranks it starts."""
    if "RANK" in os.environ:
        return os.environ["RANK"] == "0"
    return os.environ.get("NODE_RANK", "0") == "0" and os.environ.get("LOCAL_RANK", "0") == "0"


@contextmanager
def outside_the_launch() -> Iterator[None]:
    """Hide the launch's environment, so that a Trainer made inside a rank (LatentEvolve's
    nightly weaver fit) is a one-process Trainer instead of joining or re-launching the job."""
    saved = {k: os.environ.pop(k) for k in LAUNCH_ENV if k in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


def quiet_lightning() -> None:
    """Keep Lightning's banner tips and known deprecation chatter out of the run's output."""
    import logging
    import warnings

    logging.getLogger("lightning.pytorch.utilities.rank_zero").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")


class RankLost(Exception):
    """A collective between the ranks of a DDP run failed: another rank stopped (killed, out of memory)."""


@contextmanager
def between_ranks(what: str) -> Iterator[None]:
    """Run a collective; a rank that died is one line naming ``what`` waited for, not a traceback
    from inside the backend. Finished batches are on disk, so the rerun resumes them."""
    try:
        yield
    except RuntimeError as err:
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            raise
        reason = (str(err).splitlines() or [type(err).__name__])[0].split(". ")[0]
        raise RankLost(f"{what}: another rank of this run stopped ({reason})") from None


class StopRequested(Exception):
    """SIGTERM or Ctrl-C arrived: the batch in flight was finished and written, then the run stopped."""


class GracefulStop:
    """First SIGTERM / SIGINT: finish and write the current batch, then stop. A second Ctrl-C stops at once.

    Used as a Lightning callback (kept last, after the writer): it checks the flag at each
    batch end.
    """

    def __init__(self, lockstep: bool = False):
        self.requested: Optional[str] = None
        # ranks that meet after every batch (LatentEvolve under DDP) must stop after the same one
        self.lockstep = lockstep

    def install(self) -> None:
        import signal
        import threading

        if threading.current_thread() is not threading.main_thread():
            return

        def handler(signum, frame):
            if self.requested is not None and signum == signal.SIGINT:
                raise KeyboardInterrupt
            self.requested = signal.Signals(signum).name
            print(f"\n{self.requested} received: stopping after the current batch (Ctrl-C again to stop now)", file=sys.stderr)

        signal.signal(signal.SIGTERM, handler)
        signal.signal(signal.SIGINT, handler)

    def callback(self):
        from lightning.pytorch.callbacks import Callback

        stop = self

        class _Check(Callback):
            def on_predict_start(self, trainer, pl_module):
                if stop.lockstep and trainer.world_size > 1:
                    # Lightning's SIGTERM handler, set when predict starts, broadcasts from inside the
                    # handler, a collective no other rank joins: it would hang against our per-batch
                    # ones. Ours only sets the flag, which the reduce below takes to every rank.
                    stop.install()

            def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
                requested = stop.requested is not None
                if stop.lockstep and trainer.world_size > 1:
                    # a signal may reach one rank only (kill PID), or the ranks at different batches
                    with between_ranks("stop requests"):
                        requested = trainer.strategy.reduce_boolean_decision(requested, all=False)
                if requested:
                    raise StopRequested(stop.requested or "a signal to another rank")

            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
                if stop.requested is not None:
                    trainer.should_stop = True

        return _Check()


def run_entry_point(main: Callable[[list[str]], Any], argv: list[str]) -> int:
    """Run ``main``; bad input is one line on stderr and exit code 2, never a traceback."""
    try:
        main(argv)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # disk full, read-only folder, permission denied: the path and the reason
        first = _first_os_error(e)
        where = f"{first.filename}: " if first.filename else ""
        print(f"error: {where}{first.strerror or first}", file=sys.stderr)
        return 1
    except RankLost as e:
        print(f"error: {e}; finished problems are saved: rerun with the same run_dir=... to resume", file=sys.stderr)
        return 1
    except StopRequested as e:
        print(f"stopped on {e}: finished problems are saved; rerun with the same run_dir=... to resume", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("interrupted: finished problems are saved; rerun with the same run_dir=... to resume", file=sys.stderr)
        return 130
    return 0


def _first_os_error(e: OSError) -> OSError:
    """The failure that started it: a full disk fails the first write (ours, naming its file),
    then the loggers' flushes during the shutdown (which name none)."""
    chain, seen = [], e
    while seen is not None:
        if isinstance(seen, OSError):
            chain.append(seen)
        seen = seen.__context__
    return next((x for x in reversed(chain) if x.filename), e)
