"""Other clients against http_bucket: tus-js-client (Node) for resumable uploads.

Off unless HTTP_BUCKET_INTEROP=1 (.ci/run turns it on for one interpreter);
needs node and npm (interop/node_modules is installed with npm ci on first
use), else the tests skip saying which is missing.  The driver is
interop/tus-upload.cjs (``node interop/tus-upload.cjs --help``), run
through http_bucket_testing.tus_upload.
"""

import unittest

from http_bucket_testing import interop_node, tus_upload


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


if __name__ == "__main__":
    unittest.main()
