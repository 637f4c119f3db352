"""One upload, one transaction; and the rough edges a new user hits (issue 9).

An upload request is stored whole or not at all: every exit of the
transaction is driven here -- a precondition on a later file, a conflict,
the client gone, a full disk, an internal error -- for single-file and
multi-file requests, and after each the store must hold exactly what it
held before (no blob, name, tree, replica, pin, expiry or staging file of
the failed request, and no journal record that claims one).

The HTTP exits run against a real server process; the full disk and the
internal error are injected in-process into the store (``UploadTransaction``
on a temporary ARCHIVE_DIR), where a fault can be placed at any step.  The
real ENOSPC of a small tmpfs is covered by test_hardening.

    python3 -m unittest -v test_upload_transaction
"""

import contextlib
import errno
import hashlib
import io
import os
import re
import shutil
import socket
import subprocess
import sys
import tarfile
import tempfile
import unittest
import zipfile

import http_bucket
from http_bucket_testing import (HERE, SERVER_SCRIPT, ServerProcess, assert_staging_empty,
                                 assert_store_consistent, b64, clean_environment, field_part,
                                 file_part, free_port, multipart_body, read_raw_response,
                                 sha256, zip_of)

MIB = 1024 * 1024


def journal_lines(directory):
    """Every line of every journal in ``directory``/index."""
    lines = []
    index = os.path.join(directory, "index")
    for name in sorted(os.listdir(index)):
        if not name.endswith(".log"):
            continue
        with open(os.path.join(index, name), encoding="utf-8") as handle:
            lines += handle.read().splitlines()
    return lines


class StoreSnapshot:
    """What the store holds (blobs, names and symlinks under files/,
    explode/, replica/, empty directories there), to compare before and
    after a failed request."""

    def __init__(self, directory):
        contents = assert_store_consistent(directory)
        self.blobs = set(contents.blobs)
        self.names = dict(contents.names)
        self.other = set()
        for top in ("files", "explode", "replica"):
            root = os.path.join(directory, top)
            for parent, dirs, names in os.walk(root):
                for name in dirs + names:
                    path = os.path.join(parent, name)
                    relpath = os.path.relpath(path, directory)
                    if top == "explode" and relpath.count(os.sep) < 3:
                        continue  # explode/ab/cd: the store's own layout, like blob/ab/cd
                    if os.path.islink(path) or os.path.isdir(path):
                        self.other.add((relpath, os.path.islink(path)))

    def __eq__(self, other):
        return (self.blobs, self.names, self.other) == (other.blobs, other.names, other.other)

    def diff(self, other):
        return {"blobs": self.blobs ^ other.blobs,
                "names": set(self.names.items()) ^ set(other.names.items()),
                "other": self.other ^ other.other}


# ===========================================================================
# The transaction over HTTP: every exit a client can cause
# ===========================================================================


class TransactionOverHttpTest(unittest.TestCase):
    """Failed requests leave the store as it was (real server, real HTTP)."""

    @classmethod
    def setUpClass(cls):
        cls.directory = tempfile.mkdtemp(prefix="http_bucket-txn-")
        cls.server = ServerProcess(cls.directory, ("--fsync", "false"), env={
            "REPLICATE_0": "user/${Username}"}).start()

    @classmethod
    def tearDownClass(cls):
        cls.server.stop()
        shutil.rmtree(cls.directory, ignore_errors=True)

    def snapshot(self):
        return StoreSnapshot(self.directory)

    def assertUnchanged(self, before, reply=None):
        after = self.snapshot()
        self.assertEqual(before, after, "left behind: %s (answer %r)" % (before.diff(after), reply))

    def assertRefused(self, reply, status, fragment):
        self.assertEqual(reply.status, status, reply)
        payload = reply.json()
        self.assertEqual((payload["code"], payload["status"]), (status, "error"))
        self.assertIn(fragment, payload["error"])

    def post_form(self, path, parts, headers=None):
        body, content_type = multipart_body(parts)
        return self.server.request("POST", path, body,
                                   dict({"Content-Type": content_type}, **(headers or {})))

    def test_precondition_on_a_later_file_keeps_nothing(self):
        existing = os.urandom(500)
        self.assertEqual(self.server.request("PUT", "/files/pre/b.txt", existing).status, 201)
        before = self.snapshot()
        first, archive = os.urandom(700), zip_of({"m/one.txt": os.urandom(300)})
        reply = self.post_form("/files/pre/", [file_part("a.txt", first),
                                               file_part("c.zip", archive),
                                               file_part("b.txt", os.urandom(600))],
                               {"If-None-Match": "*"})
        self.assertRefused(reply, 412, "files/pre/b.txt exists (If-None-Match: *)")
        self.assertUnchanged(before, reply)
        self.assertEqual(self.server.request("HEAD", "/checksum/" + sha256(first)).status, 404)
        with open(os.path.join(self.directory, "files", "pre", "b.txt"), "rb") as handle:
            self.assertEqual(handle.read(), existing)

    def test_a_name_sent_twice_under_if_none_match_keeps_nothing(self):
        before = self.snapshot()
        reply = self.post_form("/files/twice/", [file_part("same.txt", os.urandom(100)),
                                                 file_part("same.txt", os.urandom(100))],
                               {"If-None-Match": "*"})
        self.assertRefused(reply, 412, "files/twice/same.txt exists")
        self.assertUnchanged(before, reply)

    def test_single_file_precondition_refused_before_the_body(self):
        self.assertEqual(self.server.request("PUT", "/files/one/x.txt", b"old").status, 201)
        before = self.snapshot()
        with self.server.raw_socket() as sock:
            sock.sendall(b"PUT /files/one/x.txt HTTP/1.1\r\nHost: t\r\nIf-None-Match: *\r\n"
                         b"Content-Length: 1000000\r\nExpect: 100-continue\r\n\r\n")
            reply = read_raw_response(sock.makefile("rb"))
        self.assertRefused(reply, 412, "files/one/x.txt exists")
        self.assertUnchanged(before, reply)

    def test_conflict_on_a_later_file_keeps_nothing_and_restores_replaced_names(self):
        old = os.urandom(400)
        self.assertEqual(self.server.request("PUT", "/files/conf/keep.txt", old).status, 201)
        self.assertEqual(self.server.request("PUT", "/files/conf/sub/inner.txt",
                                             b"inner").status, 201)
        before = self.snapshot()
        new = os.urandom(400)
        reply = self.post_form("/files/conf/", [file_part("keep.txt", new),
                                                file_part("fresh.txt", os.urandom(50)),
                                                file_part("sub", os.urandom(50))])
        self.assertRefused(reply, 409, "files/conf/sub is a directory")
        self.assertUnchanged(before, reply)
        with open(os.path.join(self.directory, "files", "conf", "keep.txt"), "rb") as handle:
            self.assertEqual(handle.read(), old)  # the replaced name got its content back
        self.assertEqual(self.server.request("HEAD", "/checksum/" + sha256(new)).status, 404)

    def test_single_file_conflict(self):
        self.assertEqual(self.server.request("PUT", "/files/fileway", b"a file").status, 201)
        before = self.snapshot()
        reply = self.server.request("PUT", "/files/fileway/below.txt", os.urandom(100))
        self.assertRefused(reply, 409, "a file is in the way of directory files/fileway")
        self.assertUnchanged(before, reply)

    def test_client_gone_in_a_later_file_keeps_nothing(self):
        before = self.snapshot()
        body, content_type = multipart_body([file_part("whole.txt", os.urandom(2000)),
                                             file_part("cut.bin", os.urandom(3 * MIB))])
        with self.server.raw_socket() as sock:
            sock.sendall(("POST /upload HTTP/1.1\r\nHost: t\r\nContent-Type: %s\r\n"
                          "Content-Length: %d\r\n\r\n" % (content_type, len(body))).encode())
            sock.sendall(body[:len(body) - MIB])  # the first file whole, the second cut
        assert_staging_empty(self.directory)
        self.assertUnchanged(before)

    def test_client_gone_in_a_single_raw_upload_keeps_nothing(self):
        before = self.snapshot()
        with self.server.raw_socket() as sock:
            sock.sendall(b"PUT /files/gone/raw.bin HTTP/1.1\r\nHost: t\r\n"
                         b"Content-Length: 5000000\r\n\r\n" + os.urandom(2 * MIB))
        assert_staging_empty(self.directory)
        self.assertUnchanged(before)

    def test_digest_mismatch_keeps_nothing(self):
        before = self.snapshot()
        data = os.urandom(1000)
        reply = self.server.request("PUT", "/upload/mismatch.bin", data, {
            "Repr-Digest": "sha-512=:%s:" % b64(hashlib.sha512(b"other").digest())})
        self.assertRefused(reply, 400, "Repr-Digest sha-512 mismatch")
        self.assertUnchanged(before, reply)

    def test_a_successful_multi_file_request_still_stores_everything(self):
        archive = zip_of({"m/a.txt": b"member a", "m/b.txt": os.urandom(100)})
        reply = self.post_form("/upload", [file_part("ok.zip", archive),
                                           file_part("ok.txt", os.urandom(100))],
                               {"Username": "alice"})
        self.assertEqual(reply.status, 201, reply)
        files = reply.json()["files"]
        self.assertEqual(files[0]["extracted"]["count"], 2)
        self.assertEqual(len(files[0]["replicas"]), 2)  # the blob and the tree link
        assert_store_consistent(self.directory)


# ===========================================================================
# The transaction in-process: faults at every step
# ===========================================================================


class InjectedFault(Exception):
    """Raised by a store step a test sabotages."""


DISK_FULL = OSError(errno.ENOSPC, "No space left on device")


@contextlib.contextmanager
def sabotaged(owner, method, fault, after_calls=0, when=lambda *args: True):
    """``owner.method`` raises ``fault`` once: on the first call past the
    first ``after_calls`` for which ``when(*args)`` holds (a transient
    fault: the rollback after it can work); restored on exit."""
    saved = vars(owner).get(method)
    real = getattr(owner, method)
    calls = []

    def failing(*args, **kwargs):
        if when(*args):
            calls.append(args)
            if len(calls) == after_calls + 1:
                raise fault
        return real(*args, **kwargs)

    setattr(owner, method, failing)
    try:
        yield calls
    finally:
        if saved is None:
            delattr(owner, method)
        else:
            setattr(owner, method, saved)


class TransactionFaultTest(unittest.TestCase):
    """UploadTransaction on a temporary store, with a fault placed at a
    chosen step: a full disk (ENOSPC) or a bug (any exception).  After each
    the store is as before, and the journals, replayed by a fresh Store,
    claim nothing of the failed request."""

    FAULTS = (("disk full", DISK_FULL, (OSError, http_bucket.InsufficientStorage)),
              ("a bug", InjectedFault("boom"), InjectedFault))

    def setUp(self):
        self.directory = tempfile.mkdtemp(prefix="http_bucket-txnfault-")
        self.addCleanup(shutil.rmtree, self.directory, True)
        self.config = http_bucket.Config(
            directory=self.directory, fsync=False,
            replicate=[http_bucket.ReplicaTemplate("REPLICATE_0", "user/${Username}")])
        self.store = self.open_store()
        self.uploads_log = http_bucket.UploadsLog(os.path.join(self.directory, "uploads"),
                                                  self.store.process_id, self.store.tag)
        self.addCleanup(self.uploads_log.close)

    def open_store(self):
        store = http_bucket.Store(self.config)
        self.addCleanup(store.journal.close)
        store.journals.load()
        return store

    def replayed(self):
        """A Store that read the journals as a restarted server would (on a
        copy of index/; blob/ shared read-only by a symlink).  In another
        directory: a second Store here would take this process's own
        journal for a dead process's (fcntl locks are per process)."""
        copy = tempfile.mkdtemp(prefix="http_bucket-replay-")
        self.addCleanup(shutil.rmtree, copy, True)
        shutil.copytree(os.path.join(self.directory, "index"), os.path.join(copy, "index"))
        os.symlink(os.path.join(self.directory, "blob"), os.path.join(copy, "blob"))
        store = http_bucket.Store(http_bucket.Config(directory=copy, fsync=False))
        self.addCleanup(store.journal.close)
        store.journals.refresh()  # the journals only: no reconciling through the link
        store.ready.set()
        return store

    def received(self, files, dest_dir=None, retain_until=0.0):
        items = []
        for name, data in files:
            staged = self.store.stage(name)
            staged.write(data)
            staged.finish()
            dest = os.path.join(self.directory, "files", dest_dir, name) if dest_dir else None
            items.append(http_bucket.Incoming(name, staged, None, dest))
        headers = http_bucket.Headers({"username": "bob"})
        return http_bucket.Received(items, False, retain_until, headers, {"job": "7"}, False,
                                    "127.0.0.1")

    def commit(self, received):
        return http_bucket.UploadTransaction(self.store, self.config.replicate, self.uploads_log).commit(received)

    def assertNothingLeft(self, before, failed_contents):
        after = StoreSnapshot(self.directory)
        self.assertEqual(before, after, before.diff(after))
        self.assertEqual(os.listdir(self.store.staging_dir), [])
        lines = journal_lines(self.directory)
        for data in failed_contents:
            digest = sha256(data)
            kinds = [line.split("\t")[0] for line in lines if digest in line]
            # A blob published and taken back is B ... R, nothing else.
            self.assertIn(kinds, ([], ["B", "R"]), (digest, kinds))
            self.assertFalse(self.store.blobs.pinned(digest))
            self.assertNotIn(digest, self.store.sources)
        self.assertEqual([relpath for relpath in self.store.expiries if "fault" in relpath], [])
        fresh = self.replayed()
        for data in failed_contents:
            self.assertIsNone(fresh.lookup(sha256(data)))
            self.assertFalse(fresh.blobs.pinned(sha256(data)))
        self.assertEqual([relpath for relpath in fresh.expiries if "fault" in relpath], [])

    def check_fault(self, files, owner, method, after_calls, dest_dir=None,
                    when=lambda *args: True):
        for label, fault, expected in self.FAULTS:
            with self.subTest(label):
                before = StoreSnapshot(self.directory)
                contents = [data() if callable(data) else data for _name, data in files]
                received = self.received([(name, data) for (name, _), data in
                                          zip(files, contents)], dest_dir,
                                         retain_until=http_bucket.utc_now() + 3600)
                with sabotaged(owner, method, fault, after_calls, when) as calls:
                    with self.assertRaises(expected):
                        self.commit(received)
                self.assertGreater(len(calls), after_calls, "the fault was never reached")
                self.assertNothingLeft(before, contents)

    def test_fault_while_naming_a_later_file_restores_the_replaced_name(self):
        self.commit(self.received([("old.txt", b"old content")], "fault"))
        self.check_fault([("old.txt", lambda: os.urandom(300)),
                          ("new.txt", lambda: os.urandom(300))],
                         os, "replace", 1, dest_dir="fault")
        with open(os.path.join(self.directory, "files", "fault", "old.txt"), "rb") as handle:
            self.assertEqual(handle.read(), b"old content")

    def test_fault_while_expanding_a_later_archive(self):
        self.check_fault([("first.zip", lambda: zip_of({"a/x.txt": os.urandom(100),
                                                        "a/y.txt": os.urandom(100)})),
                          ("second.zip", lambda: zip_of({"b/z.txt": os.urandom(100)}))],
                         http_bucket.TreeBuilder, "publish", 1)

    def test_fault_while_decompressing(self):
        import gzip
        self.check_fault([("plain.txt", lambda: os.urandom(100)),
                          ("inner.tgz", lambda: gzip.compress(os.urandom(100)))],
                         self.store, "add_derived", 0)

    def test_fault_while_making_a_later_replica(self):
        # Links: rep.zip's member (1), its replica (2), rep.txt's replica (3).
        self.check_fault([("rep.zip", lambda: zip_of({"r/x.txt": os.urandom(100)})),
                          ("rep.txt", lambda: os.urandom(100))],
                         self.store, "link_blob", 2)

    def test_fault_at_the_commit_point(self):
        def batch(self_or_lines, lines=None):
            lines = lines if lines is not None else self_or_lines
            return any(line[0] in "PE" for line in lines)
        self.check_fault([("c1.txt", lambda: os.urandom(100)),
                          ("c2.zip", lambda: zip_of({"c/x.txt": os.urandom(100)}))],
                         self.store.journal, "write_lines", 0, dest_dir="fault", when=batch)

    def test_fault_in_a_single_file_request(self):
        self.check_fault([("single.zip", lambda: zip_of({"s/x.txt": os.urandom(100)}))],
                         http_bucket.TreeBuilder, "publish", 0)
        self.check_fault([("single.txt", lambda: os.urandom(100))],
                         os, "replace", 0, dest_dir="fault")

    def test_nothing_sabotaged_commits(self):
        stored = self.commit(self.received([("fine.zip", zip_of({"f/x.txt": b"x"})),
                                            ("fine.txt", b"fine")], "fault",
                                           retain_until=http_bucket.utc_now() + 3600))
        self.assertEqual([item.name for item in stored],
                         ["files/fault/fine.zip", "files/fault/fine.txt"])
        self.assertEqual(stored[0].expansion.tree.files[0]["path"], "f/x.txt")
        self.assertIn("files/fault/fine.txt", self.store.expiries)
        self.assertEqual(os.listdir(self.store.staging_dir), [])


# ===========================================================================
# Rough edges a new user hits (issue 9, part 2)
# ===========================================================================


class RoughEdgesTest(unittest.TestCase):
    """Each rough edge of issue 9, over real HTTP against one server."""

    @classmethod
    def setUpClass(cls):
        cls.directory = tempfile.mkdtemp(prefix="http_bucket-edges-")
        cls.server = ServerProcess(cls.directory, ("--fsync", "false",
                                                   "--max-content-length", "64mb")).start()

    @classmethod
    def tearDownClass(cls):
        cls.server.stop()
        shutil.rmtree(cls.directory, ignore_errors=True)

    def assertRefused(self, reply, status, fragment):
        self.assertEqual(reply.status, status, reply)
        payload = reply.json()
        self.assertEqual((payload["code"], payload["status"]), (status, "error"))
        self.assertIn(fragment, payload["error"])

    def raw_exchange(self, head, body=b""):
        """Send ``head`` (and ``body``), read one response, never send more."""
        with self.server.raw_socket() as sock:
            sock.sendall(head + body)
            stream = sock.makefile("rb")
            reply = read_raw_response(stream)
            if reply.status == 100:
                reply = read_raw_response(stream)
            return reply

    def test_1_a_chunk_larger_than_the_limit_is_413_at_once(self):
        # Nothing after the chunk-size line is ever sent: the answer must
        # not wait for it (a hang would end in the socket timeout).
        reply = self.raw_exchange(b"PUT /upload/huge.bin HTTP/1.1\r\nHost: t\r\n"
                                  b"Transfer-Encoding: chunked\r\n\r\nfffffffffffffffffff\r\n")
        self.assertRefused(reply, 413, "over MAX_CONTENT_LENGTH (67108864 bytes)")
        reply = self.raw_exchange(b"PUT /upload/big.bin HTTP/1.1\r\nHost: t\r\n"
                                  b"Transfer-Encoding: chunked\r\n\r\n10\r\n0123456789abcdef\r\n"
                                  b"4000000\r\n")  # 16 + 64 MiB
        self.assertRefused(reply, 413, "a chunk of 67108864 bytes")

    def test_2_digest_mismatches_name_the_algorithm(self):
        data = os.urandom(300)
        for header, algorithm, digest in (
                ("Repr-Digest", "sha-256", hashlib.sha256(b"x").digest()),
                ("Content-Digest", "sha-512", hashlib.sha512(b"x").digest())):
            reply = self.server.request("PUT", "/upload/m.bin", data, {
                header: "%s=:%s:" % (algorithm, b64(digest))})
            self.assertRefused(reply, 400, "%s %s mismatch" % (header, algorithm))
        both = "sha-256=:%s:, sha-512=:%s:" % (b64(hashlib.sha256(data).digest()),
                                               b64(hashlib.sha512(b"x").digest()))
        reply = self.server.request("PUT", "/upload/m.bin", data, {"Repr-Digest": both})
        self.assertRefused(reply, 400, "Repr-Digest sha-512 mismatch")

    def test_3_a_hex_content_md5_is_refused_before_the_body(self):
        hex_md5 = hashlib.md5(b"x").hexdigest()
        reply = self.raw_exchange(("PUT /upload/md5.bin HTTP/1.1\r\nHost: t\r\n"
                                   "Content-MD5: %s\r\nExpect: 100-continue\r\n"
                                   "Content-Length: 10000000\r\n\r\n" % hex_md5).encode())
        self.assertRefused(reply, 400, "Content-MD5 must be the base64 of the 16-byte md5 "
                                       "digest (24 characters); a hex digest goes in "
                                       "X-Checksum-Md5")
        reply = self.server.request("PUT", "/upload/md5.bin", b"x",
                                    {"Content-MD5": b64(hashlib.md5(b"x").digest())})
        self.assertEqual(reply.status, 201, reply)
        reply = self.server.request("PUT", "/upload/r.bin", b"x",
                                    {"Repr-Digest": "sha-256=:%s:" % b64(b"short")})
        self.assertRefused(reply, 400, "Repr-Digest sha-256 must be the base64 of the "
                                       "32-byte sha256 digest")

    def test_5_the_409_of_delete_checksum_names_the_names(self):
        data = os.urandom(100)
        for number in range(25):
            reply = self.server.request("PUT", "/files/many/n%02d.txt" % number, data)
            self.assertEqual(reply.status, 201, reply)
        reply = self.server.request("DELETE", "/checksum/" + sha256(data))
        self.assertRefused(reply, 409, "25 name(s) still use blob %s: " % sha256(data))
        error = reply.json()["error"]
        listed = re.findall(r"files/many/n\d\d\.txt", error)
        self.assertEqual(listed, ["files/many/n%02d.txt" % n for n in range(20)])
        self.assertIn(", ...; delete them first", error)
        self.assertEqual(reply.header("X-Names"), "25")

    def test_6_folder_downloads_hold_plain_files_and_directories(self):
        data = os.urandom(5000)
        for name in ("a.txt", "sub/b.txt", "sub/deeper/c.txt"):
            self.assertEqual(self.server.request("PUT", "/files/dl/" + name, data).status, 201)
        for kind in ("tar", "tar.gz"):
            reply = self.server.request("GET", "/files/dl/?download=" + kind)
            self.assertEqual(reply.status, 200, reply)
            with tarfile.open(fileobj=io.BytesIO(reply.body)) as archive:
                members = {member.name: member for member in archive.getmembers()}
                self.assertEqual(sorted(members), ["a.txt", "sub", "sub/b.txt", "sub/deeper",
                                                   "sub/deeper/c.txt"])
                for name, member in members.items():
                    if name.endswith(".txt"):
                        self.assertTrue(member.isreg(), (kind, name, member.type))
                        self.assertEqual(member.mode, 0o644, name)
                        self.assertEqual(archive.extractfile(member).read(), data)
                    else:
                        self.assertTrue(member.isdir(), name)
                        self.assertEqual(member.mode, 0o755, name)
            if shutil.which("tar"):
                # One file of three names of one content extracts on its own.
                with tempfile.TemporaryDirectory() as into:
                    done = subprocess.run(["tar", "-x" + ("z" if kind == "tar.gz" else ""),
                                           "-f", "-", "-C", into, "sub/deeper/c.txt"],
                                          input=reply.body, stderr=subprocess.PIPE, timeout=60)
                    self.assertEqual(done.returncode, 0, done.stderr)
                    with open(os.path.join(into, "sub", "deeper", "c.txt"), "rb") as handle:
                        self.assertEqual(handle.read(), data)
        reply = self.server.request("GET", "/files/dl/?download=zip")
        with zipfile.ZipFile(io.BytesIO(reply.body)) as archive:
            modes = {info.filename: info.external_attr >> 16 for info in archive.infolist()}
            self.assertEqual(modes, {"a.txt": 0o100644, "sub/": 0o40755, "sub/b.txt": 0o100644,
                                     "sub/deeper/": 0o40755, "sub/deeper/c.txt": 0o100644})
            self.assertEqual(archive.read("sub/deeper/c.txt"), data)

    def test_9_get_upload_is_a_form_that_needs_no_javascript(self):
        reply = self.server.request("GET", "/upload")
        self.assertEqual(reply.status, 200)
        page = reply.body.decode()
        form = re.search(r"<form[^>]*>", page).group(0)
        self.assertNotIn("onsubmit", form)  # a plain form post: no script involved
        for attribute in ('method="post"', 'action="/upload"',
                          'enctype="multipart/form-data"'):
            self.assertIn(attribute, form)
        self.assertRegex(page, r'<input type="file" name="file" multiple')
        # What the browser then posts, and the page it gets back.
        body, content_type = multipart_body([file_part("form1.txt", b"one"),
                                             file_part("form2.txt", b"two"),
                                             field_part("retain_days", b"")])
        reply = self.server.request("POST", "/upload", body, {
            "Content-Type": content_type, "Accept": "text/html,application/xhtml+xml,*/*;q=0.8"})
        self.assertEqual(reply.status, 201, reply)
        self.assertTrue(reply.header("content-type").startswith("text/html"))
        self.assertIn("form1.txt", reply.body.decode())
        self.assertIn("/checksum/%s?name=form2.txt" % sha256(b"two"), reply.body.decode())

    def test_10_one_file_name_rule_for_every_way_in(self):
        name = "<img src=x onerror=alert(1)>.txt"
        data = os.urandom(64)
        body, content_type = multipart_body([file_part(name, data)])
        by_form = self.server.request("POST", "/files/names/form/", body,
                                      {"Content-Type": content_type})
        quoted = "%3Cimg%20src%3Dx%20onerror%3Dalert(1)%3E.txt"
        by_put = self.server.request("PUT", "/files/names/put/" + quoted, data)
        by_upload = self.server.request("PUT", "/upload/" + quoted, data)
        for reply in (by_form, by_put, by_upload):
            self.assertIn(reply.status, (200, 201), reply)
            self.assertEqual(reply.json()["files"][0]["name"], name)
        self.assertTrue(os.path.isfile(os.path.join(self.directory, "files", "names", "form",
                                                    name)))
        self.assertTrue(os.path.isfile(os.path.join(self.directory, "files", "names", "put",
                                                    name)))
        for bad, fragment in (("tab\there.txt", "control character"),
                              (".~reserved", "reserved")):
            body, content_type = multipart_body([file_part(bad, data)])
            reply = self.server.request("POST", "/upload", body, {"Content-Type": content_type})
            self.assertRefused(reply, 400, fragment)
            reply = self.server.request("PUT", "/files/names/" + bad.replace("\t", "%09"), data)
            self.assertRefused(reply, 400, fragment)
        assert_store_consistent(self.directory)


class StartupErrorTest(unittest.TestCase):
    """A bad setting or an unusable port or certificate: one line, exit 2."""

    def start(self, *args):
        directory = tempfile.mkdtemp(prefix="http_bucket-startup-")
        self.addCleanup(shutil.rmtree, directory, True)
        done = subprocess.run([sys.executable, SERVER_SCRIPT] + list(args)
                              + ["-d", directory], env=clean_environment(),
                              stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, timeout=60)
        return done.returncode, done.stderr.decode()

    def assertOneLine(self, result, fragment):
        status, stderr = result
        self.assertEqual(status, 2, stderr)
        lines = stderr.strip().splitlines()
        self.assertEqual(len(lines), 1, stderr)
        self.assertTrue(lines[0].startswith("http_bucket: error: "), stderr)
        self.assertIn(fragment, lines[0])
        self.assertNotIn("Traceback", stderr)

    def test_port_out_of_range(self):
        self.assertOneLine(self.start("99999", "-b", "127.0.0.1"),
                           "port='99999': a TCP port is 0 to 65535")

    def test_address_in_use(self):
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen(1)
            port = taken.getsockname()[1]
            self.assertOneLine(self.start(str(port), "-b", "127.0.0.1"),
                               "cannot listen on 127.0.0.1:%d: address already in use" % port)

    def test_address_not_on_this_machine(self):
        self.assertOneLine(self.start(str(free_port()), "-b", "192.0.2.1"),
                           "no such address on this machine (--bind)")

    def test_missing_certificate_and_mismatched_key(self):
        missing = os.path.join(tempfile.gettempdir(), "no-such-cert-%d.pem" % os.getpid())
        self.assertOneLine(self.start(str(free_port()), "-b", "127.0.0.1", "--certfile",
                                      missing, "--keyfile", missing),
                           "--certfile %s: No such file or directory" % missing)
        if not shutil.which("openssl"):
            self.skipTest("openssl is not installed: no certificates to mismatch")
        with tempfile.TemporaryDirectory() as tls:
            paths = {}
            for name in ("one", "two"):
                paths[name] = (os.path.join(tls, name + ".crt"), os.path.join(tls, name + ".key"))
                subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                                "ec_paramgen_curve:prime256v1", "-nodes", "-days", "1",
                                "-subj", "/CN=localhost", "-keyout", paths[name][1],
                                "-out", paths[name][0]], check=True, timeout=60,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            self.assertOneLine(self.start(str(free_port()), "-b", "127.0.0.1", "--certfile",
                                          paths["one"][0], "--keyfile", paths["two"][1]),
                               "--keyfile %s is not the key of --certfile %s"
                               % (paths["two"][1], paths["one"][0]))


class SelfContainedDocsTest(unittest.TestCase):
    """The project's files say what they mean (issue 9, part 2.11)."""

    def project_files(self):
        listed = subprocess.run(["git", "ls-files"], cwd=HERE, stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL, timeout=30)
        names = listed.stdout.decode().split() if listed.returncode == 0 else []
        return [name for name in names or os.listdir(HERE)
                if os.path.isfile(os.path.join(HERE, name)) and not name.endswith(".png")]

    def test_no_reference_to_pages_a_reader_cannot_open(self):
        # Written so that this line does not match itself.
        pattern = re.compile(r"SPEC\.md|\bthe s[e]ed\b|s[e]ed's|shared/s[e]ed", re.I)
        for name in self.project_files():
            with open(os.path.join(HERE, name), encoding="utf-8", errors="replace") as handle:
                for number, line in enumerate(handle, 1):
                    self.assertIsNone(pattern.search(line), "%s:%d: %s" % (name, number, line))

    def test_readme_recipes_that_save_a_response_fail_on_errors(self):
        with open(os.path.join(HERE, "README.md"), encoding="utf-8") as handle:
            for number, line in enumerate(handle, 1):
                command = line.split("#", 1)[0]
                if not re.search(r"\bcurl\b", command):
                    continue
                command = command.replace("-o /dev/null", "")  # nothing saved
                saves = re.search(r"(^|\s)-(o|O|[a-zA-Z]*[oO][a-zA-Z]*)\b", command) \
                    or "--output" in command
                if saves:
                    self.assertRegex(command, r"(^|\s)-[a-zA-Z]*f|--fail",
                                     "README.md:%d saves without -f: %s" % (number, line))


if __name__ == "__main__":
    unittest.main()
