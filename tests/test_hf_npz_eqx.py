"""Hugging Face Flax folders, big_vision .npz archives and Equinox .eqx files, written by the
frameworks' own save code (tests/data/hf_flax, big_vision, equinox; scripts/make_*_fixture.py),
read by every command against the float64 norms saved at write time; damaged copies fail with
one line; objects stored pickled are never unpickled."""

import json
import math
import os
import shutil
import zipfile

import numpy as np
import pytest
from conftest import tree_snapshot
from test_cli import run, run_json
from test_refusals import _Trap
from test_trainers import DATA, assert_reads, expected, unboxed

HF = expected("hf_flax")["folders"]
BIG_VISION = expected("big_vision")["arrays"]
EQUINOX = expected("equinox")


def hf(*parts):
    return os.path.join(DATA, "hf_flax", *parts)


# each way of pointing at a committed fixture: (path, options, expected arrays)
WAYS = {
    "hf folder": (hf("bert"), (), HF["bert"]["params"]),
    "hf file": (hf("bert", "flax_model.msgpack"), (), HF["bert"]["params"]),
    "hf sharded folder": (hf("gpt2_sharded"), (), HF["gpt2_sharded"]["params"]),
    "hf index file": (hf("gpt2_sharded", "flax_model.msgpack.index.json"), (), HF["gpt2_sharded"]["params"]),
    "hf both, default": (hf("bert_both"), (), HF["bert"]["params"]),
    "hf both, safetensors": (hf("bert_both"), ("--item", "model.safetensors"), HF["bert"]["params"]),
    "npz": (os.path.join(DATA, "big_vision", "checkpoint.npz"), (), BIG_VISION),
    "npz compressed": (os.path.join(DATA, "big_vision", "checkpoint_compressed.npz"), (), BIG_VISION),
    "eqx": (os.path.join(DATA, "equinox", "model.eqx"), (), EQUINOX["leaves"]),
    "eqx hyperparameters": (os.path.join(DATA, "equinox", "with_hyperparameters.eqx"), (), EQUINOX["leaves"]),
    # flax NNX quantized by qwix and Paxml's two layouts (tests/test_trainers.py has more)
    "qwix": (os.path.join(DATA, "qwix", "state"), (), unboxed(expected("qwix")["leaves"])),
    **{
        f"paxml {run_name}": (
            os.path.join(DATA, "paxml", run_name, "checkpoints"),
            ("--step", "100"),
            expected("paxml")["runs"][run_name]["steps"]["100"]["leaves"],
        )
        for run_name in ("v1_2", "v1_1")
    },
}


@pytest.mark.parametrize("way", list(WAYS))
def test_every_command_reads_the_saved_values(way, tmp_path):
    path, options, wanted = WAYS[way]
    before = tree_snapshot(os.path.dirname(path))
    assert_reads(path, wanted, *options)
    for command in ("mask", "layers"):
        assert run(command, path, *options).exit_code == 0, command
    stats = run_json("stats", path, *options)
    assert {p["path"] for p in stats["params"]} == set(wanted)
    for row in stats["params"]:
        count = math.prod(wanted[row["path"]]["shape"])
        assert row["mean"] ** 2 <= wanted[row["path"]]["norm"] ** 2 / count * (1 + 1e-6) + 1e-12
    doc = run_json("verify", path, *options, "--memory-budget", "1KiB")
    items = 2 if way == "hf both, default" else 1  # verify checks every item: both weights
    assert doc["ok"] and doc["arrays"] == items * len(wanted) and doc["bytes_read"] > 0
    sides = (
        [o.replace("--step", f"--step-{side}") for side in "ab" for o in options]
        if "--step" in options
        else options
    )
    diff = run_json("diff", path, path, *sides)
    assert diff["summary"]["identical"] == len(wanted) and diff["summary"]["changed"] == 0
    baseline = str(tmp_path / "baseline.json")
    assert run("snapshot", path, *options, "-o", baseline, "-q").exit_code == 0
    assert run_json("check", path, *options, "--baseline", baseline)["passed"]
    assert tree_snapshot(os.path.dirname(path)) == before


def test_hf_info_shows_the_config_and_the_index():
    (item,) = run_json("info", hf("bert"))["items"]
    assert (item["name"], item["kind"], item["storage"]) == ("bert", "hf_flax", "msgpack")
    assert item["metadata"] == {"architectures": ["BertModel"], "model_type": "bert"}
    sharded = HF["gpt2_sharded"]
    (item,) = run_json("info", hf("gpt2_sharded"))["items"]
    assert item["metadata"] == {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "flax_model.msgpack.index.json": sharded["index"]["metadata"],
    }
    shards = sorted(set(sharded["index"]["weight_map"].values()))
    assert len(shards) > 1 and item["arrays"] == len(sharded["params"])
    assert item["bytes_on_disk"] == sum(
        os.path.getsize(hf("gpt2_sharded", f)) for f in [*shards, "flax_model.msgpack.index.json"]
    )
    (item,) = run_json("info", hf("gpt2_sharded", "flax_model.msgpack.index.json"))["items"]
    assert item["name"] == "flax_model.msgpack.index.json" and item["arrays"] == len(sharded["params"])


def test_a_shard_read_alone_says_so():
    shard = sorted(set(HF["gpt2_sharded"]["index"]["weight_map"].values()))[1]
    result = run("table", hf("gpt2_sharded", shard), "--format", "json")
    assert result.exit_code == 0
    count = len(json.loads(result.stdout)["params"])
    assert 0 < count < len(HF["gpt2_sharded"]["params"])
    total = len(set(HF["gpt2_sharded"]["index"]["weight_map"].values()))
    assert f"is shard 2 of {total} of a sharded Flax checkpoint" in result.stderr
    assert "flax_model.msgpack.index.json reads them all" in result.stderr
    assert run_json("verify", hf("gpt2_sharded", shard))["ok"]


def test_a_folder_with_flax_and_safetensors_weights_reads_flax_and_says_so():
    info = run_json("info", hf("bert_both"))
    assert [(i["name"], i["kind"]) for i in info["items"]] == [
        ("flax_model.msgpack", "hf_flax"),
        ("model.safetensors", "safetensors"),
    ]
    result = run("table", hf("bert_both"), "--format", "json")
    assert json.loads(result.stdout)["items"] == ["flax_model.msgpack"]
    assert "also holds safetensors weights ('model.safetensors'): reading flax_model.msgpack" in result.stderr
    chosen = run_json("table", hf("bert_both"), "--item", "model.safetensors")
    assert chosen["items"] == ["model.safetensors"]
    result = run("table", hf("bert_both"), "--item", "pytorch_model.bin")
    assert result.exit_code == 3 and "flax_model.msgpack" in result.stderr


def test_npz_bfloat16_is_shown_as_recovered_from_void():
    path = os.path.join(DATA, "big_vision", "checkpoint.npz")
    table = run_json("table", path)
    recovered = {p["path"]: p.get("stored_dtype") for p in table["params"] if p["dtype"] == "bfloat16"}
    assert recovered and set(recovered.values()) == {"|V2"}
    assert set(recovered) == {k for k, v in BIG_VISION.items() if v["dtype"] == "bfloat16"}
    assert all("stored_dtype" not in p for p in table["params"] if p["dtype"] != "bfloat16")
    assert "bfloat16 (from |V2)" in run("table", path).stdout
    storages = [
        run_json("info", os.path.join(DATA, "big_vision", f))["items"][0]["storage"]
        for f in ("checkpoint.npz", "checkpoint_compressed.npz")
    ]
    assert storages == ["npz", "npz-deflated"]


def test_equinox_leaves_are_numbered_with_a_note():
    path = os.path.join(DATA, "equinox", "with_hyperparameters.eqx")
    result = run("table", path, "--format", "json")
    assert [p["path"] for p in json.loads(result.stdout)["params"]] == [
        str(i) for i in range(len(EQUINOX["leaves"]))
    ]
    assert "leaf names are not stored in an Equinox file" in result.stderr
    (item,) = run_json("info", path)["items"]
    assert item["kind"] == "equinox" and item["metadata"] == {"hyperparameters": EQUINOX["hyperparameters"]}
    assert run_json("info", os.path.join(DATA, "equinox", "model.eqx"))["items"][0].get("metadata") is None


def one_line(args, *words):
    """Exit 3, one line on stderr; the words in it (verify: in its report on stdout)."""
    result = run(*args)
    assert result.exit_code == 3, (args, result.exit_code, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr and "hint:" in lines[0], result.stderr
    said = (result.stdout if args[0] == "verify" else "") or lines[0]
    for word in words:
        assert word in said, (word, said)


def flip(path, at):
    with open(path, "r+b") as f:
        f.seek(at)
        byte = f.read(1)
        f.seek(at)
        f.write(bytes([byte[0] ^ 0xFF]))


def test_damaged_copies_fail_verify(tmp_path):
    npz = str(tmp_path / "checkpoint.npz")
    shutil.copy(os.path.join(DATA, "big_vision", "checkpoint.npz"), npz)
    flip(npz, os.path.getsize(npz) // 2)  # inside some stored array's data: only its CRC-32 tells
    result = run("verify", npz, "--format", "json")
    assert result.exit_code == 3 and "Bad CRC-32" in result.stdout
    for name in ("checkpoint.npz", "checkpoint_compressed.npz"):
        cut = str(tmp_path / f"cut_{name}")
        with open(os.path.join(DATA, "big_vision", name), "rb") as f:
            data = f.read()
        with open(cut, "wb") as f:
            f.write(data[: len(data) - 100])
        for command in ("table", "norms", "verify"):
            one_line([command, cut], "not a readable npz archive")
    eqx = str(tmp_path / "model.eqx")
    with open(os.path.join(DATA, "equinox", "model.eqx"), "rb") as f:
        data = f.read()
    with open(eqx, "wb") as f:
        f.write(data[:-3])
    for command in ("table", "verify"):
        one_line([command, eqx], "leaf 9", "the file has")
    folder = str(tmp_path / "gpt2_sharded")
    shutil.copytree(hf("gpt2_sharded"), folder)
    shard = sorted(set(HF["gpt2_sharded"]["index"]["weight_map"].values()))[-1]
    os.remove(os.path.join(folder, shard))
    for command in ("table", "verify"):
        one_line([command, folder], shard, "missing")


def test_npz_object_members_are_refused_unread(tmp_path):
    marker = str(tmp_path / "UNPICKLED")
    path = str(tmp_path / "mixed.npz")
    np.savez(
        path, **{"params/w": np.arange(6.0).reshape(2, 3), "meta": np.array([_Trap(marker)], dtype=object)}
    )
    result = run("norms", path, "--per-param", "--format", "json")
    assert result.exit_code == 0, result.stderr
    assert [p["path"] for p in json.loads(result.stdout)["params"]] == ["params.w"]
    assert "'meta.npy' is of dtype |O (Python objects, stored pickled): not read" in result.stderr
    assert run("verify", path).exit_code == 3
    with zipfile.ZipFile(path) as archive:
        assert sorted(archive.namelist()) == ["meta.npy", "params/w.npy"]
    assert not os.path.exists(marker)


def test_npz_voids_other_than_two_bytes_are_named_never_guessed(tmp_path):
    """Only 2-byte voids are bfloat16 (big_vision's convention); any other void, a structured
    dtype or strings are named with their dtype and left out, the other members read."""
    path = str(tmp_path / "voids.npz")
    weights = np.arange(6.0).reshape(2, 3)
    np.savez(
        path,
        **{
            "params/w": weights,
            "v4": np.zeros(3, dtype="V4"),
            "rec": np.zeros(2, dtype=[("a", "<f4"), ("b", "<i4")]),
            "names": np.array(["ab", "c"]),
        },
    )
    result = run("norms", path, "--per-param", "--format", "json")
    assert result.exit_code == 0, result.stderr
    (row,) = json.loads(result.stdout)["params"]
    assert row["path"] == "params.w"
    assert row["norm"] == pytest.approx(float(np.linalg.norm(weights)), rel=1e-12)
    assert "'v4.npy' is of dtype |V4 (4-byte void; only 2-byte voids are known: bfloat16): not read" in (
        result.stderr
    )
    assert "'rec.npy' is of dtype [('a', '<f4'), ('b', '<i4')] (structured" in result.stderr
    assert "'names.npy' is of dtype <U2 (not numbers): not read" in result.stderr
    report = run("verify", path, "--format", "json")
    assert report.exit_code == 3
    assert len(json.loads(report.stdout)["problems"]) == 3
