"""`mixedprec reproduce`: the CIFAR-100 python layout reader, and a recipe run end to end on a
tiny synthetic folder in that layout (seconds), printing the paper's row next to the measured one."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from mixedprec.cli import main
from mixedprec.cli.reproduce import RECIPES
from mixedprec.data.cifar import Cifar100, CifarLayoutError, write_cifar100


def _images(n: int, seed: int) -> tuple[np.ndarray, list[int]]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 3072), dtype=np.uint8), rng.integers(0, 100, n).tolist()


@pytest.fixture()
def cifar(tmp_path):
    write_cifar100(tmp_path / "data", _images(32, 0), _images(16, 1))
    return tmp_path / "data"


def test_reader_decodes_the_python_layout(cifar):
    data, labels = _images(32, 0)
    train, test = Cifar100(cifar, train=True), Cifar100(cifar, train=False)
    assert len(train) == 32 and len(test) == 16 and len(train.classes) == 100
    image, label = test[3]
    assert image.shape == (3, 32, 32) and label == _images(16, 1)[1][3]
    # the channel planes in order: red plane first, row-major
    red = torch.from_numpy(_images(16, 1)[0][3, :1024].reshape(32, 32)).float() / 255
    torch.testing.assert_close(image[0] * 0.2673 + 0.5071, red)
    assert train.augment and not test.augment
    assert train[0][0].shape == (3, 32, 32) and train[0][1] == labels[0]


def test_reader_names_what_is_missing(tmp_path):
    with pytest.raises(CifarLayoutError, match="cifar-100-python/train"):
        Cifar100(tmp_path, train=True)


def test_recipe_runs_end_to_end_and_prints_the_paper_row(cifar, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["reproduce", "sbs-cifar100-resnet20", "--data-dir", str(cifar), "--epochs", "1", "--max-steps", "1",
                 "--batch-size", "8", "--out", str(out), "-q"])
    assert code == 0
    printed = capsys.readouterr().out
    lines = printed.splitlines()
    paper = next(line for line in lines if line.startswith("paper "))
    measured = next(line for line in lines if line.startswith("measured "))
    assert "not available" in paper and "BOPs reduction" in printed
    assert "paper row: not available (source:" in printed and "schedule: this project's choice" in printed
    record = json.loads((out / "sbs-cifar100-resnet20.json").read_text())
    assert record["paper"] is None and record["training_images"] == 8
    assert record["measured"]["BOPs reduction"] > 1 and record["report"]["reference"]["source"] == "the float model"
    assert f"{record['measured']['BOPs']:,}" in measured
    assert record["schedule"]["preset"] == "cifar-preresnet" and set(RECIPES) == {"sbs-cifar100-resnet20",
                                                                                   "sbs-cifar100-resnet56"}


def test_a_folder_without_cifar_is_one_line_and_exit_2(tmp_path, capsys):
    code = main(["reproduce", "sbs-cifar100-resnet56", "--data-dir", str(tmp_path), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "cifar-100-python" in err[0] and "--data-dir" in err[0]
