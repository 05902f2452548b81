import pytest
import torch

from fmnist.models.networks import REGISTRY, count_parameters, create_model, model_config


@pytest.mark.parametrize("name", list(REGISTRY))
def test_shapes_no_nan_every_param_gets_grad(name):
    torch.manual_seed(0)
    m = create_model(name)
    x = torch.rand(4, 1, 28, 28)
    out = m(x)
    assert out.shape == (4, 10) and torch.isfinite(out).all()
    out.logsumexp(1).sum().backward()
    missing = [n for n, p in m.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing


def test_space_to_depth_stem_has_no_28x28_map_and_rejects_other_patches():
    m = create_model("fast", {"stem_patch": 2}).eval()
    sizes = []
    hooks = [mod.register_forward_hook(lambda _m, _i, o: sizes.append(o.shape[-1])) for mod in m.features]
    assert m(torch.rand(2, 1, 28, 28)).shape == (2, 10)
    assert max(sizes) == 14  # pixel-unshuffle first: every map is 14x14 or smaller
    for h in hooks:
        h.remove()
    with pytest.raises(ValueError, match="stem_patch"):
        create_model("fast", {"stem_patch": 3})


def test_wrn_first_stage_runs_at_full_resolution():
    """stem_pool=False (wrn): no pooling after the stem, stages at 28, 14 and 7 pixels, then 4."""
    m = create_model("wrn", {"stem": 4, "widths": (4, 4, 4)}).eval()
    assert model_config("wrn")["stem_pool"] is False and model_config("wide")["stem_pool"] is True
    assert m.forward_features(torch.rand(2, 1, 28, 28)).shape == (2, 4, 4, 4)
    assert sum(isinstance(mod, torch.nn.MaxPool2d) for mod in m.features) == 3


def test_seed_matches_keras_parameter_count():
    # Keras model.summary() of the assignment's network: 356,234 trainable parameters.
    assert count_parameters(create_model("seed")) == 356_234


def test_seed_feature_map_sizes_follow_keras_same_pooling():
    m = create_model("seed").eval()
    f = m.forward_features(torch.rand(2, 1, 28, 28))
    assert f.shape == (2, 128, 4, 4)  # 28 -> 14 -> 7 -> 4


def test_model_normalises_inside():
    m = create_model("seed").eval()
    assert torch.allclose(m.norm(torch.full((1, 1, 2, 2), 0.2860)), torch.zeros(1, 1, 2, 2), atol=1e-6)


def test_unknown_model_and_config_keys_rejected():
    with pytest.raises(ValueError, match="unknown model"):
        create_model("nope")
    with pytest.raises(ValueError, match="unknown FastConfig keys"):
        model_config("fast", {"widht": 3})


def test_flip_tta_gives_the_same_answer_for_one_image_as_in_a_batch():
    """Small batches run image and mirror as one batch of 2N (FlipTTA.JOINT_BELOW): the same
    function as the two calls larger batches make, image by image."""
    from fmnist.models.networks import FlipTTA

    torch.manual_seed(0)
    net = FlipTTA(create_model("fast").eval())
    x = torch.rand(6, 1, 28, 28)
    with torch.no_grad():
        together = net(x)                                  # 6 >= JOINT_BELOW: two calls
        alone = torch.cat([net(x[i:i + 1]) for i in range(6)])
        pairs = torch.cat([net(x[i:i + 2]) for i in range(0, 6, 2)])
        by_hand = (net.model(x) + net.model(x.flip(3))) / 2
    assert len(x) >= FlipTTA.JOINT_BELOW > 2
    for got in (alone, pairs, together):
        assert torch.allclose(got, by_hand, atol=1e-5), (got - by_hand).abs().max()


def test_bench_summary_medians_and_unreached_thresholds():
    from fmnist.bench.runner import _summarise

    runs = [{"final_test_acc": a, "wall_seconds": w, "time_to": {"0.92": t92, "0.93": t93, "0.94": None}}
            for a, w, t92, t93 in [(0.931, 100, 50, 90), (0.935, 110, 40, None), (0.933, 105, 45, 95)]]
    s = _summarise(runs)
    assert s["final_test_acc_median"] == 0.933 and s["wall_seconds_median"] == 105
    assert s["time_to_0.92_median"] == 45 and s["time_to_0.93_median"] == 95
    assert s["time_to_0.93_reached"] == "2/3" and s["time_to_0.94_median"] is None  # not reached: null in JSON


def test_bench_seeds_parse_and_append_merges_by_preset_and_seed():
    from fmnist.bench.runner import merge_accuracy, parse_seeds

    assert parse_seeds("3") == [0, 1, 2] and parse_seeds("1,2") == [1, 2]
    for bad in ("0", "x", "1,1", "-1,2"):
        with pytest.raises(ValueError, match="--seeds"):
            parse_seeds(bad)

    def run(seed, acc):
        return {"seed": seed, "final_test_acc": acc, "wall_seconds": 10.0,
                "time_to": {"0.92": 5.0, "0.93": None, "0.94": None}}

    old = {"best-cpu*1": {"runs": [run(0, 0.940)]}, "fast": {"runs": [run(0, 0.93), run(1, 0.94)]}}
    new = {"best-cpu": {"runs": [run(2, 0.950), run(1, 0.944)]}, "fast": {"runs": [run(1, 0.935)]}}
    m = merge_accuracy(old, new)
    assert [r["seed"] for r in m["best-cpu"]["runs"]] == [0, 1, 2]
    assert m["best-cpu"]["summary"]["n"] == 3 and m["best-cpu"]["summary"]["final_test_acc_median"] == 0.944
    # a seed measured again replaces its old run
    assert [r["final_test_acc"] for r in m["fast"]["runs"]] == [0.93, 0.935]


@pytest.mark.parametrize("name", ["seed", "fast"])
def test_forward_penultimate_is_what_the_last_linear_reads(name):
    torch.manual_seed(0)
    m = create_model(name).eval()
    x = torch.rand(3, 1, 28, 28)
    f = m.forward_penultimate(x)
    last = m.head[-1] if name == "seed" else m.fc
    assert f.shape == (3, last.in_features)
    assert torch.allclose(last(f), m(x), atol=1e-5)
