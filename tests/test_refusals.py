"""Files paramscope does not read are named for what they are; pickle-based ones are refused
without ever being unpickled (loading one would run the code it names)."""

import os
import pickle
import shutil
import zipfile

import numpy as np
import pytest
from test_cli import run


class _Trap:
    """Unpickling this creates a file: proof that a refusal never unpickled anything."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("refused")
    marker = str(folder / "UNPICKLED")
    with open(folder / "model.pkl", "wb") as f:
        pickle.dump(_Trap(marker), f)
    with open(folder / "pytorch_model.bin", "wb") as f:
        pickle.dump({"w": _Trap(marker)}, f, protocol=2)
    with zipfile.ZipFile(folder / "weights.pt", "w") as archive:  # torch.save's layout
        archive.writestr("weights/data.pkl", pickle.dumps(_Trap(marker)))
    np.save(folder / "objects.npy", np.array([_Trap(marker)], dtype=object), allow_pickle=True)
    np.save(folder / "plain.npy", np.ones(3))
    (folder / "model.h5").write_bytes(b"\x89HDF\r\n\x1a\n" + bytes(64))
    return folder, marker


@pytest.mark.parametrize("name", ["model.pkl", "pytorch_model.bin", "weights.pt", "objects.npy"])
def test_pickle_based_files_are_refused_unread(files, name):
    folder, marker = files
    for command in ("table", "norms", "verify", "info"):
        result = run(command, folder / name)
        assert result.exit_code == 3, result.stderr
        assert result.stderr.count("\n") == 1 and "pickle-based" in result.stderr
        assert "never unpickles" in result.stderr and "safetensors" in result.stderr
    assert not os.path.exists(marker)


def test_a_folder_of_pickles_names_them(files):
    folder, marker = files
    result = run("table", folder)
    assert result.exit_code == 3
    assert "holds pickle-based files (model.pkl, objects.npy, pytorch_model.bin and 1 more)" in result.stderr
    assert not os.path.exists(marker)


@pytest.mark.parametrize(("name", "what"), [("plain.npy", "numpy .npy"), ("model.h5", "HDF5")])
def test_other_formats_are_named(files, name, what):
    folder, _ = files
    result = run("table", folder / name)
    assert result.exit_code == 3 and result.stderr.count("\n") == 1
    assert what in result.stderr and "does not read" in result.stderr


DATA = os.path.join(os.path.dirname(__file__), "data")


@pytest.mark.parametrize("name", ["checkpoint.npz", "model.eqx"])
def test_a_folder_holding_one_checkpoint_file_names_it(tmp_path, name):
    # the folder is no checkpoint; its file is one, read when passed (never named another format)
    folder = tmp_path / "run"
    folder.mkdir()
    if name.endswith(".npz"):
        np.savez(folder / name, w=np.ones((2, 3), np.float32))
    else:
        shutil.copy(os.path.join(DATA, "equinox", name), folder / name)
    assert run("table", folder / name).exit_code == 0
    result = run("table", folder)
    assert result.exit_code == 3 and result.stderr.count("\n") == 1, result.stderr
    assert (
        f"{folder} is a folder holding the checkpoint file {name}, not a checkpoint itself" in result.stderr
    )
    assert f"pass the file: {folder / name}" in result.stderr
    assert "does not read" not in result.stderr


def test_a_folder_above_a_checkpoint_folder_names_it(tmp_path):
    shutil.copytree(os.path.join(DATA, "hf_flax", "bert"), tmp_path / "bert")
    assert run("table", tmp_path / "bert").exit_code == 0
    result = run("table", tmp_path)
    assert result.exit_code == 3 and result.stderr.count("\n") == 1, result.stderr
    assert "found checkpoints under bert/: pass one" in result.stderr
