"""Training options of issue 20: MACs-uniform sampling, progressive shrinking, distillation temperature and chain."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from nestnas.errors import ConfigError
from nestnas.predictors.macs import count_macs
from nestnas.supernet import ElasticCNN, ElasticTransformer, SearchSpace
from nestnas.supernet.sampling import ATTENTIVE_POOL, PHASES, SCORE_ROWS, SubnetSampler, phase_masks, phase_of
from nestnas.supernet.train import TrainOptions, batch_losses, distill_loss, train_supernet


@pytest.fixture(scope="module")
def cnn():
    torch.manual_seed(0)
    return ElasticCNN(SearchSpace.mobilenet(), num_classes=10, in_channels=1)


def _macs(net, config):
    return count_macs(net.space, config, **net.spec())[0]


def test_macs_sampling_spreads_over_cost_where_choice_uniform_piles_up(cnn):
    rng = np.random.default_rng(0)
    lo, hi = _macs(cnn, cnn.space.smallest()), _macs(cnn, cnn.space.largest())
    macs = SubnetSampler(cnn, TrainOptions(4, sampling="macs", sandwich=1))
    drawn = np.array([_macs(cnn, macs.draw(2, rng)[2]) for _ in range(200)])
    uniform = np.array([_macs(cnn, cnn.space.sample(rng)) for _ in range(200)])
    share = (drawn - lo) / (hi - lo)  # uniform on [0, 1] if MACs are uniform
    assert abs(np.median(share) - 0.5) < 0.1 and (share > 0.75).mean() > 0.15
    assert ((uniform - lo) / (hi - lo) > 0.75).mean() < 0.05


def test_log_macs_sampling_is_uniform_in_log_cost(cnn):
    rng = np.random.default_rng(0)
    lo, hi = np.log(_macs(cnn, cnn.space.smallest())), np.log(_macs(cnn, cnn.space.largest()))
    sampler = SubnetSampler(cnn, TrainOptions(4, sampling="log-macs", sandwich=1))
    share = (np.log([_macs(cnn, sampler.draw(2, rng)[2]) for _ in range(200)]) - lo) / (hi - lo)
    # uniform on [0, 1] in log cost: each quarter gets about a quarter of the draws
    counts = np.histogram(share, bins=4, range=(0, 1))[0]
    assert counts.min() > 30 and abs(np.median(share) - 0.5) < 0.1, counts
    linear = SubnetSampler(cnn, TrainOptions(4, sampling="macs", sandwich=1))
    lin = (np.log([_macs(cnn, linear.draw(2, rng)[2]) for _ in range(200)]) - lo) / (hi - lo)
    assert (lin < 0.25).mean() < 0.05 < (share < 0.25).mean()  # linear MACs starve the small end


def test_attentive_sampling_trains_the_worst_of_equal_cost_candidates(cnn):
    rng, span = np.random.default_rng(0), np.log(_macs(cnn, cnn.space.largest()) / _macs(cnn, cnn.space.smallest()))
    sampler = SubnetSampler(cnn, TrainOptions(4, sampling="attentive", sandwich=2))
    scored = []

    def score(configs):  # a loss unrelated to cost, so the pick cannot be the nearest by accident
        losses = [float(np.random.default_rng(list(c.to_json().encode())).uniform()) for c in configs]
        scored.append((configs, losses))
        return losses

    for _ in range(30):
        step = sampler.draw(2, rng, score=score)
        groups, picks = scored[-2:], step[2:]
        assert len(picks) == 2
        for (configs, losses), pick in zip(groups, picks):
            assert len(configs) == ATTENTIVE_POOL and pick == configs[int(np.argmax(losses))]
            cost = np.log([_macs(cnn, c) for c in configs])
            assert cost.max() - cost.min() < 0.1 * span  # candidates of about one cost
    assert len(scored) == 60
    with pytest.raises(ConfigError, match="give draw\\(\\) a score"):
        sampler.draw(2, rng)


def test_batch_losses_score_on_the_first_rows_without_gradients():
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(64, 1, 8, 8, generator=g), torch.randint(0, 10, (64,), generator=g)
    torch.manual_seed(0)
    cnn = ElasticCNN(SearchSpace.mobilenet(), num_classes=10, in_channels=1).train()  # as in a training step
    configs = [cnn.space.smallest(), cnn.space.largest()]
    losses = batch_losses(cnn, x, y, configs)
    head = batch_losses(cnn, x[:SCORE_ROWS], y[:SCORE_ROWS], configs)
    with torch.no_grad():
        direct = [torch.nn.functional.cross_entropy(cnn(cnn.prepare_input(x[:SCORE_ROWS], c), c),
                                                    y[:SCORE_ROWS]).item() for c in configs]
    assert losses == head and np.allclose(losses, direct, rtol=1e-5) and losses[0] != losses[1]
    assert all(p.grad is None for p in cnn.parameters())


def test_attentive_sampling_is_refused_for_ray_training(cnn):
    loader = DataLoader(TensorDataset(torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,))), batch_size=4)
    with pytest.raises(ConfigError, match="sampling 'attentive' trains in one process only"):
        train_supernet(cnn, loader, epochs=1, sampling="attentive", ray_address="local:2", progress=False)


def test_step_resolution_runs_every_subnet_of_a_step_at_one_input_size(cnn):
    plain = SubnetSampler(cnn, TrainOptions(4, sandwich=3))
    step = SubnetSampler(cnn, TrainOptions(4, sandwich=3, step_resolution=True))
    seen, sizes = set(), cnn.space.resolution_choices
    for i in range(40):
        a, b = plain.draw(1, np.random.default_rng(i)), step.draw(1, np.random.default_rng(i))
        assert a[0].resolution == max(sizes) and a[1].resolution == min(sizes)
        assert len({c.resolution for c in b}) == 1
        seen.add(b[0].resolution)
        # only the input size moves: the architectures are the ones the plain sampler draws
        assert [dict(c.to_dict(), resolution=0) for c in a] == [dict(c.to_dict(), resolution=0) for c in b]
    assert seen == set(sizes)


def test_recipe_defaults_fill_what_the_caller_leaves_out(cnn, monkeypatch):
    import dataclasses

    from nestnas.predictors import macs
    from nestnas.supernet.train import SCRATCH, _sampling_defaults

    recipe = dataclasses.replace(SCRATCH, sampling="log-macs", progressive=True)
    assert _sampling_defaults(cnn, recipe, None, None, False) == ("log-macs", True)
    assert _sampling_defaults(cnn, recipe, "uniform", False, False) == ("uniform", False)  # the caller wins
    assert _sampling_defaults(cnn, recipe, None, None, True) == ("uniform", False)  # a ladder draws its rungs

    def cannot(*a, **k):
        raise NotImplementedError("no MACs for this family")

    monkeypatch.setattr(macs, "count_macs_encoded", cannot)
    assert _sampling_defaults(cnn, recipe, None, None, False) == ("uniform", True)  # no MACs: choices uniform
    with pytest.raises(ConfigError, match="cannot be counted"):  # asked for explicitly: an error, not a fallback
        SubnetSampler(cnn, TrainOptions(2, sampling="log-macs"))


def test_previous_rung_distillation_orders_each_step_largest_first(cnn):
    sampler = SubnetSampler(cnn, TrainOptions(4, sandwich=3, distill_from="previous"))
    rng = np.random.default_rng(1)
    for _ in range(20):
        configs = sampler.draw(1, rng)
        assert configs[0] == cnn.space.largest() and configs[1] == cnn.space.smallest()
        rest = [_macs(cnn, c) for c in configs[2:]]
        assert rest == sorted(rest, reverse=True)


def test_progressive_shrinking_opens_the_space_in_phases(cnn):
    sampler = SubnetSampler(cnn, TrainOptions(8, progressive=True))
    assert [phase_of(e, 8) for e in range(8)] == [0, 1, 2, 2, 3, 3, 3, 3]
    rng = np.random.default_rng(2)
    assert sampler.draw(0, rng) == [cnn.space.largest()]
    top = cnn.space.upper_bounds()
    groups = {1: {"kernel"}, 2: {"kernel", "depth"}}
    from nestnas.supernet.sampling import choice_group

    for epoch, phase in ((1, 1), (2, 2)):
        for config in sampler.draw(epoch, rng):
            x = cnn.space.encode(config)
            for var, idx, hi in zip(cnn.space.variables(), x, top):
                if choice_group(var) not in groups[phase]:
                    assert idx == hi, (PHASES[phase], var.name)
    assert any(c != cnn.space.largest() for c in sampler.draw(5, rng)[2:])


def test_a_family_without_kernels_skips_that_phase():
    space = ElasticTransformer(SearchSpace.transformer(), num_classes=10, num_tokens=8, token_dim=8).space
    masks = phase_masks(space)
    assert not masks[0].any() and masks[1].any() and (masks[1] == masks[2]).all() and masks[3].all()


def test_temperature_softens_and_rescales_the_distillation_loss():
    torch.manual_seed(0)
    s, t = torch.randn(16, 10), torch.randn(16, 10) * 3
    assert distill_loss(s, t, temperature=1.0) == pytest.approx(distill_loss(s, t).item())
    t2 = distill_loss(s, t, temperature=2.0)
    manual = torch.nn.functional.kl_div(torch.log_softmax(s / 2, 1), torch.softmax(t / 2, 1),
                                        reduction="batchmean") * 4
    assert t2.item() == pytest.approx(manual.item(), rel=1e-6)
    assert distill_loss(t, t, temperature=3.0).item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("options, words", [
    (dict(sampling="cost"), "'sampling' is 'cost'; allowed: ['uniform', 'macs', 'log-macs', 'attentive']"),
    (dict(distill_from="teacher"), "'distill_from' is 'teacher'; allowed: ['largest', 'previous']"),
    (dict(distill_temperature=0.0), "'distill_temperature' must be positive"),
    (dict(sorted_ladder=True, sampling="macs"), "cannot be combined"),
    (dict(sorted_ladder=True, progressive=True), "cannot be combined"),
])
def test_bad_training_options_name_the_option(options, words):
    with pytest.raises(ConfigError) as exc:
        TrainOptions(2, **options)
    assert words in str(exc.value)


class _Killed(Exception):
    pass


def _kill_after_2(epoch, metrics):
    if epoch >= 2:
        raise _Killed


@pytest.mark.parametrize("options", [dict(sampling="macs"), dict(sampling="log-macs", progressive=True),
                                     dict(progressive=True), dict(step_resolution=True, sorted_ladder=True),
                                     dict(distill_from="previous", distill_temperature=2.0),
                                     dict(sampling="attentive", step_resolution=True)])
def test_every_option_trains_and_resumes_bit_identically(options, tmp_path):
    g = torch.Generator().manual_seed(0)
    loader = DataLoader(TensorDataset(torch.randn(64, 1, 8, 8, generator=g), torch.randint(0, 10, (64,), generator=g)),
                        batch_size=32, shuffle=True)

    def net(seed=0):
        torch.manual_seed(seed)
        return ElasticCNN(SearchSpace.mobilenet(), num_classes=10, in_channels=1)

    straight = net()
    train_supernet(straight, loader, epochs=4, progress=False, **options)
    ckpt = tmp_path / "run.ckpt"
    with pytest.raises(_Killed):  # killed after epoch 2 of 4: progressive shrinking is mid-way
        train_supernet(net(), loader, epochs=4, progress=False, checkpoint=ckpt, callbacks=[_kill_after_2], **options)
    resumed = net(seed=9)
    result = train_supernet(resumed, loader, epochs=4, progress=False, checkpoint=ckpt, **options)
    assert result.resumed_from_epoch == 2
    for (k, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), k
    with pytest.raises(Exception, match="other options"):  # the options are part of the run
        train_supernet(net(), loader, epochs=4, progress=False, checkpoint=ckpt)
