"""Fuzzing the readers (issue 11.4): random bytes and random mutations of valid files.

Every input file a reader takes (each format of the registry, CSV and Parquet ratings logs,
test lists, the truth sidecar) is replaced by random bytes or by a valid file with random
byte flips, insertions, deletions, duplicated lines and truncations, and driven through
``plan_ingest`` (reading, checks and packing; no image is decoded). The only outcomes
allowed are success or the project's own user error: never another exception.
"""

from __future__ import annotations

import io
import shutil
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from piaa_dist.data.ingest import plan_ingest
from piaa_dist.data.readers import READERS
from piaa_dist.errors import UserError


def _jpeg() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (10, 20, 30)).save(buf, "JPEG")
    return buf.getvalue()


def _parquet_log() -> bytes:
    buf = io.BytesIO()
    pq.write_table(pa.table({"user": ["u1", "u1", "u2"], "image": ["a.jpg", "b.jpg", "a.jpg"],
                             "score": [3.0, 4.5, 1.0], "split": ["train", "train", "test"]}), buf)
    return buf.getvalue()


# target name -> (format, file to fuzz (relative to the dataset folder), valid content, ingest kwargs)
TARGETS = {
    "flickr-aes": ("flickr-aes", "FLICKR-AES_image_labeled_by_each_worker.csv",
                   b"worker, imagePair, score\nA1, a.jpg, 3\nA1, b.jpg, 4\nA2, a.jpg, 5\n", {}),
    "flickr-aes test list": ("flickr-aes", "test_workers.csv", b"ID\nA2\nA3\n", {}),
    "flickr-aes sidecar": ("flickr-aes", "latent_scores.csv",
                           b"worker,imagePair,latent,average_latent\nA1,a.jpg,3.1,2.9\nA2,a.jpg,4.2,2.9\n", {}),
    "aadb": ("aadb", "AllinAll.csv",
             b"WorkerId,Input.image_url1,Input.image_url2,Answer.overallScore1,Answer.overallScore2\n"
             b"W1,http://x/a.jpg,http://x/b.jpg,3,4\nW2,http://x/a.jpg,,5,\n", {}),
    "ratings csv": ("ratings", "log.csv", b"user,image,score,split\nu1,a.jpg,3,train\nu1,b.jpg,4.5,\nu2,a.jpg,1,test\n",
                    {"ratings_file": "log.csv"}),
    "ratings parquet": ("ratings", "log.parquet", _parquet_log(), {"ratings_file": "log.parquet"}),
    "para": ("para", "annotation/PARA-Images.csv",
             b"sessionId,imageName,userId,aestheticScore,qualityScore\ns1,a.jpg,U1,3.5,3\ns1,b.jpg,U1,4,2\n"
             b"s1,a.jpg,U2,2.5,1\n", {}),
}
assert {t[0] for t in TARGETS.values()} == set(READERS), "every registered format is fuzzed"


def _layout(root: Path) -> None:
    """A dataset folder in which every format finds its images (a.jpg, b.jpg)."""
    for folder in (root / "images", root / "imgs" / "s1"):
        folder.mkdir(parents=True, exist_ok=True)
        for name in ("a.jpg", "b.jpg"):
            (folder / name).write_bytes(_jpeg())
    for _name, (_, rel, content, _) in TARGETS.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("fuzz-base") / "data"
    _layout(root)
    return root


MUTATION = st.tuples(
    st.sampled_from(["flip", "insert", "delete", "dupline", "truncate", "replace"]),
    st.integers(min_value=0, max_value=1 << 20),
    st.binary(min_size=1, max_size=6),
)


def _mutate(data: bytes, ops: list[tuple[str, int, bytes]]) -> bytes:
    buf = bytearray(data)
    for op, at, blob in ops:
        i = at % (len(buf) + 1)
        if op == "flip" and buf:
            buf[i % len(buf)] ^= blob[0] or 0xFF
        elif op == "insert":
            buf[i:i] = blob
        elif op == "delete":
            del buf[i : i + len(blob)]
        elif op == "dupline":
            lines = bytes(buf).split(b"\n")
            k = i % len(lines)
            lines.insert(k, lines[k])
            buf = bytearray(b"\n".join(lines))
        elif op == "truncate":
            del buf[i:]
        elif op == "replace":
            buf[i : i + len(blob)] = blob
    return bytes(buf)


def _drive(base: Path, target: str, content: bytes) -> None:
    fmt, rel, _, kwargs = TARGETS[target]
    with tempfile.TemporaryDirectory(prefix="fuzz-") as tmp:
        root = Path(tmp) / "data"
        shutil.copytree(base, root, symlinks=True)
        (root / rel).write_bytes(content)
        kw = dict(kwargs)
        if "ratings_file" in kw:
            kw["ratings_file"] = root / kw["ratings_file"]
            kw["images_dir"] = root / "images"
            dataset_root = None
        else:
            dataset_root = root
        if fmt == "aadb":
            kw["test_users"] = root / "test_workers.csv"
        try:
            plan_ingest(fmt, dataset_root, str(Path(tmp) / "out"), **kw)
        except UserError:
            pass  # the project's own error: a clear, one-line message


FUZZ = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def test_the_valid_inputs_plan(base):
    for target in TARGETS:
        _drive(base, target, TARGETS[target][2])


@pytest.mark.parametrize("target", list(TARGETS))
@FUZZ
@given(data=st.binary(max_size=600))
def test_random_bytes_give_success_or_a_user_error(base, target, data):
    _drive(base, target, data)


@pytest.mark.parametrize("target", list(TARGETS))
@FUZZ
@given(ops=st.lists(MUTATION, min_size=1, max_size=6))
def test_mutated_files_give_success_or_a_user_error(base, target, ops):
    _drive(base, target, _mutate(TARGETS[target][2], ops))
