"""Draw the README's example picture of `paramscope history --plot` on a small synthetic run.

A CheckpointManager root of 8 steps: one block's weights grow 1.4x a step, the others drift
slowly. Usage: python scripts/make_history_picture.py docs/history.png
"""

import os
import subprocess
import sys
import tempfile

import numpy as np
import orbax.checkpoint as ocp


def main(picture: str) -> None:
    rng = np.random.default_rng(0)
    base = {f"block_{i}": {"kernel": rng.standard_normal((64, 64)).astype(np.float32)} for i in range(10)}
    with tempfile.TemporaryDirectory() as tmp:
        root = f"{tmp}/run"
        with ocp.CheckpointManager(root) as manager:
            for k in range(8):
                tree = {
                    name: {
                        "kernel": leaf["kernel"]
                        * np.float32(1.4**k if name == "block_3" else 1 + 0.02 * k * i)
                    }
                    for i, (name, leaf) in enumerate(base.items())
                }
                manager.save(1000 * (k + 1), args=ocp.args.Composite(params=ocp.args.StandardSave(tree)))
                manager.wait_until_finished()
        command = [sys.executable, "-m", "paramscope", "history", "run", "--depth", "1", "--top", "4"]
        subprocess.run(
            [*command, "--no-cache", "--plot", os.path.abspath(picture), "-q"], check=True, cwd=tmp
        )


if __name__ == "__main__":
    main(sys.argv[1])
