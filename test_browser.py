"""The web page in a real browser: Debian's headless Chromium under Playwright.

Off unless HTTP_BUCKET_BROWSER=1 (.ci/run turns it on for one interpreter);
needs playwright (requirements-browser.txt) and /usr/bin/chromium, else
the tests skip saying which is missing.  Screenshots go to the run's
screenshot folder (http_bucket_testing.screenshot_dir), named in the summary:
home, a finished multi-file upload, a tree listing, the phone width, dark.

What a person does is what the tests do: pick files and a folder, drop
files, watch the progress, follow the result links, download, cancel a
slow upload, filter the uploads, sort and delete in a listing, paste a
sha256sum line, log in with a token -- and the page must stay readable at
390 px, in dark mode, and with a file named like an HTML tag.
"""

import os
import shutil
import tempfile
import unittest

from http_bucket_testing import (Browser, POLL_TIMEOUT, ServerProcess, assert_store_consistent,
                                 save_screenshot, sha256, wait_until, zip_of)

FSYNC_OFF = ("--fsync", "false")  # speed: no test here outlives a power loss
XSS_NAME = "<img src=x onerror=alert(1)>.txt"
WAIT_MS = 20000                    # a page condition (an upload, a reload) may take this long


class BrowserTestCase(unittest.TestCase):
    """One server and one Chromium for the class; self.page() opens pages."""

    SERVER_ARGS = FSYNC_OFF
    SERVER_ENV = None

    @classmethod
    def setUpClass(cls):
        cls.browser = Browser().start()  # first: skips before a server starts
        cls.addClassCleanup(cls.browser.close)
        cls.tmp = tempfile.mkdtemp(prefix="http_bucket-browser-")
        cls.addClassCleanup(shutil.rmtree, cls.tmp, ignore_errors=True)
        cls.store = os.path.join(cls.tmp, "store")
        cls.server = ServerProcess(cls.store, cls.SERVER_ARGS, env=cls.SERVER_ENV).start()
        cls.addClassCleanup(cls.server.stop)

    def page(self, path="/", status=200, **options):
        """A new page (see Browser.new_page for ``options``) showing ``path``;
        its uncaught JavaScript errors collect in ``page.errors_seen``, and
        an alert() (an injected script) fails the test."""
        page = self.browser.new_page(**options)
        self.addCleanup(page.context.close)
        page.errors_seen = []
        page.on("pageerror", lambda error: page.errors_seen.append(str(error)))
        page.on("dialog", self.on_dialog)
        page.set_default_timeout(WAIT_MS)
        response = page.goto(self.server.url(path))
        self.assertEqual(response.status, status, path)
        return page

    def on_dialog(self, dialog):
        if dialog.type == "alert":
            self.fail("a script ran: alert(%r)" % dialog.message)
        dialog.accept()  # the delete confirmation

    def file(self, relpath, data):
        path = os.path.join(self.tmp, "given", relpath)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as handle:
            handle.write(data)
        return path

    def assertNoErrors(self, page):
        self.assertEqual(page.errors_seen, [])

    def wait_uploads_done(self, page, count):
        page.wait_for_function(
            "n => document.querySelector('#overall-text') && document.querySelector("
            "'#overall-text').textContent.startsWith(n + ' of ' + n + ' files')", arg=count)


class UploadTest(BrowserTestCase):

    def test_files_and_a_folder_with_a_zip_then_the_tree_and_a_download(self):
        page = self.page("/")
        print("screenshot:", save_screenshot(page, "home"))
        report = b"<testsuite tests='3'/>"
        members = {"logs/build.log": b"built\n" * 100, "logs/test.log": b"tested\n" * 50,
                   "../escape.txt": b"outside"}
        archive = zip_of(members)
        page.set_input_files("#pick-files", [self.file("report.xml", report),
                                             self.file("logs.zip", archive)])
        folder = os.path.join(self.tmp, "given", "site")
        self.file("site/index.html", b"<h1>hi</h1>")
        self.file("site/css/main.css", b"h1{color:red}")
        self.wait_uploads_done(page, 2)
        page.check("input[name=target][value=files]")
        page.fill("#folder", "web/build-1")
        page.set_input_files("#pick-folder", folder)
        self.wait_uploads_done(page, 4)
        self.assertEqual(page.eval_on_selector("#overall", "bar => bar.value === bar.max"), True)
        self.assertIn("4 of 4 files", page.text_content("#overall-text"))
        for path in ("site/index.html", "site/css/main.css"):
            with open(os.path.join(self.store, "files", "web", "build-1", path), "rb") as handle:
                self.assertTrue(handle.read())
        print("screenshot:", save_screenshot(page, "upload-finished"))
        # The archive's result links to its tree, which lists its members.
        tree_link = page.locator("#queue a", has_text="2 members")
        self.assertEqual(tree_link.count(), 1)
        skipped = page.locator("#queue details")
        skipped.locator("summary").click()
        self.assertIn("../escape.txt: '..' in path", skipped.text_content())
        tree_link.click()
        page.wait_for_load_state()
        page.click("text=logs/")
        page.wait_for_selector("text=build.log")
        self.assertIn("test.log", page.content())
        print("screenshot:", save_screenshot(page, "tree-listing"))
        self.assertNoErrors(page)

    def test_a_result_link_downloads_under_the_real_name(self):
        page = self.page("/")
        data = os.urandom(3000)
        page.set_input_files("#pick-files", [self.file("results-%s.xml" % os.getpid(), data)])
        self.wait_uploads_done(page, 1)
        link = page.locator("#queue a[download]").first
        with page.expect_download() as info:
            link.click()
        download = info.value
        self.assertEqual(download.suggested_filename, "results-%s.xml" % os.getpid())
        with open(download.path(), "rb") as handle:
            self.assertEqual(sha256(handle.read()), sha256(data))

    def test_metadata_retention_keep_and_a_picked_folder(self):
        self.server.request("PUT", "/files/picked/deeper/seed.txt", b"seed")
        page = self.page("/")
        page.check("input[name=target][value=files]")
        page.click("#pick-target")
        page.click("#picker-list button:has-text('picked/')")
        page.click("#picker-list button:has-text('deeper/')")
        self.assertEqual(page.text_content("#picker-path"), "files/picked/deeper/")
        page.click("#picker-use")
        self.assertEqual(page.input_value("#folder"), "picked/deeper")
        page.click("summary:has-text('Metadata')")
        page.click("#add-meta")
        page.fill(".meta-row .meta-key", "job")
        page.fill(".meta-row .meta-value", "4812")
        page.fill("#retain", "3")
        page.check("#keep")
        page.set_input_files("#pick-files", [self.file("tagged.txt", b"tagged")])
        self.wait_uploads_done(page, 1)
        record = self.server.request("GET", "/uploads?format=json&meta.job=4812").json()
        self.assertEqual(record["count"], 1)
        record = record["uploads"][0]
        self.assertEqual((record["names"], record["keep"]),
                         (["files/picked/deeper/tagged.txt"], True))
        self.assertTrue(record["expires"])

    def test_dropped_files_go_in_too(self):
        page = self.page("/")
        page.evaluate("""() => {
            const transfer = new DataTransfer();
            transfer.items.add(new File(['dropped one'], 'dropped-1.txt'));
            transfer.items.add(new File(['dropped two'], 'dropped-2.txt'));
            const drop = document.querySelector('#drop');
            drop.dispatchEvent(new DragEvent('drop', {dataTransfer: transfer, bubbles: true,
                                                      cancelable: true}));
        }""")
        self.wait_uploads_done(page, 2)
        for data in (b"dropped one", b"dropped two"):
            self.assertEqual(self.server.request("HEAD", "/checksum/" + sha256(data)).status, 200)

    def test_cancelling_a_slow_upload_keeps_nothing(self):
        page = self.page("/")
        client = page.context.new_cdp_session(page)
        client.send("Network.enable")
        client.send("Network.emulateNetworkConditions", {
            "offline": False, "latency": 0, "downloadThroughput": -1,
            "uploadThroughput": 1024 * 1024})  # 1 MiB/s: 24 MiB take long enough
        data = os.urandom(24 * 1024 * 1024)
        before = assert_store_consistent(self.store)
        page.set_input_files("#pick-files", [self.file("slow.bin", data)])
        page.wait_for_function("() => document.querySelector('#queue progress').value > 0")
        page.click("#queue button:has-text('Cancel')")
        page.wait_for_selector("text=cancelled: nothing of it is kept")

        def nothing_left():
            partial = os.listdir(os.path.join(self.store, "resumable"))
            return not [name for name in partial if os.path.exists(
                os.path.join(self.store, "resumable", name, "data"))]
        wait_until(nothing_left, POLL_TIMEOUT, what="the partial upload to be removed")
        after = assert_store_consistent(self.store)
        self.assertEqual(before.blobs, after.blobs)
        self.assertEqual(self.server.request("HEAD", "/checksum/" + sha256(data)).status, 404)

    def test_a_name_like_html_is_shown_as_text(self):
        page = self.page("/")
        page.set_input_files("#pick-files", [self.file(XSS_NAME, b"not a script")])
        self.wait_uploads_done(page, 1)
        self.assertIn(XSS_NAME, page.text_content("#queue"))
        page.goto(self.server.url("/"))
        self.assertIn(XSS_NAME, page.text_content("#uploads-table"))
        self.assertEqual(page.evaluate("document.querySelectorAll('img').length"), 0)
        self.assertNoErrors(page)


class FindAndBrowseTest(BrowserTestCase):

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        for name, size, job in (("alpha.xml", 10, "7"), ("beta.log", 3000, "7"),
                                ("gamma.xml", 200, "8")):
            reply = cls.server.request("PUT", "/files/browse/" + name, os.urandom(size),
                                       {"X-Bucket-Meta-Job": job})
            assert reply.status == 201, reply

    def test_the_uploads_list_and_its_filters(self):
        page = self.page("/")
        rows = page.locator("#uploads-table tbody tr")
        self.assertGreaterEqual(rows.count(), 3)
        page.fill("input[name=meta]", "job=7")
        page.click("form.filters button")
        page.wait_for_load_state()
        names = page.locator("#uploads-table tbody td.name a").all_text_contents()
        self.assertIn("alpha.xml", names)
        self.assertIn("beta.log", names)
        self.assertNotIn("gamma.xml", names)
        page.fill("input[name=name]", "*.xml")
        page.click("form.filters button")
        page.wait_for_load_state()
        self.assertEqual(page.locator("#uploads-table tbody tr").count(), 1)
        self.assertNoErrors(page)

    def test_browse_sort_and_delete(self):
        page = self.page("/files/browse/")
        crumbs = page.locator("nav.crumbs a").all_text_contents()
        self.assertEqual(crumbs, ["bucket", "files", "browse"])
        page.click("th a:has-text('size')")
        page.wait_for_load_state()
        order = page.locator("tbody td.name a").all_text_contents()
        self.assertEqual(order[:3], ["alpha.xml", "gamma.xml", "beta.log"])
        page.click("th a:has-text('size')")  # again: descending
        page.wait_for_load_state()
        self.assertEqual(page.locator("tbody td.name a").first.text_content(), "beta.log")
        size = page.locator("tbody td.num span").first
        self.assertEqual(size.get_attribute("title"), "3000 bytes")  # exact bytes on hover
        self.assertEqual(size.text_content(), "2.9 KiB")
        page.click("button[data-delete='files/browse/gamma.xml']")
        page.wait_for_selector("text=Deleted files/browse/gamma.xml")
        self.assertFalse(os.path.exists(os.path.join(self.store, "files", "browse",
                                                     "gamma.xml")))
        self.assertEqual(page.locator("button[data-delete='files/browse/gamma.xml']").count(), 0)
        self.assertNoErrors(page)

    def test_looking_up_a_pasted_sha256sum_line(self):
        data = b"looked up " + os.urandom(8)
        self.server.request("PUT", "/upload/looked.bin", data)
        page = self.page("/")
        page.fill("#lookup-text", "%s  looked.bin\n%s  missing.bin" % (sha256(data), "0" * 64))
        page.click("#lookup button")
        page.wait_for_selector("#lookup-result li.ok")
        stored = page.locator("#lookup-result li.ok").text_content()
        self.assertIn("stored", stored)
        self.assertIn("download looked.bin", stored)
        self.assertIn("not stored", page.locator("#lookup-result li.bad").text_content())
        self.assertNoErrors(page)

    def test_phone_width_and_dark_scheme(self):
        self.server.request("PUT", "/files/browse/" + "a-very-long-name-" * 12 + ".txt", b"x")
        for path in ("/", "/files/browse/", "/uploads"):
            page = self.page(path, viewport=(390, 844))
            overflow = page.evaluate("document.documentElement.scrollWidth - "
                                     "document.documentElement.clientWidth")
            self.assertLessEqual(overflow, 0, "%s scrolls sideways at 390 px" % path)
            # Nor does a table inside its box: the uploads stack into
            # labelled rows (when, file, size, ...) on a phone.
            boxes = page.evaluate("Array.from(document.querySelectorAll('.table-wrap'), "
                                  "w => w.scrollWidth - w.clientWidth)")
            if path != "/files/browse/":  # a listing's columns may scroll in their box
                self.assertTrue(boxes, path)
                self.assertLessEqual(max(boxes), 0, "%s: a table scrolls in its box" % path)
            if path == "/":
                labels = page.evaluate("Array.from(document.querySelectorAll("
                                       "'#uploads-table tbody tr:first-child td'), td => "
                                       "getComputedStyle(td, '::before').content)")
                self.assertEqual(labels[:3], ['"when"', '"file"', '"size"'])
                print("screenshot:", save_screenshot(page, "phone"))
        page = self.page("/", color_scheme="dark")
        background = page.evaluate("getComputedStyle(document.body).backgroundColor")
        channels = [int(part) for part in background[background.index("(") + 1:-1].split(",")[:3]]
        self.assertLess(sum(channels), 150, background)
        print("screenshot:", save_screenshot(page, "dark"))

    def test_favicon_and_cached_assets(self):
        page = self.page("/")
        icon = page.request.get(self.server.url("/favicon.ico"))
        self.assertEqual((icon.status, icon.headers["content-type"]), (200, "image/svg+xml"))
        style = page.locator("link[rel=stylesheet]").get_attribute("href")
        answer = page.request.get(self.server.url(style))
        self.assertIn("immutable", answer.headers["cache-control"])


class TokenTest(BrowserTestCase):
    SERVER_ENV = {"BUCKET_TOKEN": "write-secret", "BUCKET_READ_TOKEN": "read-secret"}

    def test_a_read_token_is_asked_once_in_a_form_and_kept_for_the_tab(self):
        page = self.page("/", status=401)
        self.assertIn("needs a token", page.text_content("main"))
        page.fill("#page-token", "wrong")
        page.click("#login-page button")
        page.wait_for_selector("text=That token does not allow reading")
        page.fill("#page-token", "read-secret")
        page.click("#login-page button")
        page.wait_for_selector("#drop")  # the start page, loaded again
        # Navigations (a listing, a download) carry it now, through the browser.
        response = page.goto(self.server.url("/files/"))
        self.assertEqual(response.status, 200)
        # Writing needs the write token: asked in the page's own form.
        page.goto(self.server.url("/"))
        page.set_input_files("#pick-files", [self.file("tokened.txt", b"with a token")])
        page.wait_for_selector("#login[open]")
        self.assertIn("write token", page.text_content("#login-reason"))
        page.fill("#login-token", "write-secret")
        page.click("#login-form button[type=submit]")
        self.wait_uploads_done(page, 1)
        self.assertEqual(self.server.request(
            "HEAD", "/checksum/" + sha256(b"with a token"),
            headers={"Authorization": "Bearer read-secret"}).status, 200)
        self.assertIn("may read and write", page.text_content("#who"))
        self.assertNoErrors(page)


if __name__ == "__main__":
    unittest.main()
