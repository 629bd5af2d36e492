"""The one place where embed_assets turns off output it does not want a user to see.

- Progress bars of the libraries underneath (transformers' "Loading weights", sentence-transformers' "Computing
  widget examples", tqdm in general, all honouring ``TQDM_DISABLE``): a run reports progress through its own
  log lines instead (rate, ETA). The trainer's printed log dicts are removed in :func:`embed_assets.training.train`
  (its ``PrinterCallback``), which reports through the run's logger.
- Dagster's ``BetaWarning`` for ``Output(data_version=...)``: the project uses content data versions on purpose
  (downstream goes stale exactly when content changes), so the warning, repeated per asset and run, says
  nothing a user can act on.

:func:`configure` is called when the code location loads (``embed_assets/definitions.py``), so every Dagster
process (CLI, webserver, daemon, step workers) gets it; library users may call it themselves.
"""

from __future__ import annotations

import functools
import os
import warnings


def configure() -> None:
    """Silence third-party progress bars and the warnings listed in the module docstring (idempotent).

    ``TQDM_DISABLE=0`` in the environment keeps the bars.
    """
    if os.environ.get("TQDM_DISABLE", "1") != "0":
        os.environ["TQDM_DISABLE"] = "1"  # for processes started from here
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        _disable_tqdm()
    warnings.filterwarnings("ignore", message=r".*Parameter `data_version` of initializer `Output.__init__`")


def _disable_tqdm() -> None:
    """Make ``disable=True`` the default of every tqdm bar in this process.

    tqdm reads ``TQDM_DISABLE`` once, when it is first imported (Dagster imports it before this module runs), so
    the environment variable alone does not reach this process's bars; the libraries' own switches cover only
    some of them.
    """
    from tqdm import std

    if not getattr(std.tqdm.__init__, "_embed_assets_quiet", False):
        quiet_init = functools.partialmethod(std.tqdm.__init__, disable=True)
        quiet_init._embed_assets_quiet = True  # type: ignore[attr-defined]
        std.tqdm.__init__ = quiet_init  # type: ignore[method-assign]
