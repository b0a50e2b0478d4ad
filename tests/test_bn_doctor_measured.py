"""The BN doctor's measured diagnosis (d2norm.doctor_measured) against float64 computations written here from the
definitions (rethinking §3.1 Fig. 2, §4, §5.2, §6.1; estimation-shift Def. 2), on tiny models whose answer is
known: a BN shared by two "levels" with different input statistics, an R-CNN-like head whose RoIs of one image
are alike, buffers that are non-finite or too large for float16."""
import pytest
import torch
from torch import nn

from d2norm.doctor_measured import FP16_MAX, THRESHOLDS, diagnose_measured, measure


LEVELS = ((1, 0), (3, 8), (0.5, -1))


class SharedHead(nn.Module):
    """One BN called on three levels: the input as it is, scaled by 3 and shifted by 8, halved and shifted by -1."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        return sum(self.bn(self.conv(x * s + t)).sum() for s, t in LEVELS)


class RoIHead(nn.Module):
    """``roi_heads.bn`` over the RoIs of all images of a batch (a list of per-image (R, C, 1, 1) tensors)."""

    def __init__(self):
        super().__init__()
        self.roi_heads = nn.Module()
        self.roi_heads.bn = nn.BatchNorm2d(4)

    def forward(self, images):
        return self.roi_heads.bn(torch.cat(images)).sum()


def _batches(seed=0, k=3):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(5, 3, 4, 4, generator=g) * 2 + 1 for _ in range(k)]


def test_level_divergence_and_gaps_equal_float64_definitions():
    torch.manual_seed(0)
    model = SharedHead().train()
    with torch.no_grad():
        model.bn.running_mean.uniform_(-1, 1), model.bn.running_var.uniform_(0.5, 2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    batches = _batches()
    res = measure(model, batches, num_batches=3)["bn"]
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # nothing changed
    # float64 reference: per level, the conv outputs over every batch
    w, b = model.conv.weight.detach().double(), model.conv.bias.detach().double()
    levels = [[torch.nn.functional.conv2d(x.double() * s + t, w, b) for x in batches] for s, t in LEVELS]
    flat = [torch.cat([y.transpose(0, 1).reshape(4, -1) for y in lv], 1) for lv in levels]
    pooled = torch.cat(flat, 1)
    mu, sigma = pooled.mean(1), pooled.var(1, unbiased=False).sqrt()
    expected = max(float((f.mean(1) - mu).norm()) for f in flat) / float(sigma.norm())
    assert res["calls"] == 3 and res["level_divergence"] == pytest.approx(expected, rel=1e-6)  # the model runs float32
    expected_std = max(float((f.var(1, unbiased=False).sqrt() - sigma).norm()) for f in flat) / float(sigma.norm())
    assert expected_std > 0.1 and res["level_std_divergence"] == pytest.approx(expected_std, rel=1e-5)
    per_call = res["per_call"]
    assert per_call["mean_shift"] == pytest.approx(
        [float((f.mean(1) - mu).norm()) / float(sigma.norm()) for f in flat], rel=1e-5)
    assert per_call["std_shift"] == pytest.approx(
        [float((f.var(1, unbiased=False).sqrt() - sigma).norm()) / float(sigma.norm()) for f in flat], rel=1e-5)
    assert per_call["element_share"] == pytest.approx([f.shape[1] / pooled.shape[1] for f in flat])
    # Def. 2 / Fig. 2: EMA vs population (unbiased σ, torch's running_var convention), per-batch spread
    n = pooled.shape[1]
    pop_sigma_u = (pooled.var(1, unbiased=False) * n / (n - 1)).sqrt()
    ema_mu, ema_sigma = model.bn.running_mean.double(), model.bn.running_var.double().sqrt()
    assert res["mean_gap"] == pytest.approx(float((ema_mu - mu).norm()), rel=1e-5)
    assert res["std_gap"] == pytest.approx(float((ema_sigma - pop_sigma_u).norm()), rel=1e-5)
    per_batch = [torch.cat([lv[i].transpose(0, 1).reshape(4, -1) for lv in levels], 1) for i in range(3)]
    spread = sum(float((p.mean(1) - mu).norm()) for p in per_batch) / 3
    assert res["batch_mean_spread"] == pytest.approx(spread, rel=1e-5)
    assert res["rel_batch_mean_spread"] == pytest.approx(spread / float(ema_sigma.norm()), rel=1e-5)
    findings = {f.code: f for f in diagnose_measured({"bn": res})}
    assert expected > THRESHOLDS["level_divergence"] and "level_divergence" in findings


def test_roi_within_image_ratio_equals_float64_definition():
    g = torch.Generator().manual_seed(1)
    # 2 images x 6 RoIs: each image's RoIs share a per-image offset, so between-image variance dominates
    batches = [[torch.randn(6, 4, 1, 1, generator=g) * 0.3 + torch.randn(1, 4, 1, 1, generator=g) * 3
                for _ in range(2)] for _ in range(2)]
    model = RoIHead().train()
    res = measure(model, batches, num_batches=2)["roi_heads.bn"]
    ratios = []
    for imgs in batches:
        x = torch.stack([i.double().reshape(6, 4) for i in imgs])  # (images, RoIs, C)
        between = x.mean(1).var(0, unbiased=False)
        total = x.reshape(12, 4).var(0, unbiased=False)
        ratios.append(float((between / total).mean()))
    assert res["roi_within_image"] == pytest.approx(sum(ratios) / 2, rel=1e-9)
    assert res["roi_within_image"] > THRESHOLDS["roi_within_image"]
    assert "roi_within_image" in {f.code for f in diagnose_measured({"roi_heads.bn": res})}
    # independent RoIs (no per-image offset): the ratio is small and no finding
    flat = [[torch.randn(6, 4, 1, 1, generator=g) for _ in range(2)] for _ in range(2)]
    low = measure(RoIHead().train(), flat, num_batches=2)["roi_heads.bn"]["roi_within_image"]
    assert low < THRESHOLDS["roi_within_image"]


class SampledRoIHead(RoIHead):
    """R-CNN-like RoI sampling: training normalizes the first 3 RoIs of each image, inference all 6 of one image,
    shifted by 2 and scaled by 1.5 -- the proposals at inference follow another distribution. A second norm
    ``roi_heads.bn2`` takes the first one's output through a ReLU (its input depends on how ``bn`` normalized)."""

    def __init__(self):
        super().__init__()
        self.roi_heads.bn2 = nn.BatchNorm2d(4)
        with torch.no_grad():  # EMA statistics far from any batch's: batch and EMA normalization differ
            self.roi_heads.bn.running_mean.fill_(-3.0)

    def forward(self, images):
        x = torch.cat([i[:3] for i in images]) if self.training else torch.cat([i * 1.5 + 2 for i in images])
        return self.roi_heads.bn2(self.roi_heads.bn(x).relu()).sum()


def test_inference_roi_batches_against_training_ones_equal_float64_definitions():
    g = torch.Generator().manual_seed(2)
    batches = [[torch.randn(6, 4, 2, 2, generator=g) * 2 + 1 for _ in range(2)] for _ in range(3)]
    model = SampledRoIHead().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    res = measure(model, batches, num_batches=3)["roi_heads.bn"]
    assert model.training and model.roi_heads.bn.training  # eval mode of the pass undone
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())

    def moments(x):  # (R, C, H, W) -> per-channel mean, σ (population) in float64
        f = x.double().transpose(0, 1).reshape(4, -1)
        return f.mean(1), f.var(1, unbiased=False).sqrt()

    train = [torch.cat([i[:3] for i in imgs]) for imgs in batches]          # one normalization batch per forward
    inference = [i * 1.5 + 2 for imgs in batches for i in imgs]             # one image per forward
    mu, sigma = moments(torch.cat(train))
    scale = float(sigma.norm())
    mu_inf, sigma_inf = moments(torch.cat(inference))
    assert res["inference_mean_shift"] == pytest.approx(float((mu_inf - mu).norm()) / scale, rel=1e-9)
    assert res["inference_std_shift"] == pytest.approx(float((sigma_inf - sigma).norm()) / scale, rel=1e-9)
    for key, calls in (("inference", inference), ("training", train)):
        per = [moments(x) for x in calls]
        assert res[f"{key}_batch_mean_spread"] == pytest.approx(
            sum(float((m - mu).norm()) for m, _ in per) / len(per) / scale, rel=1e-9)
        assert res[f"{key}_batch_std_spread"] == pytest.approx(
            sum(float((s - sigma).norm()) for _, s in per) / len(per) / scale, rel=1e-9)
    assert res["inference_rois"] == 6 and res["training_rois"] == 6
    assert res["calls"] == 1 and "level_divergence" not in res  # the inference forwards stay out of the per-call sums
    # bn2 at inference sees bn's output with each image's RoIs normalized by their own statistics (batch-statistics
    # inference), not by bn's EMA
    def batch_normalized_relu(x):
        xd = x.double()
        m = xd.mean((0, 2, 3), keepdim=True)
        v = xd.var((0, 2, 3), unbiased=False, keepdim=True)
        return ((xd - m) / (v + model.roi_heads.bn.eps).sqrt()).relu()

    mu2, sigma2 = moments(torch.cat([batch_normalized_relu(x) for x in train]))
    per2 = [moments(batch_normalized_relu(x)) for x in inference]
    res2 = measure(model, batches, num_batches=3)["roi_heads.bn2"]
    assert res2["inference_batch_mean_spread"] == pytest.approx(
        sum(float((m - mu2).norm()) for m, _ in per2) / len(per2) / float(sigma2.norm()), rel=1e-5)
    assert res["inference_batch_mean_spread"] > res["training_batch_mean_spread"] + 0.5
    assert "inference_roi_shift" in {f.code for f in diagnose_measured({"roi_heads.bn": res})}
    # the same distribution at inference (RoIHead: every RoI in both modes): the shift is small and no finding
    same = measure(RoIHead().train(), batches, num_batches=3)["roi_heads.bn"]
    assert same["inference_mean_shift"] < 1e-9 and same["inference_rois"] == 6 and same["training_rois"] == 12
    assert "inference_roi_shift" not in {f.code for f in diagnose_measured({"roi_heads.bn": same})}
    assert "inference_mean_shift" not in measure(RoIHead().train(), batches, 3, inference_fn=None)["roi_heads.bn"]


def test_buffers_nonfinite_is_an_error_and_fp16_overflow_a_warning_with_amp():
    model = SharedHead().train()
    with torch.no_grad():
        model.bn.running_var[0] = 70000.0  # E[x²] above float16's max
    res = measure(model, _batches(), 1)["bn"]
    assert res["second_moment_max"] == pytest.approx(70000.0 + float(model.bn.running_mean[0]) ** 2)
    assert res["second_moment_max"] > FP16_MAX and not res["nonfinite"]
    codes = {f.code: f.severity for f in diagnose_measured({"bn": res}, amp=True)}
    assert codes["fp16_overflow"] == "warning"
    with torch.no_grad():
        model.bn.running_mean[1] = float("nan")
    res = measure(model, _batches(), 1)["bn"]
    assert res["nonfinite"] and "mean_gap" not in res  # no comparison against a NaN EMA
    assert {f.code: f.severity for f in diagnose_measured({"bn": res})}["nonfinite_buffers"] == "error"


def test_no_finding_on_a_well_estimated_layer():
    """Population statistics recomputed exactly (PreciseBN over the same batches) and one call per forward:
    no EMA, level or buffer finding."""
    from d2norm.stats import recompute_population_stats

    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)).train()
    batches = _batches(k=4)
    recompute_population_stats(model, iter(batches), 20, progress=False)
    res = measure(model, batches, 4)
    codes = {f.code for f in diagnose_measured(res)}
    assert not codes & {"ema_outside_batches", "level_divergence", "nonfinite_buffers", "fp16_overflow"}, codes


class DomainHead(nn.Module):
    """A DomainBN fed every level at once through ``forward_domains`` (rethinking §5.2, DomainBNRetinaNet's way)."""

    def __init__(self):
        super().__init__()
        from d2norm.layers import DomainBatchNorm2d

        self.conv = nn.Conv2d(3, 4, 1)
        self.bn = DomainBatchNorm2d(4, num_domains=3)

    def forward(self, x):
        return sum(y.sum() for y in self.bn.forward_domains([self.conv(x * s + t) for s, t in LEVELS]))


def test_level_divergence_of_a_domain_bn_fed_through_forward_domains():
    torch.manual_seed(0)
    model = DomainHead().train()
    batches = _batches()
    res = measure(model, batches, num_batches=3)["bn"]
    w, b = model.conv.weight.detach().double(), model.conv.bias.detach().double()
    flat = [torch.cat([torch.nn.functional.conv2d(x.double() * s + t, w, b).transpose(0, 1).reshape(4, -1)
                       for x in batches], 1) for s, t in LEVELS]
    pooled = torch.cat(flat, 1)
    mu, sigma = pooled.mean(1), pooled.var(1, unbiased=False).sqrt()
    expected = max(float((f.mean(1) - mu).norm()) for f in flat) / float(sigma.norm())
    assert res["calls"] == 3 and res["level_divergence"] == pytest.approx(expected, rel=1e-6)
    expected_std = max(float((f.var(1, unbiased=False).sqrt() - sigma).norm()) for f in flat) / float(sigma.norm())
    assert res["level_std_divergence"] == pytest.approx(expected_std, rel=1e-5)


def test_mabn_gaps_equal_float64_definitions():
    """MABN keeps no mean/variance pair: its gaps are measured on χ = sqrt(E[x²] + ε) (mabn eq 15) in units of
    ||χ̂|| (running_chi), and its buffer check reads χ̂² (the doctor used to leave MABN layers blank)."""
    from d2norm.layers.mabn import MABN2d

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 1)
            self.bn = MABN2d(4, buffer_size=4, momentum=0.98, clip=5.0, warmup_iters=0, eps=1e-5, schedule="paper")

        def forward(self, x):
            return self.bn(self.conv(x)).sum()

    torch.manual_seed(0)
    model = Net().train()
    with torch.no_grad():
        model.bn.running_chi.uniform_(0.5, 3)
    batches = _batches()
    res = measure(model, batches, num_batches=3)["bn"]
    w, b = model.conv.weight.detach().double(), model.conv.bias.detach().double()
    ys = [torch.nn.functional.conv2d(x.double(), w, b).transpose(0, 1).reshape(4, -1) for x in batches]
    chi_pop = (torch.cat(ys, 1).square().mean(1) + 1e-5).sqrt()
    chi_ema = model.bn.running_chi.double()
    assert res["std_gap"] == pytest.approx(float((chi_ema - chi_pop).norm()), rel=1e-5)
    assert res["rel_std_gap"] == pytest.approx(float((chi_ema - chi_pop).norm() / chi_ema.norm()), rel=1e-5)
    spread = sum(float(((y.square().mean(1) + 1e-5).sqrt() - chi_pop).norm()) for y in ys) / 3
    assert res["rel_batch_std_spread"] == pytest.approx(spread / float(chi_ema.norm()), rel=1e-5)
    assert res["second_moment_max"] == pytest.approx(float(chi_ema.square().max()), rel=1e-6)
    assert "rel_mean_gap" not in res  # no centering, no mean to compare
