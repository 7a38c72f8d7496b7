"""The layers import downwards only: the command line is a view of the API, the readers know
neither. Read from the source (every import, at the top of a module or inside a function)."""

import ast
import os
import sys

import pytest

PACKAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "paramscope")

# what the command line may import of paramscope: the API, the one output layer, the errors
CLI_ALLOWED = ("paramscope.api", "paramscope.output", "paramscope.errors", "paramscope.cli")
CLI_LIBRARIES = ("typer", "rich", "click")
CLI_FROM_PACKAGE = {"__version__", "errors"}  # `from paramscope import ...`


def _modules(folder: str) -> list[str]:
    root = os.path.join(PACKAGE, folder)
    return sorted(os.path.join(root, name) for name in os.listdir(root) if name.endswith(".py"))


def _imports(path: str) -> list[tuple[int, str, list[str]]]:
    """(line, module, names imported from it) for every import statement of a file."""
    with open(path) as f:
        tree = ast.parse(f.read(), path)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative imports stay inside the package they are in
                continue
            found.append((node.lineno, node.module or "", [alias.name for alias in node.names]))
    return found


def _within(module: str, prefixes) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


@pytest.mark.parametrize("path", _modules("cli"), ids=os.path.basename)
def test_the_command_line_imports_the_api_and_the_output_only(path):
    wrong = []
    for line, module, names in _imports(path):
        top = module.split(".")[0]
        if top != "paramscope":
            if top not in sys.stdlib_module_names and top not in CLI_LIBRARIES:
                wrong.append(f"{line}: {module}")
        elif module == "paramscope":
            wrong += [f"{line}: paramscope.{n}" for n in names if n not in CLI_FROM_PACKAGE]
        elif not _within(module, CLI_ALLOWED):
            wrong.append(f"{line}: {module}")
    assert not wrong, f"{os.path.basename(path)} imports below the API: {wrong}"


@pytest.mark.parametrize("path", _modules("io"), ids=os.path.basename)
def test_the_readers_import_neither_the_command_line_nor_the_api(path):
    wrong = [
        f"{line}: {module}"
        for line, module, names in _imports(path)
        if _within(module, ("paramscope.cli", "paramscope.api"))
        or (module == "paramscope" and {"api", "cli"} & set(names))
    ]
    assert not wrong, f"{os.path.basename(path)} imports a layer above it: {wrong}"
