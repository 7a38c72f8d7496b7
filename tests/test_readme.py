"""Every command the README shows with its output is run here on `make demo`'s checkpoint.

A README block that starts with ``$ paramscope ...`` holds commands (lines starting with ``$``),
each followed by what it prints: its stdout, and its stderr lines (``paramscope: ...``) after. The
commands run in order in a folder holding ``demo_ckpt``, as piped output (no terminal). After a
change of output, ``python tests/test_readme.py --write`` rewrites the README's blocks.
"""

import glob
import os
import re
import shlex
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")
# pages of the documentation whose examples are run the same way
PAGES = [README, *sorted(glob.glob(os.path.join(ROOT, "docs", "commands", "*.md")))]
BLOCK = re.compile(r"```\n(\$ paramscope .*?)```", re.S)
SIZE_ON_DISK = re.compile(r"\d+(\.\d)? (B|KiB|MiB)$", re.M)  # OCDBT file sizes vary from run to run
WHEN = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ")  # so do the times a step was saved


def examples(text: str) -> list[tuple[str, list[tuple[str, str]]]]:
    """The README's example blocks: (block text, [(command line, expected output)])."""
    found = []
    for match in BLOCK.finditer(text):
        pairs = []
        for part in re.split(r"^(?=\$ )", match.group(1), flags=re.M):
            if part:
                command, _, output = part.partition("\n")
                pairs.append((command[2:], output))
        found.append((match.group(1), pairs))
    return found


def run_example(command: str, folder: str) -> str:
    """What the command prints: stdout, then its stderr lines, with the folder's path normalised."""
    from test_cli import run

    args = shlex.split(command)
    assert args[0] == "paramscope", command
    cwd = os.getcwd()
    os.chdir(folder)
    try:
        result = run(*args[1:])
    finally:
        os.chdir(cwd)
    return (result.stdout + result.stderr).replace(folder + os.sep, "/path/to/")


def normalise(command: str, output: str) -> str:
    if not command.startswith("paramscope info"):
        return output
    return WHEN.sub("TIME", SIZE_ON_DISK.sub("SIZE", output))


@pytest.fixture(scope="module")
def demo_folder(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("readme"))
    subprocess.run(
        [sys.executable, os.path.join(ROOT, "scripts", "make_demo_checkpoint.py"), "demo_ckpt"],
        cwd=folder,
        check=True,
        capture_output=True,
        timeout=600,
    )
    return folder


def test_readme_examples_are_what_the_commands_print(demo_folder):
    with open(README) as f:
        blocks = examples(f.read())
    assert len(blocks) >= 10
    commands = set()
    for _, pairs in blocks:
        for command, expected in pairs:
            commands.add(command.split()[1])
            actual = run_example(command, demo_folder)
            assert normalise(command, actual) == normalise(command, expected), command
    assert {
        "info",
        "table",
        "count",
        "norms",
        "stats",
        "mask",
        "verify",
        "diff",
        "snapshot",
        "check",
    } <= commands


@pytest.mark.parametrize("page", PAGES[1:], ids=os.path.basename)
def test_doc_page_examples_are_what_the_commands_print(demo_folder, page):
    with open(page) as f:
        blocks = examples(f.read())
    assert blocks, page
    for _, pairs in blocks:
        for command, expected in pairs:
            actual = run_example(command, demo_folder)
            assert normalise(command, actual) == normalise(command, expected), command


def write(folder: str) -> None:
    for page in PAGES:
        with open(page) as f:
            text = f.read()
        for block, pairs in examples(text):
            new = "".join(f"$ {command}\n{run_example(command, folder)}" for command, _ in pairs)
            text = text.replace(block, new, 1)
        with open(page, "w") as f:
            f.write(text)


if __name__ == "__main__" and sys.argv[1:] == ["--write"]:
    import tempfile

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    with tempfile.TemporaryDirectory() as folder:
        script = os.path.join(ROOT, "scripts", "make_demo_checkpoint.py")
        subprocess.run([sys.executable, script, "demo_ckpt"], cwd=folder, check=True, capture_output=True)
        write(folder)
