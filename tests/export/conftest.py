"""Fixtures of the export tests: tiny real training runs (through lbc-train), made once and shared."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from tests.helpers import TINY, run_cli

# resnet_small on digits, a few steps per epoch. LBC: candidates removed at epoch 1 (t_f=1), so its
# second epoch trains an exactly 2:4 mask (and keeps EMA weights); ASP prunes before the first step.
RUNS = {
    "lbc": ["sparsity=lbc", "sparsity.t_f=1", "trainer.ema=true"],
    "srste": ["sparsity=srste", "schedule.epochs=1"],
    "asp": ["sparsity=asp", "sparsity.dense_epochs=0", "schedule.epochs=1"],
}


@pytest.fixture(scope="package")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """``trained(method)``: the run directory of a finished tiny run of ``method`` (trained on first use)."""
    done: dict[str, Path] = {}

    def get(method: str) -> Path:
        if method not in done:
            run_dir = tmp_path_factory.mktemp(f"run_{method}") / "run"
            code, out, err = run_cli(*TINY, *RUNS[method], f"run_dir={run_dir}")
            assert code == 0 and (run_dir / "last.pt").is_file(), out[-2000:] + err[-2000:]
            done[method] = run_dir
        return done[method]

    return get


@pytest.fixture(scope="package")
def lbc_export(trained: Callable[[str], Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``lbc-export --onnx`` of the LBC run: an export directory shared by the export and check tests."""
    from lbc.cli.export import main

    out = tmp_path_factory.mktemp("export") / "lbc"
    assert main([str(trained("lbc")), "--out", str(out), "--onnx", "--quiet"]) == 0
    return out


# A folder (ImageNet-layout) run whose eval transform differs from every default: a metadata that ignored the
# run's config (ImageNet's mean and std, crop_pct 0.875, bilinear) would feed the exported model other tensors.
FOLDER_CLASSES = ["ant", "bee", "cat"]
FOLDER_DATA = ["data.image_size=32", "data.crop_pct=0.8", "data.interpolation=bicubic",
               "data.mean=[0.5,0.4,0.3]", "data.std=[0.2,0.25,0.3]", "data.num_classes=3"]


def make_folder_tree(root: Path) -> Path:
    """``root/{train,val}/<class>/<i>.png``: noisy non-square images, each class tinted its own colour."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, count in (("train", 6), ("val", 2)):
        for c, name in enumerate(FOLDER_CLASSES):
            (root / split / name).mkdir(parents=True)
            for i in range(count):
                tint = np.roll(np.array([200, 60, 60]), c)
                pixels = np.clip(tint + rng.normal(0, 40, (38 + i, 45, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(root / split / name / f"{i}.png")
    return root


@pytest.fixture(scope="package")
def folder_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The run directory of a tiny SR-STE run on a folder data set with a non-default eval transform."""
    base = tmp_path_factory.mktemp("folder_run")
    root = make_folder_tree(base / "data")
    code, out, err = run_cli(*TINY, "data=imagenet", f"data.root={root}", *FOLDER_DATA, "data.loader.workers=0",
                             "data.loader.batch_size=6", "sparsity=srste", "schedule.epochs=1", f"run_dir={base / 'run'}")
    assert code == 0 and (base / "run" / "last.pt").is_file(), out[-2000:] + err[-2000:]
    return base / "run"


@pytest.fixture(scope="package")
def folder_export(folder_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``lbc-export --onnx`` of the folder run."""
    from lbc.cli.export import main

    out = tmp_path_factory.mktemp("export") / "folder"
    assert main([str(folder_run), "--out", str(out), "--onnx", "--quiet"]) == 0
    return out
