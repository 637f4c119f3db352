"""Resumable uploads (issue 13): the IETF draft "Resumable Uploads for HTTP".

A hand-written raw-socket client speaks the draft (http.client takes a 104
for the final answer, so interim responses are read by hand) against real
server processes: creation with 104 and Location, offset retrieval, appends
with offset checks, completion with the same receipt as a one-shot upload,
cancellation, expiry, every refusal, the cut connection at random offsets,
resuming after a restart and through a second process.  The interop test
with tus-js-client is in test_interop.py.

    python3 -m unittest -v test_resumable
"""

import base64
import hashlib
import json
import os
import random
import shutil
import socket
import tempfile
import unittest

from http_bucket_testing import (POLL_TIMEOUT, ServerProcess, assert_store_consistent,
                                 read_raw_response, sha256, wait_until)

KIB = 1024
MIB = 1024 * 1024


def repr_digest(data):
    return "sha-256=:%s:" % base64.b64encode(hashlib.sha256(data).digest()).decode()


class Exchange:
    """One request on a raw socket and what came back: ``interim`` (the 1xx
    responses, in order) and ``final`` (a Reply, or None when the server
    closed without one)."""

    def __init__(self, interim, final):
        self.interim = interim
        self.final = final


def exchange(server, method, path, headers=None, body=b"", cut_after=None, version=None,
             send_length=None):
    """Send a request with ``body`` (all of it, or only ``cut_after`` bytes,
    then close: a dropped connection).  Content-Length is the whole body's
    (``send_length`` overrides it)."""
    fields = {"Host": "t", "Content-Length": str(len(body) if send_length is None
                                                  else send_length)}
    if version is not None:
        fields["Upload-Draft-Interop-Version"] = str(version)
    fields.update(headers or {})
    head = "%s %s HTTP/1.1\r\n%s\r\n\r\n" % (method, path, "\r\n".join(
        "%s: %s" % item for item in fields.items() if item[1] is not None))
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=30)
    try:
        sock.sendall(head.encode("latin-1"))
        stream = sock.makefile("rb")
        if cut_after is not None:
            sock.sendall(body[:cut_after])
            interim = []
            sock.settimeout(0.5)
            try:  # the 104 (and 100) before the cut, when they came
                while True:
                    reply = read_raw_response(stream)
                    interim.append(reply)
            except (OSError, ConnectionError, ValueError):
                pass
            return Exchange(interim, None)
        sock.sendall(body)
        interim = []
        while True:
            reply = read_raw_response(stream)
            if reply.status >= 200:
                return Exchange(interim, reply)
            interim.append(reply)
    finally:
        sock.close()


class ResumableCase(unittest.TestCase):

    ARGS = ("--fsync", "false")
    ENV = None

    @classmethod
    def setUpClass(cls):
        cls.directory = tempfile.mkdtemp(prefix="http_bucket-resumable-")
        cls.server = ServerProcess(cls.directory, cls.ARGS, env=cls.ENV).start()

    @classmethod
    def tearDownClass(cls):
        cls.server.stop()
        shutil.rmtree(cls.directory, ignore_errors=True)

    def create(self, path, body, complete=False, version=10, headers=None, cut_after=None,
               send_length=None):
        fields = {"Upload-Complete": "?1" if complete else "?0"}
        fields.update(headers or {})
        return exchange(self.server, "PUT", path, fields, body, cut_after, version, send_length)

    def append(self, location, offset, body, complete=False, version=10, headers=None,
               cut_after=None):
        fields = {"Upload-Offset": str(offset), "Upload-Complete": "?1" if complete else "?0",
                  "Content-Type": "application/partial-upload"}
        fields.update(headers or {})
        return exchange(self.server, "PATCH", location, fields, body, cut_after, version)

    def offset(self, location, version=10):
        result = exchange(self.server, "HEAD", location, version=version, send_length=None)
        return result.final

    def wait_offset(self, location, expected):
        """The offset once the server noticed the cut (bounded wait)."""
        return wait_until(lambda: int(self.offset(location).headers.get("upload-offset", -1))
                          == expected and expected, POLL_TIMEOUT,
                          what="offset %d" % expected)

    def assertRefused(self, reply, status, fragment):
        self.assertEqual(reply.status, status, reply)
        body = json.loads(reply.body)
        self.assertEqual((body["code"], body["status"]), (status, "error"))
        self.assertIn(fragment, body["error"])
        return body


class CreationTest(ResumableCase):

    def test_a_complete_request_is_answered_like_a_plain_upload_plus_location(self):
        data = os.urandom(300 * KIB)
        result = self.create("/upload/whole.bin", data, complete=True,
                             headers={"Repr-Digest": repr_digest(data)})
        self.assertEqual([reply.status for reply in result.interim], [104])
        announced = result.interim[0].headers
        location = announced["location"]
        self.assertRegex(location, r"^/resumable/[A-Za-z0-9_-]{32}$")  # 192 random bits
        self.assertEqual(announced["upload-draft-interop-version"], "10")
        self.assertIn("max-age=86400", announced["upload-limit"])
        final = result.final
        self.assertEqual(final.status, 201, final)
        self.assertEqual(final.headers["location"], location)
        self.assertEqual(final.headers["upload-complete"], "?1")
        self.assertEqual(final.headers["upload-offset"], str(len(data)))
        receipt = json.loads(final.body)
        plain = self.server.request("PUT", "/upload/whole.bin", data).json()
        for key in ("name", "size", "mime", "checksums", "path", "url"):
            self.assertEqual(receipt["files"][0][key], plain["files"][0][key], key)
        self.assertEqual(receipt["checksum"], plain["checksum"])
        # The upload resource says it is complete; GET gives the receipt.
        head = self.offset(location)
        self.assertEqual((head.status, head.headers["upload-complete"],
                          head.headers["upload-offset"]), (204, "?1", str(len(data))))
        self.assertEqual(json.loads(exchange(self.server, "GET", location).final.body)["files"][0]
                         ["checksums"]["sha256"], sha256(data))

    def test_no_interim_response_without_a_draft_version(self):
        data = os.urandom(1000)
        result = self.create("/upload/final-rfc.bin", data, complete=False, version=None)
        self.assertEqual(result.interim, [])
        self.assertEqual(result.final.status, 201)
        self.assertEqual(result.final.headers["upload-complete"], "?0")
        self.assertEqual(result.final.headers["upload-offset"], "1000")

    def test_options_announces_resumable_uploads(self):
        for path in ("/upload/x", "/files/a/b", "*"):
            result = exchange(self.server, "OPTIONS", path, version=6, send_length=0)
            self.assertEqual(result.final.status, 204, path)
            headers = result.final.headers
            self.assertEqual(headers["accept-patch"], "application/partial-upload")
            self.assertIn("max-size=17179869184", headers["upload-limit"])
            self.assertIn("expires=", headers["upload-limit"])  # interop 6 named max-age so
            self.assertIn("PATCH" if path == "*" else "PUT", headers["allow"])


class AppendTest(ResumableCase):

    def test_cut_at_ten_random_offsets_and_resumed_gives_the_bytes_and_one_blob(self):
        data = os.urandom(3 * MIB + 12345)
        rng = random.Random(7)
        cuts = sorted(rng.sample(range(1, len(data)), 10))
        result = self.create("/files/resumed/big.bin", data, cut_after=cuts[0],
                             headers={"Repr-Digest": repr_digest(data),
                                      "X-Bucket-Meta-Run": "cuts"})
        location = result.interim[0].headers["location"]
        offset = self.wait_offset(location, cuts[0])
        for cut in cuts[1:]:
            self.append(location, offset, data[offset:], cut_after=cut - offset)
            offset = self.wait_offset(location, cut)
        final = self.append(location, offset, data[offset:], complete=True).final
        self.assertEqual(final.status, 201, final)
        self.assertEqual(final.headers["upload-complete"], "?1")
        receipt = json.loads(final.body)
        self.assertEqual(receipt["files"][0]["checksums"]["sha256"], sha256(data))
        self.assertEqual(receipt["files"][0]["checksums"]["md5"], hashlib.md5(data).hexdigest())
        self.assertEqual(receipt["files"][0]["name_path"], "files/resumed/big.bin")
        with open(os.path.join(self.directory, "files", "resumed", "big.bin"), "rb") as handle:
            self.assertEqual(sha256(handle.read()), sha256(data))
        contents = assert_store_consistent(self.directory)
        self.assertEqual([b for b in contents.blobs if b == sha256(data)], [sha256(data)])
        record = self.server.request("GET", "/uploads?format=json&meta.run=cuts").json()
        self.assertEqual(record["uploads"][0]["sha256"], sha256(data))
        left = os.listdir(os.path.join(self.directory, "resumable", location.rsplit("/", 1)[1]))
        self.assertNotIn("data", left)  # the bytes are the blob now; the receipt stays a while
        self.assertIn("done.json", left)

    def test_appends_in_pieces_and_the_incomplete_answers(self):
        data = os.urandom(200 * KIB)
        created = self.create("/upload/pieces.bin", data[:50 * KIB],
                              headers={"Upload-Length": str(len(data))})
        self.assertEqual(created.final.status, 201)
        location = created.final.headers["location"]
        self.assertEqual(created.final.headers["upload-length"], str(len(data)))
        piece = self.append(location, 50 * KIB, data[50 * KIB:120 * KIB]).final
        self.assertEqual((piece.status, piece.headers["upload-complete"],
                          piece.headers["upload-offset"]), (204, "?0", str(120 * KIB)))
        old = self.append(location, 120 * KIB, data[120 * KIB:150 * KIB], version=6).final
        self.assertEqual(old.status, 201)  # interop 6 answered 201 to an append
        head = self.offset(location)
        self.assertEqual((head.status, head.headers["upload-offset"],
                          head.headers["upload-length"], head.headers["cache-control"]),
                         (204, str(150 * KIB), str(len(data)), "no-store"))
        done = self.append(location, 150 * KIB, data[150 * KIB:], complete=True).final
        self.assertEqual(done.status, 201, done)
        self.assertEqual(json.loads(done.body)["files"][0]["size"], len(data))


class RefusalTest(ResumableCase):

    def started(self, size=1000, **options):
        data = os.urandom(size)
        created = self.create("/upload/refusals.bin", data, **options)
        return created.final.headers["location"], data

    def test_offsets_lengths_and_completion(self):
        location, data = self.started(headers={"Upload-Length": "5000"})
        checks = [
            (dict(offset=2000, body=b"x"), 409, "Upload-Offset 2000 does not match the upload's "
                                                "offset 1000"),
            (dict(offset=500, body=b"x"), 409, "append from 1000"),
            (dict(offset="-5", body=b"x"), 400, "Upload-Offset must be a non-negative integer"),
            (dict(offset="1e3", body=b"x"), 400, "Upload-Offset must be a non-negative integer"),
            (dict(offset=1000, body=b"x", headers={"Upload-Length": "6000"}), 400,
             "Upload-Length 6000 differs from the 5000 bytes stated before"),
            (dict(offset=1000, body=b"x" * 4001), 400, "the upload's length is 5000 bytes"),
            (dict(offset=1000, body=b"x", headers={"Content-Type": "text/plain"}), 415,
             "application/partial-upload"),
            (dict(offset=1000, body=b"x", headers={"Upload-Complete": None}), 400,
             "an append needs Upload-Complete"),
            (dict(offset=1000, body=b"x", version=99), 400,
             "Upload-Draft-Interop-Version 99 is not supported"),
        ]
        expected_offset = 1000
        for options, status, fragment in checks:
            with self.subTest(fragment):
                options = dict(options)
                reply = self.append(location, options.pop("offset"), options.pop("body"),
                                    **options).final
                body = self.assertRefused(reply, status, fragment)
                if status == 409:
                    self.assertEqual(reply.headers["upload-offset"], str(expected_offset))
                    self.assertEqual((body["type"].rsplit("#", 1)[1], body["expected-offset"]),
                                     ("mismatching-upload-offset", expected_offset))
                if "length is 5000" in fragment:
                    expected_offset = 5000  # what fitted was kept: nothing is lost
                self.assertEqual(self.offset(location).headers["upload-offset"],
                                 str(expected_offset), "a refusal lost or added bytes")
        # What fitted (4000 bytes of x) was kept; the upload completes at 5000.
        done = self.append(location, 5000, b"", complete=True).final
        self.assertEqual(done.status, 201, done)
        again = self.append(location, 5000, b"", complete=True).final
        body = self.assertRefused(again, 410, "already complete")
        self.assertTrue(body["type"].endswith("#completed-upload"))
        more = self.append(location, 5000, b"more", complete=True).final
        self.assertTrue(self.assertRefused(more, 400, "nothing more can be appended")["type"]
                        .endswith("#inconsistent-upload-length"))

    def test_unknown_and_malformed_locations_are_404(self):
        for location in ("/resumable/" + "A" * 32, "/resumable/short", "/resumable/"):
            for method in ("HEAD", "PATCH", "DELETE"):
                result = exchange(self.server, method, location, {
                    "Upload-Offset": "0", "Upload-Complete": "?1",
                    "Content-Type": "application/partial-upload"})
                self.assertEqual(result.final.status, 404, (method, location))

    def test_cancel_removes_the_partial_data(self):
        location, _ = self.started()
        token = location.rsplit("/", 1)[1]
        self.assertTrue(os.path.isdir(os.path.join(self.directory, "resumable", token)))
        result = exchange(self.server, "DELETE", location)
        self.assertEqual((result.final.status, result.final.body), (204, b""))
        self.assertFalse(os.path.exists(os.path.join(self.directory, "resumable", token)))
        self.assertEqual(self.offset(location).status, 404)

    def test_a_digest_mismatch_at_completion_keeps_nothing(self):
        data = os.urandom(5000)
        created = self.create("/upload/wrong.bin", data[:2000],
                              headers={"Repr-Digest": repr_digest(b"other")})
        location = created.final.headers["location"]
        done = self.append(location, 2000, data[2000:], complete=True).final
        self.assertRefused(done, 400, "Repr-Digest sha-256 mismatch")
        self.assertEqual(self.offset(location).status, 404)
        self.assertEqual(self.server.request("HEAD", "/checksum/" + sha256(data)).status, 404)

    def test_an_unsupported_draft_version_is_said_clearly(self):
        result = self.create("/upload/v3.bin", b"x", version=3)
        self.assertRefused(result.final, 400, "this server speaks 5 to 10")


class TokenTest(ResumableCase):
    ENV = {"BUCKET_TOKEN": "writer", "BUCKET_READ_TOKEN": "reader"}

    def test_upload_resources_need_the_write_token(self):
        data = os.urandom(500)
        created = self.create("/upload/t.bin", data, headers={"Authorization": "Bearer writer"})
        location = created.final.headers["location"]
        for auth, status in ((None, 401), ("Bearer reader", 401), ("Bearer writer", 204)):
            result = exchange(self.server, "HEAD", location, {"Authorization": auth})
            self.assertEqual(result.final.status, status, auth)
        result = exchange(self.server, "PATCH", location, {
            "Authorization": "Bearer reader", "Upload-Offset": "500", "Upload-Complete": "?1",
            "Content-Type": "application/partial-upload"})
        self.assertEqual(result.final.status, 401)


class RestartAndProcessesTest(unittest.TestCase):

    def setUp(self):
        self.directory = tempfile.mkdtemp(prefix="http_bucket-resumable2-")
        self.addCleanup(shutil.rmtree, self.directory, True)

    def server(self, *args):
        server = ServerProcess(self.directory, ("--fsync", "false") + args).start()
        self.addCleanup(server.stop)
        return server

    def test_resume_after_a_restart_and_through_a_second_process(self):
        first = self.server()
        data = os.urandom(2 * MIB + 777)
        result = exchange(first, "PUT", "/files/r/restart.bin", {"Upload-Complete": "?0"},
                          data, cut_after=700 * KIB, version=10)
        location = result.interim[0].headers["location"]
        offset = wait_until(lambda: int(exchange(first, "HEAD", location).final.headers
                                        ["upload-offset"]) or None, POLL_TIMEOUT,
                            what="the cut to be noticed")
        first.stop()
        first.start()  # the digests' state is gone: the data file is hashed again
        head = exchange(first, "HEAD", location).final
        self.assertEqual(head.headers["upload-offset"], str(offset))
        piece = exchange(first, "PATCH", location, {
            "Upload-Offset": str(offset), "Upload-Complete": "?0",
            "Content-Type": "application/partial-upload"}, data[offset:offset + MIB]).final
        self.assertEqual(piece.status, 204, piece)
        second = self.server()  # another process on the same directory finishes it
        offset += MIB
        done = exchange(second, "PATCH", location, {
            "Upload-Offset": str(offset), "Upload-Complete": "?1",
            "Content-Type": "application/partial-upload"}, data[offset:]).final
        self.assertEqual(done.status, 201, done)
        receipt = json.loads(done.body)
        self.assertEqual(receipt["files"][0]["checksums"]["sha512"],
                         hashlib.sha512(data).hexdigest())
        self.assertEqual(first.request("HEAD", "/checksum/" + sha256(data)).status, 200)
        assert_store_consistent(self.directory)

    def test_unfinished_uploads_expire_and_count_against_the_limits(self):
        server = self.server("--resumable-max-age", "2", "--sweep-interval", "0.2",
                             "--max-size", "1mb")
        created = exchange(server, "PUT", "/upload/partial.bin", {"Upload-Complete": "?0"},
                           os.urandom(700 * KIB), version=10).final
        location = created.headers["location"]
        metrics = server.request("GET", "/metrics").body.decode()
        self.assertIn("http_bucket_partial_uploads 1", metrics)
        self.assertIn("http_bucket_partial_bytes %d" % (700 * KIB), metrics)
        # 700 KiB partial + 400 KiB is past the hard limit, and nothing can be evicted.
        reply = server.request("PUT", "/upload/more.bin", os.urandom(400 * KIB),
                               {"X-Bucket-Keep": "true"})
        self.assertEqual(reply.status, 507, reply)
        token = location.rsplit("/", 1)[1]
        wait_until(lambda: not os.path.exists(os.path.join(self.directory, "resumable", token)),
                   POLL_TIMEOUT, what="the sweep to remove the expired upload")
        self.assertEqual(exchange(server, "HEAD", location).final.status, 404)
        metrics = server.request("GET", "/metrics").body.decode()
        self.assertRegex(metrics, r"http_bucket_partial_expired_total [1-9]")
        self.assertIn("http_bucket_partial_uploads 0", metrics)
        self.assertEqual(server.request("PUT", "/upload/more.bin", os.urandom(400 * KIB)).status,
                         201)


if __name__ == "__main__":
    unittest.main()
