"""Smoke tests of the attack commands (`nm fig3 | fig4 | fig6 | fig7 | fig8 | table5 | pairs`)
on a 10-class stand-in whose class c follows pixel c, so every attack has a real target."""

from __future__ import annotations

import argparse
import json
import math

import pytest
import torch
from standins import pixel_class_data, pixel_class_net

from torchbridge.attacks import pgd_targeted
from torchbridge.experiments import attack_figures, targeted_pairs


@pytest.fixture
def standin(monkeypatch):
    net = pixel_class_net()
    x, y = pixel_class_data()
    with torch.no_grad():
        pred = net(x).argmax(1)
    assert bool((pred == y).all())
    data = (net, x, y, pred)
    monkeypatch.setattr(attack_figures, "lenet_data", lambda: data)
    monkeypatch.setattr(targeted_pairs, "lenet_data", lambda: data)
    return data


def _run(tmp_path, argv: list[str]):
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="command")
    attack_figures.add_parser(sub)
    targeted_pairs.add_parser(sub)
    args = p.parse_args([argv[0], "--out", str(tmp_path), *argv[1:]])
    return args.func(args)


def _outputs(tmp_path, name: str) -> dict:
    assert (tmp_path / f"{name}.md").is_file()
    return json.loads((tmp_path / f"{name}.json").read_text())


def _within_range(rows: list[dict]) -> bool:
    return all(0.0 <= r["img_mu_min"] and r["img_mu_max"] <= 1.0 for r in rows)


def _run_info_ok(data: dict) -> None:
    run = data["run"]
    assert {"seed", "threads", "torch", "scipy", "bounds", "range"} <= set(run)
    assert run["threads"] == 1 and run["bounds"] == [0.0, 1.0]


def test_fig3_and_fig4(standin, tmp_path):
    _run(tmp_path, ["fig3", "--targets", "2", "4", "--maxiter", "10"])
    data = _outputs(tmp_path, "fig3")
    rows = data["rows"]
    _run_info_ok(data)
    assert [r["source"] for r in rows] == [9, 9] and [r["target"] for r in rows] == [2, 4]
    assert all(
        0 <= r["fooling_rate"] <= 1 and r["fooling_rate_10"] in {i / 10 for i in range(11)}
        for r in rows
    )
    assert _within_range(rows) and "clipped" in data["note"]
    assert (tmp_path / "fig3.png").stat().st_size > 0
    _run(tmp_path, ["fig4", "--supports", "2", "--alpha", "0.25", "--maxiter", "30"])
    rows = _outputs(tmp_path, "fig4")["rows"]
    assert len(rows) == 2 and all(r["sparsity"] >= 0.75 - 1e-9 for r in rows)
    assert _within_range(rows)


def test_unconstrained_flag_is_labelled(standin, tmp_path):
    _run(tmp_path, ["fig3", "--targets", "4", "--maxiter", "10", "--unconstrained"])
    data = _outputs(tmp_path, "fig3")
    assert data["run"]["bounds"] is None
    assert "unconstrained (invalid images possible)" in data["note"]
    assert "UNCLIPPED" in (tmp_path / "fig3.md").read_text()


def test_fig6_fig7(standin, tmp_path):
    _run(tmp_path, ["fig6", "--classes", "3", "--gamma", "0.05", "--maxiter", "40"])
    row = _outputs(tmp_path, "fig6")["rows"][0]
    assert row["source"] == 3 and row["target"] is None and _within_range([row])
    assert {"converged", "iteration_cap", "success"} <= set(row)
    _run(tmp_path, ["fig7", "--targets", "5", "--maxiter", "40", "--max-support", "0.1"])
    row = _outputs(tmp_path, "fig7")["rows"][0]
    assert row["source"] == 4 and row["target"] == 5 and _within_range([row])
    # At most floor(10% of 64) = 6 pixels non-zero.
    assert row["sparsity"] >= 1 - 6 / 64 - 1e-9


def test_fig8(standin, tmp_path):
    _run(tmp_path, ["fig8", "--images", "2", "--gammas", "0", "0.1", "--samples", "50"])
    rows = _outputs(tmp_path, "fig8")["rows"]
    assert [r["gamma"] for r in rows] == [0.0, 0.1] and all(r["images"] == 2 for r in rows)
    assert all(r["separation_std"] >= 0 and 0 <= r["fooling_rate"] <= 1 for r in rows)
    assert (tmp_path / "fig8.png").is_file()


def test_table5_matrix(standin, tmp_path, monkeypatch):
    # Only two source classes have images: the other rows stay NaN (no image to attack).
    net, x, y, pred = standin
    keep = (y == 1) | (y == 2)
    data = (net, x[keep], y[keep], pred[keep])
    monkeypatch.setattr(attack_figures, "lenet_data", lambda: data)
    _run(tmp_path, ["table5", "--samples", "20", "--maxiter", "20", "--rounds", "1"])
    out = _outputs(tmp_path, "table5")
    rate = out["fooling_rate"]
    assert (
        "MNIST / LeNet" in out["dataset"]
        and "MNIST / LeNet" in (tmp_path / "table5.md").read_text()
    )
    assert len(rate) == 10 and all(len(r) == 10 for r in rate)
    for s in range(10):
        for t in range(10):
            if s in (1, 2) and s != t:
                assert 0 <= rate[s][t] <= 1
            else:
                assert math.isnan(rate[s][t])


def test_pairs_command(standin, tmp_path):
    rc = _run(
        tmp_path,
        ["pairs", "--pairs", "3", "--start", "0", "--relinearize", "2", "--samples", "100"],
    )
    assert rc == 0
    data = _outputs(tmp_path, "pairs")
    assert data["pairs"] == 3
    assert {"paper", "relinearized", "pgd_feasible", "paper_of_pgd_feasible"} <= set(
        data["summary"]
    )
    _run_info_ok(data)
    net, x, y, _ = standin
    for r in data["rows"]:
        with torch.no_grad():
            logits = net(x[r["image"]][None])[0]
        assert r["label"] == int(y[r["image"]])
        assert r["target"] == int(logits.argsort(descending=True)[1])
        assert r["paper_fooling"] in {i / 100 for i in range(101)}
    counts = data["summary"]
    assert counts["paper"] == sum(r["paper_fooling"] >= 0.9 for r in data["rows"])
    assert counts["pgd_feasible"] == sum(r["pgd_real_margin"] < 0 for r in data["rows"])


def test_held_out_pairs_rules(standin):
    net, x, y, _ = standin
    nxt = targeted_pairs.held_out_pairs(net, x, y, 4, start=3, rule="next")
    assert [i for i, _ in nxt] == [3, 4, 5, 6]
    assert all(t == (int(y[i]) + 1) % 10 for i, t in nxt)
    with pytest.raises(ValueError, match="rule"):
        targeted_pairs.held_out_pairs(net, x, y, 1, rule="random")


def test_pgd_targeted_flips_feasible_and_reports_infeasible(standin):
    net, x, _, _ = standin
    img = x[6]  # class 3
    mu, m = pgd_targeted(net, img, 7, beta=0.3)
    assert m < 0 and float(mu.abs().max()) <= 0.3 + 1e-12
    y = img.double() + mu
    assert float(y.min()) >= 0.0 and float(y.max()) <= 1.0
    with torch.no_grad():
        assert int(net(y.float()[None]).argmax()) == 7
    _, m_small = pgd_targeted(net, img, 7, beta=1e-4, steps=5)
    assert m_small > 0  # a 1e-4 box cannot move a margin of order 0.1
    with pytest.raises(ValueError, match="beta"):
        pgd_targeted(net, img, 7, beta=0.0)


def test_bench_attacks_smoke(tmp_path, monkeypatch):
    import torchbridge.data
    import torchbridge.models
    from torchbridge.experiments import bench_attacks

    net = pixel_class_net()
    x, y = pixel_class_data()
    monkeypatch.setattr(torchbridge.models, "trained_lenet", lambda **k: net)
    monkeypatch.setattr(torchbridge.data, "mnist", lambda: (x, y, x, y))
    p = argparse.ArgumentParser()
    bench_attacks.add_bench_parser(p.add_subparsers(dest="bench"))
    args = p.parse_args(
        ["attacks", "--out", str(tmp_path), "--images", "1", "--maxiter", "5", "--fd-maxiter", "2"]
    )
    args.func(args)
    data = json.loads((tmp_path / "bench_attacks.json").read_text())
    assert "sparse_smooth (Eq. 9), linearization given" in data["attacks"]
    cmp = data["exact_vs_fd"]
    assert set(cmp) == {"range [0, 1] on", "paper: +-beta box only"}
    for c in cmp.values():
        assert c["fd"]["nfev"] > c["exact"]["nfev"] and c["wall_ratio"] > 0
    assert data["run"]["threads"] == 1
