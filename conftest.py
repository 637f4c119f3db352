"""pytest hooks for the whole suite (tests stay runnable with plain unittest)."""

import sys


def pytest_terminal_summary(terminalreporter):
    """Name the folder of the screenshots this run saved, once at the end."""
    testing = sys.modules.get("http_bucket_testing")
    saved = getattr(testing, "SCREENSHOTS_SAVED", None)
    if saved:
        terminalreporter.write_line("screenshots: %d saved in %s"
                                    % (len(set(saved)), testing.screenshot_dir()))
