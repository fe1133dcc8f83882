"""The named loss grid and the models."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from crossent.experiments.losses import (
    BALANCED_LOSSES,
    DISTILL_LOSSES,
    IMBALANCED_LOSSES,
    KD_TEMPERATURE,
    default_losses,
    parse_loss,
    parse_losses,
)
from crossent.experiments.models import build_model


def test_parse_names() -> None:
    assert parse_loss("ls-0.10").name == "ls-0.1"
    assert parse_loss("FOCAL-3").gamma == 3.0
    assert parse_loss("cp-0.1").confidence_penalty == 0.1
    assert parse_loss("cb-focal").weighting == "effective_number"
    assert parse_loss("cb-focal-2").gamma == 2.0
    assert parse_loss("weighted-ce").needs_counts
    assert parse_loss("la-ce").logit_adjust == 1.0 and parse_loss("la-ce").needs_counts
    assert parse_loss("la-ce-0.5").name == "la-ce-0.5"
    assert parse_loss("kd-ls-0.10").teacher == "ls-0.1" and parse_loss("kd-ce").name == "kd-ce"
    assert [s.name for s in parse_losses("ce, ce,focal-2")] == ["ce", "focal-2"]
    assert [s.name for s in default_losses(imbalanced=False)] == list(BALANCED_LOSSES)
    assert [s.name for s in default_losses(imbalanced=True)] == list(IMBALANCED_LOSSES)
    assert [s.name for s in default_losses(imbalanced=False, distill=True)] == list(DISTILL_LOSSES)
    for bad in ("mse", "ls-1.5", "focal-", "ls-x", "", "kd-kd-ce", "kd-mse", "la-ce-0"):
        with pytest.raises(ValueError):
            parse_losses(bad)


def test_losses_match_pytorch_where_defined() -> None:
    g = torch.Generator().manual_seed(0)
    z = torch.randn(32, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 5, (32,), generator=g)
    counts = [50, 20, 10, 5, 2]
    torch.testing.assert_close(parse_loss("ce").build()(z, y), F.cross_entropy(z, y))
    torch.testing.assert_close(
        parse_loss("ls-0.1").build()(z, y), F.cross_entropy(z, y, label_smoothing=0.1)
    )
    w = 1.0 / torch.tensor(counts, dtype=torch.float64)
    w = w * 5 / w.sum()
    torch.testing.assert_close(
        parse_loss("weighted-ce").build(counts)(z, y), F.cross_entropy(z, y, weight=w)
    )
    # focal gamma=0 limit and ordering: focal <= CE per sample
    assert parse_loss("focal-2").build()(z, y) < F.cross_entropy(z, y)
    for name in ("flsd-53", "cp-0.1", "cb-focal"):
        v = parse_loss(name).build(counts)(z.requires_grad_(), y)
        assert torch.isfinite(v)
        v.backward()
    with pytest.raises(ValueError, match="class counts"):
        parse_loss("cb-focal").build(None)
    # logit-adjusted CE (Menon et al.): CE of z + tau * log(prior)
    prior = torch.tensor(counts, dtype=torch.float64) / sum(counts)
    for tau in (1.0, 0.5):
        torch.testing.assert_close(
            parse_loss(f"la-ce-{tau}").build(counts)(z, y), F.cross_entropy(z + tau * prior.log(), y)
        )
    with pytest.raises(ValueError, match="class counts"):
        parse_loss("la-ce").build(None)
    # distillation: tau^2 * KL(teacher_tau || student_tau) + const = tau^2 * CE(z / tau, t)
    t = torch.softmax(torch.randn(32, 5, generator=g, dtype=torch.float64) / KD_TEMPERATURE, 1)
    tau = KD_TEMPERATURE
    torch.testing.assert_close(
        parse_loss("kd-ce").build()(z, t),
        tau**2 * (F.kl_div(torch.log_softmax(z / tau, 1), t, reduction="batchmean")
                  - (t * t.log()).sum(1).mean()),
    )


def test_models() -> None:
    torch.manual_seed(0)
    m = build_model("mlp", 40, 10)
    assert sum(p.numel() for p in m.parameters()) == 40 * 256 + 256 + 256 * 256 + 256 + 2570
    assert build_model("linear", 4, 3)(torch.zeros(2, 4)).shape == (2, 3)
    # MNIST-1D's ConvBase: 3 conv layers of 25 channels, length 40 -> 19 -> 10 -> 5, Linear(125, K)
    cnn = build_model("cnn", 40, 10)
    convs = 1 * 25 * 5 + 25 + 2 * (25 * 25 * 3 + 25)
    assert sum(p.numel() for p in cnn.parameters()) == convs + 125 * 10 + 10
    for length in (3, 8, 40, 64):
        assert build_model("cnn", length, 4)(torch.zeros(5, length)).shape == (5, 4)
    for bad in ("resnet", "CNN"):
        with pytest.raises(ValueError, match="unknown model"):
            build_model(bad, 4, 3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="too short"):
        build_model("cnn", 2, 3)
