"""diff across naming schemes: A's paths renamed, some arrays compared transposed, scanned layers
against per-layer tensors; the rules on the command line or in a JSON or TOML map file."""

import json
import os
import re

import numpy as np
import orbax.checkpoint as ocp
import pytest
from conftest import f64_norm
from test_cli import run, run_json
from test_gates import _validator

from paramscope import digest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# linen-like names in A, Hugging Face-like names in B, kernels (in, out) against weights (out, in)
RULES = [
    r"^params\.Dense_(\d+)\.kernel$=model.layers.\1.mlp.up_proj.weight",
    r"^params\.Dense_(\d+)\.bias$=model.layers.\1.mlp.up_proj.bias",
]
TRANSPOSE = [r"\.weight$"]
SHAPES = {0: (4, 6), 1: (64, 48), 2: (5, 5)}  # (in, out); 1: several regions under a small budget


def save(path, tree):
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(path, tree)
    checkpointer.wait_until_finished()
    return path


def linen_values():
    rng = np.random.default_rng(5)
    return {
        f"params.Dense_{i}.{name}": rng.standard_normal(shape if name == "kernel" else shape[1:]).astype(
            np.float32
        )
        for i, shape in SHAPES.items()
        for name in ("kernel", "bias")
    }


def hf_name(path):
    i, name = re.fullmatch(r"params\.Dense_(\d+)\.(\w+)", path).groups()
    return f"model.layers.{i}.mlp.up_proj.{'weight' if name == 'kernel' else 'bias'}"


def nested(flat):
    tree = {}
    for path, value in flat.items():
        *parents, leaf = path.split(".")
        node = tree
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return tree


@pytest.fixture(scope="module")
def conversion(tmp_path_factory):
    """A (linen names), B (the same arrays under HF names, kernels transposed), B with one value
    changed; and maps holding RULES and TRANSPOSE as JSON and as TOML."""
    root = tmp_path_factory.mktemp("pairing")
    a = linen_values()
    b = {hf_name(p): (v.T.copy() if p.endswith("kernel") else v) for p, v in a.items()}
    changed = dict(b)
    changed["model.layers.1.mlp.up_proj.weight"] = b["model.layers.1.mlp.up_proj.weight"].copy()
    changed["model.layers.1.mlp.up_proj.weight"][17, 3] += np.float32(0.25)
    paths = {
        "a": save(str(root / "a"), nested(a)),
        "b": save(str(root / "b"), nested(b)),
        "changed": save(str(root / "changed"), nested(changed)),
    }
    rename = [rule.split("=", 1) for rule in RULES]
    paths["json"] = str(root / "map.json")
    with open(paths["json"], "w") as f:
        json.dump({"rename": rename, "transpose": TRANSPOSE}, f)
    paths["toml"] = str(root / "map.toml")
    with open(paths["toml"], "w") as f:
        f.write("rename = [\n" + "".join(f"  ['{r}', '{s}'],\n" for r, s in rename) + "]\n")
        f.write(f"transpose = ['{TRANSPOSE[0]}']\n")
    return paths, a, {"b": b, "changed": changed}


def rule_options(rename=RULES, transpose=TRANSPOSE):
    return [
        *(x for r in rename for x in ("--rename", r)),
        *(x for t in transpose for x in ("--transpose", t)),
    ]


def by_path(doc):
    return {p["path"]: p for p in doc["params"]}


def test_without_rules_nothing_pairs(conversion):
    paths, a, values = conversion
    doc = run_json("diff", paths["a"], paths["b"])
    assert doc["summary"]["removed"] == len(a) and doc["summary"]["added"] == len(values["b"])
    assert doc["pairing"]["a_only"] == sorted(a) and doc["pairing"]["b_only"] == sorted(values["b"])
    assert doc["pairing"]["rename"] == [] and doc["pairing"]["transpose"] == []
    assert run("diff", paths["a"], paths["b"], "--fail-on-change").exit_code == 1


def test_rename_and_transpose_pair_every_array(conversion):
    paths, a, values = conversion
    for budget in ([], ["--memory-budget", "5KiB"]):  # whole arrays; then bands of rows of B
        doc = run_json("diff", paths["a"], paths["b"], *rule_options(), *budget)
        assert doc["summary"] == {"identical": len(a), "close": 0, "changed": 0, "added": 0, "removed": 0}
        assert doc["pairing"]["a_only"] == [] and doc["pairing"]["b_only"] == []
        rows = by_path(doc)
        assert set(rows) == set(values["b"])
        for path_a, value in a.items():
            row = rows[hf_name(path_a)]
            assert row["path_a"] == path_a and row["transposed"] == path_a.endswith("kernel")
            assert row["max_abs_diff"] == 0 and row["diff_norm"] == 0 and row["identical"]
            assert row["a"]["shape"] == list(value.shape)
            assert row["norm_a"] == pytest.approx(f64_norm(value), rel=1e-12)
            # A's digest is of A as stored, not of the transposed copy compared
            assert row["digest_a"] == digest(value)
            assert row["digest_b"] == digest(values["b"][hf_name(path_a)])
        assert not list(_validator("diff").iter_errors(doc))
    assert run("diff", paths["a"], paths["b"], *rule_options(), "--fail-on-change").exit_code == 0


def test_a_square_kernel_needs_the_transpose(conversion):
    paths, a, values = conversion
    doc = run_json("diff", paths["a"], paths["b"], *rule_options(transpose=[]))
    rows = by_path(doc)
    square = rows["model.layers.2.mlp.up_proj.weight"]  # same shape either way: only values tell
    assert square["status"] == "changed" and not square["transposed"]
    kernel, weight = a["params.Dense_2.kernel"], values["b"]["model.layers.2.mlp.up_proj.weight"]
    assert square["max_abs_diff"] == pytest.approx(
        np.abs(kernel.astype(np.float64) - weight).max(), rel=1e-12
    )
    reshaped = rows["model.layers.0.mlp.up_proj.weight"]
    assert reshaped["status"] == "changed" and reshaped["changes"] == ["shape (4, 6) -> (6, 4)"]
    assert "norm_a" not in reshaped


def test_one_changed_value_is_found_with_its_difference(conversion):
    paths, a, values = conversion
    for budget in ([], ["--memory-budget", "5KiB"]):
        doc = run_json("diff", paths["a"], paths["changed"], *rule_options(), *budget)
        changed = [p for p in doc["params"] if p["status"] != "identical"]
        assert [p["path"] for p in changed] == ["model.layers.1.mlp.up_proj.weight"]
        row = changed[0]
        reference = a["params.Dense_1.kernel"].T.astype(np.float64)
        other = values["changed"]["model.layers.1.mlp.up_proj.weight"].astype(np.float64)
        assert row["max_abs_diff"] == pytest.approx(np.abs(reference - other).max(), rel=1e-12)
        assert row["max_abs_diff"] == pytest.approx(0.25, rel=1e-5)
        assert row["diff_norm"] == pytest.approx(f64_norm(reference - other), rel=1e-12)
        assert row["beyond_tolerance"] == 1
    result = run("diff", paths["a"], paths["changed"], *rule_options(), "--fail-on-change")
    assert result.exit_code == 1
    # the table names the pair by B's name and shows A's own path beside it
    table = run("diff", paths["a"], paths["changed"], *rule_options()).stdout
    assert "A path" in table and "params.Dense_1.kernel" in table
    assert "model.layers.1.mlp.up_proj.weight" in table and "compared transposed" in table
    assert "6 paths of A renamed by 2 rules, 3 pairs compared transposed" in table


def test_map_files_give_the_same_report_as_options(conversion):
    paths, _, _ = conversion
    expected = run_json("diff", paths["a"], paths["changed"], *rule_options())
    for name in ("json", "toml"):
        assert run_json("diff", paths["a"], paths["changed"], "--map", paths[name]) == expected, name
    # options after the file's rules: the file renames, the command line transposes
    with_option = run_json(
        "diff", paths["a"], paths["changed"], "--map", paths["json"], "--transpose", "nothing", "-q"
    )
    assert with_option["summary"] == expected["summary"]
    assert with_option["pairing"]["transpose"] == [*TRANSPOSE, "nothing"]


def test_rename_without_transpose_works_by_digest(conversion):
    paths, a, _ = conversion
    doc = run_json("diff", paths["a"], paths["b"], "--digest-only", *rule_options(transpose=[]))
    statuses = {p["path_a"]: p["status"] for p in doc["params"]}
    assert all(statuses[p] == "identical" for p in a if p.endswith("bias"))
    assert all(statuses[p] == "changed" for p in a if p.endswith("kernel"))  # stored (in, out)


@pytest.fixture(scope="module")
def bad_maps(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad_maps")
    files = {
        "not_json.json": "rename = [['a', 'b']]\n",
        "not_toml.toml": "rename = [[\n",
        "list.json": "[]",
        "pairs.json": json.dumps({"rename": [["a", "b", "c"]]}),
        "unknown.json": json.dumps({"renames": [["a", "b"]]}),
        "unstack.toml": "unstack = 'yes'\n",
        "transpose.json": json.dumps({"transpose": "weight$"}),
        "regex.toml": "rename = [['(a', 'b']]\n",
    }
    for name, text in files.items():
        (root / name).write_text(text)
    return root


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--rename", "(bad=x"], "invalid regex '(bad'"),
        (["--rename", "params.Dense"], "has no '='"),
        (["--rename", r"Dense_(\d)=layers.\2"], "invalid replacement"),
        (["--transpose", "[unclosed"], "invalid regex '[unclosed' in --transpose"),
        (["--rename", r"^params\.Dense_\d\.bias$=bias"], "the same name bias"),
        (["--map", "{maps}/missing.json"], "not found"),
        (["--map", "{maps}/not_json.json"], "not valid JSON"),
        (["--map", "{maps}/not_toml.toml"], "not valid TOML"),
        (["--map", "{maps}/list.json"], "not a table"),
        (["--map", "{maps}/pairs.json"], "rename[0]"),
        (["--map", "{maps}/unknown.json"], "unknown key 'renames'"),
        (["--map", "{maps}/unstack.toml"], "unstack must be true or false"),
        (["--map", "{maps}/transpose.json"], "transpose must be a list"),
        (["--map", "{maps}/regex.toml"], "rename[0]"),
        (["--transpose", "weight", "--digest-only"], "--transpose needs the values of both sides"),
    ],
)
def test_bad_rules_are_usage_errors_in_one_line(conversion, bad_maps, options, message):
    paths, _, _ = conversion
    options = [o.format(maps=bad_maps) for o in options]
    result = run("diff", paths["a"], paths["b"], *options)
    assert result.exit_code == 2, result.stderr
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and "hint:" in lines[0], lines
    if message == "the same name bias":  # both of A's paths are named
        assert "params.Dense_0.bias" in lines[0] and "params.Dense_1.bias" in lines[0]


def test_rules_that_do_nothing_are_warned_about(conversion):
    paths, _, _ = conversion
    result = run("diff", paths["a"], paths["b"], *rule_options(), "--rename", "nowhere=x")
    assert result.exit_code == 0
    assert "rename rule 'nowhere' changes no path" in result.stderr


# ----------------------------------------------------------------------------------------------
# Scanned layers against per-layer tensors


LAYERS, IN, OUT = 3, 8, 12


def readme_map() -> str:
    """The map file the manual shows for a scanned linen model against per-layer HF tensors."""
    with open(os.path.join(ROOT, "docs", "commands", "diff.md")) as f:
        text = f.read()
    return re.search(r"```toml\n# linen_to_hf\.toml\n(.*?)```", text, re.S).group(1)


@pytest.fixture(scope="module")
def scanned(tmp_path_factory):
    root = tmp_path_factory.mktemp("scanned")
    rng = np.random.default_rng(9)
    kernel = rng.standard_normal((LAYERS, IN, OUT)).astype(np.float32)
    bias = rng.standard_normal((LAYERS, OUT)).astype(np.float32)
    embedding = rng.standard_normal((16, IN)).astype(np.float32)
    a = {"params": {"layers": {"mlp": {"kernel": kernel, "bias": bias}}, "embed": {"embedding": embedding}}}
    b = {
        "model": {
            "layers": {
                str(i): {"mlp": {"up_proj": {"weight": kernel[i].T.copy(), "bias": bias[i]}}}
                for i in range(LAYERS)
            },
            "embed_tokens": {"weight": embedding},
        }
    }
    toml = root / "linen_to_hf.toml"
    toml.write_text(readme_map())
    return save(str(root / "a"), a), save(str(root / "b"), b), str(toml), kernel


def test_scanned_layers_pair_with_per_layer_tensors(scanned):
    a, b, toml, kernel = scanned
    options = [
        "--unstack",
        "--rename",
        r"^params\.layers\.(\d+)\.mlp\.kernel$=model.layers.\1.mlp.up_proj.weight",
        "--rename",
        r"^params\.layers\.(\d+)\.mlp\.bias$=model.layers.\1.mlp.up_proj.bias",
        "--rename",
        r"^params\.embed\.embedding$=model.embed_tokens.weight",
        "--transpose",
        r"_proj\.weight$",
    ]
    doc = run_json("diff", a, b, *options)
    assert doc["summary"] == {"identical": 2 * LAYERS + 1, "close": 0, "changed": 0, "added": 0, "removed": 0}
    # each layer read in bands of B's rows, from the stacked array's columns (float64 sums of
    # other blocks: norms agree to the last bits)
    banded = by_path(run_json("diff", a, b, *options, "--memory-budget", "1KiB"))
    for path, row in by_path(doc).items():
        exact = ("status", "path_a", "max_abs_diff", "diff_norm", "digest_a", "digest_b")
        assert {k: banded[path][k] for k in exact} == {k: row[k] for k in exact}
        assert banded[path]["norm_a"] == pytest.approx(row["norm_a"], rel=1e-14)
    rows = by_path(doc)
    for i in range(LAYERS):
        row = rows[f"model.layers.{i}.mlp.up_proj.weight"]
        assert row["path_a"] == f"params.layers.{i}.mlp.kernel" and row["transposed"]
        assert row["a"]["shape"] == [IN, OUT] and row["b"]["shape"] == [OUT, IN]
        assert row["norm_a"] == pytest.approx(f64_norm(kernel[i]), rel=1e-12) and row["max_abs_diff"] == 0
    assert not rows["model.embed_tokens.weight"]["transposed"]
    # the manual's map file (unstack = true in it) says the same
    assert run_json("diff", a, b, "--map", toml) == doc
    # and without --unstack the stack pairs with nothing
    stacked = run_json("diff", a, b, *options[1:], "-q")
    assert "params.layers.mlp.kernel" in stacked["pairing"]["a_only"]
