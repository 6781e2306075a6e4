import torch

from speedq_core.quant import QuantScheme, clip_error, quantize_weight, search_clip

SCHEME = QuantScheme.parse("w2g16")


def data():
    torch.manual_seed(0)
    w = torch.randn(8, 64) * 0.05
    x = torch.randn(256, 64)
    return w, x


def test_search_never_scores_worse_than_no_clip():
    w, x = data()
    clip_min, clip_max = search_clip(w, x, SCHEME, rows_per_chunk=3)
    assert clip_min.shape == clip_max.shape == (8, 4)
    searched = clip_error(w, x, SCHEME, clip_min, clip_max)
    plain = clip_error(w, x, SCHEME)
    assert (searched <= plain).all() and (searched < plain).any()
    assert (clip_min >= w.view(8, 4, 16).amin(-1)).all() and (clip_max <= w.view(8, 4, 16).amax(-1)).all()


def test_planted_outlier_is_clipped_and_layer_error_drops():
    w, x = data()
    w[2, 5] = 0.2                            # a mild outlier that costs the group's resolution at 2 bits
    clip_min, clip_max = search_clip(w, x, SCHEME)
    assert clip_max[2, 0] < 0.2
    err = {}
    for label, bounds in (("none", (None, None)), ("searched", (clip_min, clip_max))):
        w_hat = quantize_weight(w, SCHEME, *bounds).dequantize()
        err[label] = ((x @ w_hat.t() - x @ w.t()) ** 2).sum().item()
    print(f"layer output error: no clip {err['none']:.3f}, searched clip {err['searched']:.3f}")
    assert err["searched"] < err["none"]


def test_asymmetric_bounds_shrink_independently():
    w, x = data()
    w[0, :16] = torch.linspace(0, 1, 16) ** 4   # long upper tail only
    clip_min, clip_max = search_clip(w, x, SCHEME)
    assert clip_min[0, 0] == w[0, :16].min() and clip_max[0, 0] < w[0, :16].max()
