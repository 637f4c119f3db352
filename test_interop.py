"""Other clients against http_bucket: tus-js-client (Node) for resumable uploads.

Off unless HTTP_BUCKET_INTEROP=1 (.ci/run turns it on for one interpreter);
needs node and npm (interop/node_modules is installed with npm ci on first
use), else the tests skip saying which is missing.  The driver is
interop/tus-upload.cjs (``node interop/tus-upload.cjs --help``), run
through http_bucket_testing.tus_upload.
"""

import hashlib
import os
import shutil
import tempfile
import unittest

from http_bucket_testing import ServerProcess, assert_store_consistent, interop_node, tus_upload


class TusDriverTest(unittest.TestCase):

    def test_driver_runs_with_the_locked_tus_js_client(self):
        node = interop_node()
        run = tus_upload("--version")
        self.assertEqual(run.returncode, 0, run)
        self.assertEqual(run.result, {"driver": "1", "tus-js-client": "4.3.1",
                                      "node": node.version})
        run = tus_upload("--help")
        self.assertEqual(run.returncode, 0, run)
        self.assertIn("--protocol", run.stdout)
        run = tus_upload("--protocol", "ietf-draft-99", "a", "b")  # a usage error
        self.assertEqual((run.returncode, run.result), (2, None), run)
        self.assertIn("--protocol", run.stderr)


class TusJsClientTest(unittest.TestCase):
    """Resumable uploads by tus-js-client 4.3.1, an independent implementation
    of the draft: its interop versions 6 (ietf-draft-05) and 5 (-03), with
    its own creation by POST, chunked appends, a resume after an abort, and
    cancellation."""

    @classmethod
    def setUpClass(cls):
        interop_node()  # skips the class when node or the package is missing
        cls.directory = tempfile.mkdtemp(prefix="http_bucket-interop-")
        cls.server = ServerProcess(cls.directory, ("--fsync", "false"),
                                   env={"BUCKET_TOKEN": "writer"}).start()
        cls.data = os.urandom(700 * 1024 + 11)
        cls.path = os.path.join(cls.directory, "source.bin")
        with open(cls.path, "wb") as handle:
            handle.write(cls.data)

    @classmethod
    def tearDownClass(cls):
        cls.server.stop()
        shutil.rmtree(cls.directory, ignore_errors=True)

    def upload(self, endpoint, *options):
        run = tus_upload("--header", "Authorization: Bearer writer", *options,
                         self.path, self.server.url(endpoint))
        self.assertEqual(run.returncode, 0, run)
        self.assertTrue(run.result["ok"], run)
        return run.result

    def assertStored(self, relpath):
        with open(os.path.join(self.directory, relpath), "rb") as handle:
            self.assertEqual(hashlib.sha256(handle.read()).hexdigest(),
                             hashlib.sha256(self.data).hexdigest())

    def test_both_draft_versions_in_chunks(self):
        for protocol in ("ietf-draft-05", "ietf-draft-03"):
            with self.subTest(protocol):
                name = "files/tus/%s.bin" % protocol
                result = self.upload("/" + name, "--protocol", protocol,
                                     "--chunk-size", str(128 * 1024))
                self.assertEqual(result["offset"], len(self.data))
                self.assertRegex(result["url"], r"/resumable/[A-Za-z0-9_-]{32}$")
                self.assertStored(name)
        assert_store_consistent(self.directory)

    def test_data_in_the_creation_request_and_put_creation(self):
        self.upload("/files/tus/with-data.bin", "--with-data")
        self.assertStored("files/tus/with-data.bin")
        self.upload("/files/tus/put.bin", "--creation-method", "PUT", "--chunk-size", "100000")
        self.assertStored("files/tus/put.bin")

    def test_resume_after_an_abort_in_another_client_process(self):
        first = self.upload("/upload/resumed.bin", "--chunk-size", str(100 * 1024),
                            "--abort-after-chunks", "3")
        self.assertTrue(first["aborted"])
        self.assertEqual(first["offset"], 300 * 1024)
        second = self.upload("/upload/resumed.bin", "--chunk-size", str(100 * 1024),
                             "--upload-url", first["url"])
        self.assertEqual(second["offset"], len(self.data))
        head = self.server.request("HEAD", "/checksum/" + hashlib.sha256(self.data).hexdigest())
        self.assertEqual(head.status, 200)

    def test_cancellation(self):
        first = self.upload("/upload/cancelled.bin", "--chunk-size", str(100 * 1024),
                            "--abort-after-chunks", "2")
        token = first["url"].rsplit("/", 1)[1]
        self.assertTrue(os.path.isdir(os.path.join(self.directory, "resumable", token)))
        run = tus_upload("--header", "Authorization: Bearer writer", "--upload-url",
                         first["url"], "--chunk-size", str(100 * 1024), "--terminate",
                         self.path, self.server.url("/upload/cancelled.bin"))
        self.assertEqual(run.returncode, 0, run)
        self.assertFalse(os.path.exists(os.path.join(self.directory, "resumable", token)))


if __name__ == "__main__":
    unittest.main()
