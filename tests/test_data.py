"""Tests for torchbridge.data (offline MNIST subset, sklearn digits, FER2013 CSV loader)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from torchbridge.data import FER2013_CLASSES, digits, fer2013, mnist


def test_mnist_shapes_ranges_and_balance() -> None:
    train_x, train_y, test_x, test_y = mnist()
    assert train_x.shape == (4000, 1, 28, 28) and test_x.shape == (1000, 1, 28, 28)
    assert train_x.dtype == torch.float32 and test_x.dtype == torch.float32
    assert train_y.dtype == torch.int64 and test_y.shape == (1000,)
    assert float(train_x.min()) >= 0.0 and float(train_x.max()) == 1.0
    assert torch.equal(torch.bincount(train_y), torch.full((10,), 400))
    assert torch.equal(torch.bincount(test_y), torch.full((10,), 100))
    # Shuffled (not sorted by class) and deterministic.
    assert len(set(train_y[:50].tolist())) > 5
    again = mnist()
    assert torch.equal(again[0], train_x) and torch.equal(again[3], test_y)


def test_digits() -> None:
    x, y = digits()
    assert x.shape == (1797, 1, 8, 8) and x.dtype == torch.float32
    assert y.shape == (1797,) and y.dtype == torch.int64
    assert float(x.min()) == 0.0 and float(x.max()) == 1.0


def _row(label: int, value: int, usage: str) -> str:
    return f"{label}," + " ".join([str(value)] * (48 * 48)) + f",{usage}\n"


def _write(path: Path, rows: list[str], header: str = "emotion,pixels,Usage\n") -> Path:
    path.write_text(header + "".join(rows))
    return path


def test_fer2013_loader(tmp_path: Path) -> None:
    assert FER2013_CLASSES == (
        "Anger",
        "Disgust",
        "Fear",
        "Happiness",
        "Sadness",
        "Surprise",
        "Neutral",
    )
    csv = _write(
        tmp_path / "fer.csv",
        [_row(3, 255, "Training"), _row(0, 0, "PublicTest"), _row(6, 51, "PrivateTest")],
    )
    x, y = fer2013(csv)
    assert x.shape == (3, 1, 48, 48) and x.dtype == torch.float32
    assert y.tolist() == [3, 0, 6] and y.dtype == torch.int64
    assert float(x[0].min()) == 1.0 and float(x[1].max()) == 0.0
    torch.testing.assert_close(x[2], torch.full((1, 48, 48), 0.2))
    x_tr, y_tr = fer2013(csv, usage="Training")
    assert x_tr.shape == (1, 1, 48, 48) and y_tr.tolist() == [3]
    _, y_te = fer2013(str(csv), usage=("PublicTest", "PrivateTest"))
    assert y_te.tolist() == [0, 6]
    with pytest.raises(ValueError, match="no rows selected"):
        fer2013(csv, usage="Validation")
    # Usage column is optional when no filter is given.
    no_usage = tmp_path / "nousage.csv"
    no_usage.write_text("emotion,pixels\n" + _row(1, 10, "")[:-2] + "\n")
    assert fer2013(no_usage)[1].tolist() == [1]


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ("2," + " ".join(["1"] * 100) + ",Training\n", r"line 3: expected 2304 pixels, got 100"),
        (_row(9, 1, "Training"), r"line 3: emotion 9 not in 0\.\.6"),
        (_row(1, 300, "Training"), r"line 3: pixel values"),
        ("x," + " ".join(["1"] * 2304) + ",Training\n", r"line 3: emotion 'x'"),
        ("1," + " ".join(["a"] * 2304) + ",Training\n", r"line 3: pixels must be integers"),
        ("1\n", r"line 3: wrong number of fields"),
    ],
)
def test_fer2013_malformed(tmp_path: Path, row: str, message: str) -> None:
    csv = _write(tmp_path / "bad.csv", [_row(0, 0, "Training"), row])
    with pytest.raises(ValueError, match=message):
        fer2013(csv)


def test_fer2013_bad_header_and_missing_file(tmp_path: Path) -> None:
    csv = _write(tmp_path / "bad.csv", [_row(0, 0, "Training")], header="label,pix,Usage\n")
    with pytest.raises(ValueError, match="missing column"):
        fer2013(csv)
    with pytest.raises(FileNotFoundError):
        fer2013(tmp_path / "absent.csv")
