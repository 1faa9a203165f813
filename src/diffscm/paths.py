"""Where the files this repository ships are: its checkpoints and its data."""

import os
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parents[2]
CHECKPOINTS = "checkpoints"
DATA = "data"


def shipped_checkpoint(name: str) -> str:
    """A shipped checkpoint folder: under $DIFFSCM_CHECKPOINTS, the repository this package is installed from, or
    ./checkpoints."""
    return _find(name, [os.environ.get("DIFFSCM_CHECKPOINTS"), REPOSITORY / CHECKPOINTS, CHECKPOINTS], "checkpoint")


def shipped_data(name: str) -> str:
    """A data folder that ships with the repository (`morphomnist`: the Morpho-MNIST test split)."""
    return _find(name, [REPOSITORY / DATA, DATA], "data folder")


def _find(name: str, roots: list, kind: str) -> str:
    for root in filter(None, roots):
        if (Path(root) / name).is_dir():
            return str(Path(root) / name)
    searched = ", ".join(str(root) for root in roots if root)
    raise FileNotFoundError(f"The shipped {kind} {name!r} was not found (looked in {searched}).")
