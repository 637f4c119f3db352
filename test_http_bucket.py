#!/usr/bin/env python3
"""Tests of http_bucket.py: the parser and store in-process, the server for real.

    python3 -m unittest -v test_http_bucket
    python3 -m pytest -q test_http_bucket.py

The unit tests import http_bucket and feed its pieces bytes (the multipart
parser at every chunk size, bottle's "test all buffer sizes").  The HTTP
tests start ``http_bucket.py`` as a subprocess on a free port against a
temporary ARCHIVE_DIR (``start_server``) and talk to it with http.client,
raw sockets and real curl (those skip only when curl is missing).  Every
wait is bounded; one server is shared per class unless a test restarts it.
"""

import concurrent.futures
import errno
import hashlib
import io
import os
import re
import shlex
import stat
import subprocess
import sys
import tempfile
import threading
import time
import unittest
from unittest import mock

import http_bucket
from http_bucket_testing import (
    BOUNDARY, CURL, CURL_TIMEOUT, POLL_TIMEOUT, SERVER_SCRIPT, FormPart, Reply, b64,
    assert_staging_empty, blob_path, clean_environment, digests_of, field_part, file_part,
    files_under, free_port, multipart_body, read_raw_response, reply_of, start_server,
    wait_until)

EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()


# ===========================================================================
# One server per class, and the assertions about what it answers and keeps
# ===========================================================================


class ServerTestCase(unittest.TestCase):
    """One server per class, ARCHIVE_DIR = <tmp>/archive, cwd = <tmp>."""

    server_args = ()
    server_env = None

    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.TemporaryDirectory(prefix="http_bucket_test_")
        cls.root = cls.tmp.name
        cls.archive = os.path.join(cls.root, "archive")
        try:
            cls.server = start_server(cls.archive, *cls.server_args, env=cls.server_env,
                                      cwd=cls.root)
        except BaseException:
            cls.tmp.cleanup()
            raise

    @classmethod
    def tearDownClass(cls):
        try:
            cls.server.stop()
        finally:
            cls.tmp.cleanup()

    # -- helpers ---------------------------------------------------------------

    def assertError(self, reply, status, *fragments):
        """``reply`` is the JSON error shape with ``status``; its message
        holds every fragment (case-insensitive).  Returns the message."""
        self.assertEqual(reply.status, status, reply)
        self.assertTrue(reply.header("content-type", "").startswith("application/json"),
                        reply.headers)
        body = reply.json()
        self.assertEqual(body.get("code"), status, body)
        self.assertEqual(body.get("status"), "error", body)
        message = body.get("error")
        self.assertIsInstance(message, str, body)
        self.assertTrue(message, body)
        for fragment in fragments:
            self.assertIn(fragment.lower(), message.lower(), body)
        return message

    def blob_files(self):
        return files_under(os.path.join(self.archive, "blob"))

    def staging_files(self):
        return files_under(os.path.join(self.archive, "staging"))

    def assertStagingEmpty(self):
        assert_staging_empty(self.archive)

    def assertNotStored(self, data):
        """No blob, no index entry (HEAD 404 by every digest) for ``data``."""
        digests = digests_of(data)
        self.assertFalse(os.path.exists(self.blob_path(digests["sha256"])))
        for algorithm in ("md5", "sha256", "sha512"):
            reply = self.server.request("HEAD", "/checksum/" + digests[algorithm])
            self.assertEqual(reply.status, 404, "%s of unkept content answers %d"
                             % (algorithm, reply.status))

    def assertStored(self, data):
        digests = digests_of(data)
        for algorithm in ("md5", "sha256", "sha512"):
            reply = self.server.request("HEAD", "/checksum/" + digests[algorithm])
            self.assertEqual(reply.status, 200, "HEAD by %s: %r" % (algorithm, reply))
        with open(self.blob_path(digests["sha256"]), "rb") as handle:
            self.assertEqual(handle.read(), data)

    def blob_path(self, sha256):
        return blob_path(self.archive, sha256)

    def put(self, name, data, headers=None):
        return self.server.request("PUT", "/upload/" + name, body=data, headers=headers)

    def post_files(self, parts, boundary=BOUNDARY, headers=None):
        body, content_type = multipart_body(parts, boundary)
        all_headers = {"Content-Type": content_type}
        all_headers.update(headers or {})
        return self.server.request("POST", "/upload", body=body, headers=all_headers)

    def unique(self, label="", size=64):
        """Content no other test stores."""
        text = ("%s %s %s " % (self.id(), label, time.monotonic())).encode()
        return (text * (size // len(text) + 1))[:max(size, len(text))]

    def assertUploaded(self, reply, data, name, status=201, stored="new"):
        """The SPEC's upload response for one file; returns files[0]."""
        self.assertEqual(reply.status, status, reply)
        body = reply.json()
        self.assertEqual(body["code"], status)
        self.assertEqual(body["status"], "Success")
        entry = body["files"][0]
        digests = digests_of(data)
        self.assertEqual(entry["name"], name)
        self.assertEqual(entry["size"], len(data))
        for algorithm in ("md5", "sha256", "sha512"):
            self.assertEqual(entry["checksums"][algorithm], digests[algorithm], algorithm)
        self.assertEqual(entry["stored"], stored)
        sha256 = digests["sha256"]
        self.assertEqual(entry["path"], "blob/%s/%s/%s" % (sha256[:2], sha256[2:4], sha256))
        self.assertEqual(body["checksum"]["blob"], sha256)  # CHECKSUM_TYPE sha256
        self.assertEqual(body["path"]["blob"], entry["path"])
        return entry


# ===========================================================================
# Unit tests: small helpers
# ===========================================================================


class ParseSizeTest(unittest.TestCase):

    def test_units_are_binary(self):
        self.assertEqual(http_bucket.parse_size("1kb"), 1024)
        self.assertEqual(http_bucket.parse_size("16gb"), 16 * 1024 ** 3)
        self.assertEqual(http_bucket.parse_size("3mb"), 3 * 1024 ** 2)
        self.assertEqual(http_bucket.parse_size("1KB"), 1024)
        self.assertEqual(http_bucket.parse_size("1024"), 1024)
        self.assertEqual(http_bucket.parse_size("0"), 0)

    def test_bad_values_raise_value_error(self):
        for text in ("12zb", "", "abc", "-1", "1.5kb", "kb", "1 2kb", "0x10"):
            with self.assertRaises(ValueError, msg=text):
                http_bucket.parse_size(text)


class ClientFilenameTest(unittest.TestCase):
    """One rule for a client's file name, multipart or PUT (issue 9)."""

    def test_directories_are_dropped(self):
        self.assertEqual(http_bucket.client_filename("../../etc/passwd"), "passwd")
        self.assertEqual(http_bucket.client_filename("C:\\Users\\me\\report.xml"), "report.xml")
        self.assertEqual(http_bucket.client_filename("..\\..\\evil.txt"), "evil.txt")
        self.assertEqual(http_bucket.client_filename("/abs/path/x.txt"), "x.txt")

    def test_harmful_names_are_refused_not_rewritten(self):
        for raw, fragment in (("a\x00b.txt", "separator or NUL"), ("a\nb", "control character"),
                              ("\x7f", "control character"), ("..", "not allowed"),
                              (".", "not allowed"), ("", "not allowed"), ("/", "not allowed"),
                              ("../", "not allowed"), ("a/..", "not allowed"),
                              (".~tmp", "reserved"), ("a" * 300 + ".txt", "255 bytes")):
            with self.assertRaises(http_bucket.BadRequest, msg=repr(raw)) as caught:
                http_bucket.client_filename(raw)
            self.assertIn(fragment, caught.exception.message, repr(raw))

    def test_ordinary_names_are_kept_as_sent(self):
        for raw in ("results.xml", "r\u00e9sum\u00e9.pdf", "\u20ac.txt", "a b.tar.gz", ".hidden",
                    'say "hi".txt', "<img src=x onerror=alert(1)>.txt", "\u20ac" * 85):
            self.assertEqual(http_bucket.client_filename(raw), raw)


class HeaderSegmentTest(unittest.TestCase):
    """Replica directories from free-text header values."""

    def test_values_become_one_harmless_segment(self):
        for raw in ("a\x00b", "a/b", "..", ".", "", "../x", "a\\b", "  "):
            name = http_bucket.header_segment(raw)
            self.assertTrue(name, raw)
            self.assertNotIn("/", name)
            self.assertNotIn("\\", name)
            self.assertFalse(name.startswith("."), (raw, name))
        self.assertEqual(http_bucket.header_segment("alice"), "alice")
        self.assertLessEqual(len(http_bucket.header_segment("\u20ac" * 200).encode()), 255)


class SplitUrlPathTest(unittest.TestCase):

    def test_segments_are_decoded(self):
        self.assertEqual(http_bucket.split_url_path("a/b%20c/d.txt"), ["a", "b c", "d.txt"])
        self.assertEqual(http_bucket.split_url_path("%E2%82%AC.txt"), ["\u20ac.txt"])
        self.assertEqual(http_bucket.split_url_path("a/b/"), ["a", "b"])
        # An empty segment is an absolute path or '//': refused (issue 4).
        for raw in ("a//b/", "/a", "//"):
            with self.assertRaises(http_bucket.BadRequest, msg=raw) as caught:
                http_bucket.split_url_path(raw)
            self.assertIn("empty segment", caught.exception.message)

    def test_traversal_is_refused(self):
        for raw in ("..", "a/../b", "%2e%2e", "%2E%2E/x", "a/%2e%2e/b", ".%2e", "a%2Fb",
                    "..%2F..%2Fetc%2Fpasswd", "a%5Cb", "a%00b", "%00", "a%0Ab", "."):
            with self.assertRaises(http_bucket.BadRequest, msg=raw) as caught:
                http_bucket.split_url_path(raw)
            self.assertEqual(caught.exception.status, 400)
            self.assertIn("segment", caught.exception.message)

    def test_invalid_utf8_escapes_are_bad_request(self):
        """A client's bad percent-escape is a 400, never an exception (500)."""
        for raw in ("%ff", "a/%C0%AE%C0%AE/b", "%e2%82"):
            with self.assertRaises(http_bucket.BadRequest, msg=raw):
                http_bucket.split_url_path(raw)

    def test_long_paths_are_refused(self):
        with self.assertRaises(http_bucket.BadRequest) as caught:
            http_bucket.split_url_path("a/" * 3000)
        self.assertIn("longer than", caught.exception.message)
        with self.assertRaises(http_bucket.BadRequest):
            http_bucket.split_url_path("x" * 300)


# ===========================================================================
# Unit tests: the multipart push parser, at every chunk size
# ===========================================================================


def parse_in_chunks(body, boundary, size):
    """Feed ``body`` ``size`` bytes at a time: [(PartInfo, content bytes)].

    Checks the event order (part, data..., end) on the way.
    """
    parser = http_bucket.MultipartParser(boundary)
    parts = []
    current = None
    for start in range(0, len(body), size):
        for kind, value in parser.feed(body[start:start + size]):
            if kind == "part":
                if current is not None:
                    raise AssertionError("part event inside a part")
                current = (value, bytearray())
            elif kind == "data":
                if current is None:
                    raise AssertionError("data event outside a part")
                current[1].extend(bytes(value))
            elif kind == "end":
                if current is None:
                    raise AssertionError("end event outside a part")
                parts.append((current[0], bytes(current[1])))
                current = None
            else:
                raise AssertionError("unknown event %r" % (kind,))
    parser.close()
    if current is not None:
        raise AssertionError("parser closed with a part still open")
    return parts


def summary(parts):
    return [(info.name, info.filename, info.content_type, content) for info, content in parts]


class MultipartParserTest(unittest.TestCase):

    # Content that looks like the delimiter without being one.
    TRICKY = (b"\r\n--" + BOUNDARY[:-1] + b"X\r\n--" + BOUNDARY[:10] + b"\r\r\n\r\n-"
              + b"--" + BOUNDARY + b"\r\n"  # no CRLF before it: content
              + b"\r" + b"\n--" + BOUNDARY[:5] + b"\r\n--" + BOUNDARY[:-1])

    def assertAllChunkSizes(self, body, expected, boundary=BOUNDARY):
        for size in range(1, len(body) + 1):
            try:
                got = summary(parse_in_chunks(body, boundary, size))
            except http_bucket.BadRequest as exc:
                self.fail("chunk size %d: BadRequest %s" % (size, exc.message))
            self.assertEqual(got, expected, "chunk size %d" % size)

    def test_several_files_and_tricky_content_at_every_chunk_size(self):
        binary = bytes(range(256)) * 2
        parts = [
            field_part("comment", b"just a field"),
            file_part("a.bin", self.TRICKY),
            file_part("empty.txt", b"", content_type="text/plain"),
            FormPart(disposition='form-data; name="file"; filename="say \\"hi\\".txt"',
                     content=b"quoted", content_type="text/plain"),
            FormPart(disposition="form-data; name=\"file\"; filename=\"fallback.txt\"; "
                     "filename*=UTF-8''%E2%82%AC.txt", content=b"euro", content_type="text/plain"),
            file_part("binary.dat", binary),
            file_part("ends-like-delimiter", b"data\r\n--" + BOUNDARY[:-3]),
        ]
        body, _ = multipart_body(parts, preamble=b"This is the preamble.\r\n",
                                 epilogue=b"and an epilogue\r\n")
        expected = [
            ("comment", None, "text/plain", b"just a field"),
            ("file", "a.bin", "application/octet-stream", self.TRICKY),
            ("file", "empty.txt", "text/plain", b""),
            ("file", 'say "hi".txt', "text/plain", b"quoted"),
            ("file", "\u20ac.txt", "text/plain", b"euro"),
            ("file", "binary.dat", "application/octet-stream", binary),
            ("file", "ends-like-delimiter", "application/octet-stream",
             b"data\r\n--" + BOUNDARY[:-3]),
        ]
        self.assertAllChunkSizes(body, expected)

    def test_curl_style_body_with_short_boundary(self):
        boundary = b"------------------------d74496d66958873e"
        body, _ = multipart_body([file_part("results.xml", b"<xml/>\n",
                                            content_type="application/xml")], boundary=boundary)
        self.assertAllChunkSizes(body, [("file", "results.xml", "application/xml", b"<xml/>\n")],
                                 boundary=boundary)
        one = b"x"
        content = b"\r\n--y\r\n-x\r\n--\r\n\r\n-"  # near misses of "\r\n--x"
        body, _ = multipart_body([file_part("f", content)], boundary=one)
        self.assertAllChunkSizes(body, [("file", "f", "application/octet-stream", content)],
                                 boundary=one)

    def test_transport_padding_and_no_final_crlf(self):
        body = (b"--" + BOUNDARY + b" \t \r\n"
                b'Content-Disposition: form-data; name="f"; filename="p.txt"\r\n\r\n'
                b"padded\r\n--" + BOUNDARY + b"--")
        self.assertAllChunkSizes(body, [("f", "p.txt", "text/plain", b"padded")])

    def test_rfc5987_and_escapes_in_parameters(self):
        kind, params = http_bucket.parse_header_params(
            "form-data; name=\"file\"; filename*=UTF-8''%E2%82%AC%20rates.txt")
        self.assertEqual(kind, "form-data")
        self.assertEqual(params["filename"], "\u20ac rates.txt")
        _, params = http_bucket.parse_header_params(
            'form-data; name="f"; filename="a \\"b\\" \\\\ c; d.txt"')
        self.assertEqual(params["filename"], 'a "b" \\ c; d.txt')
        _, params = http_bucket.parse_header_params('form-data; name=plain; filename=x.txt')
        self.assertEqual((params["name"], params["filename"]), ("plain", "x.txt"))

    def test_held_back_bytes_stay_under_the_delimiter_length(self):
        content = (b"abc\r\n--" + BOUNDARY[:7] + b"def\r\r\n") * 40 + b"tail"
        head = b"--" + BOUNDARY + b'\r\nContent-Disposition: form-data; name="f"; filename="x"\r\n\r\n'
        body = head + content + b"\r\n--" + BOUNDARY + b"--\r\n"
        room = len(b"\r\n--" + BOUNDARY) - 1
        for size in (1, 2, 3, 7, 41, 64, 100, 333):
            parser = http_bucket.MultipartParser(BOUNDARY)
            emitted = 0
            for start in range(0, len(body), size):
                for kind, value in parser.feed(body[start:start + size]):
                    if kind == "data":
                        emitted += len(value)
                fed = min(max(start + size - len(head), 0), len(content))
                self.assertLessEqual(fed - emitted, room, "chunk size %d at %d" % (size, start))
            parser.close()
            self.assertEqual(emitted, len(content))

    MALFORMED = [
        ("no closing boundary",
         b"--" + BOUNDARY + b'\r\nContent-Disposition: form-data; name="f"; filename="a"\r\n\r\n'
         b"data\r\n", "no closing boundary"),
        ("closing boundary missing after a delimiter",
         b"--" + BOUNDARY + b'\r\nContent-Disposition: form-data; name="f"; filename="a"\r\n\r\n'
         b"data\r\n--" + BOUNDARY + b"\r\n", "no closing boundary"),
        ("no boundary at all", b"just some text, no multipart here\r\n", "no closing boundary"),
        ("header block too big",
         b"--" + BOUNDARY + b'\r\nContent-Disposition: form-data; name="f"; filename="a"\r\n'
         b"X-Padding: " + b"p" * 5000 + b"\r\n\r\ndata\r\n--" + BOUNDARY + b"--\r\n",
         "headers over"),
        ("missing Content-Disposition",
         b"--" + BOUNDARY + b"\r\nContent-Type: text/plain\r\n\r\ndata\r\n--" + BOUNDARY + b"--\r\n",
         "Content-Disposition"),
        ("part without any header",
         b"--" + BOUNDARY + b"\r\n\r\ndata\r\n--" + BOUNDARY + b"--\r\n", "Content-Disposition"),
        ("header line without a colon",
         b"--" + BOUNDARY + b'\r\nContent-Disposition: form-data; name="f"\r\nbogus line\r\n\r\n'
         b"x\r\n--" + BOUNDARY + b"--\r\n", "header line"),
        ("not form-data",
         b"--" + BOUNDARY + b'\r\nContent-Disposition: attachment; filename="a"\r\n\r\n'
         b"x\r\n--" + BOUNDARY + b"--\r\n", "form-data"),
        ("garbage after the first boundary",
         b"--" + BOUNDARY + b"XYZ\r\n" + b'Content-Disposition: form-data; name="f"\r\n\r\n'
         b"x\r\n--" + BOUNDARY + b"--\r\n", "boundary"),
        ("garbage after a later boundary",
         b"--" + BOUNDARY + b'\r\nContent-Disposition: form-data; name="f"\r\n\r\n'
         b"x\r\n--" + BOUNDARY + b"junk\r\n", "boundary"),
        ("headers cut off by the end",
         b"--" + BOUNDARY + b'\r\nContent-Disposition: form-data; name="f"\r\n', "headers"),
    ]

    def test_malformed_bodies_raise_bad_request_at_every_chunk_size(self):
        for label, body, fragment in self.MALFORMED:
            for size in range(1, len(body) + 1):
                with self.assertRaises(http_bucket.BadRequest,
                                       msg="%s, chunk size %d" % (label, size)) as caught:
                    parse_in_chunks(body, BOUNDARY, size)
                self.assertEqual(caught.exception.status, 400)
                self.assertIn(fragment.lower(), caught.exception.message.lower(),
                              "%s, chunk size %d" % (label, size))

    def test_bad_boundaries_are_refused(self):
        for boundary in (b"", b"x" * 71):
            with self.assertRaises(http_bucket.BadRequest) as caught:
                http_bucket.MultipartParser(boundary)
            self.assertIn("boundary", caught.exception.message)

    def test_content_type_boundary(self):
        self.assertEqual(http_bucket.multipart_boundary(
            'multipart/form-data; boundary="quoted boundary"'), b"quoted boundary")
        self.assertEqual(http_bucket.multipart_boundary(
            "Multipart/Form-Data; charset=utf-8; boundary=abc"), b"abc")
        with self.assertRaises(http_bucket.BadRequest) as caught:
            http_bucket.multipart_boundary("multipart/form-data")
        self.assertIn("boundary", caught.exception.message)
        for other in ("text/plain", "application/x-www-form-urlencoded", "", None):
            with self.assertRaises(http_bucket.UnsupportedMediaType) as caught:
                http_bucket.multipart_boundary(other)
            self.assertEqual(caught.exception.status, 415)
            self.assertIn("multipart/form-data", caught.exception.message)


# ===========================================================================
# Unit tests: BodyReader (Content-Length and chunked framing)
# ===========================================================================


def read_all(reader, size=7):
    pieces = []
    while True:
        data = reader.read(size)
        if not data:
            return b"".join(pieces)
        pieces.append(bytes(data))


class BodyReaderTest(unittest.TestCase):

    def reader(self, raw, **kwargs):
        self.rfile = io.BytesIO(raw)
        return http_bucket.BodyReader(self.rfile, **kwargs)

    def test_content_length_is_never_read_past(self):
        reader = self.reader(b"hello worldNEXT REQUEST", length=11)
        self.assertEqual(read_all(reader, 4), b"hello world")
        self.assertTrue(reader.finished)
        self.assertEqual(self.rfile.read(), b"NEXT REQUEST")

    def test_chunked_with_extensions_and_trailers(self):
        raw = (b"5;name=value\r\nhello\r\n"
               b"6 ; a=b;c\r\n world\r\n"
               b"A\r\n0123456789\r\n"
               b"0;last\r\nX-Trailer: one\r\nX-Other: two\r\n\r\nNEXT")
        for size in (1, 3, 5, 1 << 20):
            reader = self.reader(raw, chunked=True)
            self.assertEqual(read_all(reader, size), b"hello world0123456789")
            self.assertTrue(reader.finished)
            self.assertEqual(self.rfile.read(), b"NEXT", "read size %d" % size)

    def test_before_first_read_is_called_once(self):
        calls = []
        reader = self.reader(b"3\r\nabc\r\n0\r\n\r\n", chunked=True,
                             before_first_read=lambda: calls.append(1))
        self.assertEqual(read_all(reader), b"abc")
        self.assertEqual(calls, [1])

    def assertBad(self, raw, fragment, **kwargs):
        kwargs.setdefault("chunked", True)
        reader = self.reader(raw, **kwargs)
        with self.assertRaises(http_bucket.BadRequest) as caught:
            read_all(reader)
        self.assertEqual(caught.exception.status, 400)
        self.assertIn(fragment.lower(), caught.exception.message.lower())

    def test_bad_size_lines(self):
        self.assertBad(b"zz\r\nabc\r\n0\r\n\r\n", "chunk size")
        self.assertBad(b"-5\r\nhello\r\n0\r\n\r\n", "chunk size")
        self.assertBad(b"0x5\r\nhello\r\n0\r\n\r\n", "chunk size")
        self.assertBad(b"\r\nhello\r\n0\r\n\r\n", "chunk size")
        self.assertBad(b"5;" + b"e" * 2000 + b"\r\nhello\r\n0\r\n\r\n", "chunk-size line")

    def test_missing_crlf_after_chunk_data(self):
        self.assertBad(b"5\r\nhelloXY0\r\n\r\n", "CRLF")
        self.assertBad(b"3\r\nhello\r\n0\r\n\r\n", "CRLF")

    def test_trailers_over_limit(self):
        self.assertBad(b"0\r\n" + (b"X-T: " + b"t" * 100 + b"\r\n") * 100 + b"\r\n", "trailer")

    def test_truncated_bodies_are_client_gone(self):
        for raw, kwargs in ((b"a\r\nhello", {"chunked": True}),
                            (b"5\r\nhello\r\n", {"chunked": True}),
                            (b"5\r\nhel", {"chunked": True}),
                            (b"0\r\nX-Trailer: 1\r\n", {"chunked": True}),
                            (b"", {"chunked": True}),
                            (b"short", {"length": 100})):
            reader = self.reader(raw, **kwargs)
            with self.assertRaises(http_bucket.ClientGone, msg=raw):
                read_all(reader)

    def test_over_limit_is_too_large(self):
        chunk = b"200\r\n" + b"c" * 512 + b"\r\n"
        reader = self.reader(chunk * 3 + b"0\r\n\r\n", chunked=True, limit=1024)
        with self.assertRaises(http_bucket.TooLarge) as caught:
            read_all(reader, 1 << 20)
        self.assertEqual(caught.exception.status, 413)
        self.assertIn("MAX_CONTENT_LENGTH", caught.exception.message)
        reader = self.reader(chunk * 2 + b"0\r\n\r\n", chunked=True, limit=1024)
        self.assertEqual(len(read_all(reader, 1 << 20)), 1024)  # the limit itself is fine


# ===========================================================================
# Unit tests: Store and BlobIndex
# ===========================================================================


class StoreTest(unittest.TestCase):

    def setUp(self):
        self.tmp = tempfile.TemporaryDirectory(prefix="http_bucket_store_")
        self.addCleanup(self.tmp.cleanup)
        self.stores = []

    def tearDown(self):
        for store in self.stores:
            store.journal.close()

    def make_store(self, fsync=False):
        config = http_bucket.Config(directory=self.tmp.name, fsync=fsync)
        store = http_bucket.Store(config)
        self.stores.append(store)
        store.journals.load()
        return store

    def store_bytes(self, store, data, pin=True):
        """Stage ``data`` in 1000-byte writes and publish it: (digests, info).

        ``self.digest_threads``: the Digester threads running before finish.
        """
        with store.stage("x.bin") as staged:
            for start in range(0, len(data), 1000):
                staged.write(memoryview(data)[start:start + 1000])
            self.digest_threads = sorted(thread.name for thread in threading.enumerate()
                                         if thread.name.startswith("digest-"))
            digests = staged.finish()
            info = store.publish(staged)
            if pin:
                store.pin(info.sha256)
        return digests, info

    def test_publish_lookup_and_reload(self):
        store = self.make_store()
        # Past SMALL_BODY, each digest is computed by a thread of its own.
        data = os.urandom(http_bucket.SMALL_BODY + 300 * 1024) + b"end"
        digests, info = self.store_bytes(store, data)
        self.assertEqual(self.digest_threads, ["digest-md5", "digest-sha256", "digest-sha512"])
        expected = digests_of(data)
        self.assertEqual(digests, {k: expected[k] for k in ("md5", "sha256", "sha512")})
        sha256 = expected["sha256"]
        self.assertTrue(info.new)
        self.assertEqual(info.path, "blob/%s/%s/%s" % (sha256[:2], sha256[2:4], sha256))
        path = store.blob_path(sha256)
        with open(path, "rb") as handle:
            self.assertEqual(handle.read(), data)
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o444)
        self.assertEqual(files_under(store.staging_dir), [])
        for algorithm in ("md5", "sha256", "sha512"):
            self.assertEqual(store.lookup(expected[algorithm]), sha256, algorithm)
        self.assertIsNone(store.lookup(expected["sha1"]))  # not configured
        self.assertIsNone(store.lookup("0" * 64))
        for bad in ("zz" * 16, "a" * 31, "a" * 33, "", "g" * 64):
            with self.assertRaises(http_bucket.BadRequest):
                store.lookup(bad)
        _, again = self.store_bytes(store, data)
        self.assertFalse(again.new)
        self.assertEqual(files_under(os.path.join(self.tmp.name, "blob")), [path])
        store.journal.close()
        reloaded = self.make_store()
        for algorithm in ("md5", "sha256", "sha512"):
            self.assertEqual(reloaded.lookup(expected[algorithm]), sha256, algorithm)
        self.assertEqual(len(reloaded.blobs), 1)

    def test_write_back_flushes_a_large_body_while_it_arrives(self):
        """With fsync on, every WRITE_BACK_BYTES written start a background
        fdatasync of the staged file (one at a time), before the final fsync."""
        store = self.make_store(fsync=True)
        flushed = []
        real_fdatasync = os.fdatasync

        def fdatasync(fd):
            flushed.append((threading.current_thread().name, os.fstat(fd).st_size))
            real_fdatasync(fd)
        data = os.urandom(1024 * 1024)
        with mock.patch.object(http_bucket, "WRITE_BACK_BYTES", 64 * 1024), \
                mock.patch.object(os, "fdatasync", fdatasync):
            with store.stage("x.bin") as staged:
                for start in range(0, len(data), 16 * 1024):
                    staged.write(data[start:start + 16 * 1024])
                    if staged.write_back.thread:
                        staged.write_back.thread.join()  # the next flush may start
                self.assertEqual(len(flushed), 16)
                self.assertEqual({name for name, _ in flushed}, {"write-back"})
                self.assertEqual([size for _, size in flushed],
                                 list(range(64 * 1024, len(data) + 1, 64 * 1024)))
                digests = staged.finish()
                info = store.publish(staged)
        self.assertEqual(digests["sha256"], hashlib.sha256(data).hexdigest())
        with open(store.blob_path(info.sha256), "rb") as handle:
            self.assertEqual(handle.read(), data)

    def test_write_back_error_reaches_finish(self):
        """The kernel reports a write-back error to one fsync only: when the
        background flush met it, finish raises it (ENOSPC as a 507)."""
        store = self.make_store(fsync=True)
        for error, raised in ((errno.EIO, OSError), (errno.ENOSPC, http_bucket.InsufficientStorage)):
            def fdatasync(fd, error=error):
                raise OSError(error, os.strerror(error))
            with self.subTest(error=errno.errorcode[error]), \
                    mock.patch.object(http_bucket, "WRITE_BACK_BYTES", 64 * 1024), \
                    mock.patch.object(os, "fdatasync", fdatasync):
                with store.stage("x.bin") as staged:
                    staged.write(os.urandom(128 * 1024))
                    with self.assertRaises(raised) as caught:
                        staged.finish()
                    if raised is OSError:
                        self.assertEqual(caught.exception.errno, error)
                    self.assertIsNone(staged.fd)  # closed, after the flush ended
                self.assertEqual(files_under(store.staging_dir), [])

    def test_pins_across_journals_follow_time_order(self):
        """A pin kept forever is applied as it is read; an unpin from another
        journal wins only over pins older than itself."""
        store = self.make_store()
        index = os.path.join(self.tmp.name, "index")
        again, gone = "a" * 64, "b" * 64
        with open(os.path.join(index, "dead-a.log"), "w") as handle:
            handle.write("P\t100.000\t%s\t0.000\nP\t100.000\t%s\t0.000\n" % (again, gone))
            handle.write("P\t300.000\t%s\t0.000\n" % again)  # pinned again after the unpin
        with open(os.path.join(index, "dead-b.log"), "w") as handle:
            handle.write("U\t200.000\t%s\nU\t200.000\t%s\n" % (again, gone))
        store.refresh_journals()
        self.assertTrue(store.blobs.pinned(again))
        self.assertFalse(store.blobs.pinned(gone))

    def test_blob_index(self):
        """add/candidates/len: a digest leads to its blob's sha256 prefix (the
        blob directory completes it); a second record does not count twice."""
        index = http_bucket.BlobIndex(("md5", "sha256", "sha512"))
        first, second = digests_of(b"first"), digests_of(b"second")
        for digests in (first, second, second):
            index.add({k: digests[k] for k in ("md5", "sha256", "sha512")}, 5, 100.0)
        self.assertEqual(len(index), 2)
        self.assertEqual(index.bytes, 10)
        for digests in (first, second):
            for algorithm in ("md5", "sha512"):
                self.assertEqual(index.candidates(algorithm, digests[algorithm]),
                                 [digests["sha256"][:16]], algorithm)
            self.assertTrue(index.stored(http_bucket.digest_key(digests["sha256"])))
        self.assertEqual(index.candidates("sha1", first["sha1"]), [])
        self.assertEqual(index.candidates("md5", "0" * 32), [])


# ===========================================================================
# The command line: --help, bad settings, isolated start
# ===========================================================================


class CommandLineTest(unittest.TestCase):

    def run_server(self, *args, env=None, python_flags=()):
        environ = clean_environment(env)
        with tempfile.TemporaryDirectory(prefix="http_bucket_cli_") as tmp:
            return subprocess.run([sys.executable] + list(python_flags) + [SERVER_SCRIPT] + list(args),
                                  env=environ, cwd=tmp, stdin=subprocess.DEVNULL,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  timeout=15, universal_newlines=True)

    def test_help_under_isolated_mode_mentions_every_variable(self):
        done = self.run_server("--help", python_flags=("-I", "-S"))
        self.assertEqual(done.returncode, 0, done.stderr)
        for name in ("ARCHIVE_DIR", "ARCHIVE_URI", "CHECKSUM_TYPE", "MAX_CONTENT_LENGTH",
                     "--bind", "--directory", "PORT", "default", "REPLICATE_"):
            self.assertIn(name, done.stdout, name)
        for setting in getattr(http_bucket, "SETTINGS", ()):
            self.assertIn(setting.env, done.stdout, setting.env)

    def test_readme_settings_table_lists_every_setting_with_its_default(self):
        with open(os.path.join(os.path.dirname(SERVER_SCRIPT), "README.md"), encoding="utf-8") as handle:
            text = handle.read()
        table = text[text.index("Generated from http_bucket.SETTINGS"):]
        table = table[:table.index("\n\n")]
        cells = [re.split(r"(?<!\\)\|", row) for row in table.splitlines() if row.startswith("| ")]
        rows = {row[2].strip(" `"): row for row in cells if len(row) >= 6}
        for setting in http_bucket.SETTINGS:
            row = rows.get(setting.env)
            self.assertIsNotNone(row, "README settings table lacks %s" % setting.env)
            self.assertTrue(any(flag in row[1] for flag in setting.flags)
                            or not setting.flags[0].startswith("-"), row)
            default = "`%s`" % setting.default if setting.default else "(none)"
            self.assertIn(default, row[3], row)

    def assertRefused(self, setting, *args, env=None):
        port = str(free_port())
        done = self.run_server(*(args or (port,)) + ("-b", "127.0.0.1", "-d", "store"), env=env)
        self.assertNotEqual(done.returncode, 0, done.stderr)
        lines = done.stderr.strip().splitlines()
        self.assertEqual(len(lines), 1, done.stderr)
        self.assertIn(setting, lines[0])

    def test_bad_values_stop_startup_naming_the_setting(self):
        self.assertRefused("MAX_CONTENT_LENGTH", env={"MAX_CONTENT_LENGTH": "12zb"})
        self.assertRefused("port", "abc")
        self.assertRefused("max-content-length", str(free_port()), "--max-content-length", "1.5gb")
        self.assertRefused("CHECKSUM_TYPE", env={"CHECKSUM_TYPE": "crc32"})
        self.assertRefused("BUCKET_DIGESTS", env={"BUCKET_DIGESTS": "md5,nosuchhash"})

    def test_starts_isolated_without_site_packages(self):
        with tempfile.TemporaryDirectory(prefix="http_bucket_isolated_") as tmp:
            server = start_server(os.path.join(tmp, "a"), python_flags=("-I", "-S"))
            try:
                reply = server.request("GET", "/healthz")
                self.assertEqual(reply.status, 200)
                self.assertEqual(reply.json()["status"], "ok")
            finally:
                server.stop()
            log = server.log_text()
            self.assertIn(os.path.join(tmp, "a"), log)
            self.assertIn("127.0.0.1:%d" % server.port, log)

    def test_checksum_type_sha1_gives_sha1_in_seed_keys(self):
        """CHECKSUM_TYPE=sha1 must yield sha1 in "checksum" (or refuse to start)."""
        with tempfile.TemporaryDirectory(prefix="http_bucket_sha1_") as tmp:
            try:
                server = start_server(os.path.join(tmp, "a"), env={"CHECKSUM_TYPE": "sha1"})
            except AssertionError as exc:
                self.assertIn("CHECKSUM_TYPE", str(exc))
                return
            try:
                data = b"checksum type sha1\n"
                reply = server.request("PUT", "/upload/s.txt", body=data)
                self.assertEqual(reply.status, 201, reply)
                self.assertEqual(reply.json()["checksum"]["blob"], hashlib.sha1(data).hexdigest())
            finally:
                server.stop()


# ===========================================================================
# HTTP: the README's curl commands through real curl
# ===========================================================================


@unittest.skipIf(CURL is None, "curl is not installed")
class CurlTest(ServerTestCase):

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.work = os.path.join(cls.root, "client")
        os.mkdir(cls.work)

    def curl(self, *args, **kwargs):
        """Run curl in the client directory; bounded. CompletedProcess (bytes)."""
        kwargs.setdefault("timeout", CURL_TIMEOUT)
        return subprocess.run([CURL] + list(args), cwd=self.work, stdin=subprocess.DEVNULL,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kwargs)

    def curl_reply(self, *args):
        """``curl -sS -w <status> args``: a Reply (no headers)."""
        done = self.curl("-sS", "-w", "\n%{http_code}", *args)
        self.assertEqual(done.returncode, 0, done.stderr)
        body, _, status = done.stdout.rpartition(b"\n")
        return Reply(int(status), {}, body)

    def write_client_file(self, name, data):
        with open(os.path.join(self.work, name), "wb") as handle:
            handle.write(data)

    def test_post_form_then_put_same_file(self):
        data = b'<?xml version="1.0"?>\n<testsuite tests="1"><testcase name="t"/></testsuite>\n'
        data += self.unique("results").replace(b"\n", b" ")
        self.write_client_file("results.xml", data)
        reply = self.curl_reply("-X", "POST", "-F", "file=@results.xml", self.server.url("upload"))
        entry = self.assertUploaded(reply, data, "results.xml")
        body = reply.json()
        self.assertEqual(set(body), {"code", "status", "files", "checksum", "path"})
        for key in ("blob", "decompressed", "archive"):
            self.assertIn(key, body["checksum"])
        for key in ("blob", "decompressed", "archive", "replicas"):
            self.assertIn(key, body["path"])
        self.assertIn(entry["mime"].split(";")[0], ("application/xml", "text/xml"))
        blob = os.path.join(self.archive, entry["path"])
        with open(blob, "rb") as handle:
            self.assertEqual(handle.read(), data)
        self.assertEqual(stat.S_IMODE(os.stat(blob).st_mode), 0o444)

        reply = self.curl_reply("-T", "results.xml", self.server.url("upload/"))
        self.assertUploaded(reply, data, "results.xml", status=200, stored="existing")
        sha256 = hashlib.sha256(data).hexdigest()
        self.assertEqual([path for path in self.blob_files() if path.endswith(sha256)], [blob])

    def test_literal_curl_x_head_returns_at_once(self):
        data = self.unique("head")
        self.assertEqual(self.put("head.txt", data).status, 201)
        md5 = hashlib.md5(data).hexdigest()
        started = time.monotonic()
        done = self.curl("-X", "HEAD", self.server.url("checksum/" + md5), timeout=10)
        self.assertEqual(done.returncode, 0, done.stderr)
        self.assertLess(time.monotonic() - started, 5.0)
        for digest in ("0" * 32, "f" * 64, "not-hex", "abc"):
            started = time.monotonic()
            done = self.curl("-sf", "-X", "HEAD", self.server.url("checksum/" + digest), timeout=10)
            self.assertEqual(done.returncode, 22, (digest, done.stderr))
            self.assertLess(time.monotonic() - started, 5.0)
        done = self.curl("-sf", "-X", "HEAD", self.server.url("checksum/" + md5), timeout=10)
        self.assertEqual(done.returncode, 0, done.stderr)

    def test_curl_head_by_sha256_and_sha512(self):
        data = self.unique("curl -I")
        self.assertEqual(self.put("i.txt", data).status, 201)
        digests = digests_of(data)
        for digest in (digests["sha256"], digests["sha512"], digests["sha512"].upper()):
            done = self.curl("-sS", "-I", self.server.url("checksum/" + digest), timeout=10)
            self.assertEqual(done.returncode, 0, done.stderr)
            self.assertTrue(done.stdout.startswith(b"HTTP/1.1 200"), done.stdout)
        done = self.curl("-sS", "-I", self.server.url("checksum/" + "e" * 128), timeout=10)
        self.assertTrue(done.stdout.startswith(b"HTTP/1.1 404"), done.stdout)

    def test_chunked_stdin_upload_and_download(self):
        big = os.urandom(3 * 1024 * 1024 + 17) + (b"\r\n--" + BOUNDARY) * 3
        self.write_client_file("big.bin", big)
        command = "cat big.bin | %s -sS -w '\\n%%{http_code}' -T - %s" % (
            shlex.quote(CURL), shlex.quote(self.server.url("upload/big.bin")))
        done = subprocess.run(command, shell=True, cwd=self.work, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, timeout=CURL_TIMEOUT)
        self.assertEqual(done.returncode, 0, done.stderr)
        body, _, status = done.stdout.rpartition(b"\n")
        self.assertUploaded(Reply(int(status), {}, body), big, "big.bin")
        digests = digests_of(big)
        for algorithm in ("sha256", "md5"):
            done = self.curl("-sS", "-f", "-o", "back.bin",
                             self.server.url("checksum/" + digests[algorithm]))
            self.assertEqual(done.returncode, 0, done.stderr)
            with open(os.path.join(self.work, "back.bin"), "rb") as handle:
                self.assertTrue(handle.read() == big, "bytes back differ (%s)" % algorithm)

    def test_several_files_in_one_form(self):
        first, second = self.unique("first"), self.unique("second")
        self.write_client_file("one.txt", first)
        self.write_client_file("two.log", second)
        reply = self.curl_reply("-F", "file=@one.txt", "-F", "file=@two.log",
                                "-F", "note=a plain field", self.server.url("upload"))
        self.assertEqual(reply.status, 201, reply)
        body = reply.json()
        self.assertEqual([entry["name"] for entry in body["files"]], ["one.txt", "two.log"])
        self.assertEqual(body["files"][1]["checksums"]["sha256"], hashlib.sha256(second).hexdigest())
        self.assertStored(first)
        self.assertStored(second)


# ===========================================================================
# HTTP: uploads, lookups, integrity, refusals (default settings)
# ===========================================================================


class HttpTest(ServerTestCase):

    # -- lookups ---------------------------------------------------------------

    def test_checksum_lookups(self):
        data = self.unique("lookups")
        self.assertEqual(self.put("lookup.txt", data).status, 201)
        digests = digests_of(data)
        for algorithm in ("md5", "sha256", "sha512"):
            for digest in (digests[algorithm], digests[algorithm].upper()):
                self.assertEqual(self.server.request("HEAD", "/checksum/" + digest).status, 200)
                reply = self.server.request("GET", "/checksum/" + digest)
                self.assertEqual((reply.status, reply.body), (200, data))
        # sha1 is not configured by default: 404, not 400
        reply = self.server.request("GET", "/checksum/" + digests["sha1"])
        self.assertError(reply, 404, digests["sha1"])
        self.assertEqual(self.server.request("HEAD", "/checksum/" + digests["sha1"]).status, 404)
        for unknown in ("0" * 32, "1" * 40, "2" * 64, "3" * 128):
            self.assertError(self.server.request("GET", "/checksum/" + unknown), 404, "checksum")
            self.assertEqual(self.server.request("HEAD", "/checksum/" + unknown).status, 404)

    def test_bad_checksums_are_400(self):
        for bad in ("z" * 32, "g" * 64, "a" * 31, "a" * 33, "a" * 63, "a" * 65, "a" * 127,
                    "a" * 129, "abc", "%20" + "a" * 29, "-" * 32, "a" * 300):
            reply = self.server.request("GET", "/checksum/" + bad)
            self.assertError(reply, 400, "hex")
            self.assertEqual(self.server.request("HEAD", "/checksum/" + bad).status, 400, bad)

    # -- storing -----------------------------------------------------------------

    def test_second_identical_upload_is_existing_with_one_read_only_blob(self):
        data = self.unique("twice")
        first = self.post_files([file_part("twice.txt", data)])
        entry = self.assertUploaded(first, data, "twice.txt")
        second = self.post_files([file_part("again.txt", data)])
        self.assertUploaded(second, data, "again.txt", status=200, stored="existing")
        sha256 = entry["checksums"]["sha256"]
        self.assertEqual([p for p in self.blob_files() if os.path.basename(p) == sha256],
                         [self.blob_path(sha256)])
        self.assertEqual(stat.S_IMODE(os.stat(self.blob_path(sha256)).st_mode), 0o444)
        self.assertStagingEmpty()

    def test_put_upload_and_empty_body(self):
        data = self.unique("put")
        self.assertUploaded(self.put("put.bin", data), data, "put.bin")
        reply = self.put("empty.txt", b"")
        self.assertIn(reply.status, (200, 201), reply)
        entry = reply.json()["files"][0]
        self.assertEqual((entry["size"], entry["checksums"]["sha256"]), (0, EMPTY_SHA256))
        self.assertEqual(self.server.request("HEAD", "/checksum/" + EMPTY_SHA256).status, 200)

    def test_chunked_put_with_http_client(self):
        pieces = [self.unique("chunk %d" % number, 1000 + number) for number in range(20)]
        data = b"".join(pieces)
        reply = self.server.request("PUT", "/upload/chunked.bin", body=iter(pieces),
                                    encode_chunked=True)
        self.assertUploaded(reply, data, "chunked.bin")
        self.assertStored(data)

    def test_chunked_extensions_and_trailers_keep_the_connection(self):
        data = self.unique("raw chunked", 30)
        head = (b"PUT /upload/ext.txt HTTP/1.1\r\nHost: test\r\n"
                b"Transfer-Encoding: chunked\r\n\r\n")
        body = (b"%x;name=value\r\n" % 10 + data[:10] + b"\r\n"
                + b"%x\r\n" % (len(data) - 10) + data[10:] + b"\r\n"
                + b"0;end\r\nX-Trailer: yes\r\n\r\n")
        with self.server.raw_socket() as sock:
            stream = sock.makefile("rb")
            sock.sendall(head + body)
            self.assertUploaded(read_raw_response(stream), data, "ext.txt")
            # the connection is still usable: the body was consumed exactly
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: test\r\n\r\n")
            self.assertEqual(read_raw_response(stream).status, 200)
            stream.close()

    def test_expect_continue_then_body(self):
        data = self.unique("expect")
        with self.server.raw_socket() as sock:
            stream = sock.makefile("rb")
            sock.sendall(b"PUT /upload/expect.txt HTTP/1.1\r\nHost: test\r\n"
                         b"Content-Length: %d\r\nExpect: 100-continue\r\n\r\n" % len(data))
            interim = read_raw_response(stream)
            self.assertEqual(interim.status, 100)
            sock.sendall(data)
            self.assertUploaded(read_raw_response(stream), data, "expect.txt")
            stream.close()

    # -- integrity headers -------------------------------------------------------

    def integrity_headers(self, data):
        raw = {name: hashlib.new(name, data).digest() for name in ("md5", "sha1", "sha256", "sha512")}
        return [
            {"Content-MD5": b64(raw["md5"])},
            {"Repr-Digest": "sha-256=:%s:" % b64(raw["sha256"])},
            {"Repr-Digest": "sha-512=:%s:" % b64(raw["sha512"])},
            {"Content-Digest": "sha-256=:%s:" % b64(raw["sha256"])},
            {"Content-Digest": "sha-512=:%s:, sha-256=:%s:" % (b64(raw["sha512"]), b64(raw["sha256"]))},
            {"X-Checksum-Md5": raw["md5"].hex()},
            {"X-Checksum-Sha1": raw["sha1"].hex()},
            {"X-Checksum-Sha256": raw["sha256"].hex().upper()},
            {"X-Checksum-Sha512": raw["sha512"].hex()},
        ]

    def test_matching_digest_headers_store(self):
        for number, _ in enumerate(self.integrity_headers(b"")):
            data = self.unique("match %d" % number)
            headers = self.integrity_headers(data)[number]
            self.assertUploaded(self.put("ok%d.txt" % number, data, headers), data,
                                "ok%d.txt" % number)

    def test_mismatching_digest_headers_are_400_and_keep_nothing(self):
        blobs_before = self.blob_files()
        other = b"some other content"
        for number, headers in enumerate(self.integrity_headers(other)):
            data = self.unique("mismatch %d" % number, 2000)
            reply = self.put("bad%d.txt" % number, data, headers)
            header = list(headers)[0]
            self.assertError(reply, 400, header)
            self.assertIn("mismatch", reply.json()["error"].lower())
            self.assertNotStored(data)
            self.assertStagingEmpty()
        self.assertEqual(self.blob_files(), blobs_before)

    def test_unreadable_digest_headers_are_400(self):
        data = self.unique("unreadable")
        for headers, fragment in (({"Content-MD5": "not base64!"}, "Content-MD5"),
                                  ({"Repr-Digest": "sha-256=abc"}, "Repr-Digest"),
                                  ({"Content-Digest": "sha-256=:!!!:"}, "Content-Digest"),
                                  ({"X-Checksum-Sha256": "abc"}, "X-Checksum-Sha256"),
                                  ({"X-Checksum-Md5": "z" * 32}, "X-Checksum-Md5")):
            self.assertError(self.put("u.txt", data, headers), 400, fragment)
        self.assertNotStored(data)
        self.assertStagingEmpty()

    # -- X-Checksum-Deploy ----------------------------------------------------------

    def deploy(self, name, length, headers):
        """PUT with Expect: 100-continue; the body is never sent. A Reply."""
        lines = ["PUT /upload/%s HTTP/1.1" % name, "Host: test", "Content-Length: %d" % length,
                 "Expect: 100-continue", "X-Checksum-Deploy: true"]
        lines += ["%s: %s" % item for item in headers.items()]
        with self.server.raw_socket(timeout=10) as sock:
            stream = sock.makefile("rb")
            sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
            reply = read_raw_response(stream)
            stream.close()
        return reply

    def test_deploy_known_checksum_answers_without_the_body(self):
        data = self.unique("deploy")
        self.assertEqual(self.put("deploy-src.txt", data).status, 201)
        digests = digests_of(data)
        for header in ("X-Checksum-Sha256", "X-Checksum-Md5", "X-Checksum-Sha512"):
            reply = self.deploy("deployed.txt", len(data),
                                {header: digests[header.rsplit("-", 1)[1].lower()]})
            self.assertEqual(reply.status, 200, reply)  # nothing new stored
            body = reply.json()
            self.assertEqual(body["status"], "Success")
            entry = body["files"][0]
            self.assertEqual((entry["name"], entry["stored"], entry["size"]),
                             ("deployed.txt", "existing", len(data)))
            self.assertEqual(entry["checksums"]["sha256"], digests["sha256"])
        self.assertStagingEmpty()

    def test_deploy_answer_lists_all_checksums(self):
        """SPEC's upload response: files[].checksums has md5, sha256, sha512."""
        data = self.unique("deploy checksums")
        self.assertEqual(self.put("dc.txt", data).status, 201)
        digests = digests_of(data)
        reply = self.deploy("dc.txt", len(data), {"X-Checksum-Sha256": digests["sha256"]})
        self.assertEqual(reply.status, 200, reply)
        checksums = reply.json()["files"][0]["checksums"]
        for algorithm in ("md5", "sha256", "sha512"):
            self.assertEqual(checksums.get(algorithm), digests[algorithm], algorithm)

    def test_deploy_unknown_checksum_is_404_and_keeps_nothing(self):
        data = self.unique("deploy unknown")
        reply = self.deploy("nope.txt", len(data),
                            {"X-Checksum-Sha256": hashlib.sha256(data).hexdigest()})
        self.assertError(reply, 404, "X-Checksum-Deploy")
        self.assertNotStored(data)
        self.assertStagingEmpty()

    def test_deploy_refuses_digests_that_disagree_with_the_blob(self):
        """A stated md5 that is not the blob's must not be answered as deployed."""
        data = self.unique("deploy disagree")
        self.assertEqual(self.put("dd.txt", data).status, 201)
        reply = self.deploy("dd.txt", len(data), {
            "X-Checksum-Sha256": hashlib.sha256(data).hexdigest(),
            "X-Checksum-Md5": hashlib.md5(b"other content").hexdigest()})
        self.assertIn(reply.status, (400, 404), reply)
        self.assertError(reply, reply.status, "md5")

    # -- refusals ------------------------------------------------------------------

    def test_put_without_length_is_411(self):
        conn = self.server.connection()
        try:
            conn.putrequest("PUT", "/upload/nolength.txt")
            conn.endheaders()
            reply = reply_of(conn.getresponse())
        finally:
            conn.close()
        self.assertError(reply, 411, "Content-Length")

    def headers_only(self, head):
        """Send a request head (no body) on a raw socket: the Reply."""
        with self.server.raw_socket(timeout=10) as sock:
            stream = sock.makefile("rb")
            sock.sendall(head)
            reply = read_raw_response(stream)
            stream.close()
        return reply

    def test_bad_framing_is_400(self):
        self.assertError(self.headers_only(
            b"PUT /upload/x HTTP/1.1\r\nHost: t\r\nContent-Length: abc\r\n\r\n"), 400,
            "Content-Length")
        self.assertError(self.headers_only(
            b"PUT /upload/x HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n"), 400, "Transfer-Encoding")
        self.assertError(self.headers_only(
            b"PUT /upload/x HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: gzip\r\n\r\n"), 400,
            "Transfer-Encoding")
        reply = self.headers_only(b"PUT /upload/x HTTP/1.1\r\nHost: t\r\n"
                                  b"Transfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n")
        self.assertError(reply, 400, "chunk size")
        self.assertStagingEmpty()

    def test_post_that_is_not_multipart_is_415(self):
        for content_type in ("text/plain", "application/json", "application/x-www-form-urlencoded"):
            reply = self.server.request("POST", "/upload", body=b"a=1",
                                        headers={"Content-Type": content_type})
            self.assertError(reply, 415, "multipart/form-data")
        reply = self.server.request("POST", "/upload", body=b"a=1")
        self.assertError(reply, 415, "multipart/form-data")

    def test_malformed_multipart_is_400_and_keeps_nothing(self):
        data = self.unique("malformed", 3000)
        body, _ = multipart_body([file_part("a", data)])
        reply = self.server.request("POST", "/upload", body=body,
                                    headers={"Content-Type": "multipart/form-data"})
        self.assertError(reply, 400, "boundary")
        whole, content_type = multipart_body([file_part("m.txt", data)])
        cases = [
            (whole[:-len(b"--" + BOUNDARY + b"--\r\n")], "no closing boundary"),
            (whole.replace(b"Content-Disposition", b"Content-Dispositio"), "Content-Disposition"),
            (whole.replace(b"--" + BOUNDARY + b"\r\n", b"--" + BOUNDARY + b"GARBAGE\r\n", 1),
             "boundary"),
            (whole.replace(b"\r\n\r\n", b"\r\nX-Big: " + b"b" * 6000 + b"\r\n\r\n", 1),
             "headers over"),
            (multipart_body([field_part("note", b"no file here")])[0], "no file part"),
        ]
        for body, fragment in cases:
            reply = self.server.request("POST", "/upload", body=body,
                                        headers={"Content-Type": content_type})
            self.assertError(reply, 400, fragment)
            self.assertNotStored(data)
            self.assertStagingEmpty()

    def test_invalid_utf8_in_path_is_400(self):
        for path in ("/upload/%ff", "/upload/%C0%AE%C0%AE"):
            self.assertError(self.put(path[len("/upload/"):], b"x"), 400)
        self.assertStagingEmpty()

    def test_form_fields_are_capped(self):
        data = self.unique("fields")
        reply = self.post_files([field_part("note", b"n" * (70 * 1024)), file_part("f.txt", data)])
        self.assertError(reply, 400, "form field", "note")
        reply = self.post_files([field_part("f%d" % number, b"v") for number in range(200)]
                                + [file_part("f.txt", data)])
        self.assertError(reply, 400, "form fields")
        self.assertNotStored(data)
        self.assertStagingEmpty()

    def test_method_not_allowed_has_allow(self):
        # OPTIONS is answered (resumable uploads' limits discovery): not a 405.
        for method in ("PATCH", "DELETE"):
            reply = self.server.request(method, "/upload")
            self.assertError(reply, 405, method)
            allowed = {word.strip() for word in reply.header("allow", "").split(",")}
            self.assertIn("POST", allowed, reply.headers)
            self.assertIn("PUT", allowed, reply.headers)
            self.assertNotIn(method, allowed)

    def test_allow_lists_only_the_methods_of_the_resource(self):
        """RFC 9110 15.5.6: Allow names the target's methods; /upload has no DELETE."""
        for method in ("PATCH", "DELETE"):
            reply = self.server.request(method, "/upload")
            self.assertEqual(reply.status, 405)
            allowed = {word.strip() for word in reply.header("allow", "").split(",")}
            self.assertEqual(allowed, {"GET", "HEAD", "OPTIONS", "POST", "PUT"}, method)

    def test_unknown_endpoint_is_404(self):
        for method, path in (("GET", "/nope"), ("HEAD", "/nope"), ("GET", "/uploadx"),
                             ("POST", "/nope/x")):
            reply = self.server.request(method, path, body=b"" if method == "POST" else None)
            if method == "HEAD":
                self.assertEqual(reply.status, 404)
            else:
                self.assertError(reply, 404, "no such endpoint")

    def test_upload_form_and_health(self):
        reply = self.server.request("GET", "/upload")
        self.assertEqual(reply.status, 200)
        self.assertTrue(reply.header("content-type").startswith("text/html"))
        self.assertIn(b'type="file"', reply.body)
        health = self.server.request("GET", "/healthz").json()
        self.assertEqual((health["status"], health["index_ready"]), ("ok", True))

    # -- names ---------------------------------------------------------------------

    def test_client_filenames_cannot_leave_archive_dir(self):
        data = self.unique("evil")
        parts = [file_part("../../evil.txt", data),
                 file_part("..\\..\\win.txt", data + b"w"),
                 file_part("/etc/passwd", data + b"p"),
                 FormPart(disposition="form-data; name=\"file\"; "
                          "filename*=UTF-8''..%2F..%2Fpct.txt", content=data + b"q")]
        reply = self.post_files(parts)
        self.assertEqual(reply.status, 201, reply)
        names = [entry["name"] for entry in reply.json()["files"]]
        self.assertEqual(names, ["evil.txt", "win.txt", "passwd", "pct.txt"])
        for path, fragment in (("/upload/..%2F..%2Fevil.txt", "segment"),
                               ("/upload/%2e%2e", "segment"),
                               ("/upload/..", "segment"),
                               ("/upload/a%00b", "segment")):
            self.assertError(self.put(path[len("/upload/"):], b"x"), 400, fragment)
        self.assertEqual(os.listdir(self.root), ["archive"])
        for path in files_under(self.root):
            self.assertNotIn(os.path.basename(path), ("evil.txt", "win.txt", "passwd", "pct.txt"))

    def test_quoted_and_rfc5987_filenames(self):
        data = self.unique("names")
        reply = self.post_files([
            FormPart(disposition="form-data; name=\"file\"; filename=\"fallback.txt\"; "
                     "filename*=UTF-8''%E2%82%AC.txt", content=data),
            FormPart(disposition='form-data; name="file"; filename="say \\"hi\\".txt"',
                     content=data + b"2"),
        ])
        self.assertEqual(reply.status, 201, reply)
        files = reply.json()["files"]
        self.assertEqual(files[0]["name"], "\u20ac.txt")
        self.assertEqual(files[1]["name"], 'say "hi".txt')

    # -- connections -----------------------------------------------------------------

    def test_keep_alive_every_response_has_content_length(self):
        data = self.unique("keep-alive")
        digests = digests_of(data)
        form, content_type = multipart_body([file_part("ka.txt", data)])
        conn = self.server.connection()
        try:
            conn.connect()
            sock = conn.sock
            requests = [
                ("GET", "/healthz", None, {}, 200),
                ("PUT", "/upload/ka.txt", data, {}, 201),
                ("HEAD", "/checksum/" + digests["md5"], None, {}, 200),
                ("GET", "/checksum/" + digests["sha256"], None, {}, 200),
                ("HEAD", "/checksum/" + "0" * 32, None, {}, 404),
                ("GET", "/checksum/" + "0" * 64, None, {}, 404),
                ("GET", "/checksum/xyz", None, {}, 400),
                ("GET", "/config", None, {}, 200),
                ("GET", "/nope", None, {}, 404),
                ("PATCH", "/upload", b"", {}, 405),
                ("POST", "/upload", form, {"Content-Type": content_type}, 200),
                ("PUT", "/upload/ka2.txt", data, {}, 200),
                ("GET", "/upload", None, {}, 200),
            ]
            for method, path, body, headers, status in requests:
                conn.request(method, path, body=body, headers=headers)
                response = conn.getresponse()
                reply = reply_of(response)
                where = "%s %s" % (method, path)
                self.assertEqual(reply.status, status, (where, reply))
                self.assertIn("content-length", reply.headers, where)
                if method != "HEAD":
                    self.assertEqual(int(reply.header("content-length")), len(reply.body), where)
                self.assertNotEqual(reply.header("connection", "").lower(), "close", where)
                self.assertIs(conn.sock, sock, "connection not reused after " + where)
        finally:
            conn.close()

    def test_aborted_put_leaves_nothing(self):
        blobs_before = self.blob_files()
        prefix = self.unique("aborted", 100000)
        with self.server.raw_socket() as sock:
            sock.sendall(b"PUT /upload/aborted.bin HTTP/1.1\r\nHost: t\r\n"
                         b"Content-Length: 1000000\r\n\r\n" + prefix)
            wait_until(self.staging_files, POLL_TIMEOUT, what="the upload's staged file")
        self.assertStagingEmpty()
        self.assertEqual(self.blob_files(), blobs_before)
        self.assertEqual(self.server.request("GET", "/healthz").status, 200)

    def test_aborted_chunked_multipart_leaves_nothing(self):
        blobs_before = self.blob_files()
        data = self.unique("aborted multipart", 50000)
        body, _ = multipart_body([file_part("abort.bin", data)])
        first = body[:len(body) // 2]
        head = (b"POST /upload HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n"
                b"Content-Type: multipart/form-data; boundary=" + BOUNDARY + b"\r\n\r\n")
        with self.server.raw_socket() as sock:
            sock.sendall(head + b"%x\r\n" % len(first) + first + b"\r\n" + b"1000\r\nonly part")
            wait_until(self.staging_files, POLL_TIMEOUT, what="the upload's staged file")
        self.assertStagingEmpty()
        self.assertEqual(self.blob_files(), blobs_before)
        self.assertNotStored(data)

    # -- concurrency ---------------------------------------------------------------------

    def test_two_concurrent_identical_uploads_make_one_blob(self):
        data = os.urandom(5 * 1024 * 1024)
        sha256 = hashlib.sha256(data).hexdigest()
        blobs_before = len(self.blob_files())
        barrier = threading.Barrier(2, timeout=10)
        replies = [None, None]

        def upload(slot):
            barrier.wait()
            replies[slot] = self.put("same.bin", data)

        threads = [threading.Thread(target=upload, args=(slot,)) for slot in (0, 1)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
            self.assertFalse(thread.is_alive())
        stored = sorted(reply.json()["files"][0]["stored"] for reply in replies)
        self.assertEqual(stored, ["existing", "new"], replies)
        self.assertEqual(sorted(reply.status for reply in replies), [200, 201])
        self.assertEqual([p for p in self.blob_files() if os.path.basename(p) == sha256],
                         [self.blob_path(sha256)])
        self.assertEqual(len(self.blob_files()), blobs_before + 1)
        self.assertStored(data)
        self.assertStagingEmpty()

    def test_fifty_concurrent_distinct_uploads(self):
        bodies = [self.unique("distinct %d" % number, 4096 + number) for number in range(50)]

        def upload(number):
            return self.put("d%02d.bin" % number, bodies[number])

        with concurrent.futures.ThreadPoolExecutor(max_workers=50) as pool:
            replies = list(pool.map(upload, range(50), timeout=120))
        for number, reply in enumerate(replies):
            self.assertUploaded(reply, bodies[number], "d%02d.bin" % number)
        for data in bodies:
            md5 = hashlib.md5(data).hexdigest()
            self.assertEqual(self.server.request("HEAD", "/checksum/" + md5).status, 200)
        self.assertStagingEmpty()


# ===========================================================================
# HTTP: limits and configured digests
# ===========================================================================


class LimitsTest(ServerTestCase):

    server_env = {"MAX_CONTENT_LENGTH": "1kb", "BUCKET_DIGESTS": "md5,sha1,sha256,sha512"}

    def test_content_length_over_limit_is_413_before_the_body(self):
        for method, path, extra in (("PUT", "/upload/big.bin", b""),
                                    ("POST", "/upload", b"Content-Type: multipart/form-data; "
                                                        b"boundary=" + BOUNDARY + b"\r\n")):
            with self.server.raw_socket(timeout=10) as sock:
                stream = sock.makefile("rb")
                sock.sendall(b"%s %s HTTP/1.1\r\nHost: t\r\nContent-Length: 1025\r\n"
                             b"Expect: 100-continue\r\n%s\r\n"
                             % (method.encode(), path.encode(), extra))
                reply = read_raw_response(stream)  # a 100 Continue would fail here
                stream.close()
            self.assertError(reply, 413, "MAX_CONTENT_LENGTH")
        self.assertStagingEmpty()

    def test_chunked_body_over_limit_is_413_and_keeps_nothing(self):
        blobs_before = self.blob_files()
        data = self.unique("over", 1200)
        head = b"PUT /upload/chunked-big.bin HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
        # The second chunk passes the limit; its trailing CRLF and the last
        # chunk are never sent, so the server has read all we sent.
        body = b"258\r\n" + data[:600] + b"\r\n" + b"258\r\n" + data[600:1200]
        with self.server.raw_socket(timeout=10) as sock:
            stream = sock.makefile("rb")
            sock.sendall(head + body)
            reply = read_raw_response(stream)
            stream.close()
        self.assertError(reply, 413, "MAX_CONTENT_LENGTH")
        self.assertStagingEmpty()
        self.assertEqual(self.blob_files(), blobs_before)
        self.assertNotStored(data[:1200])
        self.assertNotStored(data[:600])

    def test_bodies_up_to_the_limit_are_stored(self):
        data = self.unique("limit", 1024)[:1024]
        self.assertUploaded(self.put("limit.bin", data), data, "limit.bin")

    def test_sha1_answers_when_configured(self):
        data = self.unique("sha1")
        reply = self.put("sha1.txt", data)
        self.assertEqual(reply.status, 201)
        digests = digests_of(data)
        self.assertEqual(reply.json()["files"][0]["checksums"]["sha1"], digests["sha1"])
        for digest in (digests["sha1"], digests["sha1"].upper()):
            self.assertEqual(self.server.request("HEAD", "/checksum/" + digest).status, 200)
        self.assertEqual(self.server.request("HEAD", "/checksum/" + "9" * 40).status, 404)

    def test_config_shows_the_effective_settings(self):
        config = self.server.request("GET", "/config").json()
        self.assertEqual(config["max_content_length"], 1024)
        self.assertEqual(config["digests"], ["md5", "sha1", "sha256", "sha512"])
        self.assertEqual(config["port"], self.server.port)
        self.assertEqual(os.path.realpath(config["directory"]), os.path.realpath(self.archive))


# ===========================================================================
# HTTP: configuration through variables and flags; secrets stay hidden
# ===========================================================================


class ConfigTest(ServerTestCase):

    TOKEN = "tok-SECRET-0123456789"
    URI = "http://bucket.example:9999/store"
    server_env = {"BUCKET_TOKEN": TOKEN, "ARCHIVE_URI": URI, "CHECKSUM_TYPE": "md5",
                  "MAX_CONTENT_LENGTH": "1kb"}
    server_args = ("--max-content-length", "2kb")  # flags win over variables

    def test_config_json_without_token_values(self):
        reply = self.server.request("GET", "/config")
        self.assertEqual(reply.status, 200)
        self.assertTrue(reply.header("content-type").startswith("application/json"))
        self.assertNotIn(self.TOKEN.encode(), reply.body)
        self.assertNotIn(b"SECRET", reply.body)
        config = reply.json()
        self.assertEqual(config["max_content_length"], 2048)
        self.assertEqual(config["checksum_type"], "md5")
        self.assertEqual(config["uri"], self.URI)
        self.assertEqual(os.path.realpath(config["directory"]), os.path.realpath(self.archive))
        self.assertNotIn(self.TOKEN, self.server.log_text())

    def test_uri_and_checksum_type_in_upload_response(self):
        data = self.unique("uri")
        reply = self.put("uri.txt", data, {"Authorization": "Bearer " + self.TOKEN})
        self.assertEqual(reply.status, 201, reply)
        body = reply.json()
        self.assertEqual(body["checksum"]["blob"], hashlib.md5(data).hexdigest())
        self.assertTrue(body["files"][0]["url"].startswith(self.URI + "/"), body["files"][0])
        reply = self.put("uri.txt", data)
        self.assertError(reply, 401, "token")


# ===========================================================================
# HTTP: restart persistence (a server per test)
# ===========================================================================


class RestartTest(unittest.TestCase):

    INDEXED = re.compile(r"indexed (\d+) blobs in (\d+(?:\.\d+)?) s")

    def setUp(self):
        self.tmp = tempfile.TemporaryDirectory(prefix="http_bucket_restart_")
        self.addCleanup(self.tmp.cleanup)
        self.archive = os.path.join(self.tmp.name, "archive")

    def start(self):
        server = start_server(self.archive, cwd=self.tmp.name)
        self.addCleanup(server.stop)
        return server

    def indexed_count(self, server):
        match = wait_until(lambda: self.INDEXED.search(server.log_text()), POLL_TIMEOUT,
                           what="the 'indexed N blobs in X s' line")
        float(match.group(2))
        return int(match.group(1))

    def test_everything_answers_after_restart(self):
        server = self.start()
        self.assertEqual(self.indexed_count(server), 0)
        bodies = [("restart %d " % number).encode() * (number + 1) for number in range(3)]
        for number, data in enumerate(bodies):
            self.assertEqual(server.request("PUT", "/upload/r%d.txt" % number, body=data).status, 201)
        self.assertEqual(server.request("PUT", "/upload/again.txt", body=bodies[0]).status, 200)
        server.stop()
        leftover = os.path.join(self.archive, "staging", "gonehost-1-abcdef")
        os.makedirs(leftover)
        with open(os.path.join(leftover, "up-0123456789abcdef"), "wb") as handle:
            handle.write(b"half an upload")
        for _ in range(2):  # the second restart reads the merged journal
            server.start()
            self.assertEqual(self.indexed_count(server), 3, server.log_text())
            for data in bodies:
                digests = digests_of(data)
                for algorithm in ("md5", "sha256", "sha512"):
                    reply = server.request("HEAD", "/checksum/" + digests[algorithm])
                    self.assertEqual(reply.status, 200, algorithm)
                self.assertEqual(server.request("GET", "/checksum/" + digests["md5"]).body, data)
            self.assertFalse(os.path.exists(leftover), "dead process's staging left behind")
            reply = server.request("PUT", "/upload/r0.txt", body=bodies[0])
            self.assertEqual((reply.status, reply.json()["files"][0]["stored"]), (200, "existing"))
            server.stop()

    def test_blob_without_record_is_hashed_at_startup(self):
        data = b"copied in by hand\n" * 100
        digests = digests_of(data)
        sha256 = digests["sha256"]
        directory = os.path.join(self.archive, "blob", sha256[:2], sha256[2:4])
        os.makedirs(directory)
        with open(os.path.join(directory, sha256), "wb") as handle:
            handle.write(data)
        server = self.start()
        for algorithm in ("md5", "sha512", "sha256"):
            wait_until(lambda: server.request("HEAD", "/checksum/" + digests[algorithm]).status == 200,
                       POLL_TIMEOUT, what="HEAD by %s of an unrecorded blob" % algorithm)
        server.restart()
        self.assertEqual(self.indexed_count(server), 1)
        self.assertEqual(server.request("HEAD", "/checksum/" + digests["md5"]).status, 200)


if __name__ == "__main__":
    unittest.main()
