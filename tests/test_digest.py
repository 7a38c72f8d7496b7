"""Content digests: independent of how an array is cut, stored, read and combined."""

import hashlib
import json

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from paramscope.compute import digest as D


def reference_digest(x: np.ndarray) -> str:
    """The README's reference implementation, verbatim."""
    data = np.ascontiguousarray(x).astype(x.dtype.newbyteorder("<")).tobytes()
    leaves = b"".join(hashlib.sha256(data[i : i + 2**20]).digest() for i in range(0, len(data), 2**20))
    header = json.dumps({"dtype": x.dtype.name, "shape": list(x.shape)}, separators=(",", ":"))
    return hashlib.sha256(b"paramscope-digest/1\n" + header.encode() + b"\n" + leaves).hexdigest()


@pytest.mark.parametrize(
    "x",
    [
        np.arange(12, dtype=np.float32).reshape(3, 4),
        np.zeros((0, 8), np.float32),
        np.float32(3.5),
        np.arange(700_001, dtype=np.float32),  # crosses block boundaries, a short last block
        np.arange(300_000, dtype=np.float64).astype(">f8"),  # big-endian: the same logical content
        np.ones((5, 7), ml_dtypes.bfloat16),
        np.array([True, False, True]),
        (np.arange(6) + 1j).astype(np.complex64),
        np.arange(-8, 8, dtype=ml_dtypes.int4),
    ],
    ids=lambda x: f"{x.dtype.name}{list(np.shape(x))}",
)
def test_digest_matches_the_reference(x):
    x = np.asarray(x)
    assert D.digest_of(x) == reference_digest(x)


def test_digest_depends_on_content_dtype_and_shape():
    x = np.arange(12, dtype=np.float32)
    flipped = x.copy()
    flipped.view(np.uint32)[5] ^= 1  # one low mantissa bit
    assert D.digest_of(x) != D.digest_of(flipped)
    assert D.digest_of(x) != D.digest_of(x.reshape(3, 4))
    assert D.digest_of(x) != D.digest_of(x.view(np.int32))
    assert D.digest_of(np.arange(600_000, dtype=np.float32).astype(">f4")) == D.digest_of(
        np.arange(600_000, dtype=np.float32)
    )


@settings(max_examples=40, deadline=None)
@given(
    size=st.integers(0, 3 * D.BLOCK_BYTES // 4 + 5),
    cuts=st.lists(st.floats(0, 1), max_size=6),
    order=st.randoms(use_true_random=False),
    states=st.integers(1, 3),
)
def test_pieces_in_any_order_and_any_number_of_states_give_one_digest(size, cuts, order, states):
    x = (np.arange(size, dtype=np.uint32) * 2654435761).astype(np.uint32)
    data = D.logical_bytes(x)
    bounds = sorted({0, len(data), *(int(c * len(data)) for c in cuts)})
    pieces = list(zip(bounds, bounds[1:]))
    order.shuffle(pieces)
    parts = [D.DigestState("uint32", x.shape, 4) for _ in range(states)]
    for k, (a, b) in enumerate(pieces):
        parts[k % states].feed(a, data[a:b])
    whole = parts[0]
    for other in parts[1:]:
        whole.merge_bytes(other.to_bytes())  # as it crosses processes
    assert whole.hexdigest() == D.digest_of(x)


def test_boxes_of_a_sharded_array_give_the_same_digest():
    x = np.random.default_rng(0).standard_normal((64, 48, 3)).astype(np.float32)
    flat = x.reshape(-1).view(np.uint8)
    state = D.DigestState("float32", x.shape, 4)
    for i in range(0, 64, 16):
        for j in range(0, 48, 12):  # shards along two dimensions: boxes, not slabs
            box = (slice(i, i + 16), slice(j, j + 12), slice(0, 3))
            values = np.ascontiguousarray(x[box]).reshape(-1)
            for offset, local, length in D.box_runs(x.shape, box):
                state.feed(offset * 4, values[local : local + length].view(np.uint8))
    assert state.hexdigest() == D.digest_of(x)
    assert bytes(flat) == x.tobytes()


def test_an_incomplete_state_refuses_to_give_a_digest():
    state = D.DigestState("float32", (1000,), 4)
    state.feed(0, np.zeros(10, np.float32).view(np.uint8))
    with pytest.raises(ValueError, match="unseen"):
        state.hexdigest()


def test_the_digest_of_a_set_is_over_sorted_paths():
    a, b = D.digest_of(np.zeros(3)), D.digest_of(np.ones(3))
    assert D.combined([("x", a), ("y", b)]) == D.combined([("y", b), ("x", a)])
    assert D.combined([("x", a), ("y", b)]) != D.combined([("x", b), ("y", a)])
