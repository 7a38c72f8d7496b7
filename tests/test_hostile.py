"""Hostile or tiny malformed inputs: bounded time and memory, the right numbers, one line and a
documented exit code. Each case is a real file or folder; commands that could hang run in a
subprocess under a harness timeout (never asserted on), memory under RLIMIT_AS."""

import json
import os
import signal
import struct
import subprocess
import sys
import time

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_cli import run

from paramscope.io import checkpoint, msgpack_walk, records, safetensors

HARNESS_TIMEOUT = 120  # a bound for a hang, not a measurement
MEMORY_LIMIT = 3 << 30


def _limit_memory():
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))


def cli(*args, memory=False):
    """The command line in a child process: (exit code, stdout, stderr lines)."""
    done = subprocess.run(
        [sys.executable, "-m", "paramscope", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=HARNESS_TIMEOUT,
        preexec_fn=_limit_memory if memory else None,
    )
    return done.returncode, done.stdout, done.stderr.splitlines()


def one_error(lines, *words):
    assert len(lines) == 1 and lines[0].startswith("paramscope: error: "), lines
    for word in words:
        assert word in lines[0], lines
    return lines[0]


def safetensors_file(path, tensors, data=b""):
    header = json.dumps(tensors).encode()
    path.write_bytes(struct.pack("<Q", len(header)) + header + data)
    return path


def flax_array(shape, dtype, raw):
    return msgpack.ExtType(1, msgpack.packb([list(shape), dtype, raw]))


# ----------------------------------------------------------------------------------------------
# 1. Zero-size arrays of enormous shape cost nothing


def _zero_size(tmp_path, form):
    shape = [10**12, 0]
    if form == "safetensors":
        return safetensors_file(
            tmp_path / "zero.safetensors", {"w": {"dtype": "F32", "shape": shape, "data_offsets": [0, 0]}}
        )
    if form == "msgpack":
        doc = {"params": {"w": flax_array(shape, "float32", b"")}}
    else:  # flax's chunked form
        chunked = {
            msgpack_walk.CHUNKED: True,
            "shape": {"0": shape[0], "1": shape[1]},
            "chunks": {"0": flax_array([0], "float32", b"")},
        }
        doc = {"params": {"w": chunked}}
    path = tmp_path / "checkpoint_1"
    path.write_bytes(msgpack.packb(doc))
    return path


@pytest.mark.parametrize(
    "form, command",
    [("safetensors", "stats"), ("msgpack", "stats"), ("chunked", "stats"), ("safetensors", "verify")],
)
def test_zero_size_array_of_huge_shape_is_read_at_once(tmp_path, form, command):
    code, out, err = cli(command, _zero_size(tmp_path, form), "-f", "json")
    assert code == 0, err
    if command == "stats":
        (row,) = json.loads(out)["params"]
        assert row["count"] == 0


@pytest.mark.parametrize("index", [None, (slice(5, 10**11, 7),), (3,), (slice(None, None, -1), slice(None))])
def test_bytes_array_with_no_elements_reads_any_index_without_reading(index):
    def never(lo, hi):
        raise AssertionError("read no bytes")

    handle = records.BytesArray((10**12, 0), "float32", 0, never)
    got = (handle if index is None else handle[index]).read().result()
    assert got.size == 0 and got.shape == np.empty((10**12, 0))[index or ()].shape


# ----------------------------------------------------------------------------------------------
# 2. Arrays of chunks never written: refused past a cap on fill value


def _zarray(folder, shape, chunks):
    folder.mkdir(parents=True)
    meta = {"zarr_format": 2, "shape": shape, "chunks": chunks, "dtype": "<f4", "compressor": None}
    meta.update(fill_value=0, order="C", filters=None)
    (folder / ".zarray").write_text(json.dumps(meta))


@pytest.mark.parametrize(
    "shape, chunks, words",
    [([2**40], [2**20], ["of its 1,048,576 chunks are not stored"]), ([1000, 1000], [1, 1], ["1,000,000"])],
)
def test_array_of_missing_chunks_is_refused(tmp_path, shape, chunks, words):
    _zarray(tmp_path / "tree" / "w", shape, chunks)
    code, out, _ = cli("table", tmp_path / "tree", "-f", "json")
    assert code == 0 and json.loads(out)["params"][0]["count"] == np.prod(shape, dtype=object)
    code, _, err = cli("stats", tmp_path / "tree")
    assert code == 3
    one_error(err, "'w'", *words)


def test_fill_value_cap_counts_stored_chunks(tmp_path):
    """A few missing chunks read as fill value; past the caps the array is refused."""
    import tensorstore as ts

    tree = tmp_path / "tree"
    for name, written in (("whole", 8), ("partial", 1)):
        spec = {"driver": "zarr", "kvstore": {"driver": "file", "path": str(tree / name)}}
        spec["metadata"] = {"chunks": [2, 4], "compressor": None}
        handle = ts.open(spec, create=True, dtype=ts.float32, shape=[8, 8]).result()
        for k in range(written):
            handle[2 * (k // 2) : 2 * (k // 2) + 2, 4 * (k % 2) : 4 * (k % 2) + 4] = k + 1
    _zarray(tree / "none", [2**14, 2**14], [2**7, 2**7])
    location = checkpoint.locate(str(tree))
    arrays = {a.name: a for a in checkpoint.read_arrays(location.items[0], [])}
    assert {n: a.stored_chunks for n, a in arrays.items()} == {"whole": 8, "partial": 1, "none": 0}
    assert records.fill_problem(arrays["whole"]) is None and records.fill_problem(arrays["partial"]) is None
    assert "fill value" in records.fill_problem(arrays["none"])
    assert checkpoint.open_array(arrays["partial"]).read().result().sum() == 8  # one chunk of ones


# ----------------------------------------------------------------------------------------------
# 3. Documented caps on what one file lists, under a memory limit


def test_msgpack_of_too_many_ints_is_refused_in_bounded_memory(tmp_path):
    path = tmp_path / "checkpoint_1"
    path.write_bytes(msgpack.packb({"params": {str(i): i for i in range(msgpack_walk.MAX_LEAVES + 1)}}))
    code, _, err = cli("table", path, "-f", "json", memory=True)
    assert code == 3
    one_error(err, f"more than {msgpack_walk.MAX_LEAVES:,} leaves")


def test_msgpack_of_a_million_empty_maps_is_refused(tmp_path):
    path = tmp_path / "checkpoint_1"
    path.write_bytes(msgpack.packb({"params": [{}] * (msgpack_walk.MAX_VALUES + 1)}))
    result = run("table", path)
    assert result.exit_code == 3
    one_error(result.stderr.splitlines(), f"more than {msgpack_walk.MAX_VALUES:,} values")


def test_safetensors_header_of_too_many_tensors_is_refused_in_bounded_memory(tmp_path):
    entry = {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]}
    tensors = {f"t{i}": entry for i in range(safetensors.MAX_TENSORS + 1)}
    path = safetensors_file(tmp_path / "many.safetensors", tensors)
    code, _, err = cli("table", path, "-f", "json", memory=True)
    assert code == 3
    one_error(err, f"more than {safetensors.MAX_TENSORS:,} tensors")


def test_safetensors_header_past_the_read_limit_is_refused(tmp_path):
    path = tmp_path / "big.safetensors"
    length = safetensors.MAX_READ_HEADER_BYTES + 1
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", length))
        f.truncate(8 + length)
    result = run("table", path)
    assert result.exit_code == 3
    one_error(result.stderr.splitlines(), "more than paramscope reads")


# ----------------------------------------------------------------------------------------------
# 4. FIFOs where files are expected


def _fifo_case(tmp_path, case):
    if case == "orbax _METADATA":
        (tmp_path / "item").mkdir()
        fifo = tmp_path / "item" / "_METADATA"
        target = tmp_path / "item"
    elif case == "safetensors":
        fifo = target = tmp_path / "model.safetensors"
    elif case == "msgpack":
        fifo = target = tmp_path / "checkpoint_1"
    else:  # a zarr array's metadata, then a chunk of another
        _zarray(tmp_path / "tree" / "b", [2], [2])
        os.mkfifo(tmp_path / "tree" / "b" / "0")
        (tmp_path / "tree" / "a").mkdir()
        fifo, target = tmp_path / "tree" / "a" / ".zarray", tmp_path / "tree"
    os.mkfifo(fifo)
    return fifo, target


@pytest.mark.parametrize("case", ["orbax _METADATA", "safetensors", "msgpack", "zarr"])
def test_fifo_is_refused_before_it_is_opened(tmp_path, case):
    fifo, target = _fifo_case(tmp_path, case)
    code, _, err = cli("stats", target)
    assert code == 3
    one_error(err, str(fifo), "FIFO")
    if case == "zarr":  # and a chunk file that is one, once the metadata is a file
        os.unlink(fifo)
        code, _, err = cli("stats", target)
        assert code == 3
        one_error(err, str(target / "b" / "0"), "FIFO")


# ----------------------------------------------------------------------------------------------
# 5. JSON nested too deeply for the parser


@pytest.mark.parametrize("name", ["_METADATA", "zarr"])
def test_deeply_nested_json_is_damaged_metadata(tmp_path, name):
    if name == "zarr":
        (tmp_path / "item" / "w").mkdir(parents=True)
        (tmp_path / "item" / "w" / ".zarray").write_text("[" * 200_000)
    else:
        (tmp_path / "item").mkdir()
        (tmp_path / "item" / "_METADATA").write_text("[" * 200_000)
    result = run("table", tmp_path / "item")
    assert result.exit_code == 3, result.stderr
    one_error(result.stderr.splitlines(), "zarr metadata" if name == "zarr" else "nested too deeply")


# ----------------------------------------------------------------------------------------------
# 6. Big-endian dtypes are read in their byte order


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    values=st.lists(st.floats(-1e6, 1e6, width=32), min_size=1, max_size=40),
    dtype=st.sampled_from([">f4", "<f4", ">f8", ">i4", ">u2", "float32"]),
    chunked=st.booleans(),
)
def test_msgpack_array_is_read_in_its_byte_order(tmp_path, values, dtype, chunked):
    array = np.asarray(values).astype(dtype)
    stored = flax_array(array.shape, dtype, array.tobytes())
    if chunked:  # two flat pieces
        half = len(array) // 2
        pieces = [array[:half], array[half:]]
        pieces = [p for p in pieces if p.size]  # flax numbers the pieces it writes from 0
        chunks = {str(i): flax_array(p.shape, dtype, p.tobytes()) for i, p in enumerate(pieces)}
        stored = {msgpack_walk.CHUNKED: True, "shape": {"0": len(array)}, "chunks": chunks}
    path = tmp_path / f"checkpoint_{abs(hash((dtype, chunked)))}"
    path.write_bytes(msgpack.packb({"params": {"w": stored}}))
    location = checkpoint.locate(str(path))
    (param,) = checkpoint.read_arrays(location.items[0], [])
    got = checkpoint.open_array(param).read().result()
    assert got.dtype.isnative and np.array_equal(got.astype(np.float64), array.astype(np.float64))


def test_big_endian_msgpack_norm_is_the_float64_norm(tmp_path):
    array = np.arange(6, dtype=">f4").reshape(2, 3)
    path = tmp_path / "checkpoint_1"
    path.write_bytes(msgpack.packb({"params": {"w": flax_array(array.shape, ">f4", array.tobytes())}}))
    result = run("norms", path, "-f", "json")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["global_norm"] == pytest.approx(np.linalg.norm(array.astype(np.float64)))
    assert run("verify", path).exit_code == 0


# ----------------------------------------------------------------------------------------------
# 7. Ctrl-C at any moment


def _bytes_read(pid):
    """Bytes the child has read so far (``rchar``): imports read some megabytes."""
    try:
        with open(f"/proc/{pid}/io") as f:
            return int(next(line for line in f if line.startswith("rchar:")).split()[1])
    except (OSError, StopIteration):
        return 0


INTERRUPTED = ["paramscope: error: interrupted"]
MOMENTS = (0.05, 0.3, 0.7, 1.2, 2.0)  # seconds after the start: imports, parsing, reading


def _in_python_start_up(code, lines):
    """Whether SIGINT came before paramscope's first line ran: before Python heeds it (killed by
    the signal, which a shell shows as exit 130), in its site module, or in runpy finding the
    package (a traceback of Python's own frozen modules alone)."""
    if any("init_import_site" in line for line in lines):
        return True
    frames = [line for line in lines if line.lstrip().startswith("File ")]
    return code == -signal.SIGINT and all('File "<frozen ' in line for line in frames)


def _interrupt_at(moment, args):
    """Runs the command line in a child process and sends it SIGINT after ``moment`` seconds:
    (exit code, stderr lines)."""
    child = subprocess.Popen(
        [sys.executable, "-m", "paramscope", *map(str, args)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        time.sleep(moment)
        child.send_signal(signal.SIGINT)
        _, err = child.communicate(timeout=HARNESS_TIMEOUT)
    finally:
        child.kill()
    return child.returncode, err.splitlines()


@pytest.mark.parametrize(
    "args",
    [
        ["table", "{ckpt}"],
        ["norms", "{ckpt}", "--per-param"],
        ["stats", "{ckpt}", "-f", "json"],
        ["diff", "{ckpt}/checkpoint_100", "{ckpt}/checkpoint_200"],
        ["history", "{ckpt}", "--no-cache"],
    ],
    ids=lambda args: args[0],
)
def test_ctrl_c_at_any_moment_is_one_line_and_130(manager_ckpt, args):
    args = [a.format(ckpt=manager_ckpt.path) for a in args]
    handled = 0
    for moment in MOMENTS:
        code, lines = _interrupt_at(moment, args)
        if _in_python_start_up(code, lines):
            continue
        if code == 0:  # finished before the signal came
            assert not any("Traceback" in line for line in lines), lines
            continue
        assert (code, lines) == (130, INTERRUPTED), (moment, code, lines)
        handled += 1
    # how many moments fall after Python's own start-up depends on the machine's load; at least
    # one must, so that the one line is seen to hold
    assert handled >= 1


@pytest.mark.skipif(not os.path.isfile("/proc/self/io"), reason="needs /proc to see the reads start")
def test_ctrl_c_while_reading_exits_130_with_one_line(tmp_path):
    count = 1 << 30  # 4 GiB of zeros, sparse on disk: many seconds of reading
    path = tmp_path / "big.safetensors"
    header = json.dumps({"w": {"dtype": "F32", "shape": [count], "data_offsets": [0, 4 * count]}}).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header)) + header)
        f.truncate(8 + len(header) + 4 * count)
    child = subprocess.Popen(
        [sys.executable, "-m", "paramscope", "stats", str(path), "--memory-budget", "32MiB"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        give_up = time.monotonic() + HARNESS_TIMEOUT
        while _bytes_read(child.pid) < 256 << 20 and child.poll() is None and time.monotonic() < give_up:
            time.sleep(0.01)
        assert child.poll() is None, child.communicate()
        child.send_signal(signal.SIGINT)
        _, err = child.communicate(timeout=HARNESS_TIMEOUT)
    finally:
        child.kill()
    assert child.returncode == 130
    assert err.splitlines() == ["paramscope: error: interrupted"]
