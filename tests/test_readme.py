"""Every command the README and the documentation site show with its output is run here.

A block in README.md or docs/**/*.md that starts with ``$ paramscope ...`` holds commands (lines
starting with ``$``), each followed by what it prints: its stdout, and its stderr lines
(``paramscope: ...``) after. The commands run on `make demo`'s checkpoint, written once, in a folder
holding ``demo_ckpt``, as piped output (no terminal); pages are read README first, then the site's
pages by name, blocks in order, and a command shown on several pages runs once. A ``pycon`` block
(lines starting with ``>>>``) runs as a doctest in the same folder. After a change of output,
``python tests/test_readme.py --write`` rewrites every page's blocks.
"""

import doctest
import glob
import os
import re
import shlex
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGES = ["README.md"] + sorted(
    os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "docs", "**", "*.md"), recursive=True)
)
BLOCK = re.compile(r"```\n(\$ paramscope .*?)```", re.S)
PYCON = re.compile(r"```pycon\n(>>> .*?)```", re.S)
SIZE_ON_DISK = re.compile(r"\d+(\.\d)? (B|KiB|MiB)$", re.M)  # OCDBT file sizes vary from run to run
WHEN = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ")  # so do the times a step was saved


def read(page: str) -> str:
    with open(os.path.join(ROOT, page)) as f:
        return f.read()


def examples(text: str) -> list[tuple[str, list[tuple[str, str]]]]:
    """A page's example blocks: (block text, [(command line, expected output)])."""
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


def make_demo(folder: str) -> None:
    script = os.path.join(ROOT, "scripts", "make_demo_checkpoint.py")
    command = [sys.executable, script, "demo_ckpt"]
    subprocess.run(command, cwd=folder, check=True, capture_output=True, timeout=600)


class Outputs:
    """Each distinct command run once, in the order pages show them."""

    def __init__(self, folder: str):
        self.folder = folder
        self.printed: dict[str, str] = {}

    def __call__(self, command: str) -> str:
        if command not in self.printed:
            self.printed[command] = run_example(command, self.folder)
        return self.printed[command]


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("readme"))
    make_demo(folder)
    return Outputs(folder)


@pytest.mark.parametrize("page", PAGES)
def test_examples_are_what_the_commands_print(outputs, page):
    for _, pairs in examples(read(page)):
        for command, expected in pairs:
            actual = outputs(command)
            assert normalise(command, actual) == normalise(command, expected), f"{page}: {command}"


def test_the_pages_show_every_command():
    def shown(pages):
        blocks = [pairs for page in pages for _, pairs in examples(read(page))]
        return {command.split()[1] for pairs in blocks for command, _ in pairs}

    every = {"info", "table", "count", "norms", "stats", "mask", "verify", "diff", "snapshot", "check"}
    assert every | {"history", "optim"} <= shown(PAGES)
    assert len(shown(["README.md"])) >= 6


@pytest.mark.parametrize("page", [p for p in PAGES if PYCON.search(read(p))])
def test_python_examples_run(outputs, page):
    parser, runner = doctest.DocTestParser(), doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    cwd = os.getcwd()
    os.chdir(outputs.folder)
    try:
        for i, match in enumerate(PYCON.finditer(read(page))):
            test = parser.get_doctest(match.group(1), {}, f"{page}[{i}]", page, 0)
            runner.run(test)
    finally:
        os.chdir(cwd)
    assert runner.failures == 0, f"{page}: {runner.failures} failing example(s), printed above"


def test_every_schema_is_on_the_json_page():
    folder = os.path.join(ROOT, "paramscope", "output", "schemas")
    page = read(os.path.join("docs", "json.md"))
    for name in sorted(os.listdir(folder)):
        assert f'--8<-- "paramscope/output/schemas/{name}"' in page, name


def write(folder: str) -> None:
    outputs = Outputs(folder)
    for page in PAGES:
        text = original = read(page)
        for block, pairs in examples(text):
            new = "".join(f"$ {command}\n{outputs(command)}" for command, _ in pairs)
            text = text.replace(block, new, 1)
        if text != original:
            with open(os.path.join(ROOT, page), "w") as f:
                f.write(text)


if __name__ == "__main__" and sys.argv[1:] == ["--write"]:
    import tempfile

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    with tempfile.TemporaryDirectory() as folder:
        make_demo(folder)
        write(folder)
