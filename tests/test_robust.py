"""Tests for torchbridge.robust (moment-regularized training) and `nm robust`.

References: the generic per-image linearization (``two_stage_linearize``, itself checked by
gradcheck in test_linearize_grad.py), scipy quadrature of definitions, hand-derived closed
forms, and Monte Carlo with tolerances in standard errors.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from scipy import integrate, stats
from standins import pixel_class_data, pixel_class_net, tiny_mnist, tiny_net
from torch import nn
from torch.nn import functional

from torchbridge import robust
from torchbridge.linearize import two_stage_linearize
from torchbridge.robust import (
    Method,
    TrainSettings,
    clipped_noise_moments,
    expected_logits_first_relu,
    linearized_output_moments,
    noisy_accuracy,
    probit_margin_loss,
    robust_loss,
    robustness_area,
    train_robust,
)


def _images(n: int, seed: int = 2) -> torch.Tensor:
    return torch.rand(
        n, 1, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)
    )


@pytest.mark.parametrize("clipped", [False, True])
def test_batched_mean_equals_per_image_linearization_with_gradients(clipped: bool) -> None:
    net = tiny_net().double()
    x = _images(3)
    sigma = 0.3
    logits, expected = expected_logits_first_relu(net, x, sigma, clipped)
    refs = []
    for xi in x:
        g = two_stage_linearize(net, xi, 0, create_graph=True)
        if clipped:
            m, v = clipped_noise_moments(xi.reshape(-1), sigma)
            refs.append(g.moments(m, v)[0])
        else:
            refs.append(g.moments(xi.reshape(-1), sigma**2)[0])
    ref = torch.stack(refs)
    torch.testing.assert_close(logits, net(x), rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(expected, ref, rtol=1e-12, atol=1e-13)
    params = list(net.parameters())
    w = torch.randn(expected.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    fast = torch.autograd.grad((w * expected).sum(), params)
    slow = torch.autograd.grad((w * ref).sum(), params)
    for a, b in zip(fast, slow, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert (expected - logits).abs().max() > 1e-3  # the noise does move the mean logits


def test_batched_mean_matches_monte_carlo_of_the_linearized_network() -> None:
    """E[g(x + n)] vs 2e5 samples of g itself (g = the first-ReLU linearization at x)."""
    net = tiny_net().double()
    x = _images(1, seed=5)
    sigma = 0.2
    _, expected = expected_logits_first_relu(net, x, sigma)
    g = two_stage_linearize(net, x[0], 0)
    gen = torch.Generator().manual_seed(1)
    noise = sigma * torch.randn(200_000, 64, dtype=torch.float64, generator=gen)
    out = g(x.reshape(1, -1) + noise)
    se = out.std(0) / math.sqrt(out.shape[0])
    assert ((expected[0].detach() - out.mean(0)).abs() < 5 * se).all()


def test_clipped_noise_moments_match_quadrature_of_the_definition() -> None:
    xs = [0.0, 0.02, 0.3, 0.5, 0.97, 1.0]
    for sigma in (0.05, 0.25, 0.5):
        m, v = clipped_noise_moments(torch.tensor(xs, dtype=torch.float64), sigma)
        for k, x in enumerate(xs):

            def clip_pow(t: float, p: int, x: float = x, sigma: float = sigma) -> float:
                return min(max(x + sigma * t, 0.0), 1.0) ** p * stats.norm.pdf(t)

            # split at the clipping kinks t = -x/σ and (1 - x)/σ
            pts = sorted({-x / sigma, (1 - x) / sigma})
            m1 = integrate.quad(clip_pow, -40, 40, args=(1,), points=pts, epsabs=1e-14)[0]
            m2 = integrate.quad(clip_pow, -40, 40, args=(2,), points=pts, epsabs=1e-14)[0]
            assert abs(float(m[k]) - m1) < 1e-12
            assert abs(float(v[k]) - (m2 - m1**2)) < 1e-11 * max(1.0, m2)


def test_probit_margin_loss_closed_forms() -> None:
    mean = torch.tensor([[2.0, 0.0], [0.5, -1.0]], dtype=torch.float64)
    cov = torch.tensor([[[1.0, 0.5], [0.5, 2.0]], [[0.0, 0.0], [0.0, 0.0]]], dtype=torch.float64)
    y = torch.tensor([0, 1])
    # image 0: μ = 2, v = 1 + 2 - 2·0.5 = 2; image 1 (no variance): μ = -1 - 0.5 = -1.5
    expected = (
        math.log1p(math.exp(-2 / math.sqrt(1 + math.pi * 2 / 8))) + math.log1p(math.exp(1.5))
    ) / 2
    assert abs(float(probit_margin_loss(mean, cov, y)) - expected) < 1e-14
    # zero covariance: exactly the cross-entropy of the mean logits
    m = torch.randn(5, 4, dtype=torch.float64)
    t = torch.tensor([0, 3, 1, 2, 3])
    z = torch.zeros(5, 4, 4, dtype=torch.float64)
    torch.testing.assert_close(
        probit_margin_loss(m, z, t), functional.cross_entropy(m, t), rtol=1e-14, atol=1e-14
    )


def test_probit_loss_uses_the_last_relu_moments() -> None:
    net = tiny_net().double()
    x = _images(2)
    mean, cov = linearized_output_moments(net, x, 0.3, relu_index=-1)
    assert mean.shape == (2, 3) and cov.shape == (2, 3, 3) and cov.requires_grad
    g = two_stage_linearize(net, x[1], -1)
    m_ref, c_ref = g.moments(x[1].reshape(-1), 0.09, full=True)
    torch.testing.assert_close(mean[1], m_ref, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(cov[1], c_ref, rtol=1e-13, atol=1e-13)


def _threshold_net(threshold: float) -> nn.Sequential:
    """(1, 1) image -> logits (threshold - v, v - threshold): class 1 iff v > threshold."""
    net = nn.Sequential(nn.Flatten(), nn.Linear(1, 2))
    with torch.no_grad():
        net[1].weight.copy_(torch.tensor([[-1.0], [1.0]]))
        net[1].bias.copy_(torch.tensor([threshold, -threshold]))
    return net.eval()


def test_noisy_accuracy_against_the_normal_cdf_and_clipping() -> None:
    n, samples = 2000, 4
    x = torch.full((n, 1, 1), 0.3)
    y = torch.zeros(n, dtype=torch.int64)
    sigmas = [0.0, 0.1, 0.3]
    acc, se = noisy_accuracy(_threshold_net(0.5), x, y, sigmas, samples=samples)
    assert acc[0] == 1.0 and se[0] == 0.0
    for k, s in enumerate(sigmas[1:], start=1):
        exact = stats.norm.cdf(0.2 / s)  # P(0.3 + σ n <= 0.5)
        assert abs(acc[k] - exact) < 5 * math.sqrt(exact * (1 - exact) / (n * samples))
        assert se[k] > 0
    # clipped to [0, 1]: a bright pixel never exceeds 1, so "v > 1.05" is never predicted
    bright = torch.full((n, 1, 1), 0.95)
    acc1, _ = noisy_accuracy(_threshold_net(1.05), bright, torch.ones(n, dtype=torch.int64), [0.5])
    assert acc1 == [0.0]


def test_robustness_area_trapezoid() -> None:
    sigmas = [0.0, 0.25, 0.5]
    assert robustness_area(sigmas, [1.0, 1.0, 1.0]) == pytest.approx(0.5, abs=1e-15)
    assert robustness_area(sigmas, [1.0, 0.5, 0.0]) == pytest.approx(0.25, abs=1e-15)


def test_augmented_epoch_has_clean_and_clipped_noisy_copies() -> None:
    x = torch.rand(10, 1, 8, 8)
    y = torch.arange(10)
    settings = TrainSettings(epochs=1, batch_size=4, sigma=0.5)
    batches = robust._epoch_batches(
        x, y, Method("augment", copies=3), settings, torch.Generator().manual_seed(0)
    )
    xs = torch.cat([b[0] for b in batches])
    ys = torch.cat([b[1] for b in batches])
    assert xs.shape[0] == 40 and len(batches) == 10
    assert xs.min() >= 0 and xs.max() <= 1
    assert torch.equal(torch.bincount(ys), torch.full((10,), 4))
    for c in range(10):  # the clean image is among its class's 4 copies, the others differ
        group = xs[ys == c]
        exact = [(g == x[c]).all().item() for g in group]
        assert sum(exact) == 1


@pytest.mark.parametrize(
    "method",
    [
        Method("plain"),
        Method("augment", copies=2),
        Method("moment_mean"),
        Method("moment_mean", clipped=True, reg_images=3),
        Method("moment_mean", relu_index=-1, reg_images=2),
        Method("moment_probit", relu_index=-1, reg_images=2, clipped=True),
    ],
    ids=lambda m: m.label,
)
def test_every_method_trains(method: Method) -> None:
    train_x, train_y, _, _ = tiny_mnist(n=40, classes=3)
    net = tiny_net()
    before = [p.detach().clone() for p in net.parameters()]
    settings = TrainSettings(epochs=2, batch_size=8, sigma=0.2)
    result = train_robust(net, train_x, train_y, method, settings, progress=False)
    steps = math.ceil(20 / 8) * (method.copies + 1 if method.kind == "augment" else 1)
    assert result.steps_per_epoch == steps
    assert len(result.epoch_seconds) == 2 and all(t > 0 for t in result.epoch_seconds)
    assert math.isfinite(result.final_loss)
    assert any(not torch.equal(a, b) for a, b in zip(before, net.parameters(), strict=True))
    assert not net.training


def test_regularized_loss_adds_lambda_times_the_moment_term() -> None:
    net = tiny_net().double()
    x = _images(4)
    y = torch.tensor([0, 1, 2, 0])
    ce = functional.cross_entropy(net(x), y)
    _, expected = expected_logits_first_relu(net, x, 0.2)
    reg = functional.cross_entropy(expected, y)
    loss = robust_loss(net, x, y, Method("moment_mean", lam=2.5), 0.2)
    torch.testing.assert_close(loss, ce + 2.5 * reg, rtol=1e-14, atol=1e-14)


def test_method_validation() -> None:
    with pytest.raises(ValueError, match="kind"):
        Method("mixup")
    with pytest.raises(ValueError, match="copies"):
        Method("augment")
    with pytest.raises(ValueError, match="reg_images"):
        Method("moment_mean", reg_images=0)
    with pytest.raises(ValueError, match="affine"):
        expected_logits_first_relu(
            nn.Sequential(nn.Flatten(), nn.MaxPool1d(2), nn.ReLU(), nn.Linear(32, 2)),
            torch.rand(2, 1, 8, 8),
            0.1,
        )


@pytest.fixture
def tiny_lenet(monkeypatch):
    """`nm robust` on the 8×8 stand-ins: tiny_net as "LeNet", tiny_mnist as "MNIST"."""
    import torchbridge.data
    import torchbridge.experiments.robust as cmd
    import torchbridge.models

    data = tiny_mnist(n=40, classes=3)
    monkeypatch.setattr(torchbridge.models, "lenet", lambda: tiny_net())
    monkeypatch.setattr(torchbridge.data, "mnist", lambda: data)
    monkeypatch.setattr(cmd, "mnist", lambda: data)
    return data


def test_checkpoints_are_cached_under_their_own_names(tiny_lenet, tmp_path) -> None:
    method, settings = Method("moment_mean"), TrainSettings(epochs=1, batch_size=8)
    model, result = robust.trained_robust_lenet(method, settings, tmp_path, progress=False)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert len(files) == 2 and all(f.startswith("lenet_mnist_robust_moment_mean") for f in files)
    assert not result.from_cache
    meta = json.loads((tmp_path / files[0]).read_text())
    assert meta["settings"]["seed"] == 0 and meta["method"]["kind"] == "moment_mean"
    again, cached = robust.trained_robust_lenet(method, settings, tmp_path, progress=False)
    assert cached.from_cache and cached.epoch_seconds == result.epoch_seconds
    for a, b in zip(model.state_dict().values(), again.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_nm_robust_smoke(tiny_lenet, tmp_path) -> None:
    from torchbridge.cli import main

    rc = main(
        [
            "robust",
            "--methods",
            "plain,mean,augment",
            "--copies",
            "1",
            "--epochs",
            "1",
            "--batch-size",
            "8",
            "--sigmas",
            "0,0.25,0.5",
            "--eval-samples",
            "2",
            "--cache-dir",
            str(tmp_path / "cache"),
            "--out",
            str(tmp_path / "out"),
            "--no-progress",
        ]
    )
    assert rc == 0
    res = json.loads((tmp_path / "out" / "robust.json").read_text())
    assert [r["kind"] for r in res["rows"]] == ["plain", "moment_mean", "augment"]
    for r in res["rows"]:
        assert len(r["accuracy"]) == 3 and 0 <= r["area"] <= 0.5
        assert r["area"] == pytest.approx(float(np.trapezoid(r["accuracy"], [0, 0.25, 0.5])))
    assert (tmp_path / "out" / "robust.png").is_file()
    assert "copies to match" in (tmp_path / "out" / "robust.md").read_text()


def test_copies_to_match() -> None:
    from torchbridge.experiments.robust import copies_to_match

    rows = [
        {"kind": "augment", "copies": k, "area": a}
        for k, a in [(1, 0.40), (3, 0.42), (10, 0.44), (21, 0.45)]
    ]
    assert copies_to_match(rows, 0.41) == "between 1 and 3"
    assert copies_to_match(rows, 0.39) == "≤ 1"
    assert copies_to_match(rows, 0.46).startswith("> 21")


def test_nm_bench_regularizer_smoke(monkeypatch, tmp_path) -> None:
    import torchbridge.experiments.bench_robust as bench
    from torchbridge.cli import main

    data = tiny_mnist(n=40, classes=3)
    monkeypatch.setattr(bench, "trained_lenet", lambda progress=True: tiny_net())
    monkeypatch.setattr(bench, "mnist", lambda: data)
    out = tmp_path / "out"
    rc = main(["bench", "regularizer", "--batch-size", "4", "--repeats", "1", "--out", str(out)])
    assert rc == 0
    res = json.loads((out / "bench_regularizer.json").read_text())
    assert len(res["rows"]) == 6 and all(r["seconds"] > 0 for r in res["rows"])
    assert res["rows"][0]["per_image_vs_plain"] == 1.0


def test_cached_loader_never_trains(tiny_lenet, tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="never trains"):
        robust.cached_robust_lenet(Method("plain"), TrainSettings(epochs=1), tmp_path)
    assert not any(tmp_path.iterdir())


def _recount(
    model: nn.Module, image: torch.Tensor, mu: torch.Tensor, sigma2: float, target: int | None
) -> float:
    """Fooling rate re-counted here: the real network on clip(image + μ + σ z), 64 draws of
    z ~ N(0, I) in float64 from ``torch.Generator().manual_seed(3)``; hit = classified as
    ``target``, or (``target`` None) not as the clean image's class."""
    gen = torch.Generator().manual_seed(3)
    z = torch.randn((64, *image.shape), generator=gen, dtype=torch.float64)
    x = (image.double() + mu + math.sqrt(sigma2) * z).clamp(0, 1)
    with torch.no_grad():
        pred = model(x.float()).argmax(1)
        source = int(model(image[None]).argmax())
    hit = pred == target if target is not None else pred != source
    return float(hit.double().mean())


@pytest.fixture
def pixel_checkpoint(monkeypatch, tmp_path):
    """A cached "LeNet" checkpoint that is ``pixel_class_net`` (attacks can fool it) and
    ``pixel_class_data`` as MNIST's test split; returns (model, test_x, test_y, cache)."""
    import torchbridge.data
    import torchbridge.experiments.robust_attacks as cmd
    import torchbridge.models

    x, y = pixel_class_data(per_class=1)
    monkeypatch.setattr(torchbridge.models, "lenet", lambda: pixel_class_net())
    monkeypatch.setattr(cmd, "mnist", lambda: (x, y, x, y))
    cache = tmp_path / "cache"
    cache.mkdir()
    weights, meta = robust._checkpoint_paths(Method("plain"), TrainSettings(epochs=1), cache)
    torch.save(pixel_class_net().state_dict(), weights)
    meta.write_text(json.dumps({"epoch_seconds": [1.0], "steps_per_epoch": 1, "final_loss": 0}))
    return pixel_class_net(), x, y, cache


def test_nm_robust_attacks_plumbing(pixel_checkpoint, tmp_path) -> None:
    """1 model, 2 images, 64 samples: saved images + μ within [0, 1], fooling rates re-counted
    here on the real network from the saved μ and σ², runner-up targets, missing models
    listed and not trained. Large noise and a small β put rates strictly inside (0, 1), so
    a wrong seed or sample count would change them."""
    from torchbridge.cli import main

    model, test_x, test_y, cache = pixel_checkpoint
    out = tmp_path / "out"
    argv = ["robust-attacks", "--methods", "plain", "--epochs", "1,2", "--images", "2"]
    argv += ["--start", "0", "--samples", "64", "--seed", "3", "--targeted-maxiter", "10"]
    argv += ["--sparse-maxiter", "20", "--beta", "10", "--sigma2-max", "1000"]
    argv += ["--sigma2", "1000", "--gamma", "0"]
    rc = main([*argv, "--cache-dir", str(cache), "--out", str(out), "--no-progress"])
    assert rc == 0
    res = json.loads((out / "robust_attacks.json").read_text())
    assert res["missing"] == ["plain CE, 2 epochs"]  # listed, not trained
    assert len(list(cache.glob("*.pt"))) == 1
    (entry,) = res["models"]
    sol = torch.load(out / "robust_attacks_mu.pt", weights_only=True)
    assert sol["attacks"] == ("eq7", "eq9") and sol["mu"].shape == (1, 2, 2, 1, 8, 8)
    with torch.no_grad():
        logits = model(test_x)
    assert sol["images"].tolist() == res["images"] == [0, 1]
    assert all(int(logits[i].argmax()) == int(test_y[i]) for i in res["images"])
    assert res["run"]["seed"] == 3 and res["run"]["threads"] == 1 and res["run"]["torch"]
    inside = set()
    for k, row in enumerate(entry["rows"]):
        i = row["image"]
        source, target = (int(c) for c in logits[i].argsort(descending=True)[:2])
        assert (row["source"], row["target"]) == (source, target)  # runner-up target
        for a, name in enumerate(("eq7", "eq9")):
            mu, sigma2 = sol["mu"][0, k, a], float(sol["sigma2"][0, k, a])
            seen = test_x[i].double() + mu
            assert seen.min() >= -1e-12 and seen.max() <= 1 + 1e-12
            assert -1e-12 <= row[name]["image_mu_min"] <= row[name]["image_mu_max"] <= 1 + 1e-12
            rate = _recount(model, test_x[i], mu, sigma2, target if name == "eq7" else None)
            assert row[name]["fooling_rate"] == rate
            assert row[name]["l2"] == pytest.approx(float(mu.norm()), rel=1e-12)
            if 0 < rate < 1:
                inside.add(name)
    assert inside == {"eq7", "eq9"}
    s = entry["summary"]
    for name in ("eq7", "eq9"):
        rates = [row[name]["fooling_rate"] for row in entry["rows"]]
        assert s[name]["fooling_rate"] == pytest.approx(sum(rates) / 2, abs=1e-15)
        assert s[name]["fooled_images"] == sum(r >= 0.5 for r in rates)
    assert (out / "robust_attacks.png").is_file()
    assert "Eq. 9 ‖μ‖₁" in (out / "robust_attacks.md").read_text()


def test_paired_ratio_is_the_geometric_mean_of_per_image_ratios() -> None:
    from torchbridge.experiments.robust_attacks import paired_ratio

    ref = [{"eq9": {"l1_grey": v}} for v in (100.0, 200.0, 400.0)]
    rows = [{"eq9": {"l1_grey": v}} for v in (200.0, 200.0, 1600.0)]  # ratios 2, 1, 4
    out = paired_ratio(rows, ref, "eq9", "l1_grey")
    assert out["ratio"] == pytest.approx(2.0, rel=1e-14)  # (2 · 1 · 4)^(1/3)
    se = float(np.std(np.log([2.0, 1.0, 4.0]), ddof=1)) / math.sqrt(3)
    assert out["low"] == pytest.approx(2.0 * math.exp(-se), rel=1e-14)
    assert out["high"] == pytest.approx(2.0 * math.exp(se), rel=1e-14)
