"""Storage limits (issue 11): a size cap with least-recently-used eviction,
a free-space floor, and the batch lookup.

Real server processes over real HTTP fill a store past ``--max-size`` and
check what went: the least recently used first (never what ``HEAD``
touched since), never kept content, never part of a tree; a download
during eviction completes; the refusals (507) leave nothing; two
processes share the work; a restart keeps the order.  The free-space floor
is checked for real on a small tmpfs (root only).  One race -- a name
linked while its blob is being evicted -- is placed exactly in-process.

    python3 -m unittest -v test_storage_limits
"""

import hashlib
import json
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
import unittest

import http_bucket
from http_bucket_testing import (POLL_TIMEOUT, ServerProcess, assert_store_consistent,
                                 file_part, multipart_body, read_raw_response, sha256,
                                 wait_until, zip_of)

KIB = 1024
MIB = 1024 * 1024


class LimitCase(unittest.TestCase):
    """Helpers shared by the tests on real servers."""

    def start(self, *args, directory=None, env=None):
        directory = directory or tempfile.mkdtemp(prefix="http_bucket-limits-")
        if not hasattr(self, "_dirs"):
            self._dirs = []
            self.addCleanup(lambda: [shutil.rmtree(d, True) for d in self._dirs])
        self._dirs.append(directory)
        server = ServerProcess(directory, ("--fsync", "false") + args, env=env).start()
        self.addCleanup(server.stop)
        return server

    def put(self, server, name, data, headers=None, expect=201):
        reply = server.request("PUT", "/upload/" + name, data, headers)
        self.assertEqual(reply.status, expect, reply)
        return reply

    def stored(self, server, data):
        return server.request("HEAD", "/checksum/" + sha256(data)).status == 200

    def assertRefused(self, reply, status, fragment):
        self.assertEqual(reply.status, status, reply)
        payload = reply.json()
        self.assertEqual((payload["code"], payload["status"]), (status, "error"))
        self.assertIn(fragment, payload["error"])

    def raw_put(self, server, head, body=b""):
        """Send a request head (and body); one response, nothing more sent."""
        with server.raw_socket() as sock:
            sock.sendall(head + body)
            stream = sock.makefile("rb")
            reply = read_raw_response(stream)
            if reply.status == 100:
                reply = read_raw_response(stream)
            return reply


class EvictionOrderTest(LimitCase):

    def test_least_recently_used_goes_first_never_kept_never_a_partial_tree(self):
        server = self.start("--max-size", "1mb")
        blocks = {name: os.urandom(180 * KIB) for name in "abcd"}
        kept = os.urandom(150 * KIB)
        self.put(server, "kept.bin", kept, {"X-Bucket-Keep": "true"})  # the oldest of all
        archive = zip_of({"t/one.bin": os.urandom(60 * KIB), "t/two.bin": os.urandom(60 * KIB)})
        answer = self.put(server, "tree.zip", archive).json()["files"][0]
        tree = answer["extracted"]["path"]
        for name in "abcd":
            self.put(server, name, blocks[name])
        # Touched since: "a" by HEAD, "b" by the batch lookup.
        self.assertTrue(self.stored(server, blocks["a"]))
        lookup = server.request("POST", "/checksum", json.dumps(
            {"digests": [hashlib.md5(blocks["b"]).hexdigest()]}).encode())
        self.assertEqual(len(lookup.json()["present"]), 1, lookup)
        # 150 + ~240 (zip, members) + 4 x 180 = ~1.1 MiB: one more block
        # crosses the hard limit; eviction goes down to 90 % of 1 MiB.
        newest = os.urandom(180 * KIB)
        self.put(server, "e", newest)
        self.assertTrue(self.stored(server, kept), "kept content was evicted")
        self.assertTrue(self.stored(server, newest))
        self.assertTrue(self.stored(server, blocks["a"]), "touched by HEAD, yet evicted")
        self.assertTrue(self.stored(server, blocks["b"]), "touched by a lookup, yet evicted")
        self.assertFalse(self.stored(server, archive), "the least recently used stayed")
        self.assertFalse(os.path.exists(os.path.join(server.directory, tree)),
                         "the tree of evicted content stayed")
        health = server.request("GET", "/healthz").json()
        self.assertLessEqual(health["stored_bytes"], 1.05 * MIB)
        records = {r["name"]: r for r in server.request(
            "GET", "/uploads?format=json").json()["uploads"]}
        self.assertEqual(records["tree.zip"]["gone"], "evicted")
        self.assertIsNone(records["kept.bin"]["gone"])
        self.assertTrue(records["kept.bin"]["keep"])
        self.assertRegex(server.log_text(), r"evicted \d+ blobs, \d+ bytes; oldest last use 20")
        metrics = server.request("GET", "/metrics").body.decode()
        self.assertRegex(metrics, r"http_bucket_evictions_total [1-9]")
        self.assertRegex(metrics, r"http_bucket_evicted_bytes_total [1-9]")
        self.assertIn("http_bucket_max_size_bytes 1048576", metrics)
        assert_store_consistent(server.directory)

    def test_a_tree_member_evicted_takes_its_whole_tree(self):
        server = self.start("--max-size", "1mb")
        members = {"m/%d.bin" % n: os.urandom(40 * KIB) for n in range(6)}
        archive = zip_of(members)
        answer = self.put(server, "m.zip", archive).json()["files"][0]
        tree = os.path.join(server.directory, answer["extracted"]["path"])
        # The archive is used since, its members are not: they are the
        # least recently used, and a member's eviction takes the whole tree.
        self.assertTrue(self.stored(server, archive))
        for number in range(3):
            self.put(server, "fill%d" % number, os.urandom(200 * KIB))
        self.assertFalse(os.path.exists(tree), "a tree whose member was evicted stayed")
        for name in members:
            self.assertFalse(self.stored(server, members[name]), name)
        self.assertTrue(self.stored(server, archive), "the archive was used: it stays")
        assert_store_consistent(server.directory)
        # Uploaded again, it is expanded again, whole.
        answer = self.put(server, "m.zip", archive, expect=201).json()["files"][0]
        self.assertEqual(answer["extracted"]["count"], 6)
        self.assertFalse(answer["extracted"]["existing"])

    def test_restart_keeps_the_use_order(self):
        server = self.start("--max-size", "1mb")
        blocks = [os.urandom(200 * KIB) for _ in range(4)]
        for number, block in enumerate(blocks):
            self.put(server, "r%d" % number, block)
        time.sleep(1.1)  # the index keeps last uses to the second
        self.assertTrue(self.stored(server, blocks[0]))  # r0 used after r1..r3
        self.assertEqual(server.stop(), 0)  # SIGTERM: the uses are journaled
        server.start()
        time.sleep(1.1)
        self.put(server, "r4", os.urandom(200 * KIB))
        self.put(server, "r5", os.urandom(200 * KIB))
        self.assertTrue(self.stored(server, blocks[0]), "the use before the restart was lost")
        # Two of r1..r3 (used in one second: a tie) went.
        self.assertEqual(sum(self.stored(server, block) for block in blocks[1:]), 1)


class RefusalTest(LimitCase):

    def test_too_large_is_507_before_the_body_without_retry_after(self):
        server = self.start("--max-size", "1mb")
        reply = self.raw_put(server, b"PUT /upload/huge.bin HTTP/1.1\r\nHost: t\r\n"
                                     b"Expect: 100-continue\r\nContent-Length: 2000000\r\n\r\n")
        self.assertRefused(reply, 507, "an upload of 2000000 bytes is larger than "
                                       "BUCKET_MAX_SIZE (1048576 bytes): it can never be stored")
        self.assertIsNone(reply.headers.get("retry-after"))

    def test_hard_limit_when_all_is_kept_is_507_with_retry_after(self):
        server = self.start("--max-size", "1mb")
        for number in range(5):
            self.put(server, "k%d" % number, os.urandom(200 * KIB), {"X-Bucket-Keep": "1"})
        before = assert_store_consistent(server.directory)
        data = os.urandom(200 * KIB)
        reply = server.request("PUT", "/upload/more.bin", data)
        self.assertRefused(reply, 507, "would take the store past its size limit")
        self.assertEqual(reply.headers.get("retry-after"), "5")
        chunked = server.request("PUT", "/upload/chunked.bin", iter([data]),
                                 encode_chunked=True)
        self.assertRefused(chunked, 507, "the store is at its size limit")
        self.assertEqual(chunked.headers.get("retry-after"), "5")
        body, content_type = multipart_body([file_part("form.bin", data)])
        form = server.request("POST", "/upload", body, {"Content-Type": content_type})
        self.assertRefused(form, 507, "size limit")
        after = assert_store_consistent(server.directory)
        self.assertEqual((before.blobs, before.names), (after.blobs, after.names))
        self.assertFalse(self.stored(server, data))

    def test_a_chunked_upload_crossing_the_limit_stops_and_leaves_nothing(self):
        server = self.start("--max-size", "1mb")
        for number in range(4):
            self.put(server, "k%d" % number, os.urandom(200 * KIB), {"X-Bucket-Keep": "1"})
        before = assert_store_consistent(server.directory)

        def pieces():
            for _ in range(40):
                yield os.urandom(16 * KIB)
        reply = server.request("PUT", "/files/big/chunked.bin", pieces(), encode_chunked=True)
        self.assertRefused(reply, 507, "the store is at its size limit")
        after = assert_store_consistent(server.directory)
        self.assertEqual((before.blobs, before.names), (after.blobs, after.names))
        self.assertFalse(os.path.exists(os.path.join(server.directory, "files", "big",
                                                     "chunked.bin")))


@unittest.skipUnless(hasattr(os, "geteuid") and os.geteuid() == 0 and shutil.which("mount"),
                     "needs root to mount a small tmpfs")
class FreeSpaceFloorTest(LimitCase):
    """--min-free on a real 8 MiB tmpfs: the floor is the filesystem's."""

    def setUp(self):
        self.mountpoint = tempfile.mkdtemp(prefix="http_bucket-floor-")
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs",
                               self.mountpoint], stderr=subprocess.PIPE, timeout=30)
        if done.returncode != 0:
            shutil.rmtree(self.mountpoint, True)
            self.skipTest("cannot mount a tmpfs: %s" % done.stderr.decode().strip())
        self.addCleanup(shutil.rmtree, self.mountpoint, True)
        self.addCleanup(subprocess.run, ["umount", "-l", self.mountpoint], timeout=30)

    def test_uploads_that_would_go_under_the_floor_are_refused(self):
        directory = os.path.join(self.mountpoint, "store")
        server = self.start("--min-free", "3mb", directory=directory)
        self.put(server, "fits.bin", os.urandom(2 * MIB))
        before = assert_store_consistent(directory)
        reply = self.raw_put(server, b"PUT /upload/big.bin HTTP/1.1\r\nHost: t\r\n"
                                     b"Expect: 100-continue\r\nContent-Length: 4000000\r\n\r\n")
        self.assertRefused(reply, 507, "under BUCKET_MIN_FREE (3145728 bytes)")
        self.assertIsNone(reply.headers.get("retry-after"))  # no max-size: nothing to evict

        def pieces():
            for _ in range(64):
                yield os.urandom(64 * KIB)
        with server.raw_socket() as sock:
            sock.sendall(b"PUT /upload/chunked.bin HTTP/1.1\r\nHost: t\r\n"
                         b"Transfer-Encoding: chunked\r\n\r\n")
            try:
                for piece in pieces():
                    sock.sendall(b"%x\r\n%s\r\n" % (len(piece), piece))
                sock.sendall(b"0\r\n\r\n")
            except (BrokenPipeError, ConnectionResetError):
                pass  # it answered before the end and stopped reading: as it should
            reply = read_raw_response(sock.makefile("rb"))
        self.assertRefused(reply, 507, "under BUCKET_MIN_FREE")
        after = assert_store_consistent(directory)
        self.assertEqual((before.blobs, before.names), (after.blobs, after.names))
        self.assertEqual(server.request("GET", "/healthz").json()["status"], "ok")
        # Someone else fills the filesystem: the server says so, still 200.
        with open(os.path.join(self.mountpoint, "other.bin"), "wb") as handle:
            handle.write(os.urandom(4 * MIB))
        wait_until(lambda: server.request("GET", "/healthz").json()["status"] == "degraded",
                   POLL_TIMEOUT, what="/healthz to say degraded")
        health = server.request("GET", "/healthz")
        self.assertEqual(health.status, 200)
        self.assertLess(health.json()["free_bytes"], health.json()["min_free_bytes"])

    def test_with_a_max_size_eviction_makes_room_above_the_floor(self):
        directory = os.path.join(self.mountpoint, "store")
        server = self.start("--min-free", "3mb", "--max-size", "6mb", directory=directory)
        first = os.urandom(2 * MIB)
        self.put(server, "old.bin", first)
        second = os.urandom(3 * MIB)
        self.put(server, "new.bin", second)  # 8 - 5 < 3 MiB free: the old one must go
        self.assertFalse(self.stored(server, first))
        self.assertTrue(self.stored(server, second))
        assert_store_consistent(directory)


class DownloadDuringEvictionTest(LimitCase):

    def test_a_download_in_progress_completes_with_the_right_bytes(self):
        server = self.start("--max-size", "12mb")
        big = os.urandom(10 * MIB)
        self.put(server, "big.bin", big)
        with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32 * KIB)
            sock.sendall(b"GET /checksum/%s HTTP/1.1\r\nHost: t\r\n\r\n" % sha256(big).encode())
            stream = sock.makefile("rb")
            head = b""
            while not head.endswith(b"\r\n\r\n"):
                head += stream.read(1)
            received = stream.read(64 * KIB)  # the download is under way ...
            self.put(server, "evicter.bin", os.urandom(6 * MIB))  # ... and big.bin goes
            wait_until(lambda: not self.stored(server, big), POLL_TIMEOUT,
                       what="big.bin to be evicted")
            received += stream.read(len(big) - len(received))
        self.assertIn(b"200 OK", head)
        self.assertEqual(sha256(received), sha256(big))


class TwoProcessesTest(LimitCase):

    def test_two_processes_evict_without_losing_kept_or_named_content(self):
        first = self.start("--max-size", "2mb")
        second = self.start("--max-size", "2mb", directory=first.directory)
        kept = os.urandom(300 * KIB)
        self.put(first, "kept.bin", kept, {"X-Bucket-Keep": "true"})
        errors = []

        def upload(server, prefix):
            for number in range(12):
                data = os.urandom(150 * KIB)
                reply = server.request("PUT", "/files/%s/%d.bin" % (prefix, number), data)
                if reply.status != 201 and not (reply.status == 507 and
                                                reply.headers.get("retry-after")):
                    errors.append(reply)
        threads = [threading.Thread(target=upload, args=(server, prefix))
                   for server, prefix in ((first, "one"), (second, "two"))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
        self.assertEqual(errors, [])
        for server in (first, second):
            self.assertTrue(self.stored(server, kept))
        def settled():
            # Each process learns what the other stored from its journal (at
            # each upload's check and each eviction pass, every 5 s): the
            # cap holds once both have caught up.
            try:
                contents = assert_store_consistent(first.directory, timeout=1)
                total = sum(os.path.getsize(path) for path in contents.blobs.values())
            except (AssertionError, OSError):
                return None  # an eviction is removing things right now
            return contents if total <= 2 * MIB else None
        wait_until(settled, POLL_TIMEOUT, what="the store back under 2 MiB")

        def listings_agree():
            # Both processes know what the other evicted (R records); an
            # eviction pass still running toward the low watermark may
            # remove more between the scan and the listings, so compare again.
            contents = settled()
            if contents is None:
                return None
            names = {n for n in contents.names if n.startswith("files/one/")}
            for server in (first, second):
                listing = server.request("GET", "/files/one/?format=json").json()
                if {"files/one/" + e["name"] for e in listing["entries"]} != names:
                    return None
            return True
        wait_until(listings_agree, POLL_TIMEOUT, what="both listings of files/one/ to match the disk")


class BatchLookupTest(LimitCase):

    def test_present_and_missing_and_the_limits(self):
        server = self.start(env={"BUCKET_READ_TOKEN": "reader", "BUCKET_TOKEN": "writer"})
        data = os.urandom(100)
        self.put(server, "x.bin", data, {"Authorization": "Bearer writer"})
        digests = [hashlib.md5(data).hexdigest(), sha256(data).upper(),
                   hashlib.sha512(data).hexdigest(), "0" * 64, hashlib.sha1(data).hexdigest()]
        body = json.dumps({"digests": digests}).encode()
        self.assertEqual(server.request("POST", "/checksum", body).status, 401)
        reply = server.request("POST", "/checksum", body, {"Authorization": "Bearer reader"})
        self.assertEqual(reply.status, 200, reply)
        answer = reply.json()
        self.assertEqual(sorted(answer["present"]), sorted(digests[:3]))
        for item in answer["present"].values():
            self.assertEqual(item, {"sha256": sha256(data), "size": 100})
        self.assertEqual(answer["missing"], ["0" * 64, hashlib.sha1(data).hexdigest()])
        auth = {"Authorization": "Bearer reader"}
        for payload, status, fragment in (
                (b"not json", 400, "needs a JSON object"),
                (b'{"digests": "abc"}', 400, '"digests" must be a list'),
                (json.dumps({"digests": ["a" * 64, "xyz"]}).encode(), 400, "digests[1]: checksum"),
                (json.dumps({"digests": ["a" * 64] * 10001}).encode(), 400,
                 "10001 digests: at most 10000"),
                (b'{"digests": ["' + b"a" * (1024 * 1024) + b'"]}', 413, "over the limit")):
            with self.subTest(fragment):
                self.assertRefused(server.request("POST", "/checksum", payload, auth),
                                   status, fragment)
        many = [hashlib.sha256(b"%d" % n).hexdigest() for n in range(10000)]
        reply = server.request("POST", "/checksum", json.dumps({"digests": many}).encode(), auth)
        self.assertEqual((reply.status, len(reply.json()["missing"])), (200, 10000))


class NameLinkedDuringEvictionTest(unittest.TestCase):
    """In-process: a name made (by another process) between the removal of
    a blob's names and the removal of the blob itself wins: the blob stays."""

    def test_a_name_linked_meanwhile_wins(self):
        directory = tempfile.mkdtemp(prefix="http_bucket-evictrace-")
        self.addCleanup(shutil.rmtree, directory, True)
        config = http_bucket.Config(directory=directory, fsync=False,
                                    min_free=http_bucket.MinFree(0.0, 0))
        store = http_bucket.Store(config)
        self.addCleanup(store.journal.close)
        store.journals.load()
        evictor = http_bucket.Evictor(store)
        old, new = os.urandom(200 * KIB), os.urandom(200 * KIB)
        for data in (old, new):
            with store.stage("x.bin") as staged:
                staged.write(data)
                staged.finish()
                info = store.publish(staged)
            store.pin(info.sha256)
            time.sleep(0.01)
        config.max_size = 300 * KIB  # now over it: the older blob must go
        late_name = os.path.join(directory, "files", "late.bin")
        os.makedirs(os.path.dirname(late_name), exist_ok=True)
        real_unpin = store.unpin

        def unpin_then_link(sha256):  # the step just before the blob goes
            real_unpin(sha256)
            os.link(store.blob_path(sha256), late_name)
        store.unpin = unpin_then_link
        self.assertEqual(evictor.evict(0), 0)  # chosen, but kept by the new name
        self.assertTrue(os.path.exists(store.blob_path(sha256(old))))
        with open(late_name, "rb") as handle:
            self.assertEqual(handle.read(), old)
        self.assertEqual(os.stat(late_name).st_ino,
                         os.stat(store.blob_path(sha256(old))).st_ino)


if __name__ == "__main__":
    unittest.main()
