"""Tests for archives (issue 3) and organizing and reading back (issue 4).

Every test talks to a real ``http_bucket.py`` started as a subprocess on a
free port, over real HTTP (``http.client``; curl where it is natural and
installed).  Archives are built at run time with zipfile, tarfile, gzip, bz2
and lzma; what the server stored is reopened from ARCHIVE_DIR and hashed.

    python3 -m unittest -v test_archives_organize
    python3 -m pytest -q test_archives_organize.py
"""

import bz2
import gzip
import http.client
import io
import json
import lzma
import os
import secrets
import shutil
import stat
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import unittest
import urllib.parse
import warnings
import zipfile

from http_bucket_testing import (CURL, DEFAULT_DIGESTS, POLL_TIMEOUT, SERVER_SCRIPT,
                                 ServerProcess, assert_staging_empty, blob_path,
                                 clean_environment, digests_of, file_part, files_under,
                                 free_port, multipart_body, sha256, tree_path, wait_until)


# ---------------------------------------------------------------------------
# Helpers: content and archives
# ---------------------------------------------------------------------------


def unique(label="data", size=0):
    """Content no other test stores: a label, a random token, padding."""
    text = ("%s %s\n" % (label, secrets.token_hex(16))).encode()
    return text + os.urandom(size) if size else text


def make_zip(members, compression=zipfile.ZIP_DEFLATED):
    """A zip of [(name, bytes) or ZipInfo-with-bytes], duplicates allowed."""
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zipfile warns on duplicate names
        with zipfile.ZipFile(buffer, "w", compression) as archive:
            for name, data in members:
                if isinstance(name, zipfile.ZipInfo):
                    name.compress_type = compression
                archive.writestr(name, data)
    return buffer.getvalue()


def tar_info(name, kind=tarfile.REGTYPE, size=0, linkname=""):
    info = tarfile.TarInfo(name)
    info.type = kind
    info.size = size
    info.linkname = linkname
    info.mode = 0o755 if kind == tarfile.DIRTYPE else 0o644
    info.mtime = 1700000000
    return info


def make_tar(members, tar_format=tarfile.PAX_FORMAT):
    """A tar of [(name, bytes)] files or TarInfo (links, devices, dirs)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tar_format) as archive:
        for member in members:
            if isinstance(member, tarfile.TarInfo):
                archive.addfile(member)
            else:
                name, data = member
                archive.addfile(tar_info(name, size=len(data)), io.BytesIO(data))
    return buffer.getvalue()


def entries_under(root):
    """Every path (files and directories) under ``root``, relative."""
    found = set()
    for parent, dirs, names in os.walk(root):
        for name in dirs + names:
            found.add(os.path.relpath(os.path.join(parent, name), root))
    return found


def vm_hwm_kib(pid):
    """Peak resident memory (VmHWM) of process ``pid``, in KiB."""
    with open("/proc/%d/status" % pid) as handle:
        for line in handle:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    raise AssertionError("no VmHWM for process %d" % pid)


class ServerTestCase(unittest.TestCase):
    """One server per class, in a fresh temporary directory.

    ``root`` is ARCHIVE_DIR; ``base`` its parent and the server's working
    directory (nothing but ARCHIVE_DIR is ever written there).
    """

    server_args = ("--fsync", "false")  # os.sync per archive: slow on a shared box
    server_env = {}

    @classmethod
    def setUpClass(cls):
        cls.base = tempfile.mkdtemp(prefix="bucket-test-")
        cls.root = os.path.join(cls.base, "archive")
        cls.server = ServerProcess(cls.root, cls.server_args, env=cls.server_env, cwd=cls.base)
        try:
            cls.server.start()
        except BaseException:
            shutil.rmtree(cls.base, ignore_errors=True)
            raise

    @classmethod
    def tearDownClass(cls):
        cls.server.stop()
        shutil.rmtree(cls.base, ignore_errors=True)

    # -- requests ------------------------------------------------------------

    def request(self, method, path, body=None, headers=None, timeout=30):
        return self.server.request(method, path, body, headers, timeout)

    def upload(self, filename, data, headers=None, query="", expect=(200, 201)):
        """POST /upload one file; returns (answer, the file's entry)."""
        body, content_type = multipart_body([file_part(filename, data)])
        all_headers = {"Content-Type": content_type}
        all_headers.update(headers or {})
        answer = self.request("POST", "/upload" + query, body, all_headers)
        self.assertIn(answer.status, expect, answer)
        document = answer.json()
        self.assertEqual(document["status"], "Success", document)
        self.assertEqual(document["code"], answer.status)
        return answer, document["files"][0]

    def put_file(self, path, data, headers=None):
        return self.request("PUT", "/files/" + path, data, headers)

    def head_checksum(self, hexdigest):
        return self.request("HEAD", "/checksum/" + hexdigest).status

    # -- assertions ----------------------------------------------------------

    def assertRefused(self, answer, status, *fragments):
        """``answer`` is the JSON error of ``status`` naming ``fragments``."""
        self.assertEqual(answer.status, status, answer)
        document = answer.json()
        self.assertEqual(set(document), {"code", "status", "error"}, document)
        self.assertEqual(document["code"], status)
        self.assertEqual(document["status"], "error")
        for fragment in fragments:
            self.assertIn(fragment, document["error"])
        return document["error"]

    def assertStored(self, data, algorithms=DEFAULT_DIGESTS):
        """Every digest of ``data`` answers HEAD /checksum with 200."""
        for name, value in digests_of(data, algorithms).items():
            self.assertEqual(self.head_checksum(value), 200,
                             "%s %s of %r... not found" % (name, value, data[:40]))

    def assertNotStored(self, data):
        for name, value in digests_of(data, DEFAULT_DIGESTS).items():
            self.assertEqual(self.head_checksum(value), 404,
                             "%s %s of %r... still answers" % (name, value, data[:40]))

    def blob_path(self, sha):
        return blob_path(self.root, sha)

    def tree_path(self, sha):
        return tree_path(self.root, sha)

    def tree_relpath(self, sha):
        return "explode/%s/%s/%s" % (sha[:2], sha[2:4], sha)

    def assertStagingEmpty(self):
        assert_staging_empty(self.root)

    def assertTreeMatches(self, sha, members):
        """explode/<sha>/ holds exactly ``members`` {path: bytes}, as blob links."""
        tree = self.tree_path(sha)
        self.assertTrue(os.path.isdir(tree), "no tree %s" % tree)
        regular = {path for path in files_under(tree, relative=True)
                   if not os.path.islink(os.path.join(tree, path))}
        self.assertEqual(regular, set(members))
        for path, data in members.items():
            full = os.path.join(tree, path)
            with open(full, "rb") as handle:
                self.assertEqual(handle.read(), data, path)
            blob = self.blob_path(sha256(data))
            self.assertEqual(os.stat(full).st_ino, os.stat(blob).st_ino,
                             "%s is not a hardlink of its blob" % path)

    def assertExtracted(self, extracted, sha, members):
        """The response's ``extracted`` describes ``members`` under ``sha``."""
        self.assertIsNotNone(extracted)
        self.assertEqual(extracted["path"], self.tree_relpath(sha))
        listed = {item["path"]: item for item in extracted["files"] if "checksums" in item}
        self.assertEqual(set(listed), set(members))
        for path, data in members.items():
            self.assertEqual(listed[path]["size"], len(data), path)
            self.assertEqual(listed[path]["checksums"], digests_of(data, DEFAULT_DIGESTS), path)


# ---------------------------------------------------------------------------
# Issue 3: archives and compressed files
# ---------------------------------------------------------------------------


class ArchiveTests(ServerTestCase):
    """Formats, detection, safety, corruption and the ratio limit (defaults)."""

    def test_single_compressed_files_keep_a_decompressed_blob(self):
        for suffix, compress, mime in (("gz", gzip.compress, "application/gzip"),
                                       ("bz2", bz2.compress, "application/x-bzip2"),
                                       ("xz", lzma.compress, "application/x-xz")):
            with self.subTest(suffix):
                payload = unique("report " + suffix) * 50
                packed = compress(payload)
                answer, entry = self.upload("report.txt." + suffix, packed)
                self.assertEqual(answer.status, 201)
                self.assertEqual(entry["checksums"], digests_of(packed, DEFAULT_DIGESTS))
                self.assertEqual(entry["mime"], mime)
                self.assertEqual(entry["stored"], "new")
                self.assertIsNone(entry["extracted"])
                self.assertIsNone(entry["expansion_error"])
                inner = entry["decompressed"]
                self.assertEqual(inner["name"], "report.txt")
                self.assertEqual(inner["size"], len(payload))
                self.assertEqual(inner["checksums"], digests_of(payload, DEFAULT_DIGESTS))
                self.assertEqual(inner["path"], os.path.relpath(
                    self.blob_path(sha256(payload)), self.root))
                with open(self.blob_path(sha256(payload)), "rb") as handle:
                    self.assertEqual(handle.read(), payload)
                self.assertStored(packed)
                self.assertStored(payload)
                fetched = self.request("GET", "/checksum/" + digests_of(payload, DEFAULT_DIGESTS)["md5"])
                self.assertEqual((fetched.status, fetched.body), (200, payload))
                seed = answer.json()
                self.assertEqual(seed["checksum"]["decompressed"], sha256(payload))
                self.assertEqual(seed["path"]["decompressed"], inner["path"])

    def test_zip_members_are_exploded_and_hardlinked(self):
        members = {"results/a.xml": b"<a>" + unique("a") + b"</a>",
                   "results/sub/b.txt": unique("b", 3000),
                   u"results/r\u00e9sum\u00e9.txt": unique("accented")}
        data = make_zip(list(members.items()) + [("results/empty/", b"")])
        answer, entry = self.upload("results.zip", data)
        self.assertEqual(answer.status, 201)
        self.assertEqual(entry["mime"], "application/zip")
        self.assertIsNone(entry["decompressed"])
        self.assertIsNone(entry["expansion_error"])
        key = sha256(data)
        extracted = entry["extracted"]
        self.assertExtracted(extracted, key, members)
        self.assertEqual(extracted["count"], 3)
        self.assertEqual(extracted["skipped"], [])
        self.assertFalse(extracted["existing"])
        self.assertTreeMatches(key, members)
        self.assertTrue(os.path.isdir(os.path.join(self.tree_path(key), "results", "empty")))
        for content in members.values():
            self.assertStored(content)
        self.assertEqual(answer.json()["path"]["archive"], self.tree_relpath(key))
        fetched = self.request("GET", "/%s/results/sub/b.txt" % self.tree_relpath(key))
        self.assertEqual((fetched.status, fetched.body), (200, members["results/sub/b.txt"]))
        self.assertEqual(fetched.headers["ETag"], '"%s"' % sha256(members["results/sub/b.txt"]))

    def test_tar_formats_ustar_gnu_pax(self):
        long_dir = "/".join(["d%02d-%s" % (n, "x" * 20) for n in range(5)])  # > 100 bytes
        for tar_format, label in ((tarfile.USTAR_FORMAT, "ustar"),
                                  (tarfile.GNU_FORMAT, "gnu"),
                                  (tarfile.PAX_FORMAT, "pax")):
            with self.subTest(label):
                members = {"top.txt": unique(label),
                           long_dir + "/deep-%s.txt" % label: unique("deep " + label, 700)}
                if tar_format == tarfile.PAX_FORMAT:
                    members[u"\u00fcnicode-\u20ac.txt"] = unique("pax unicode")
                if tar_format != tarfile.USTAR_FORMAT:  # ustar: name <= 100 after prefix
                    members["n" * 150 + ".txt"] = unique("long name " + label)
                data = make_tar([tar_info("emptydir/", tarfile.DIRTYPE)]
                                + list(members.items()), tar_format)
                answer, entry = self.upload("bundle-%s.tar" % label, data)
                self.assertEqual(answer.status, 201)
                self.assertEqual(entry["mime"], "application/x-tar")
                self.assertIsNone(entry["decompressed"])
                self.assertIsNone(entry["expansion_error"], entry)
                self.assertExtracted(entry["extracted"], sha256(data), members)
                self.assertEqual(entry["extracted"]["count"], len(members))
                self.assertTreeMatches(sha256(data), members)
                self.assertTrue(os.path.isdir(os.path.join(self.tree_path(sha256(data)), "emptydir")))
                for content in members.values():
                    self.assertStored(content)

    def test_compressed_tars_keep_tar_blob_and_members(self):
        for name, compress in (("bundle.tgz", gzip.compress),
                               ("bundle.tar.gz", gzip.compress),
                               ("bundle.tbz2", bz2.compress),
                               ("bundle.txz", lzma.compress)):
            with self.subTest(name):
                members = {"out/log.txt": unique(name, 200), "out/x/y.bin": unique(name, 5000)}
                tar_bytes = make_tar(list(members.items()))
                packed = compress(tar_bytes)
                answer, entry = self.upload(name, packed)
                self.assertEqual(answer.status, 201)
                self.assertIsNone(entry["expansion_error"], entry)
                inner = entry["decompressed"]
                self.assertEqual(inner["name"], "bundle.tar")
                self.assertEqual(inner["checksums"], digests_of(tar_bytes, DEFAULT_DIGESTS))
                self.assertEqual(inner["mime"], "application/x-tar")
                # The tree is keyed by the sha256 of the decompressed tar.
                self.assertExtracted(entry["extracted"], sha256(tar_bytes), members)
                self.assertTreeMatches(sha256(tar_bytes), members)
                self.assertFalse(os.path.exists(self.tree_path(sha256(packed))))
                for content in [packed, tar_bytes] + list(members.values()):
                    self.assertStored(content)
                seed = answer.json()
                self.assertEqual(seed["checksum"]["archive"], sha256(tar_bytes))
                self.assertEqual(seed["path"]["archive"], self.tree_relpath(sha256(tar_bytes)))

    def test_detection_is_by_content_not_by_name(self):
        member = unique("inside a .bin")
        data = make_zip([("inside.txt", member)])
        _answer, entry = self.upload("data.bin", data)
        self.assertEqual(entry["mime"], "application/zip")
        self.assertExtracted(entry["extracted"], sha256(data), {"inside.txt": member})
        self.assertStored(member)

        text = b"PK, this is only text that happens to be named .zip\n" + unique("text")
        _answer, entry = self.upload("x.zip", text)
        self.assertIsNone(entry["extracted"])
        self.assertIsNone(entry["decompressed"])
        self.assertIsNone(entry["expansion_error"])
        self.assertFalse(os.path.exists(self.tree_path(sha256(text))))

        payload = unique("gzip named .txt")
        _answer, entry = self.upload("plain.txt", gzip.compress(payload))
        self.assertEqual(entry["decompressed"]["checksums"], digests_of(payload, DEFAULT_DIGESTS))

    # -- safety ---------------------------------------------------------------

    def assertNothingOutside(self, marker):
        """No file or directory whose name holds ``marker`` exists anywhere."""
        hits = [path for path in entries_under(self.base) if marker in path]
        self.assertEqual(hits, [], "written outside the tree: %s" % hits)

    def test_zip_absolute_and_dotdot_names_are_skipped(self):
        marker = "evil" + secrets.token_hex(4)
        absolute = os.path.join(self.base, marker + "-abs.txt")
        bad = {absolute: "absolute",
               "C:/%s-drive.txt" % marker: "absolute",
               "../%s-up.txt" % marker: "..",
               "a/b/../../../%s-normalized.txt" % marker: "..",
               "..\\%s-backslash.txt" % marker: "..",
               "./../%s-dot.txt" % marker: ".."}
        good = {"ok/fine.txt": unique("fine")}
        refused = {name: unique(name) for name in bad}
        data = make_zip(list(refused.items()) + list(good.items()))
        _answer, entry = self.upload("evil.zip", data)
        extracted = entry["extracted"]
        self.assertIsNone(entry["expansion_error"])
        self.assertExtracted(extracted, sha256(data), good)
        reasons = {item["path"]: item["reason"] for item in extracted["skipped"]}
        self.assertEqual(set(reasons), set(bad))
        for name, fragment in bad.items():
            self.assertIn(fragment, reasons[name], name)
        self.assertTreeMatches(sha256(data), good)
        self.assertFalse(os.path.exists(absolute))
        self.assertNothingOutside(marker)
        for content in refused.values():
            self.assertEqual(self.head_checksum(sha256(content)), 404)

    def test_tar_absolute_and_dotdot_names_are_skipped(self):
        marker = "evil" + secrets.token_hex(4)
        absolute = os.path.join(self.base, marker + "-abs.txt")
        bad = {absolute: "absolute",
               "../%s-up.txt" % marker: "..",
               "x/../../%s-normalized.txt" % marker: ".."}
        good = {"fine.txt": unique("fine tar")}
        data = make_tar(list(good.items()) + [(name, unique(name)) for name in bad])
        _answer, entry = self.upload("evil.tar", data)
        reasons = {item["path"]: item["reason"] for item in entry["extracted"]["skipped"]}
        self.assertEqual(set(reasons), set(bad))
        for name, fragment in bad.items():
            self.assertIn(fragment, reasons[name], name)
        self.assertTreeMatches(sha256(data), good)
        self.assertFalse(os.path.exists(absolute))
        self.assertNothingOutside(marker)

    def test_tar_links_pointing_outside_are_skipped(self):
        marker = "evil" + secrets.token_hex(4)
        outside = os.path.join(self.base, marker + "-target.txt")
        good = {"real.txt": unique("real")}
        links = [tar_info("abs-sym", tarfile.SYMTYPE, linkname="/etc/passwd"),
                 tar_info("sub/up-sym", tarfile.SYMTYPE, linkname="../../%s" % marker),
                 tar_info("deep-sym", tarfile.SYMTYPE, linkname="a/../../%s" % marker),
                 tar_info("root-sym", tarfile.SYMTYPE, linkname="."),
                 tar_info("abs-hard", tarfile.LNKTYPE, linkname=outside),
                 tar_info("up-hard", tarfile.LNKTYPE, linkname="../%s" % marker),
                 tar_info("missing-hard", tarfile.LNKTYPE, linkname="not-in-archive.txt")]
        data = make_tar(list(good.items()) + links)
        _answer, entry = self.upload("links.tar", data)
        self.assertIsNone(entry["expansion_error"])
        reasons = {item["path"]: item["reason"] for item in entry["extracted"]["skipped"]}
        self.assertEqual(set(reasons), {link.name for link in links})
        self.assertIn("absolute", reasons["abs-sym"])
        self.assertIn("outside", reasons["sub/up-sym"])
        self.assertIn("outside", reasons["deep-sym"])
        self.assertIn("hardlink", reasons["abs-hard"])
        self.assertIn("hardlink", reasons["up-hard"])
        tree = self.tree_path(sha256(data))
        for link in links:
            self.assertFalse(os.path.lexists(os.path.join(tree, link.name)), link.name)
        self.assertTreeMatches(sha256(data), good)
        self.assertNothingOutside(marker)

    def test_tar_links_inside_the_tree_are_kept(self):
        readme = unique("readme")
        data = make_tar([("readme.txt", readme), tar_info("docs/", tarfile.DIRTYPE),
                         tar_info("docs/link.txt", tarfile.SYMTYPE, linkname="../readme.txt"),
                         tar_info("copy.txt", tarfile.LNKTYPE, linkname="readme.txt")])
        _answer, entry = self.upload("inside-links.tar", data)
        self.assertIsNone(entry["expansion_error"])
        self.assertEqual(entry["extracted"]["skipped"], [])
        tree = self.tree_path(sha256(data))
        link = os.path.join(tree, "docs", "link.txt")
        self.assertTrue(os.path.islink(link))
        self.assertEqual(os.readlink(link), "../readme.txt")
        self.assertEqual(os.stat(os.path.join(tree, "copy.txt")).st_ino,
                         os.stat(self.blob_path(sha256(readme))).st_ino)
        listed = {item["path"]: item for item in entry["extracted"]["files"]}
        self.assertEqual(listed["docs/link.txt"].get("symlink"), "../readme.txt")
        self.assertEqual(listed["copy.txt"]["checksums"], digests_of(readme, DEFAULT_DIGESTS))
        fetched = self.request("GET", "/%s/docs/link.txt" % self.tree_relpath(sha256(data)))
        self.assertEqual((fetched.status, fetched.body), (200, readme))

    def test_symlink_chain_cannot_point_outside_the_tree(self):
        # Each link is inside when read alone; "a/s" -> "." makes "a/s/s/s"
        # lexically deep but really "a", so "a/p" climbs six levels up from
        # "a": out of the tree, out of ARCHIVE_DIR, to <base>/<marker>.
        marker = "evil" + secrets.token_hex(4)
        secret = unique("outside ARCHIVE_DIR")
        with open(os.path.join(self.base, marker), "wb") as handle:
            handle.write(secret)
        data = make_tar([tar_info("a/", tarfile.DIRTYPE),
                         tar_info("a/s", tarfile.SYMTYPE, linkname="."),
                         tar_info("a/p", tarfile.SYMTYPE, linkname="s/" * 6 + "../" * 6 + marker),
                         ("ok.txt", unique("chain"))])
        _answer, entry = self.upload("chain.tar", data)
        tree_url = "/" + self.tree_relpath(sha256(data))
        # Reading through it must never serve what lies outside ARCHIVE_DIR.
        answer = self.request("GET", tree_url + "/a/p")
        self.assertNotEqual(answer.body, secret)
        self.assertRefused(answer, 404)
        answer = self.request("GET", tree_url + "/?download=tar.gz")
        self.assertEqual(answer.status, 200)
        self.assertNotIn(secret, gzip.decompress(answer.body))
        # And the tree itself must hold no link that leaves it (issue 3.4).
        tree = os.path.realpath(self.tree_path(sha256(data)))
        for path in files_under(tree, relative=True):
            full = os.path.join(tree, path)
            if os.path.islink(full):
                resolved = os.path.realpath(full)
                self.assertTrue(resolved == tree or resolved.startswith(tree + os.sep),
                                "symlink %s resolves to %s, outside its tree (skipped: %s)"
                                % (path, resolved, entry["extracted"]["skipped"]))

    def test_file_and_directory_of_the_same_name(self):
        first, second = unique("file a"), unique("file c")
        data = make_tar([("a", first), ("a/b", unique("under a")),
                         tar_info("c/", tarfile.DIRTYPE), ("c", second), ("c/d", second)])
        _answer, entry = self.upload("same-name.tar", data)
        self.assertIsNone(entry["expansion_error"])
        reasons = {item["path"]: item["reason"] for item in entry["extracted"]["skipped"]}
        self.assertEqual(set(reasons), {"a/b", "c"})
        self.assertIn("in the way", reasons["a/b"])
        self.assertIn("directory", reasons["c"])
        self.assertTreeMatches(sha256(data), {"a": first, "c/d": second})

    def test_zip_symlink_pointing_outside_is_skipped(self):
        link = zipfile.ZipInfo("up-link")
        link.create_system = 3  # unix: external_attr holds st_mode
        link.external_attr = (stat.S_IFLNK | 0o777) << 16
        good = {"fine.txt": unique("zip link")}
        data = make_zip([(link, b"../../../etc/passwd")] + list(good.items()))
        _answer, entry = self.upload("link.zip", data)
        reasons = {item["path"]: item["reason"] for item in entry["extracted"]["skipped"]}
        self.assertEqual(set(reasons), {"up-link"})
        self.assertIn("outside", reasons["up-link"])
        self.assertFalse(os.path.lexists(os.path.join(self.tree_path(sha256(data)), "up-link")))
        self.assertTreeMatches(sha256(data), good)

    def test_tar_devices_and_fifos_are_skipped(self):
        char = tar_info("dev/zero-ish", tarfile.CHRTYPE)
        char.devmajor, char.devminor = 1, 5
        block = tar_info("dev/disk", tarfile.BLKTYPE)
        block.devmajor, block.devminor = 8, 0
        fifo = tar_info("run/pipe", tarfile.FIFOTYPE)
        good = {"dev/readme.txt": unique("devices")}
        data = make_tar([char, block, fifo] + list(good.items()), tarfile.USTAR_FORMAT)
        _answer, entry = self.upload("devices.tar", data)
        self.assertIsNone(entry["expansion_error"])
        reasons = {item["path"]: item["reason"] for item in entry["extracted"]["skipped"]}
        self.assertEqual(set(reasons), {"dev/zero-ish", "dev/disk", "run/pipe"})
        self.assertIn("device", reasons["dev/zero-ish"])
        self.assertIn("device", reasons["dev/disk"])
        self.assertIn("FIFO", reasons["run/pipe"])
        tree = self.tree_path(sha256(data))
        for name in reasons:
            self.assertFalse(os.path.lexists(os.path.join(tree, name)), name)
        self.assertTreeMatches(sha256(data), good)

    def test_duplicate_member_names_last_wins(self):
        for label, build in (("tar", make_tar), ("zip", make_zip)):
            with self.subTest(label):
                first, last = unique("first " + label), unique("last " + label)
                other = unique("other " + label)
                data = build([("dir/dup.txt", first), ("other.txt", other),
                              ("dir/dup.txt", last)])
                _answer, entry = self.upload("dup." + label, data)
                self.assertIsNone(entry["expansion_error"])
                extracted = entry["extracted"]
                self.assertEqual(extracted["skipped"], [
                    {"path": "dir/dup.txt",
                     "reason": "duplicate name: a later member replaces it"}])
                self.assertExtracted(extracted, sha256(data),
                                     {"dir/dup.txt": last, "other.txt": other})
                self.assertTreeMatches(sha256(data), {"dir/dup.txt": last, "other.txt": other})
                self.assertEqual(self.head_checksum(sha256(first)), 404)
                self.assertStagingEmpty()

    # -- corrupt archives ------------------------------------------------------

    def assertKeptUnexpanded(self, name, data, *fragments):
        """Upload ``data``: a 201 blob, expansion_error naming ``fragments``,
        no new tree, no member blob, empty staging."""
        explode_before = entries_under(os.path.join(self.root, "explode"))
        answer, entry = self.upload(name, data)
        self.assertEqual(answer.status, 201)
        self.assertEqual(entry["checksums"], digests_of(data, DEFAULT_DIGESTS))
        self.assertIsNone(entry["extracted"])
        error = entry["expansion_error"]
        self.assertTrue(error, entry)
        for fragment in fragments:
            self.assertIn(fragment, error)
        self.assertStored(data)
        self.assertEqual(entries_under(os.path.join(self.root, "explode")), explode_before)
        self.assertStagingEmpty()
        return entry

    def test_truncated_zip_is_kept_with_an_error(self):
        member = unique("truncated zip", 4000)
        data = make_zip([("a.bin", member)])
        self.assertKeptUnexpanded("cut.zip", data[:len(data) // 2], "corrupt", "zip")
        self.assertEqual(self.head_checksum(sha256(member)), 404)

    def test_zip_with_bad_crc_leaves_no_partial_tree(self):
        first, second = unique("crc first", 100), unique("crc second", 2000)
        data = bytearray(make_zip([("first.bin", first), ("second.bin", second)],
                                  zipfile.ZIP_STORED))
        spot = bytes(data).find(second[100:140]) + 10
        data[spot] ^= 0xFF
        self.assertKeptUnexpanded("crc.zip", bytes(data), "corrupt", "CRC")
        self.assertEqual(self.head_checksum(sha256(first)), 404)

    def test_truncated_tar_leaves_no_partial_tree(self):
        first, second = unique("tar first"), unique("tar second", 20000)
        data = make_tar([("first.txt", first), ("second.bin", second)])
        cut = data[:data.find(second[:40]) + 5000]
        self.assertKeptUnexpanded("cut.tar", cut, "corrupt tar")
        self.assertEqual(self.head_checksum(sha256(first)), 404)

    def test_truncated_tgz_keeps_blob_only(self):
        member = unique("tgz", 50000)
        packed = gzip.compress(make_tar([("m.bin", member)]))
        entry = self.assertKeptUnexpanded("cut.tgz", packed[:len(packed) // 2], "gzip")
        self.assertIsNone(entry["decompressed"])
        self.assertEqual(self.head_checksum(sha256(member)), 404)

    def test_corrupt_bzip2_and_xz_are_kept_with_an_error(self):
        for name, compress, fragment in (("bad.bz2", bz2.compress, "bzip2"),
                                         ("bad.xz", lzma.compress, "xz")):
            with self.subTest(name):
                payload = unique(name, 30000)
                packed = bytearray(compress(payload))
                packed[len(packed) // 2] ^= 0xFF
                entry = self.assertKeptUnexpanded(name, bytes(packed), fragment)
                self.assertIsNone(entry["decompressed"])
                self.assertEqual(self.head_checksum(sha256(payload)), 404)

    # -- limits (defaults) ---------------------------------------------------------

    def test_gzip_bomb_stopped_by_ratio(self):
        zeros = bytes(20 * 1024 * 1024)
        packed = gzip.compress(zeros, 6)
        entry = self.assertKeptUnexpanded("bomb.gz", packed, "ratio", "250", "BUCKET_MAX_RATIO")
        self.assertIsNone(entry["decompressed"])
        self.assertEqual(self.head_checksum(sha256(zeros)), 404)

    def test_zip_bomb_stopped_by_ratio(self):
        zeros = bytes(20 * 1024 * 1024)
        data = make_zip([("small.txt", unique("bomb neighbour")), ("zeros.bin", zeros)])
        self.assertKeptUnexpanded("bomb.zip", data, "ratio", "BUCKET_MAX_RATIO")
        self.assertEqual(self.head_checksum(sha256(zeros)), 404)

    # -- nesting, repetition --------------------------------------------------------

    def test_nested_zip_in_tgz_is_a_member_not_expanded(self):
        deep = unique("deep in the inner zip")
        inner = make_zip([("deep.txt", deep)])
        top = unique("top")
        tar_bytes = make_tar([("inner.zip", inner), ("top.txt", top)])
        _answer, entry = self.upload("nested.tgz", gzip.compress(tar_bytes))
        self.assertExtracted(entry["extracted"], sha256(tar_bytes),
                             {"inner.zip": inner, "top.txt": top})
        self.assertTreeMatches(sha256(tar_bytes), {"inner.zip": inner, "top.txt": top})
        self.assertStored(inner)
        self.assertEqual(self.head_checksum(sha256(deep)), 404)
        self.assertFalse(os.path.exists(self.tree_path(sha256(inner))))

    def test_same_archive_again_is_not_expanded_again(self):
        members = {"again/a.txt": unique("again a"), "again/b.txt": unique("again b")}
        data = make_zip(list(members.items()))
        first, entry = self.upload("again.zip", data)
        self.assertEqual(first.status, 201)
        tree = self.tree_path(sha256(data))
        before = {path: os.lstat(os.path.join(tree, path)) for path in files_under(tree, relative=True)}
        tree_inode = os.stat(tree).st_ino
        second, entry = self.upload("again-renamed.zip", data)
        self.assertEqual(second.status, 200)  # nothing new stored
        self.assertEqual(entry["stored"], "existing")
        extracted = entry["extracted"]
        self.assertTrue(extracted["existing"])
        self.assertEqual(extracted["path"], self.tree_relpath(sha256(data)))
        self.assertEqual(extracted["count"], 2)
        self.assertEqual({item["path"] for item in extracted["files"]}, set(members))
        self.assertEqual(os.stat(tree).st_ino, tree_inode)
        after = {path: os.lstat(os.path.join(tree, path)) for path in files_under(tree, relative=True)}
        self.assertEqual({p: (s.st_ino, s.st_mtime_ns) for p, s in before.items()},
                         {p: (s.st_ino, s.st_mtime_ns) for p, s in after.items()})
        self.assertStagingEmpty()

    def test_curl_form_upload_of_a_tgz(self):
        curl = CURL
        if not curl:
            self.skipTest("curl not installed")
        members = {"ci/report.xml": b"<testsuite/>" + unique("curl")}
        tar_bytes = make_tar(list(members.items()))
        path = os.path.join(self.base, "results.tgz")
        with open(path, "wb") as handle:
            handle.write(gzip.compress(tar_bytes))
        output = subprocess.run(
            [curl, "-sS", "--max-time", "30", "-F", "file=@%s" % path,
             "http://127.0.0.1:%d/upload" % self.server.port],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=60, check=True).stdout
        os.unlink(path)
        entry = json.loads(output.decode())["files"][0]
        self.assertEqual(entry["name"], "results.tgz")
        self.assertExtracted(entry["extracted"], sha256(tar_bytes), members)
        result = subprocess.run(
            [curl, "-sf", "-X", "HEAD", "--max-time", "10", "http://127.0.0.1:%d/checksum/%s"
             % (self.server.port, digests_of(members["ci/report.xml"], DEFAULT_DIGESTS)["md5"])],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=30)
        self.assertEqual(result.returncode, 0)


class LimitTests(ServerTestCase):
    """--max-members 10 and --max-expanded 1mb: bombs stopped, nothing partial."""

    server_args = ("--fsync", "false", "--max-members", "10", "--max-expanded", "1mb")

    def assertLimited(self, name, data, *fragments):
        explode_before = entries_under(os.path.join(self.root, "explode"))
        answer, entry = self.upload(name, data)
        self.assertEqual(answer.status, 201)
        self.assertIsNone(entry["extracted"])
        for fragment in fragments:
            self.assertIn(fragment, entry["expansion_error"] or "")
        self.assertStored(data)
        self.assertEqual(entries_under(os.path.join(self.root, "explode")), explode_before)
        self.assertStagingEmpty()
        return entry

    def test_member_count_limit(self):
        members = [("m%02d.txt" % number, unique("member %d" % number)) for number in range(11)]
        data = make_zip(members)
        self.assertLimited("many.zip", data, "more than 10 members", "BUCKET_MAX_MEMBERS")
        for _name, content in members:
            self.assertEqual(self.head_checksum(sha256(content)), 404)
        # Exactly at the limit expands.
        data = make_zip(members[:10])
        _answer, entry = self.upload("ten.zip", data)
        self.assertIsNone(entry["expansion_error"])
        self.assertEqual(entry["extracted"]["count"], 10)

    def test_member_count_limit_in_a_tar(self):
        members = [("t%02d.txt" % number, unique("tar member %d" % number)) for number in range(12)]
        self.assertLimited("many.tar", make_tar(members), "BUCKET_MAX_MEMBERS")

    def test_expanded_bytes_limit_zip(self):
        small = unique("small before big")
        big = os.urandom(1536 * 1024)  # incompressible: the ratio is not what stops it
        data = make_zip([("small.txt", small), ("big.bin", big)], zipfile.ZIP_STORED)
        self.assertLimited("big.zip", data, "expanded size", "1048576", "BUCKET_MAX_EXPANDED")
        self.assertEqual(self.head_checksum(sha256(small)), 404)
        self.assertEqual(self.head_checksum(sha256(big)), 404)

    def test_expanded_bytes_limit_gzip(self):
        payload = os.urandom(1536 * 1024)
        entry = self.assertLimited("big.bin.gz", gzip.compress(payload, 1),
                                   "expanded size", "BUCKET_MAX_EXPANDED")
        self.assertIsNone(entry["decompressed"])
        self.assertEqual(self.head_checksum(sha256(payload)), 404)


class RestartTests(unittest.TestCase):
    """What the disk holds answers after a restart: checksums and expiries."""

    def setUp(self):
        self.base = tempfile.mkdtemp(prefix="bucket-test-")
        self.root = os.path.join(self.base, "archive")
        self.servers = []

    def tearDown(self):
        for server in self.servers:
            server.stop()
        shutil.rmtree(self.base, ignore_errors=True)

    def start(self, *args):
        server = ServerProcess(self.root, ("--fsync", "false") + args, cwd=self.base)
        self.servers.append(server)
        return server.start()

    def upload(self, server, name, data, headers=None):
        body, content_type = multipart_body([file_part(name, data)])
        all_headers = {"Content-Type": content_type}
        all_headers.update(headers or {})
        answer = server.request("POST", "/upload", body, all_headers)
        self.assertEqual(answer.status, 201, answer)
        return answer.json()["files"][0]

    def test_member_checksums_answer_after_restart(self):
        server = self.start()
        zip_member, tar_member, payload = unique("zip m"), unique("tgz m"), unique("gz")
        zip_data = make_zip([("z.txt", zip_member)])
        tar_bytes = make_tar([("t.txt", tar_member)])
        tgz = gzip.compress(tar_bytes)
        gz = gzip.compress(payload)
        for name, data in (("a.zip", zip_data), ("b.tgz", tgz), ("c.gz", gz)):
            self.upload(server, name, data)
        server.stop()
        server.start()
        for content in (zip_data, zip_member, tgz, tar_bytes, tar_member, gz, payload):
            for name, value in digests_of(content, DEFAULT_DIGESTS).items():
                self.assertEqual(server.request("HEAD", "/checksum/" + value).status, 200,
                                 "%s of %r... after restart" % (name, content[:30]))
        # The same archive after the restart: already expanded.
        body, content_type = multipart_body([file_part("a.zip", zip_data)])
        answer = server.request("POST", "/upload", body, {"Content-Type": content_type})
        self.assertEqual(answer.status, 200, answer)
        self.assertTrue(answer.json()["files"][0]["extracted"]["existing"])

    def test_retention_survives_a_restart(self):
        # The first server never sweeps; the expiry must come back from disk.
        server = self.start("--sweep-interval", "3600")
        blob_data, name_data = unique("expiring upload"), unique("expiring name")
        self.upload(server, "gone.txt", blob_data, {"X-Retain-Days": "0.00001"})
        answer = server.request("PUT", "/files/keep/gone.txt?retain_days=0.00001", name_data)
        self.assertEqual(answer.status, 201, answer)
        kept = unique("kept")
        self.assertEqual(server.request("PUT", "/files/keep/kept.txt", kept).status, 201)
        server.stop()
        time.sleep(1.0)  # 0.00001 days = 0.864 s: expired while no server ran
        self.assertTrue(os.path.exists(os.path.join(self.root, "files", "keep", "gone.txt")))
        server = self.start("--sweep-interval", "0.2")
        wait_until(lambda: all(
            server.request("HEAD", "/checksum/" + sha256(data)).status == 404
            for data in (blob_data, name_data)), POLL_TIMEOUT, interval=0.1,
            what="expired content to stop answering after the restart")
        self.assertFalse(os.path.exists(os.path.join(self.root, "files", "keep", "gone.txt")))
        for data in (blob_data, name_data):
            self.assertFalse(os.path.exists(os.path.join(
                self.root, "blob", sha256(data)[:2], sha256(data)[2:4], sha256(data))))
        fetched = server.request("GET", "/files/keep/kept.txt")
        self.assertEqual((fetched.status, fetched.body), (200, kept))


# ---------------------------------------------------------------------------
# Issue 4: named files, reading, listings, downloads, delete
# ---------------------------------------------------------------------------


class NamedFileTests(ServerTestCase):

    def test_put_then_get_back(self):
        data = unique("named", 1000)
        answer = self.put_file("a/b.txt", data)
        self.assertEqual(answer.status, 201, answer)
        self.assertEqual(answer.headers["Location"], "/files/a/b.txt")
        entry = answer.json()["files"][0]
        self.assertEqual(entry["checksums"], digests_of(data, DEFAULT_DIGESTS))
        self.assertEqual(entry["name_path"], "files/a/b.txt")
        name = os.path.join(self.root, "files", "a", "b.txt")
        self.assertEqual(os.stat(name).st_ino, os.stat(self.blob_path(sha256(data))).st_ino)
        fetched = self.request("GET", "/files/a/b.txt")
        self.assertEqual((fetched.status, fetched.body), (200, data))
        self.assertEqual(fetched.headers["ETag"], '"%s"' % sha256(data))
        self.assertEqual(fetched.headers["Accept-Ranges"], "bytes")
        self.assertIn('filename="b.txt"', fetched.headers["Content-Disposition"])
        self.assertTrue(fetched.headers["Last-Modified"].endswith("GMT"))
        head = self.request("HEAD", "/files/a/b.txt")
        self.assertEqual((head.status, head.body), (200, b""))
        self.assertEqual(head.headers["Content-Length"], str(len(data)))

    def test_put_chunked_body(self):
        data = unique("chunked", 70000)
        connection = http.client.HTTPConnection("127.0.0.1", self.server.port, timeout=30)
        try:
            connection.request("PUT", "/files/chunked/c.bin",
                               body=iter([data[:1000], data[1000:50000], data[50000:]]),
                               encode_chunked=True)
            answer = connection.getresponse()
            self.assertEqual(answer.status, 201, answer.read())
            answer.read()
        finally:
            connection.close()
        self.assertEqual(self.request("GET", "/files/chunked/c.bin").body, data)

    def test_if_none_match_star_refuses_to_replace(self):
        original, refused = unique("original"), unique("refused")
        self.assertEqual(self.put_file("inm/x.txt", original).status, 201)
        answer = self.put_file("inm/x.txt", refused, {"If-None-Match": "*"})
        self.assertRefused(answer, 412, "files/inm/x.txt", "If-None-Match")
        self.assertEqual(self.request("GET", "/files/inm/x.txt").body, original)
        self.assertEqual(self.head_checksum(sha256(refused)), 404)
        fresh = unique("fresh")
        self.assertEqual(self.put_file("inm/new.txt", fresh, {"If-None-Match": "*"}).status, 201)
        self.assertEqual(self.request("GET", "/files/inm/new.txt").body, fresh)

    def test_replace_is_atomic(self):
        versions = [unique("version %d" % number, 200000) for number in range(2)]
        self.assertEqual(self.put_file("atomic/f.bin", versions[0]).status, 201)
        seen, stop = [], threading.Event()

        def reader():
            while not stop.is_set():
                answer = self.request("GET", "/files/atomic/f.bin")
                seen.append((answer.status, answer.body in versions))

        thread = threading.Thread(target=reader)
        thread.start()
        try:
            for number in range(1, 13):
                self.assertEqual(self.put_file("atomic/f.bin", versions[number % 2]).status, 201)
        finally:
            stop.set()
            thread.join(30)
        self.assertTrue(seen)
        self.assertEqual([item for item in seen if item != (200, True)], [])
        self.assertEqual(self.request("GET", "/files/atomic/f.bin").body, versions[0])
        self.assertEqual(sorted(os.listdir(os.path.join(self.root, "files", "atomic"))), ["f.bin"])
        # The replaced content has no name left and was not uploaded: reclaimed.
        self.assertEqual(self.head_checksum(sha256(versions[1])), 404)

    def test_traversal_is_refused_and_nothing_written(self):
        marker = "trav" + secrets.token_hex(4)
        attempts = [
            ("/files/../%s" % marker, "'..'"),
            ("/files/a/../../%s" % marker, "'..'"),
            ("/files/%%2e%%2e/%s" % marker, "'..'"),
            ("/files/a/%%2E%%2E/%%2e%%2e/%s" % marker, "'..'"),
            ("/files/..%%2F%s" % marker, "separator"),
            ("/files/a%%2f..%%2f..%%2f%s" % marker, "separator"),
            ("/files/..\\%s" % marker, "separator"),
            ("/files/a%%5C..%%5C%s" % marker, "separator"),
            ("/files/%s%%00.txt" % marker, "NUL"),
            ("/files/%s/%s" % (marker, "x" * 256), "255"),
            ("/files/./%s" % marker, "'.'"),
        ]
        before = entries_under(self.root)
        for path, fragment in attempts:
            with self.subTest(path=path[:60]):
                data = unique(path)
                answer = self.request("PUT", path, data)
                self.assertRefused(answer, 400, fragment)
                self.assertEqual(self.head_checksum(sha256(data)), 404)
        after = entries_under(self.root)
        self.assertEqual(sorted(after - before), [])
        self.assertEqual([p for p in entries_under(self.base) if marker in p], [])
        answer = self.request("GET", "/files/..%2F..%2Fetc%2Fpasswd")
        self.assertRefused(answer, 400, "separator")

    def test_absolute_path_is_refused(self):
        # Issue 4: "absolute paths: 400, nothing written".
        marker = "abs" + secrets.token_hex(4)
        answer = self.request("PUT", "/files//%s/x.txt" % marker, unique("absolute"))
        self.assertEqual(answer.status, 400, answer)
        self.assertFalse(os.path.exists(os.path.join(self.root, "files", marker)))

    def test_name_under_a_file_conflicts_and_leaves_nothing(self):
        self.assertEqual(self.put_file("conflict/f", unique("a file")).status, 201)
        data = unique("under a file")
        answer = self.put_file("conflict/f/g.txt", data)
        self.assertRefused(answer, 409, "in the way")
        # SPEC: a failed upload leaves nothing behind: no blob.
        self.assertEqual(self.head_checksum(sha256(data)), 404)
        self.assertFalse(os.path.exists(self.blob_path(sha256(data))))

    def test_post_multipart_to_a_directory(self):
        first, second = unique("form one"), unique("form two", 3000)
        body, content_type = multipart_body([file_part("one.txt", first),
                                             file_part("two.bin", second)])
        answer = self.request("POST", "/files/form/dir/", body, {"Content-Type": content_type})
        self.assertEqual(answer.status, 201, answer)
        entries = answer.json()["files"]
        self.assertEqual([entry["name_path"] for entry in entries],
                         ["files/form/dir/one.txt", "files/form/dir/two.bin"])
        self.assertEqual(answer.headers["Location"], "/files/form/dir/one.txt")
        for name, data in (("one.txt", first), ("two.bin", second)):
            self.assertEqual(self.request("GET", "/files/form/dir/" + name).body, data)
            self.assertEqual(os.stat(os.path.join(self.root, "files", "form", "dir", name)).st_ino,
                             os.stat(self.blob_path(sha256(data))).st_ino)
        answer = self.request("POST", "/files/form/dir/", b"x", {"Content-Type": "text/plain"})
        self.assertRefused(answer, 415, "multipart/form-data")

    # -- reading: ranges and conditions --------------------------------------

    def test_ranges(self):
        data = bytes(range(100))
        self.assertEqual(self.put_file("range/r.bin", data).status, 201)
        for spec, status, expected, content_range in (
                ("bytes=0-9", 206, data[:10], "bytes 0-9/100"),
                ("bytes=-5", 206, data[-5:], "bytes 95-99/100"),
                ("bytes=10-", 206, data[10:], "bytes 10-99/100"),
                ("bytes=90-200", 206, data[90:], "bytes 90-99/100"),
                ("bytes=0-1,5-6", 200, data, None)):
            with self.subTest(spec):
                answer = self.request("GET", "/files/range/r.bin", headers={"Range": spec})
                self.assertEqual(answer.status, status)
                self.assertEqual(answer.body, expected)
                self.assertEqual(answer.headers.get("Content-Range"), content_range)
                self.assertEqual(answer.headers["Content-Length"], str(len(expected)))
        for spec in ("bytes=100-", "bytes=200-300", "bytes=-0"):
            with self.subTest(spec):
                answer = self.request("GET", "/files/range/r.bin", headers={"Range": spec})
                self.assertRefused(answer, 416, "not satisfiable")
                self.assertEqual(answer.headers["Content-Range"], "bytes */100")
        etag = '"%s"' % sha256(data)
        answer = self.request("GET", "/files/range/r.bin",
                              headers={"Range": "bytes=0-9", "If-Range": etag})
        self.assertEqual((answer.status, answer.body), (206, data[:10]))
        answer = self.request("GET", "/files/range/r.bin",
                              headers={"Range": "bytes=0-9", "If-Range": '"other"'})
        self.assertEqual((answer.status, answer.body), (200, data))

    def test_conditional_requests(self):
        data = unique("conditional")
        self.assertEqual(self.put_file("cond/c.txt", data).status, 201)
        first = self.request("GET", "/files/cond/c.txt")
        etag, modified = first.headers["ETag"], first.headers["Last-Modified"]
        self.assertEqual(etag, '"%s"' % sha256(data))
        for headers in ({"If-None-Match": etag}, {"If-None-Match": '"x", ' + etag},
                        {"If-None-Match": "W/" + etag}, {"If-Modified-Since": modified}):
            with self.subTest(headers):
                answer = self.request("GET", "/files/cond/c.txt", headers=headers)
                self.assertEqual((answer.status, answer.body), (304, b""))
                self.assertEqual(answer.headers["ETag"], etag)
        answer = self.request("GET", "/files/cond/c.txt", headers={"If-None-Match": '"other"'})
        self.assertEqual((answer.status, answer.body), (200, data))
        answer = self.request("GET", "/files/cond/c.txt",
                              headers={"If-Modified-Since": "Mon, 01 Jan 2001 00:00:00 GMT"})
        self.assertEqual((answer.status, answer.body), (200, data))

    def test_checksum_get_serves_content_with_disposition(self):
        data = unique("by checksum")
        self.upload("original-name.txt", data)
        answer = self.request("GET", "/checksum/%s?name=original-name.txt" % digests_of(data, DEFAULT_DIGESTS)["sha512"])
        self.assertEqual((answer.status, answer.body), (200, data))
        self.assertIn('filename="original-name.txt"', answer.headers["Content-Disposition"])
        self.assertRefused(self.request("GET", "/checksum/nothex"), 400, "hex digits")
        self.assertRefused(self.request("GET", "/checksum/" + "0" * 64), 404, "0" * 64)

    # -- listings ---------------------------------------------------------------

    def test_listing_json_sorted_and_paged(self):
        contents = {name: unique(name) for name in ("charlie.txt", "alpha.txt", "bravo.txt",
                                                    "delta.txt")}
        for name, data in contents.items():
            self.assertEqual(self.put_file("list/" + name, data).status, 201)
        self.assertEqual(self.put_file("list/sub/inner.txt", unique("inner")).status, 201)
        answer = self.request("GET", "/files/list/?format=json")
        self.assertEqual(answer.status, 200)
        self.assertTrue(answer.headers["Content-Type"].startswith("application/json"))
        document = answer.json()
        self.assertEqual(set(document), {"path", "entries", "count", "next"})
        self.assertEqual(document["path"], "files/list/")
        names = [entry["name"] for entry in document["entries"]]
        self.assertEqual(names, sorted(list(contents) + ["sub"]))
        self.assertEqual((document["count"], document["next"]), (5, None))
        for entry in document["entries"]:
            if entry["name"] == "sub":
                self.assertEqual(entry["type"], "dir")
                continue
            self.assertEqual(entry["type"], "file")
            self.assertEqual(entry["size"], len(contents[entry["name"]]))
            self.assertEqual(entry["sha256"], sha256(contents[entry["name"]]))
            self.assertAlmostEqual(entry["mtime"], time.time(), delta=300)
        by_accept = self.request("GET", "/files/list/", headers={"Accept": "application/json"})
        self.assertEqual(by_accept.json()["entries"], document["entries"])
        page = self.request("GET", "/files/list/?format=json&limit=2").json()
        self.assertEqual([e["name"] for e in page["entries"]], names[:2])
        self.assertEqual((page["count"], page["next"]), (2, names[1]))
        page = self.request("GET", "/files/list/?format=json&limit=2&after="
                            + urllib.parse.quote(page["next"])).json()
        self.assertEqual([e["name"] for e in page["entries"]], names[2:4])
        page = self.request("GET", "/files/list/?format=json&limit=2&after="
                            + urllib.parse.quote(page["next"])).json()
        self.assertEqual(([e["name"] for e in page["entries"]], page["next"]), (names[4:], None))
        self.assertRefused(self.request("GET", "/files/list/?format=json&limit=0"), 400, "limit")
        self.assertRefused(self.request("GET", "/files/no-such-dir/?format=json"), 404, "not found")

    def test_listing_html_for_a_browser(self):
        self.assertEqual(self.put_file("html/a%20b.txt", unique("html")).status, 201)
        browser = {"Accept": "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"}
        moved = self.request("GET", "/files/html", headers=browser)
        self.assertEqual(moved.status, 301)
        self.assertEqual(moved.headers["Location"], "/files/html/")
        answer = self.request("GET", "/files/html/", headers=browser)
        self.assertEqual(answer.status, 200)
        self.assertTrue(answer.headers["Content-Type"].startswith("text/html"))
        page = answer.body.decode("utf-8")
        self.assertIn("a b.txt", page)
        self.assertIn("href='a%20b.txt'", page)
        self.assertIn("?download=zip", page)

    def test_listing_of_100000_entries(self):
        """Issue 4: a directory of 100,000 names is listed whole (streamed)
        and by pages, without the server's memory growing with it."""
        count = 100000
        sources = []
        for number in range(2):  # ext4 allows 65,000 links to one inode
            data = unique("listed many times %d" % number)
            self.assertEqual(self.put_file("big-source-%d.txt" % number, data).status, 201)
            sources.append((os.path.join(self.root, "files", "big-source-%d.txt" % number),
                            sha256(data)))
        directory = os.path.join(self.root, "files", "big")
        os.mkdir(directory)
        names = ["f%06d.txt" % number for number in range(count)]
        for number, name in enumerate(names):
            os.link(sources[number % 2][0], os.path.join(directory, name))
        peak_before = vm_hwm_kib(self.server.proc.pid)
        answer = self.request("GET", "/files/big/?format=json", timeout=120)
        self.assertEqual(answer.status, 200)
        self.assertEqual(answer.headers.get("Transfer-Encoding"), "chunked")
        document = answer.json()
        self.assertEqual(document["count"], count)
        self.assertEqual([entry["name"] for entry in document["entries"]], names)
        self.assertEqual({entry["sha256"] for entry in document["entries"]},
                         {digest for _path, digest in sources})
        # Names are sorted in memory (about 100 bytes each); the entries are
        # streamed, so the peak grows by far less than the 20 MB of JSON.
        grown_kib = vm_hwm_kib(self.server.proc.pid) - peak_before
        self.assertLess(grown_kib, 32 * 1024, "peak RSS grew by %d KiB" % grown_kib)
        seen, after = [], ""
        for _page in range(11):
            page = self.request("GET", "/files/big/?format=json&limit=10000"
                                + ("&after=" + after if after else ""), timeout=60).json()
            seen += [entry["name"] for entry in page["entries"]]
            if not page["next"]:
                break
            after = page["next"]
        self.assertEqual(seen, names)

    # -- whole-folder downloads --------------------------------------------------

    def test_download_zip_and_tar_gz_round_trip(self):
        contents = {"a.txt": unique("dl a"), "sub/b.bin": unique("dl b", 100000),
                    "sub/deeper/c.txt": unique("dl c")}
        for path, data in contents.items():
            self.assertEqual(self.put_file("dl/tree/" + path, data).status, 201)
        answer = self.request("GET", "/files/dl/tree/?download=zip")
        self.assertEqual(answer.status, 200)
        self.assertEqual(answer.headers["Content-Type"], "application/zip")
        self.assertIn('attachment; filename="tree.zip"', answer.headers["Content-Disposition"])
        with zipfile.ZipFile(io.BytesIO(answer.body)) as archive:
            self.assertIsNone(archive.testzip())
            got = {info.filename: archive.read(info) for info in archive.infolist()
                   if not info.is_dir()}
        self.assertEqual(got, contents)
        for kind in ("tar.gz", "tgz"):
            with self.subTest(kind):
                answer = self.request("GET", "/files/dl/tree/?download=" + kind)
                self.assertEqual(answer.status, 200)
                self.assertIn('filename="tree.tar.gz"', answer.headers["Content-Disposition"])
                with tarfile.open(fileobj=io.BytesIO(answer.body), mode="r:gz") as archive:
                    got = {member.name: archive.extractfile(member).read()
                           for member in archive.getmembers() if member.isfile()}
                self.assertEqual(got, contents)
        self.assertRefused(self.request("GET", "/files/dl/tree/?download=rar"), 400, "rar")

    def test_download_an_exploded_tree(self):
        members = {"x/one.txt": unique("tree one"), "two.txt": unique("tree two")}
        data = make_zip(list(members.items()))
        _answer, entry = self.upload("for-download.zip", data)
        answer = self.request("GET", "/%s/?download=zip" % entry["extracted"]["path"])
        with zipfile.ZipFile(io.BytesIO(answer.body)) as archive:
            got = {info.filename: archive.read(info) for info in archive.infolist()
                   if not info.is_dir()}
        self.assertEqual(got, members)

    # -- delete --------------------------------------------------------------------

    def test_delete_name_reclaims_its_blob(self):
        data = unique("delete me")
        self.assertEqual(self.put_file("del/x.txt", data).status, 201)
        self.assertStored(data)
        answer = self.request("DELETE", "/files/del/x.txt")
        self.assertEqual(answer.status, 200, answer)
        document = answer.json()
        self.assertEqual((document["deleted"], document["names"], document["reclaimed"]),
                         ("files/del/x.txt", 1, 1))
        self.assertRefused(self.request("GET", "/files/del/x.txt"), 404, "not found")
        self.assertNotStored(data)
        self.assertFalse(os.path.exists(self.blob_path(sha256(data))))
        self.assertRefused(self.request("DELETE", "/files/del/x.txt"), 404, "not found")

    def test_delete_never_removes_a_blob_another_name_uses(self):
        data = unique("shared")
        for name in ("share/one.txt", "share/two.txt"):
            self.assertEqual(self.put_file(name, data).status, 201)
        answer = self.request("DELETE", "/files/share/one.txt")
        self.assertEqual(answer.json()["reclaimed"], 0)
        self.assertStored(data)
        self.assertEqual(self.request("GET", "/files/share/two.txt").body, data)
        answer = self.request("DELETE", "/files/share/two.txt")
        self.assertEqual(answer.json()["reclaimed"], 1)
        self.assertNotStored(data)

    def test_delete_keeps_a_blob_uploaded_without_a_name(self):
        data = unique("uploaded and named")
        self.upload("pinned.txt", data)
        self.assertEqual(self.put_file("pinned/name.txt", data).status, 201)
        self.assertEqual(self.request("DELETE", "/files/pinned/name.txt").json()["reclaimed"], 0)
        self.assertStored(data)

    def test_delete_a_tree(self):
        contents = {"deltree/a.txt": unique("tree a"), "deltree/s/b.txt": unique("tree b")}
        for path, data in contents.items():
            self.assertEqual(self.put_file(path, data).status, 201)
        answer = self.request("DELETE", "/files/deltree")
        self.assertEqual(answer.status, 200, answer)
        self.assertEqual((answer.json()["names"], answer.json()["reclaimed"]), (2, 2))
        self.assertFalse(os.path.exists(os.path.join(self.root, "files", "deltree")))
        for data in contents.values():
            self.assertNotStored(data)

    def test_delete_checksum_with_names_is_a_conflict(self):
        data = unique("named blob")
        self.assertEqual(self.put_file("c409/one.txt", data).status, 201)
        self.assertEqual(self.put_file("c409/two.txt", data).status, 201)
        answer = self.request("DELETE", "/checksum/" + digests_of(data, DEFAULT_DIGESTS)["md5"])
        self.assertRefused(answer, 409, "2 name", sha256(data))
        self.assertStored(data)
        loose = unique("unnamed upload")
        self.upload("loose.txt", loose)
        answer = self.request("DELETE", "/checksum/" + sha256(loose))
        self.assertEqual(answer.status, 200, answer)
        self.assertNotStored(loose)
        self.assertRefused(self.request("DELETE", "/checksum/" + sha256(loose)), 404)

    def test_delete_checksum_of_an_archive_removes_its_tree(self):
        member = unique("member of a deleted zip")
        data = make_zip([("m.txt", member)])
        self.upload("deleted.zip", data)
        self.assertEqual(self.request("DELETE", "/checksum/" + sha256(data)).status, 200)
        self.assertFalse(os.path.exists(self.tree_path(sha256(data))))
        self.assertNotStored(data)
        self.assertNotStored(member)

    def test_delete_while_downloading(self):
        data = os.urandom(20 * 1024 * 1024)
        self.assertEqual(self.put_file("slow/big.bin", data).status, 201)
        connection = http.client.HTTPConnection("127.0.0.1", self.server.port, timeout=30)
        try:
            connection.request("GET", "/files/slow/big.bin")
            response = connection.getresponse()
            self.assertEqual(response.status, 200)
            received = [response.read(1024 * 1024)]
            time.sleep(0.2)  # the server is now blocked mid-file on a full socket
            answer = self.request("DELETE", "/files/slow/big.bin")
            self.assertEqual(answer.status, 200, answer)
            self.assertEqual(self.request("GET", "/files/slow/big.bin").status, 404)
            while True:
                chunk = response.read(256 * 1024)
                if not chunk:
                    break
                received.append(chunk)
        finally:
            connection.close()
        body = b"".join(received)
        self.assertEqual(len(body), len(data))
        self.assertEqual(sha256(body), sha256(data))
        self.assertEqual(self.head_checksum(sha256(data)), 404)


# ---------------------------------------------------------------------------
# Issue 4: replicas, retention, ARCHIVE_URI
# ---------------------------------------------------------------------------


class ReplicaTests(ServerTestCase):

    server_env = {"REPLICATE_0": "user/${Username}/${Topic}",
                  "REPLICATE_1": "by-host/${Hostname}/${Topic}"}

    def stamps_around(self, before, after):
        return {time.strftime("%Y%m%d.%H%M", time.gmtime(moment)) for moment in (before, after)}

    def test_replica_hardlink_and_latest_symlink(self):
        data = b"<testsuite/>" + unique("replica")
        before = time.time()
        answer, entry = self.upload("results.xml", data,
                                    {"Username": "alice", "Topic": "build"})
        stamps = self.stamps_around(before, time.time())
        self.assertEqual(len(entry["replicas"]), 1, entry)
        replica = entry["replicas"][0]
        directory = "replica/user/alice/build/"
        self.assertTrue(replica.startswith(directory), replica)
        name = replica[len(directory):]
        self.assertIn(name, {"results.%s.0.xml" % stamp for stamp in stamps})
        self.assertEqual(answer.json()["path"]["replicas"], [replica])
        full = os.path.join(self.root, replica)
        self.assertEqual(os.stat(full).st_ino, os.stat(self.blob_path(sha256(data))).st_ino)
        self.assertFalse(os.path.islink(full))
        latest = os.path.join(self.root, directory, "results.latest.xml")
        self.assertTrue(os.path.islink(latest))
        self.assertEqual(os.readlink(latest), name)
        # REPLICATE_1 lacks Hostname: skipped and said so.
        self.assertEqual(entry["replicas_skipped"],
                         [{"template": "REPLICATE_1", "missing_headers": ["Hostname"]}])
        fetched = self.request("GET", "/" + directory + "results.latest.xml")
        self.assertEqual((fetched.status, fetched.body), (200, data))

        newer = b"<testsuite tests='2'/>" + unique("replica 2")
        _answer, entry = self.upload("results.xml", newer,
                                     {"Username": "alice", "Topic": "build"})
        second = entry["replicas"][0]
        self.assertNotEqual(second, replica)
        self.assertEqual(os.readlink(latest), os.path.basename(second))
        self.assertEqual(self.request("GET", "/" + directory + "results.latest.xml").body, newer)
        self.assertEqual(self.request("GET", "/" + replica).body, data)  # old one stays
        listing = self.request("GET", "/" + directory + "?format=json").json()
        kinds = {item["name"]: item["type"] for item in listing["entries"]}
        self.assertEqual(kinds["results.latest.xml"], "symlink")
        self.assertEqual(kinds[os.path.basename(replica)], "file")

    def test_all_templates_that_match_are_filled(self):
        data = unique("two replicas")
        _answer, entry = self.upload("r.txt", data, {"Username": "bob", "Topic": "t1",
                                                     "Hostname": "ci-7"})
        self.assertEqual(len(entry["replicas"]), 2, entry)
        self.assertEqual(entry["replicas_skipped"], [])
        self.assertTrue(entry["replicas"][0].startswith("replica/user/bob/t1/r."))
        self.assertTrue(entry["replicas"][1].startswith("replica/by-host/ci-7/t1/r."))

    def test_header_values_are_sanitized(self):
        marker = "rep" + secrets.token_hex(4)
        data = unique("hostile headers")
        _answer, entry = self.upload("h.txt", data, {"Username": "../../../../" + marker,
                                                     "Topic": ".."})
        for replica in entry["replicas"]:
            self.assertTrue(replica.startswith("replica/user/"), replica)
            self.assertNotIn("..", replica.split("/"))
            self.assertEqual(len(replica.split("/")), 5, replica)
            real = os.path.realpath(os.path.join(self.root, replica))
            self.assertTrue(real.startswith(os.path.join(os.path.realpath(self.root), "replica")))
        # index/made/ mirrors the directories names are made in (when each
        # name was made): the same sanitized names, beside the journals.
        outside = [path for path in entries_under(self.base)
                   if marker in path and not path.startswith(("archive/replica/",
                                                              "archive/index/made/replica/"))]
        self.assertEqual(outside, [])

    def test_archive_replica_is_a_relative_symlink_to_its_tree(self):
        member = unique("replicated member")
        data = make_zip([("report/index.html", member)])
        _answer, entry = self.upload("results.zip", data, {"Username": "carol", "Topic": "nightly"})
        directory = os.path.join(self.root, "replica", "user", "carol", "nightly")
        files = [r for r in entry["replicas"] if r.endswith(".zip")]
        trees = [r for r in entry["replicas"] if not r.endswith(".zip")]
        self.assertEqual((len(files), len(trees)), (1, 1), entry["replicas"])
        self.assertEqual(os.stat(os.path.join(self.root, files[0])).st_ino,
                         os.stat(self.blob_path(sha256(data))).st_ino)
        link = os.path.join(self.root, trees[0])
        self.assertTrue(os.path.islink(link))
        self.assertFalse(os.path.isabs(os.readlink(link)), os.readlink(link))
        self.assertEqual(os.path.realpath(link), os.path.realpath(self.tree_path(sha256(data))))
        self.assertEqual(os.readlink(os.path.join(directory, "results.latest")),
                         os.path.basename(trees[0]))
        self.assertEqual(os.readlink(os.path.join(directory, "results.latest.zip")),
                         os.path.basename(files[0]))
        fetched = self.request("GET", "/replica/user/carol/nightly/results.latest/report/index.html")
        self.assertEqual((fetched.status, fetched.body), (200, member))

    def test_delete_replica(self):
        data = unique("replica to delete")
        _answer, entry = self.upload("d.txt", data, {"Username": "dave", "Topic": "del"})
        answer = self.request("DELETE", "/" + entry["replicas"][0])
        self.assertEqual(answer.status, 200, answer)
        self.assertFalse(os.path.exists(os.path.join(self.root, entry["replicas"][0])))
        self.assertStored(data)  # the upload itself still holds it


class TemplateStartupTests(unittest.TestCase):

    def test_invalid_template_stops_startup(self):
        base = tempfile.mkdtemp(prefix="bucket-test-")
        try:
            for template in ("a/${Unclosed", "/abs/${User}", "a/../${User}"):
                with self.subTest(template):
                    result = subprocess.run(
                        [sys.executable, SERVER_SCRIPT, str(free_port()), "-b", "127.0.0.1",
                         "-d", os.path.join(base, "archive")],
                        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                        env=clean_environment({"REPLICATE_0": template}), timeout=30)
                    self.assertNotEqual(result.returncode, 0)
                    message = result.stderr.decode("utf-8", "replace")
                    self.assertIn("REPLICATE_0", message)
                    self.assertIn(template, message)
        finally:
            shutil.rmtree(base, ignore_errors=True)


class RetentionTests(ServerTestCase):
    """Short retentions (0.00002 days = 1.7 s) and a sweep every 0.2 s."""

    server_args = ("--fsync", "false", "--sweep-interval", "0.2")

    def assertGone(self, *contents, paths=()):
        wait_until(lambda: all(self.head_checksum(sha256(data)) == 404 for data in contents)
                   and not any(os.path.lexists(os.path.join(self.root, p)) for p in paths),
                   POLL_TIMEOUT, interval=0.1, what="expired content and %s to go" % (paths,))
        for data in contents:
            self.assertNotStored(data)
            self.assertFalse(os.path.exists(self.blob_path(sha256(data))))

    def test_upload_with_retain_days_header_expires(self):
        data, kept = unique("short-lived upload"), unique("kept upload")
        _answer, entry = self.upload("short.txt", data, {"X-Retain-Days": "0.00002"})
        self.upload("kept.txt", kept)
        self.assertStored(data)
        self.assertGone(data)
        self.assertStored(kept)

    def test_named_file_with_retain_days_query_expires(self):
        data = unique("short-lived name")
        answer = self.put_file("ret/x.txt?retain_days=0.00002", data)
        self.assertEqual(answer.status, 201, answer)
        self.assertEqual(self.request("GET", "/files/ret/x.txt").body, data)
        self.assertGone(data, paths=("files/ret/x.txt",))
        self.assertEqual(self.request("GET", "/files/ret/x.txt").status, 404)

    def test_expired_archive_takes_its_tree_and_members(self):
        member = unique("member of an expiring zip")
        data = make_zip([("m.txt", member)])
        self.upload("expiring.zip", data, {"X-Retain-Days": "0.00002"})
        self.assertStored(member)
        self.assertGone(data, member, paths=(self.tree_relpath(sha256(data)),))

    def test_expired_tgz_takes_its_derived_blobs(self):
        member = unique("member of an expiring tgz")
        tar_bytes = make_tar([("m.txt", member)])
        packed = gzip.compress(tar_bytes)
        self.upload("expiring.tgz", packed, {"X-Retain-Days": "0.00002"})
        self.assertStored(tar_bytes)
        self.assertGone(packed, tar_bytes, member, paths=(self.tree_relpath(sha256(tar_bytes)),))

    def test_expired_gzip_takes_its_decompressed_blob(self):
        payload = unique("payload of an expiring gz", 1000)
        packed = gzip.compress(payload)
        self.upload("expiring.gz", packed, {"X-Retain-Days": "0.00002"})
        self.assertGone(packed, payload)

    def test_bad_retain_days_is_refused(self):
        for value in ("-1", "soon", "40000"):
            with self.subTest(value):
                data = unique("bad retention " + value)
                body, content_type = multipart_body([file_part("r.txt", data)])
                answer = self.request("POST", "/upload", body,
                                      {"Content-Type": content_type, "X-Retain-Days": value})
                self.assertRefused(answer, 400, "X-Retain-Days")
                self.assertEqual(self.head_checksum(sha256(data)), 404)
        config = self.request("GET", "/config").json()
        self.assertIn("retention", config)
        self.assertEqual(config["sweep_interval"], 0.2)


class ArchiveUriTests(ServerTestCase):

    BASE = "https://bucket.example.org/store/"
    server_env = {"ARCHIVE_URI": BASE, "REPLICATE_0": "u/${Username}"}

    def test_urls_are_absolute_under_archive_uri(self):
        member = unique("uri member")
        data = make_zip([("m.txt", member)])
        _answer, entry = self.upload("uri.zip", data, {"Username": "erin"})
        base = self.BASE.rstrip("/")
        self.assertEqual(entry["url"], base + "/checksum/" + sha256(data))
        self.assertEqual(entry["extracted"]["url"], base + "/" + self.tree_relpath(sha256(data)))
        payload = unique("uri gz")
        _answer, entry = self.upload("uri.gz", gzip.compress(payload))
        self.assertEqual(entry["decompressed"]["url"], base + "/checksum/" + sha256(payload))
        answer = self.put_file("uri/x.txt", unique("uri name"))
        self.assertEqual(answer.status, 201)
        self.assertEqual(answer.headers["Location"], base + "/files/uri/x.txt")
        self.assertEqual(answer.json()["files"][0]["url_name"], base + "/files/uri/x.txt")
        self.assertEqual(self.request("GET", "/config").json()["uri"], self.BASE)


if __name__ == "__main__":
    unittest.main()
