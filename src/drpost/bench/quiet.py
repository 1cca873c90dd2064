"""Quiet console for benchmark commands: ``quiet_libraries(verbose)`` hides the libraries' warnings, info logs and
progress bars (weight loading) so that a command's own lines and tables print cleanly; ``verbose=True`` shows them.
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings


@contextlib.contextmanager
def quiet_libraries(verbose: bool):
    """Hide warnings, transformers/datasets info logs and progress bars (weight loading) unless ``verbose``."""
    if verbose:
        yield
        return
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    old_env = os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS")
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    root_level = logging.getLogger().level
    logging.getLogger().setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()
        if old_env is None:
            os.environ.pop("HF_HUB_DISABLE_PROGRESS_BARS", None)
        else:
            os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = old_env
        logging.getLogger().setLevel(root_level)
