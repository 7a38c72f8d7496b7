"""Checkpoints in buckets: every command on s3:// (moto's server) and gs:// (fake-gcs-server)
copies of the session's fixtures gives what it gives on the local folder, reads only, in a
bounded number of requests, and turns store faults into one line and exit 3."""

import json
import os
import re
import subprocess
import sys

import pytest
from conftest import LEGACY_DIR
from remote_stores import BUCKET, FlakyProxy, environ, fake_gcs, free_port, moto_s3
from test_cli import run, run_json

from paramscope.io import storage

EASYDEL = os.path.join(os.path.dirname(__file__), "data", "easydel", "float32")

SCHEMES = ["s3", "gs"]
WRITES = ("PUT ", "POST ", "DELETE ", "PATCH ")


@pytest.fixture(scope="session")
def stores(tmp_path_factory):
    logs = str(tmp_path_factory.mktemp("stores"))
    with moto_s3(logs) as s3, fake_gcs(logs) as gcs, environ({**s3.env, **gcs.env}):
        yield {"s3": s3, "gs": gcs}


@pytest.fixture(scope="session")
def uploaded(stores):
    """Uploads a local folder once per store; returns its URL there."""
    done = {}

    def upload(scheme: str, folder: str) -> str:
        key = (scheme, folder)
        if key not in done:
            prefix = f"{len(done):02d}/{os.path.basename(folder.rstrip('/'))}"
            done[key] = stores[scheme].upload(folder, prefix)
        return done[key]

    return upload


def same(doc):
    """A report without what names where the checkpoint lives (its path, and the on-disk size a
    bucket listing does not carry)."""
    doc = {k: v for k, v in doc.items() if k not in ("checkpoint", "a", "b", "baseline")}
    if "items" in doc and doc["items"] and isinstance(doc["items"][0], dict):
        doc["items"] = [{k: v for k, v in i.items() if k != "bytes_on_disk"} for i in doc["items"]]
    return doc


def writes_since(server, start: int) -> list[str]:
    return [line for line in server.requests()[start:] if any(m in line for m in WRITES)]


@pytest.mark.parametrize("scheme", SCHEMES)
def test_every_command_on_a_manager_root(stores, uploaded, manager_ckpt, scheme, tmp_path):
    server = stores[scheme]
    url = uploaded(scheme, manager_ckpt.path)
    before, start = server.objects(), len(server.requests())
    for command in ("info", "table", "count", "norms", "stats", "mask", "verify"):
        local, remote = run_json(command, manager_ckpt.path), run_json(command, url)
        assert remote["checkpoint"] == url
        assert same(remote) == same(local), command
    step = run_json("table", url + "/checkpoint_100/params")
    assert same(step) == same(run_json("table", os.path.join(manager_ckpt.path, "checkpoint_100", "params")))
    assert [s["finished"] for s in run_json("info", url)["steps"]] == [True, True, False]
    info = run_json("info", url)
    assert all(i["bytes_on_disk"] is None for i in info["items"])

    diff = run_json("diff", manager_ckpt.path, url)
    assert diff["params"] and all(row["status"] == "identical" for row in diff["params"])
    assert diff["a"]["checkpoint"] == manager_ckpt.path and diff["b"]["checkpoint"] == url
    assert same(run_json("diff", url, url)) == same(diff)
    baseline = tmp_path / "baseline.json"
    assert run("snapshot", url, "-o", baseline, "-q").exit_code == 0
    checked = [run_json("check", c, "--baseline", baseline) for c in (manager_ckpt.path, url)]
    assert checked[0]["passed"] and same(checked[0]) == same(checked[1])

    assert writes_since(server, start) == []
    assert server.objects() == before


@pytest.mark.parametrize("scheme", SCHEMES)
def test_layouts_and_formats(stores, uploaded, nnx_ckpt, storage_ckpt, special_ckpt, scheme):
    server = stores[scheme]
    legacy = os.path.join(LEGACY_DIR, "checkpoints")
    folders = (nnx_ckpt.path, storage_ckpt.path, special_ckpt.path, legacy, EASYDEL)
    urls = [uploaded(scheme, folder) for folder in folders]
    start = len(server.requests())
    for folder, url in zip(folders, urls):
        for command in ("table", "norms"):
            assert same(run_json(command, url)) == same(run_json(command, folder)), (folder, command)
    assert same(run_json("info", urls[-1])) == same(run_json("info", EASYDEL))
    assert writes_since(server, start) == []


SAFETENSORS = os.path.join(os.path.dirname(__file__), "data", "safetensors")


@pytest.mark.parametrize("scheme", SCHEMES)
def test_safetensors_files_and_sharded_sets(stores, uploaded, scheme):
    """A safetensors file, a sharded folder and its index file read from a bucket as from disk."""
    server = stores[scheme]
    single = uploaded(scheme, os.path.join(SAFETENSORS, "single"))
    sharded = uploaded(scheme, os.path.join(SAFETENSORS, "sharded"))
    before, start = server.objects(), len(server.requests())
    index = "model.safetensors.index.json"
    cases = [
        (single + "/model.safetensors", os.path.join(SAFETENSORS, "single", "model.safetensors")),
        (sharded, os.path.join(SAFETENSORS, "sharded")),
        (f"{sharded}/{index}", os.path.join(SAFETENSORS, "sharded", index)),
    ]
    for url, local in cases:
        for command in (("table",), ("norms", "--per-param", "--digest")):
            remote = run_json(command[0], url, *command[1:])
            assert remote["checkpoint"] == url
            assert same(remote) == same(run_json(command[0], local, *command[1:])), (url, command)
        info, local_info = run_json("info", url), run_json("info", local)
        assert info["items"][0]["bytes_on_disk"] is None
        assert same(info) == same(local_info) and info["items"][0]["metadata"]
    assert run_json("verify", sharded, "--memory-budget", "1KiB")["ok"]
    assert writes_since(server, start) == []
    assert server.objects() == before

    # the metadata of one file: a listing (nothing: it is a file), a request for none of its bytes,
    # its header's length, its header, and one byte at each side of the last tensor's end
    start = len(server.requests())
    assert run_json("count", single + "/model.safetensors")["total"]["count"] == 3122
    requests = server.requests()[start:]
    assert len(requests) <= 6, "\n".join(requests)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_safetensors_file_ends_checked_in_buckets(stores, scheme, tmp_path):
    """Without a size from the store, one byte at each side of the last tensor's end tells a
    truncated file and bytes after the data (which verify reports)."""
    content = open(os.path.join(SAFETENSORS, "single", "model.safetensors"), "rb").read()
    (tmp_path / "truncated").mkdir()
    (tmp_path / "truncated" / "model.safetensors").write_bytes(content[:-1])
    (tmp_path / "trailing").mkdir()
    (tmp_path / "trailing" / "model.safetensors").write_bytes(content + b"extra")
    server = stores[scheme]
    truncated = server.upload(str(tmp_path / "truncated"), f"ends-{scheme}/truncated") + "/model.safetensors"
    trailing = server.upload(str(tmp_path / "trailing"), f"ends-{scheme}/trailing") + "/model.safetensors"
    result = run("table", truncated)
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 3 and len(lines) == 1 and "past the end of the file" in lines[0], lines
    assert run_json("table", trailing)["params"]
    result = run("verify", trailing, "--format", "json")
    assert result.exit_code == 3
    (problem,) = json.loads(result.stdout)["problems"]
    assert "bytes follow the last tensor's data" in problem["problem"]


MSGPACK_DIRS = [
    os.path.join(os.path.dirname(LEGACY_DIR), name, "checkpoints")
    for name in ("flax_msgpack", "orbax_0_4_aggregate", "flax_msgpack_gda")
]


@pytest.mark.parametrize("scheme", SCHEMES)
def test_msgpack_checkpoints(stores, uploaded, scheme):
    """flax msgpack roots and files (with a multi-host _gda folder) and an Orbax 0.4 root."""
    server = stores[scheme]
    urls = [uploaded(scheme, folder) for folder in MSGPACK_DIRS]
    start, before = len(server.requests()), server.objects()
    for folder, url in zip(MSGPACK_DIRS, urls):
        for args in (["table"], ["norms", "--per-param"], ["info"], ["table", "--step", "1"]):
            assert same(run_json(args[0], url, *args[1:])) == same(run_json(args[0], folder, *args[1:])), (
                folder,
                args,
            )
        verified = run("verify", url, "--format", "json")
        problems = [p["problem"] for p in json.loads(verified.stdout)["problems"]]
        if scheme == "gs" and folder.endswith("gda/checkpoints"):
            # copied from a local save: flax writes this marker only when it saves to GCS, and
            # restores from GCS only with it
            assert verified.exit_code == 3
            assert problems == [
                "checkpoint_2_gda/commit_success.txt is missing: flax refuses to restore it from GCS"
            ]
        else:
            assert verified.exit_code == 0 and problems == []
    for folder, url in zip(MSGPACK_DIRS[::2], urls[::2]):  # a flax file given alone
        local = run_json("norms", os.path.join(folder, "checkpoint_1"), "--per-param")
        assert same(run_json("norms", url + "/checkpoint_1", "--per-param")) == same(local)
    assert writes_since(server, start) == []
    assert server.objects() == before


DATA = os.path.join(os.path.dirname(__file__), "data")
# (folder uploaded, what is read inside it, options): the checkpoint families written by their
# frameworks' own save code (tests/data), each read in a bucket as on disk
FAMILIES = {
    "npz": ("big_vision", "checkpoint.npz", ()),
    "npz compressed": ("big_vision", "checkpoint_compressed.npz", ()),
    "eqx": ("equinox", "with_hyperparameters.eqx", ()),
    "hf folder": ("hf_flax/bert", "", ()),
    "hf sharded folder": ("hf_flax/gpt2_sharded", "", ()),
    "hf index file": ("hf_flax/gpt2_sharded", "flax_model.msgpack.index.json", ()),
    "hf shard": ("hf_flax/gpt2_sharded", "flax_model-00002-of-00007.msgpack", ()),
    "levanter run": ("levanter/run", "", ()),
    "levanter step 2": ("levanter/run", "", ("--step", "2")),
    "levanter step folder": ("levanter/run", "step-2", ()),
    "penzai": ("penzai/params", "", ()),
    "qwix": ("qwix/state", "", ()),
    "paxml": ("paxml/v1_2/checkpoints", "", ()),
    "paxml step 100": ("paxml/v1_2/checkpoints", "", ("--step", "100")),
    "paxml 1.1": ("paxml/v1_1/checkpoints", "", ()),
    "manager with JSON and grain items": ("manager_items/run", "", ()),
}


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("scheme", SCHEMES)
def test_checkpoint_families_read_in_buckets_as_on_disk(stores, uploaded, scheme, family, tmp_path):
    server = stores[scheme]
    folder, inside, options = FAMILIES[family]
    local_folder = os.path.join(DATA, folder)
    local = os.path.join(local_folder, inside) if inside else local_folder
    base = uploaded(scheme, local_folder)
    url = base + (f"/{inside}" if inside else "")
    before, start = server.objects(), len(server.requests())
    for command in (("info",), ("table",), ("count",), ("norms", "--per-param"), ("stats",), ("verify",)):
        remote = run(command[0], url, *command[1:], *options, "--format", "json")
        at_home = run(command[0], local, *command[1:], *options, "--format", "json")
        assert remote.exit_code == at_home.exit_code == 0, (command, remote.stderr)
        assert same(json.loads(remote.stdout)) == same(json.loads(at_home.stdout)), command
        assert remote.stderr.replace(base, local_folder) == at_home.stderr, command
    baseline = str(tmp_path / "baseline.json")
    assert run("snapshot", local, *options, "-o", baseline, "-q").exit_code == 0
    assert run_json("check", url, *options, "--baseline", baseline)["passed"]
    pick = [o.replace("--step", "--step-a") for o in options] + [
        o.replace("--step", "--step-b") for o in options
    ]
    diff = run_json("diff", local, url, *pick)
    assert diff["params"] and {row["status"] for row in diff["params"]} == {"identical"}
    assert writes_since(server, start) == []
    assert server.objects() == before


def test_levanter_and_paxml_history_in_buckets(stores, uploaded):
    for folder in ("levanter/run", "paxml/v1_2/checkpoints"):
        local = os.path.join(DATA, folder)
        url = uploaded("s3", local)
        remote, at_home = (run_json("history", where, "--no-cache") for where in (url, local))
        assert same(remote) == same(at_home) and len(at_home["steps"]) == 2, folder


def test_file_urls_read_like_paths(manager_ckpt):
    local = run_json("table", manager_ckpt.path)
    assert run_json("table", "file://" + manager_ckpt.path) == local


def test_layout_questions_answered_from_one_listing(tmp_path):
    for rel in ("a/b/c.txt", "a/d.txt", "ab/x", "e.txt", "f/g/h/i", "f/j"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(rel)
    (tmp_path / "empty").mkdir()  # holds no file: no key of the listing, as in a bucket
    tree = storage.Tree(tmp_path)
    assert tree.subdirs() == ["a", "ab", "f"] and tree.subdirs("a/") == ["b"]
    assert tree.subdirs("f") == ["g"] and tree.subdirs("f/g") == ["h"] and tree.subdirs("a/b") == []
    assert tree.subdirs("e.txt") == [] and tree.subdirs("nothing") == []
    assert all(tree.is_dir(d) for d in ("", "a", "a/b", "ab", "f/g/h"))
    assert not any(tree.is_dir(d) for d in ("a/d.txt", "e.txt", "f/g/h/i", "empty", "a/b/c", "x"))
    assert tree.is_file("a/d.txt") and not tree.is_file("a")


def test_library_opens_urls(stores, uploaded, manager_ckpt):
    from paramscope import open_checkpoint

    url = uploaded("s3", manager_ckpt.path)
    remote, local = open_checkpoint(url, step=100), open_checkpoint(manager_ckpt.path, step=100)
    assert [(p.path, p.shape, p.dtype) for p in remote.params] == [
        (p.path, p.shape, p.dtype) for p in local.params
    ]
    assert remote.checkpoint == url


def test_metadata_requests_do_not_grow_with_arrays(stores, tmp_path_factory):
    """count and norms on a 3,000-array OCDBT checkpoint: one listing, the JSON files, the OCDBT
    manifest and b-tree nodes, not one request per array."""
    import numpy as np
    import orbax.checkpoint as ocp

    path = str(tmp_path_factory.mktemp("many") / "ckpt")
    tree = {
        f"layer_{i:04d}": {f"w{j}": np.full((4, 2), i + j, np.float32) for j in range(10)} for i in range(300)
    }
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(path, tree)
    checkpointer.wait_until_finished()
    for scheme in SCHEMES:
        server = stores[scheme]
        url = server.upload(path, "many/ckpt")
        start = len(server.requests())
        doc = run_json("count", url)
        assert doc["total"]["count"] == 3000 * 8
        requests = server.requests()[start:]
        assert 0 < len(requests) <= 30, (scheme, len(requests), requests[:40])
        # the data too: every chunk is inline in the b-tree, read once for all 3,000 arrays
        start = len(server.requests())
        assert same(run_json("norms", url, "--per-param")) == same(run_json("norms", path, "--per-param"))
        requests = server.requests()[start:]
        assert 0 < len(requests) <= 30, (scheme, len(requests), requests[:40])


def _cli(args, env, timeout=120):
    """One CLI process with its own environment (credentials are resolved once per process)."""
    return subprocess.run(
        [sys.executable, "-m", "paramscope", *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,  # a hang guard: the retries must end on their own long before this
    )


def _clean_env(tmp_path, **extra):
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "STORAGE_EMULATOR", "TENSORSTORE_"))
    }
    env.pop("GOOGLE_AUTH_TOKEN_FOR_TESTING", None)
    # no profile files, no instance-metadata lookups: the credential chain finds nothing at once
    env.update(HOME=str(tmp_path), AWS_EC2_METADATA_DISABLED="true", **extra)
    return env


def _one_line(result, code, *words):
    lines = result.stderr.strip().splitlines()
    assert result.returncode == code, result.stderr
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert "hint:" in lines[0]
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


@pytest.mark.parametrize("scheme", SCHEMES)
def test_stderr_holds_paramscope_lines_alone(stores, uploaded, manager_ckpt, scheme, tmp_path):
    # TensorStore logs through absl straight to descriptor 2: "I... Using GOOGLE_AUTH_TOKEN_FOR_
    # TESTING" against the GCS emulator, "E... Could not find the credentials file" without one
    url = uploaded(scheme, manager_ckpt.path)
    env = _clean_env(tmp_path, **stores[scheme].env)
    for args in (["table", url], ["norms", url, "--per-param"], ["diff", url, "--format", "json"]):
        result = _cli(args, env)
        assert result.returncode == 0 and result.stdout, (args, result.stderr)
        for line in result.stderr.splitlines():
            assert line.startswith("paramscope: "), (args, line)
    with_logs = _cli(["count", url], {**env, "PARAMSCOPE_DEBUG": "1"})
    assert with_logs.returncode == 0
    if scheme == "gs":  # with PARAMSCOPE_DEBUG set, nothing is held back
        assert "GOOGLE_AUTH_TOKEN_FOR_TESTING" in with_logs.stderr
    no_credentials = _clean_env(tmp_path, PARAMSCOPE_REQUEST_RETRIES="0", PARAMSCOPE_REQUEST_TIMEOUT="2")
    result = _cli(["count", "gs://no-such-bucket-paramscope/ckpt"], no_credentials)
    (line,) = result.stderr.splitlines()
    assert result.returncode == 3 and line.startswith("paramscope: error: "), result.stderr


def test_faults_are_one_line_and_exit_3(stores, uploaded, manager_ckpt, tmp_path):
    s3, gcs = stores["s3"], stores["gs"]
    url = uploaded("s3", manager_ckpt.path)
    s3_env = _clean_env(tmp_path, **s3.env)

    _one_line(_cli(["count", f"s3://no-such-bucket-{free_port()}/ckpt"], s3_env), 3, "does not exist")
    _one_line(_cli(["count", url + "-missing"], s3_env), 3, "does not exist")
    gcs_env = _clean_env(tmp_path, **gcs.env)
    _one_line(_cli(["count", "gs://no-such-bucket/ckpt"], gcs_env), 3, "does not exist")

    # moto refuses unsigned requests: the hint names the mechanism that found no credentials
    anonymous = _clean_env(tmp_path, AWS_ENDPOINT_URL_S3=s3.endpoint, AWS_REGION="us-east-1")
    _one_line(_cli(["count", url], anonymous), 3, "access denied", "no AWS credentials")

    dead = _clean_env(tmp_path, **{**s3.env, "AWS_ENDPOINT_URL_S3": f"http://127.0.0.1:{free_port()}"})
    _one_line(_cli(["count", url], dead), 3, "cannot reach")

    _one_line(_cli(["count", "ftp://host/ckpt"], s3_env), 2, "unsupported URL scheme")
    assert s3.objects()  # the bucket is still there, untouched by any of it


def test_transient_503s_are_retried(stores, uploaded, manager_ckpt):
    s3 = stores["s3"]
    url = uploaded("s3", manager_ckpt.path)
    expected = same(run_json("norms", manager_ckpt.path, "--per-param"))
    with FlakyProxy(s3.endpoint, every=3) as proxy, environ({"AWS_ENDPOINT_URL_S3": proxy.endpoint}):
        doc = run_json("norms", url, "--per-param")
    assert proxy.failed > 0
    assert same(doc) == expected


def test_store_settings_come_from_the_environment(monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://minio.local:9000")
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-1")
    monkeypatch.delenv("AWS_REGION", raising=False)
    spec = storage.Tree("s3://bucket/run/ckpt/").spec("checkpoint_5/params")
    assert spec == {
        "driver": "s3",
        "bucket": "bucket",
        "path": "run/ckpt/checkpoint_5/params/",
        "endpoint": "http://minio.local:9000",
        "aws_region": "eu-west-1",
    }
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://r2.local")
    assert storage.Tree("s3://b/x").spec()["endpoint"] == "http://r2.local"
    assert storage.Tree("gs://b").spec("x") == {"driver": "gcs", "bucket": "b", "path": "x/"}
    assert storage.Tree("file:///tmp/ckpt").spec() == {"driver": "file", "path": "/tmp/ckpt/"}
    assert not storage.inside("/tmp/out.json", f"s3://{BUCKET}/tmp")


METADATA_FILES = ("_METADATA", "_sharding", "_CHECKPOINT_METADATA", "manifest.ocdbt", "commit_success.txt")


def metadata_requests(lines: list[str]) -> list[str]:
    """Listings and whole reads of metadata files. Not the conditional re-reads (304) of
    manifest.ocdbt that opening each array makes: those follow the arrays a process reads."""
    found = []
    for line in lines:
        line = re.sub(r"\x1b\[[0-9;]*m", "", line)  # moto colours its log
        match = re.search(r'"GET (\S+) HTTP/1\.1" (\d+)', line)
        if match is None:
            continue
        target, status = match.groups()
        key = target.split("?", 1)[0].rstrip("/").rsplit("/", 1)[-1]
        if "list-type=" in target or (key in METADATA_FILES and status == "200"):
            found.append(target)
    return found


def test_two_processes_share_one_read_of_the_metadata(stores, tmp_path):
    """2-process norms on s3://: the 1-process numbers, half the array bytes each, and the
    checkpoint's metadata read by process 0 alone (not once per process)."""
    import jax
    import numpy as np
    import orbax.checkpoint as ocp
    from conftest import make_mesh
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P
    from test_distributed import assert_same_numbers, launch

    mesh, rng = make_mesh(), np.random.default_rng(3)
    tree = {
        f"layer_{i}": {
            "w": rng.standard_normal((64 * (i + 1), 96)).astype(np.float32),
            "b": rng.standard_normal(96).astype(np.float32),
        }
        for i in range(8)
    }
    tree["embed"] = rng.standard_normal((1024, 128)).astype(np.float32)
    specs = {"w": P("data", "model"), "b": P("model"), "embed": P("model", None)}
    placed = jax.tree_util.tree_map_with_path(
        lambda path, x: jax.device_put(x, NamedSharding(mesh, specs[path[-1].key])), tree
    )
    manager = ocp.CheckpointManager(str(tmp_path / "run"))
    manager.save(5, args=ocp.args.Composite(params=ocp.args.StandardSave(placed)))
    manager.wait_until_finished()
    manager.close()
    s3 = stores["s3"]
    url = s3.upload(str(tmp_path / "run"), "distributed/run")

    args = ["norms", url, "--per-param", "--memory-budget", "256KiB", "--format", "json"]
    env = _clean_env(tmp_path, **s3.env)
    start = len(s3.requests())
    single = _cli(args, env)
    assert single.returncode == 0, single.stderr
    once = metadata_requests(s3.requests()[start:])
    start = len(s3.requests())
    results = launch(args, base=env)
    assert [code for code, _, _ in results] == [0, 0], [err for _, _, err in results]
    shared = metadata_requests(s3.requests()[start:])

    multi = json.loads(results[0][1])
    assert results[1][1] == ""
    assert_same_numbers(json.loads(single.stdout), multi)
    total = sum(p["count"] * 4 for p in multi["params"])
    assert multi["bytes_read"] == sum(multi["bytes_read_by_process"]) == total
    by_process = multi["bytes_read_by_process"]
    assert all(0.4 * total <= b <= 0.6 * total for b in by_process), by_process
    # the listing, _CHECKPOINT_METADATA, _METADATA, _sharding: once, as for one process; the
    # manifest once more, where process 1 opens the database to read its arrays
    assert any("list-type=" in r for r in once) and any(r.endswith("/_sharding") for r in once)
    for name in ("list-type=", "/_CHECKPOINT_METADATA", "/_METADATA", "/_sharding"):
        assert sum(name in r for r in shared) == sum(name in r for r in once), (name, once, shared)
    assert len(shared) <= len(once) + 2, (once, shared)


def test_errors_are_told_by_their_status_not_by_digits_in_a_path(stores, uploaded, manager_ckpt, tmp_path):
    """A store's failure is read from the status it carries (absl code, HTTP status): a path or a
    message that happens to hold 401 or 403 is no denial."""
    (tmp_path / "run_401").mkdir()
    (tmp_path / "run_401" / "notes").write_text("a file, not a folder")
    result = run("table", tmp_path / "run_401" / "notes" / "ckpt")
    assert result.exit_code == 3 and "permission denied" not in result.stderr, result.stderr

    s3 = stores["s3"]
    url = s3.upload(manager_ckpt.path, "runs/checkpoint_14030")
    failing = (
        b"<Error><Code>InternalError</Code><Message>We encountered an internal error.</Message>"
        b"<Key>runs/checkpoint_14030/_CHECKPOINT_METADATA</Key></Error>"
    )
    with (
        FlakyProxy(s3.endpoint, every=1, status=500, payload=failing) as proxy,
        environ({"AWS_ENDPOINT_URL_S3": proxy.endpoint, storage.RETRIES_ENV: "1"}),
    ):
        result = run("count", url)
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 3 and len(lines) == 1, result.stderr
    assert "access denied" not in lines[0] and "HTTP 500" in lines[0], lines[0]

    denied = b"<Error><Code>AccessDenied</Code><Message>Access Denied</Message></Error>"
    with (
        FlakyProxy(s3.endpoint, every=1, status=403, payload=denied) as proxy,
        environ({"AWS_ENDPOINT_URL_S3": proxy.endpoint}),
    ):
        result = run("count", url)
    assert result.exit_code == 3 and "access denied to" in result.stderr, result.stderr


def test_a_denied_read_is_not_taken_for_a_missing_file(stores, tmp_path):
    """Looking at how files begin: a missing file or one shorter than the range reads as what it
    holds; a denied read is an error, not an empty file."""
    folder = tmp_path / "weights"
    folder.mkdir()
    (folder / "weights.h5").write_bytes(b"\x89HDF\r\n\x1a\n" + bytes(200))
    (folder / "short").write_bytes(b"12345")
    local = storage.Tree(folder)
    assert local.read_range_or_none("short", 0, 128) == b"12345"
    assert local.read_range_or_none("short", 10, 128) == b""
    assert local.read_range_or_none("absent", 0, 128) == b""
    s3 = stores["s3"]
    url = s3.upload(str(folder), "denied/weights")
    remote = storage.Tree(url)
    assert remote.read_range_or_none("short", 0, 128) == b"12345"
    assert remote.read_range_or_none("absent", 0, 128) == b""
    assert run("table", url).stderr.count("HDF5") == 1

    denied = b"<Error><Code>AccessDenied</Code><Message>Access Denied</Message></Error>"
    reads = lambda command, path: "list-type=" not in path  # noqa: E731 - the listing is allowed
    with (
        FlakyProxy(s3.endpoint, every=1, status=403, payload=denied, when=reads) as proxy,
        environ({"AWS_ENDPOINT_URL_S3": proxy.endpoint}),
    ):
        with pytest.raises(storage.StorageError, match="access denied"):
            storage.Tree(url).read_range_or_none("weights.h5", 0, 128)
        result = run("table", url)
    assert proxy.failed > 0
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 3 and len(lines) == 1 and "access denied to" in lines[0], lines


def test_msgpack_documents_are_freed_with_their_tree():
    """The parsed structure of a msgpack file lives as long as the tree it was read from."""
    import gc
    import weakref

    from paramscope.io import checkpoint

    location = checkpoint.locate(MSGPACK_DIRS[0])
    assert checkpoint.read_arrays(location.items[0])
    tree = weakref.ref(location.items[0].tree)
    del location
    gc.collect()
    assert tree() is None


def test_history_lists_once_and_reads_each_metadata_file_once(stores, uploaded, manager_ckpt):
    s3 = stores["s3"]
    url = uploaded("s3", manager_ckpt.path)
    local = run_json("history", manager_ckpt.path, "--no-cache")
    start = len(s3.requests())
    remote = run_json("history", url, "--no-cache")
    assert same(remote) == same(local)
    requests = metadata_requests(s3.requests()[start:])
    assert sum("list-type=" in r for r in requests) == 1, requests
    reads = [r for r in requests if "list-type=" not in r]
    assert reads and len(reads) == len(set(reads)), requests
    steps = len(remote["steps"])
    for name in ("/_CHECKPOINT_METADATA", "/_METADATA", "/_sharding"):  # once per step, not per step²
        assert sum(r.endswith(name) for r in reads) == steps, (name, reads)


@pytest.mark.parametrize(
    "stall, where",
    [("silent", "every request"), ("headers", "reads, the listing answered")],
)
def test_a_stalled_store_fails_in_seconds(stores, uploaded, manager_ckpt, tmp_path, stall, where):
    """A store that accepts and never answers (or answers headers, then nothing) ends in one
    line naming it, within the request timeout and its retries."""
    s3 = stores["s3"]
    url = uploaded("s3", manager_ckpt.path)
    picks = (lambda c, p: True) if where == "every request" else (lambda c, p: "list-type=" not in p)
    with FlakyProxy(s3.endpoint, every=1, when=picks, stall=stall) as proxy:
        env = _clean_env(tmp_path, **{**s3.env, "AWS_ENDPOINT_URL_S3": proxy.endpoint})
        env.update(PARAMSCOPE_REQUEST_TIMEOUT="1", PARAMSCOPE_REQUEST_RETRIES="1")
        result = _cli(["count", url], env, timeout=90)
    assert proxy.failed > 0
    _one_line(result, 3, "cannot reach", proxy.endpoint)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_a_bucket_root_is_a_checkpoint(stores, manager_ckpt, scheme):
    server = stores[scheme]
    bucket = f"root-of-{scheme}"
    server.make_bucket(bucket)
    url = server.upload(manager_ckpt.path, "", bucket)
    assert url == f"{scheme}://{bucket}"
    local = same(run_json("table", manager_ckpt.path))
    for given in (url, url + "/"):
        assert same(run_json("table", given)) == local, given
    assert [s["step"] for s in run_json("info", url)["steps"]] == [100, 200, 300]
    step = os.path.join(manager_ckpt.path, "checkpoint_100", "params")
    assert same(run_json("table", url + "/checkpoint_100/params")) == same(run_json("table", step))
