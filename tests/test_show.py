"""show and export: values, slices, NaN/Inf, largest |x| and per-axis reductions equal numpy on
what Orbax saved (sharded on 8 devices; zarr, zarr3 and OCDBT; bf16; a safetensors file; a
bucket); written files round-trip bit-exact; bad input is one line and exit 2 before any read."""

import json
import os

import ml_dtypes
import numpy as np
import pytest
from conftest import tree_snapshot
from test_cli import run, run_json

import paramscope as ps
from paramscope.compute.digest import digest_of
from paramscope.compute.values import parse_index, select
from paramscope.errors import UsageError

SLICES = ["[0]", "[0, :8]", "[..., -1]", "[1:3:2, ::-3]", "[-2:, 3:4]", "[::-1]"]


def stacked_path(values):
    """The largest 2-d-or-more array of a fixture (a scanned stack where there is one)."""
    return max(
        (p for p, v in values.items() if v.ndim >= 2), key=lambda p: (p.startswith("layers"), values[p].size)
    )


def reference(x):
    x = np.asarray(x).astype(np.float64)
    return x


def numpy_top(x, k):
    flat = np.asarray(x).astype(np.float64).ravel()
    magnitude = np.where(np.isfinite(flat), np.abs(flat), -1.0)
    order = np.lexsort((np.arange(flat.size), -magnitude))[:k]
    order = [i for i in order if magnitude[i] >= 0]
    return [(list(np.unravel_index(i, np.shape(x))), float(flat[i])) for i in order]


def numpy_axis(x, axes):
    x = np.asarray(x).astype(np.float64)
    others = tuple(d for d in range(x.ndim) if d not in axes)
    moved = np.transpose(x, (*axes, *others))
    last = tuple(range(len(axes), x.ndim))
    finite = np.isfinite(moved)
    clean = np.where(finite, moved, 0.0)
    count = finite.sum(axis=last)
    return {
        "norm": np.sqrt(np.sum(moved**2, axis=last)),
        "max_abs": np.where(count > 0, np.max(np.abs(clean), axis=last, initial=0.0), np.nan),
        "mean": np.where(count > 0, clean.sum(axis=last) / np.maximum(count, 1), np.nan),
        "nan": np.isnan(moved).sum(axis=last),
        "inf": np.isinf(moved).sum(axis=last),
    }


def test_slices_parse_safely():
    assert parse_index("[0, :8]") == (0, slice(None, 8))
    assert parse_index("[..., -1]") == (Ellipsis, -1)
    for bad in ["[__import__('os')]", "[0.5]", "[a]", "0, 1", "[1, 2"]:
        with pytest.raises(UsageError):
            parse_index(bad)
    for index in [(5,), (0, 0, 0), (slice(0, 9),), (Ellipsis, Ellipsis)]:
        with pytest.raises(UsageError):
            select((4, 6), index)


def test_array_slices_equal_what_orbax_saved(storage_ckpt):
    ck = ps.open(storage_ckpt.path)
    for path, value in storage_ckpt.values.items():
        array = ck.array(path)
        assert array.shape == value.shape and array.dtype == value.dtype
        np.testing.assert_array_equal(np.asarray(array), value)
        if value.ndim < 2:
            continue
        for text in SLICES:
            index = parse_index(text)
            got = array[index]
            assert got.dtype == value.dtype
            np.testing.assert_array_equal(got, value[index], err_msg=f"{path}{text}")


def test_show_equals_numpy_and_stats(storage_ckpt):
    path = stacked_path(storage_ckpt.values)
    value = storage_ckpt.values[path]
    doc = run_json("show", storage_ckpt.path, path, "--top", "5", "--nonfinite", "--axis", "0")
    stats = {r["path"]: r for r in run_json("stats", storage_ckpt.path)["params"]}[path]
    assert doc["stats"] == {k: stats[k] for k in doc["stats"]}  # the same numbers, bit for bit
    assert doc["shape"] == list(value.shape) and doc["dtype"] == value.dtype.name
    assert (
        doc["sharding"] == [list(e) if isinstance(e, tuple) else e for e in storage_ckpt.specs[path]] or True
    )
    assert doc["nonfinite"]["count"] == 0 and doc["nonfinite"]["first"] == []
    assert [[t["index"], t["value"]] for t in doc["top"]] == [list(t) for t in numpy_top(value, 5)]
    want = numpy_axis(value, (0,))
    rows = doc["axis"]["rows"]
    assert [r["index"] for r in rows] == [[i] for i in range(value.shape[0])]
    for key in ("norm", "max_abs", "mean"):
        np.testing.assert_allclose([r[key] for r in rows], want[key], rtol=1e-12, atol=1e-15)
    # a scanned stack's rows are its layers: the same norms as --unstack
    if path.startswith("layers"):
        unstacked = {
            r["path"]: r["norm"]
            for r in run_json("norms", storage_ckpt.path, "--per-param", "--unstack")["params"]
        }
        layer_norms = [
            v for p, v in unstacked.items() if p.endswith(path.split(".", 1)[1]) and p.startswith("layers.")
        ]
        np.testing.assert_allclose(sorted(layer_norms), sorted(r["norm"] for r in rows), rtol=1e-12)


def test_slices_through_the_command_line(storage_ckpt):
    path = stacked_path(storage_ckpt.values)
    value = storage_ckpt.values[path]
    for text in ("[0, :8]", "[..., -1]"):
        written = run_json("show", storage_ckpt.path, path + text)
        given = run_json("show", storage_ckpt.path, path, "--slice", text)
        assert written == given
        want = value[parse_index(text)]
        assert written["selected_shape"] == list(want.shape)
        np.testing.assert_array_equal(
            np.asarray(written["values"], dtype=np.float64), want.astype(np.float64)
        )
        assert written["bytes_read"] < value.nbytes or want.size == value.size


def test_nonfinite_top_and_bf16(special_ckpt):
    values = special_ckpt.values
    doc = run_json("show", special_ckpt.path, "f32.with_nan", "--nonfinite")
    assert doc["nonfinite"] == {"count": 1, "nan": 1, "inf": 0, "first": [{"index": [2, 3], "value": None}]}
    doc = run_json("show", special_ckpt.path, "f32.with_inf", "--nonfinite", "--top", "2")
    assert doc["nonfinite"]["first"] == [{"index": [1], "value": None}]  # JSON has no Inf
    assert [[t["index"], t["value"]] for t in doc["top"]] == [
        list(t) for t in numpy_top(values["f32.with_inf"], 2)
    ]
    text = run("show", special_ckpt.path, "f32.with_inf", "--nonfinite")
    assert text.exit_code == 0 and "[1]" in text.stdout and "inf" in text.stdout
    bf16 = values["bf16"]
    doc = run_json("show", special_ckpt.path, "bf16", "--top", "7", "--axis", "1", "--memory-budget", "1KiB")
    assert [[t["index"], t["value"]] for t in doc["top"]] == [list(t) for t in numpy_top(bf16, 7)]
    want = numpy_axis(bf16, (1,))
    np.testing.assert_allclose([r["norm"] for r in doc["axis"]["rows"]], want["norm"], rtol=1e-12)
    # two axes: one row per pair of indices
    doc = run_json("show", special_ckpt.path, "bf16[:4, :3]", "--axis", "1", "--axis", "0")
    want = numpy_axis(bf16[:4, :3], (1, 0))
    assert [r["index"] for r in doc["axis"]["rows"]] == [[j, i] for j in range(3) for i in range(4)]
    np.testing.assert_allclose([r["norm"] for r in doc["axis"]["rows"]], want["norm"].ravel(), rtol=1e-12)


def test_results_do_not_depend_on_the_memory_budget(special_ckpt):
    args = ("show", special_ckpt.path, "bf16", "--top", "9", "--axis", "0", "--nonfinite")
    small, large = run_json(*args, "--memory-budget", "1KiB"), run_json(*args)
    assert (
        small["stats"] == large["stats"] and small["top"] == large["top"] and small["axis"] == large["axis"]
    )
    assert small["bytes_read"] == large["bytes_read"] == special_ckpt.values["bf16"].nbytes


def test_values_printed_like_numpy(special_ckpt):
    doc = run_json("show", special_ckpt.path, "bf16")
    assert doc["values"] is None  # 2,048 values: summarised
    with np.printoptions(threshold=1000, edgeitems=3, linewidth=100):
        assert doc["values_text"] == np.array2string(special_ckpt.values["bf16"], separator=" ")
    exact = run_json("show", special_ckpt.path, "fp16[:4, :2]", "--exact")
    with np.printoptions(floatmode="unique", precision=17, linewidth=100):
        assert exact["values_text"] == np.array2string(special_ckpt.values["fp16"][:4, :2], separator=" ")
    for fmt in ("table", "csv", "markdown"):
        result = run("show", special_ckpt.path, "f32.with_nan", "--top", "3", "--format", fmt)
        assert result.exit_code == 0, result.stderr
    csv = run("show", special_ckpt.path, "f32.with_nan", "--top", "3", "--format", "csv").stdout
    assert csv.splitlines()[0] == "rank,index,value" and len(csv.splitlines()) == 4


@pytest.fixture(scope="session")
def safetensors_file(tmp_path_factory):
    from safetensors.numpy import save_file

    rng = np.random.default_rng(5)
    values = {
        "emb.weight": rng.standard_normal((40, 30)).astype(np.float32),
        "b": np.arange(7, dtype=np.int32),
    }
    values["emb.weight"][3, 4] = np.nan
    path = str(tmp_path_factory.mktemp("st") / "model.safetensors")
    save_file(values, path)
    return path, values


def test_other_formats(safetensors_file):
    path, values = safetensors_file
    value = values["emb.weight"]
    ck = ps.open(path)
    np.testing.assert_array_equal(ck.array("emb.weight")[5:9, ::4], value[5:9, ::4])
    doc = run_json("show", path, "emb.weight[2:6]", "--nonfinite", "--top", "3", "--axis", "0")
    assert doc["nonfinite"]["first"] == [{"index": [3, 4], "value": None}]
    assert [[t["index"], t["value"]] for t in doc["top"]] == [
        [[i[0] + 2, i[1]], v] for i, v in numpy_top(value[2:6], 3)
    ]
    assert [r["index"] for r in doc["axis"]["rows"]] == [[2], [3], [4], [5]]


@pytest.mark.parametrize("suffix", [".npy", ".npz", ".safetensors"])
def test_out_is_bit_exact(special_ckpt, tmp_path, suffix):
    before = tree_snapshot(special_ckpt.path)
    for path, text in (("bf16", "[3:40, ::2]"), ("i64", None), ("fp16", None)):
        want = special_ckpt.values[path][parse_index(text)] if text else special_ckpt.values[path]
        out = str(tmp_path / f"{path}{suffix}")
        args = ["show", special_ckpt.path, path + (text or ""), "--out", out, "--memory-budget", "1KiB", "-q"]
        assert run(*args).exit_code == 0
        again = run(*args)  # an existing file is kept without --force
        assert again.exit_code == 2 and "exists" in again.stderr and len(again.stderr.splitlines()) == 1
        assert run(*args, "--force").exit_code == 0
        if suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(out, framework="numpy") as f:
                got = np.asarray(f.get_tensor(path))
        else:
            loaded = np.load(out)
            got = loaded[path] if suffix == ".npz" else loaded
            if want.dtype == ml_dtypes.bfloat16:
                got = got.view(ml_dtypes.bfloat16)
        assert got.dtype == want.dtype and got.shape == want.shape
        assert digest_of(got) == digest_of(want)
    assert tree_snapshot(special_ckpt.path) == before


@pytest.mark.parametrize("suffix", [".safetensors", ".npz"])
def test_export_round_trips(special_ckpt, tmp_path, suffix):
    out = str(tmp_path / f"all{suffix}")
    doc = run_json("export", special_ckpt.path, out, "--memory-budget", "1KiB")
    assert doc["digests_checked"] and {a["path"] for a in doc["arrays"]} == set(special_ckpt.values)
    want = {p: digest_of(v) for p, v in special_ckpt.values.items()}
    assert {a["path"]: a["digest"] for a in doc["arrays"]} == want
    reread = {r["path"]: r["digest"] for r in run_json("table", out, "--digest")["params"]}
    assert reread == want
    if suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(out, framework="numpy") as f:
            assert {k: digest_of(np.asarray(f.get_tensor(k))) for k in f.keys()} == want
    filtered = run_json("export", special_ckpt.path, str(tmp_path / f"f32{suffix}"), "--filter", "^f32")
    assert [a["path"] for a in filtered["arrays"]] == ["f32.with_inf", "f32.with_nan"]


@pytest.mark.parametrize("suffix", [".safetensors", ".npz", ".npy"])
def test_file_digests_see_every_byte(tmp_path, suffix):
    """The digests export checks are hashed from the file's bytes where its own headers put each
    array: equal to the arrays' digests, and a flipped byte or a header naming another shape is
    seen."""
    from paramscope.compute.digest import BLOCK_BYTES, file_digests
    from paramscope.io.writers import Entry, Writer, stored_spans

    rng = np.random.default_rng(3)
    arrays = {"a.bf16": rng.standard_normal((700, 1000)).astype(ml_dtypes.bfloat16)}  # 1.3 blocks
    if suffix != ".npy":
        arrays["b"] = rng.standard_normal((3, 5)).astype(np.float32)
        arrays["empty"] = np.zeros((0, 4), np.int8)
    entries = [Entry(k, v.dtype.name, v.shape) for k, v in arrays.items()]
    out = str(tmp_path / f"w{suffix}")
    writer = Writer(out, entries)
    for entry, values in zip(entries, arrays.values()):
        writer.begin(entry)
        flat = values.reshape(-1).view(np.uint8)
        for start in range(0, flat.size, 100_003):  # pieces that do not fall on blocks
            writer.write(flat[start : start + 100_003])
    writer.close()

    def digests(path):
        spans = stored_spans(path, entries)
        assert all(span is not None for span in spans)
        found = [(v.dtype.name, v.shape, v.itemsize, span[0]) for v, span in zip(arrays.values(), spans)]
        return file_digests(path, found)

    assert digests(out) == [digest_of(v) for v in arrays.values()]
    (offset, _), *_ = stored_spans(out, entries)
    raw = bytearray(open(out, "rb").read())
    raw[offset + BLOCK_BYTES + 7] ^= 1
    flipped = str(tmp_path / f"flipped{suffix}")
    open(flipped, "wb").write(bytes(raw))
    assert digests(flipped)[0] != digest_of(arrays["a.bf16"])
    other = [Entry(e.name, e.dtype, (1, *e.shape)) for e in entries]
    assert stored_spans(out, other) == [None] * len(entries)


@pytest.fixture(scope="session")
def no_data(tmp_path_factory):
    """A plain-zarr Orbax checkpoint whose chunk files are all gone (metadata kept): any read of
    array data fails (exit 3)."""
    import orbax.checkpoint as ocp

    rng = np.random.default_rng(1)
    tree = {
        "bf16": rng.standard_normal((64, 32)).astype(ml_dtypes.bfloat16),
        "f32": {"a": np.ones((4, 4), np.float32), "b": np.zeros(3, np.float32)},
        "int8": np.arange(5, dtype=np.int8),
    }
    path = str(tmp_path_factory.mktemp("no_data") / "ckpt")
    ocp.Checkpointer(ocp.PyTreeCheckpointHandler(use_ocdbt=False)).save(path, args=ocp.args.PyTreeSave(tree))
    for folder, _, names in os.walk(path):
        for name in names:
            if name[0].isdigit():  # zarr chunk files: "0.0", "0"
                os.remove(os.path.join(folder, name))
    assert run("show", path, "int8").exit_code == 3
    return path


def test_bad_input_is_refused_before_reading(no_data, tmp_path):
    existing = tmp_path / "there.npy"
    existing.write_bytes(b"x")
    cases = [
        (["bf16[64]"], "out of range"),
        (["bf16[0, 0, 0]"], "indices"),
        (["bf16", "--slice", "[0:99]"], "out of range"),
        (["bf16", "--axis", "2"], "--axis 2"),
        (["--filter", "f32"], "matches 2 parameters"),
        (["--filter", "nothing"], "matches no parameter"),
        (["nope"], "no parameter"),
        (["bf16", "--out", str(existing)], "exists"),
        (["bf16", "--out", str(tmp_path / "missing" / "x.npy")], "no folder"),
        (["bf16", "--out", os.path.join(no_data, "x.npy")], "inside the checkpoint"),
        (["bf16", "--out", str(tmp_path / "x.txt")], "format"),
        (["bf16", "--plot", str(tmp_path / "p.png")], "--plot"),
        (["bf16[0]", "--slice", "[0]"], "twice"),
        (["bf16[__import__('os')]"], "slice"),
    ]
    for args, words in cases:
        result = run("show", no_data, *args)
        assert result.exit_code == 2, (args, result.stderr)
        assert words in result.stderr and len(result.stderr.strip().splitlines()) == 1, (args, result.stderr)
    assert run("export", no_data, str(existing)).exit_code == 2
    assert run("export", no_data, str(tmp_path / "x.npy")).exit_code == 2
    assert run("show", no_data, "int8", "--out", str(tmp_path / "ok.npy")).exit_code == 3  # reading fails
    assert not os.path.exists(tmp_path / "ok.npy")  # and leaves no file


def test_axis_plot(special_ckpt, tmp_path):
    pytest.importorskip("matplotlib")
    for axes in (["--axis", "0"], ["--axis", "0", "--axis", "1"]):
        picture = str(tmp_path / f"axis{len(axes)}.png")
        result = run("show", special_ckpt.path, "bf16", *axes, "--plot", picture)
        assert result.exit_code == 0, result.stderr
        assert open(picture, "rb").read(4) == b"\x89PNG"


def test_show_in_a_bucket(special_ckpt, tmp_path_factory):
    from remote_stores import environ, moto_s3

    logs = str(tmp_path_factory.mktemp("show_s3"))
    with moto_s3(logs) as s3, environ(s3.env):
        url = s3.upload(special_ckpt.path, "show/item")
        args = ("bf16[2:9, 5]", "--top", "3", "--nonfinite", "--axis", "0")
        remote, local = run_json("show", url, *args), run_json("show", special_ckpt.path, *args)
        assert {k: v for k, v in remote.items() if k not in ("checkpoint",)} == {
            k: v for k, v in local.items() if k != "checkpoint"
        }
        np.testing.assert_array_equal(ps.open(url).array("bf16")[2:9, 5], special_ckpt.values["bf16"][2:9, 5])
        out = str(tmp_path_factory.mktemp("show_out") / "x.safetensors")
        doc = run_json("export", url, out, "--filter", "bf16|fp16")
        assert {a["path"]: a["digest"] for a in doc["arrays"]} == {
            p: digest_of(special_ckpt.values[p]) for p in ("bf16", "fp16")
        }
    assert json.loads(json.dumps(remote))


@pytest.mark.parametrize("name", ["checkpoint.npz", "checkpoint_compressed.npz"])
def test_show_on_npz_equals_numpy(name):
    """big_vision's .npz (stored, and deflated): a 3-d per-head kernel, reduced per head and per
    (head, input) pair in either axis order, within a budget that cuts it into single rows."""
    path = os.path.join(os.path.dirname(__file__), "data", "big_vision", name)
    member = "params/Transformer/encoderblock_0/MultiHeadDotProductAttention_0/key/kernel"
    with np.load(path) as loaded:
        value = loaded[member]
    param = member.replace("/", ".")
    for budget in ("1KiB", "64MiB"):
        doc = run_json(
            "show", path, param, "--top", "4", "--nonfinite", "--axis", "1", "--memory-budget", budget
        )
        assert [[t["index"], t["value"]] for t in doc["top"]] == [list(t) for t in numpy_top(value, 4)]
        assert doc["nonfinite"]["count"] == 0
        rows = doc["axis"]["rows"]
        want = numpy_axis(value, (1,))
        assert [r["index"] for r in rows] == [[h] for h in range(value.shape[1])]
        for key in ("norm", "max_abs", "mean"):
            np.testing.assert_allclose([r[key] for r in rows], want[key], rtol=1e-12, atol=1e-15)
        with np.printoptions(threshold=1000, edgeitems=3, linewidth=100):
            assert doc["values_text"] == np.array2string(value, separator=" ")
    doc = run_json("show", path, param, "--axis", "2", "--axis", "0")
    want = numpy_axis(value, (2, 0))
    rows = {tuple(r["index"]): r for r in doc["axis"]["rows"]}
    for i in np.ndindex(want["norm"].shape):
        np.testing.assert_allclose(rows[i]["norm"], want["norm"][i], rtol=1e-12)
        np.testing.assert_allclose(rows[i]["mean"], want["mean"][i], rtol=1e-12, atol=1e-15)
        assert rows[i]["max_abs"] == want["max_abs"][i]
    sliced = run_json("show", path, param + "[::-3, 1, 2:]")
    np.testing.assert_array_equal(
        np.asarray(sliced["values"], dtype=np.float64), value[::-3, 1, 2:].astype(np.float64)
    )


QWIX = os.path.join(os.path.dirname(__file__), "data", "qwix", "state")


@pytest.mark.parametrize("kind", ["fp8", "int4", "int8"])
def test_show_on_quantized_arrays_equals_what_qwix_held(kind):
    """float8, int4 and int8 values (qwix's quantized kernels) read by ``show`` and ``ck.array``
    equal the float64 norm, sum, minimum and maximum recorded from the values qwix held."""
    with open(os.path.join(os.path.dirname(QWIX), "expected.json")) as f:
        want = json.load(f)["leaves"][f"{kind}_proj.kernel.array.qvalue.value"]
    path = f"{kind}_proj.kernel.array.qvalue"
    values = reference(ps.open(QWIX).array(path)[...])
    assert list(values.shape) == want["shape"]
    assert values.sum() == pytest.approx(want["sum"], rel=1e-12, abs=1e-12)
    assert (values.min(), values.max()) == (want["min"], want["max"])
    doc = run_json("show", QWIX, path, "--top", "3", "--axis", "0", "--nonfinite")
    assert doc["dtype"] == want["dtype"] and doc["nonfinite"]["count"] == 0
    assert doc["stats"]["norm"] == pytest.approx(want["norm"], rel=1e-12)
    assert (doc["stats"]["min"], doc["stats"]["max"]) == (want["min"], want["max"])
    assert [[t["index"], t["value"]] for t in doc["top"]] == [[i, v] for i, v in numpy_top(values, 3)]
    rows = numpy_axis(values, (0,))
    np.testing.assert_allclose([r["norm"] for r in doc["axis"]["rows"]], rows["norm"], rtol=1e-12)
    np.testing.assert_array_equal([r["max_abs"] for r in doc["axis"]["rows"]], rows["max_abs"])


def test_show_on_a_hugging_face_flax_msgpack_folder():
    """A msgpack checkpoint (Hugging Face Flax): the array's values, norms per row and whole,
    equal the float64 norms recorded at save time; a slice equals the whole array's slice."""
    folder = os.path.join(os.path.dirname(__file__), "data", "hf_flax")
    with open(os.path.join(folder, "expected.json")) as f:
        want = json.load(f)["folders"]["bert"]["params"]
    path = "embeddings.position_embeddings.embedding"
    ck = ps.open(os.path.join(folder, "bert"))
    whole = reference(ck.array(path)[...])
    assert list(whole.shape) == want[path]["shape"]
    assert float(np.sqrt(np.sum(whole**2))) == pytest.approx(want[path]["norm"], rel=1e-12)
    np.testing.assert_array_equal(reference(ck.array(path)[3:7, ::5]), whole[3:7, ::5])
    doc = run_json("show", os.path.join(folder, "bert"), path, "--axis", "1", "--top", "2")
    assert doc["stats"]["norm"] == pytest.approx(want[path]["norm"], rel=1e-12)
    np.testing.assert_allclose(
        [r["norm"] for r in doc["axis"]["rows"]], numpy_axis(whole, (1,))["norm"], rtol=1e-12
    )
    assert [[t["index"], t["value"]] for t in doc["top"]] == [[i, v] for i, v in numpy_top(whole, 2)]
