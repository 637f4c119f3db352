"""pytest hooks for the whole suite (tests stay runnable with plain unittest).

The suite runs in 4 processes (pytest-xdist, ``-n 4`` in pyproject.toml):
most tests wait on a server subprocess, so 4 keep 2 cores busy.  The
screenshots of the browser tests go to one folder for the whole run, chosen
here before the worker processes start (they inherit it), and named once at
the end.
"""

import os
import shutil
import tempfile

SCREENSHOTS_VARIABLE = "HTTP_BUCKET_SCREENSHOTS"  # as in http_bucket_testing


def pytest_configure(config):
    if hasattr(config, "workerinput") or os.environ.get(SCREENSHOTS_VARIABLE):
        return
    config.screenshots_made = tempfile.mkdtemp(prefix="http_bucket-screenshots-")
    os.environ[SCREENSHOTS_VARIABLE] = config.screenshots_made


def pytest_terminal_summary(terminalreporter, config):
    """Name the folder of the screenshots this run saved, once at the end."""
    folder = os.environ.get(SCREENSHOTS_VARIABLE)
    saved = [name for name in os.listdir(folder) if name.endswith(".png")] \
        if folder and os.path.isdir(folder) else []
    if saved:
        terminalreporter.write_line("screenshots: %d saved in %s" % (len(saved), folder))


def pytest_unconfigure(config):
    """The folder made here goes when the run saved nothing in it."""
    made = getattr(config, "screenshots_made", None)
    if made and os.path.isdir(made) and not os.listdir(made):
        shutil.rmtree(made, ignore_errors=True)
