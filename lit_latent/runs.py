"""The run folder and the error handling shared by the entry points."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

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
    saved = run_dir / "config.yaml"
    text = to_yaml(cfg)
    if saved.is_file() and saved.read_text(encoding="utf-8") != text:
        # a resumed run with other settings: keep the old config beside the new one
        saved.rename(run_dir / f"config.{time.strftime('%Y%m%d-%H%M%S')}.yaml")
    saved.write_text(text, encoding="utf-8")
    return run_dir


def quiet_lightning() -> None:
    """Keep Lightning's banner tips and known deprecation chatter out of the run's output."""
    import logging
    import warnings

    logging.getLogger("lightning.pytorch.utilities.rank_zero").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")


class StopRequested(Exception):
    """SIGTERM or Ctrl-C arrived: the batch in flight was finished and written, then the run stopped."""


class GracefulStop:
    """First SIGTERM / SIGINT: finish and write the current batch, then stop. A second Ctrl-C stops at once.

    Used as a Lightning callback (kept last, after the writer): it checks the flag at each
    batch end.
    """

    def __init__(self):
        self.requested: Optional[str] = None

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
            def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
                if stop.requested is not None:
                    raise StopRequested(stop.requested)

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
    except StopRequested as e:
        print(f"stopped on {e}: finished problems are saved; rerun with the same run_dir=... to resume", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("interrupted: finished problems are saved; rerun with the same run_dir=... to resume", file=sys.stderr)
        return 130
    return 0
