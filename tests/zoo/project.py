"""A user's project folder, laid out as a user would have it: the model modules as
top-level files (``resnet.py``, ...), their data, and the models saved by running the
user's own script there in a separate Python process (``python save_models.py ...``).

The pickles therefore name ``resnet.ResNet`` etc., modules that only that folder provides:
torchslim can load them only by looking where the user runs it (--trust), or --code-path.
"""

from __future__ import annotations

import importlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

from . import FAMILIES, data
from .count import Count

HERE = Path(__file__).parent
LOST_MODULE = '''"""A module kept in lib/, which is not where the user runs torchslim."""
from torch import nn


class LostNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(x)
'''
SAVE_LOST = ("import sys; sys.path.insert(0, 'lib'); import torch, lostnet; "
             "torch.save(lostnet.LostNet(), 'lost.pt')")


def family(name: str):
    """The family's module as the suite imports it (zoo.<name>, not the user's copy)."""
    return importlib.import_module(f"{__package__}.{name}")


def hand_count(name: str) -> tuple[int, int]:
    c = Count()
    family(name).hand_count(c)
    return c.params, c.macs


def inputs(name: str) -> list[str]:
    return list(family(name).INPUTS)


def data_file(root: Path, name: str) -> Path:
    return root / f"{family(name).DATA}.npz"


def make(root: Path, families=FAMILIES) -> Path:
    """Lay out the project in ``root`` and save every family's model there."""
    root.mkdir(parents=True, exist_ok=True)
    for name in [*families, "save_models", "main_script"]:
        shutil.copy(HERE / f"{name}.py", root / f"{name}.py")
    for kind in sorted({family(n).DATA for n in families}):
        data.write(kind, root)
    (root / "lib").mkdir(exist_ok=True)
    (root / "lib" / "lostnet.py").write_text(LOST_MODULE)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # only the folder
    run = [
        [sys.executable, "save_models.py", *families],
        [sys.executable, "main_script.py"],
        [sys.executable, "-c", SAVE_LOST],
    ]
    for argv in run:
        done = subprocess.run(argv, cwd=root, env=env, capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(f"{' '.join(argv[1:2])} failed in {root}:\n{done.stderr}")
    return root
