"""The web page in a real browser: Debian's headless Chromium under Playwright.

Off unless HTTP_BUCKET_BROWSER=1 (.ci/run turns it on for one interpreter);
needs playwright (requirements-browser.txt) and /usr/bin/chromium, else
the tests skip saying which is missing.  Screenshots go to the run's
screenshot folder (http_bucket_testing.screenshot_dir), named in the summary.
"""

import shutil
import tempfile
import unittest

from http_bucket_testing import Browser, ServerProcess, save_screenshot

FSYNC_OFF = ("--fsync", "false")  # speed: no test here outlives a power loss


class BrowserTestCase(unittest.TestCase):
    """One server and one Chromium for the class; self.page() opens pages."""

    @classmethod
    def setUpClass(cls):
        cls.browser = Browser().start()  # first: skips before a server starts
        cls.addClassCleanup(cls.browser.close)
        cls.tmp = tempfile.mkdtemp()
        cls.addClassCleanup(shutil.rmtree, cls.tmp, ignore_errors=True)
        cls.server = ServerProcess(cls.tmp, FSYNC_OFF).start()
        cls.addClassCleanup(cls.server.stop)

    def page(self, path="/", **options):
        """A new page (see Browser.new_page for ``options``) showing ``path``;
        its uncaught JavaScript errors collect in ``page.errors_seen``."""
        page = self.browser.new_page(**options)
        self.addCleanup(page.context.close)
        page.errors_seen = []
        page.on("pageerror", lambda error: page.errors_seen.append(str(error)))
        response = page.goto(self.server.url(path))
        self.assertEqual(response.status, 200, path)
        return page


class IndexPageTest(BrowserTestCase):

    def test_page_loads_with_a_file_input(self):
        page = self.page("/")
        self.assertIn("http_bucket", page.title())
        self.assertGreaterEqual(page.locator("input[type=file]").count(), 1)
        self.assertEqual(page.errors_seen, [])
        print("screenshot:", save_screenshot(page, "index-light"))


if __name__ == "__main__":
    unittest.main()
