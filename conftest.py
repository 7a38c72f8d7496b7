"""The doctests of the Python API run against the demo checkpoint (``make demo``'s), written once."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(scope="session")
def _demo_checkpoint(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("doctest") / "demo_ckpt")
    script = os.path.join(ROOT, "scripts", "make_demo_checkpoint.py")
    subprocess.run([sys.executable, script, path], check=True, capture_output=True)
    return path


@pytest.fixture(autouse=True)
def _api_doctest_namespace(request, doctest_namespace):
    if isinstance(request.node, pytest.DoctestItem) and request.node.name.startswith("paramscope.api"):
        doctest_namespace["demo_ckpt"] = request.getfixturevalue("_demo_checkpoint")
