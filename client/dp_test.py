"""Tests of the site's DP-SGD: stage noise and the Opacus wrapping."""

from __future__ import annotations

import pytest
import torch
from opacus.accountants import RDPAccountant
from opacus.data_loader import DPDataLoader
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from client.dp import make_private, stage_noise_multiplier, steps_for

DELTA = 1e-5


def reference_epsilon(history: list[tuple[float, float, int]], delta: float = DELTA) -> float:
    """Epsilon of an Opacus accountant that was stepped through ``history`` one step at a time."""
    accountant = RDPAccountant()
    for noise, rate, steps in history:
        for _ in range(steps):
            accountant.step(noise_multiplier=noise, sample_rate=rate)
    return float(accountant.get_epsilon(delta=delta))


@pytest.mark.parametrize(("n", "batch", "epochs"), [(60, 10, 2), (65, 10, 1), (93, 1, 1)])
def test_steps_for_matches_the_batches_of_opacus_dp_data_loader(
    n: int, batch: int, epochs: int
) -> None:
    # Prepare: the Poisson loader Opacus builds from a plain loader
    loader = DataLoader(TensorDataset(torch.zeros(n, 1)), batch_size=batch)
    dp_loader = DPDataLoader.from_data_loader(loader)
    # Execute
    sample_rate, steps = steps_for(n, batch, epochs)
    # Assert: the same rate and epochs x batches per epoch
    assert sample_rate == dp_loader.sample_rate == 1 / len(loader)
    assert steps == epochs * len(dp_loader)
    if n % batch == 0:
        assert sample_rate == pytest.approx(batch / n, rel=1e-12)


def test_stage_noise_reaches_the_target_over_all_rounds() -> None:
    # Prepare
    target, rate, steps = 3.0, 0.05, 300
    # Execute
    noise = stage_noise_multiplier(
        target_epsilon=target, delta=DELTA, sample_rate=rate, total_steps=steps
    )
    more_rounds = stage_noise_multiplier(
        target_epsilon=target, delta=DELTA, sample_rate=rate, total_steps=2 * steps
    )
    # Assert: within Opacus' tolerance below the target; more steps need more noise
    epsilon = reference_epsilon([(noise, rate, steps)])
    assert target - 0.01 <= epsilon <= target
    assert more_rounds > noise
    with pytest.raises(ValueError, match=r"raise privacy\.target_epsilon"):
        stage_noise_multiplier(target_epsilon=1e-9, delta=DELTA, sample_rate=1.0, total_steps=10**6)


def test_make_private_clips_each_sample_like_a_hand_written_step() -> None:
    # Prepare: one full-batch step without noise and a small clipping norm
    torch.manual_seed(0)
    x, y = torch.randn(4, 3), torch.randn(4, 1)
    model = nn.Linear(3, 1, bias=False)
    w0 = model.weight.detach().clone()
    loader = DataLoader(TensorDataset(x, y), batch_size=4)
    lr, clip = 0.5, 0.3
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    # Execute
    net, dp_opt, dp_loader = make_private(
        model, optimizer, loader, noise_multiplier=0.0, max_grad_norm=clip, poisson_sampling=False
    )
    for xb, yb in dp_loader:
        dp_opt.zero_grad()
        nn.functional.mse_loss(net(xb), yb).backward()
        dp_opt.step()
    # Assert: per-sample gradients 2 (w.x - y) x, clipped to `clip`, summed, / batch size
    grads = 2 * (x @ w0.T - y) * x
    factors = (clip / (grads.norm(dim=1, keepdim=True) + 1e-6)).clamp(max=1.0)
    expected = w0 - lr * (grads * factors).sum(0, keepdim=True) / 4
    assert net._module is model
    assert set(net._module.state_dict()) == {"weight"}
    with pytest.raises(ValueError, match="to_standard_module"):
        make_private(model, optimizer, loader, noise_multiplier=1.0, max_grad_norm=1.0)
    torch.testing.assert_close(model.weight.detach(), expected, rtol=1e-5, atol=1e-6)


def test_an_empty_first_poisson_batch_keeps_the_samples_structure() -> None:
    # dictionary samples, as the site's datasets yield them
    import torch
    from torch.utils.data import DataLoader

    samples = [{"image": torch.randn(1, 4, 4), "cls:label": torch.tensor(i % 2)} for i in range(6)]
    model = torch.nn.Linear(16, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    loader: DataLoader = DataLoader(samples, batch_size=2)  # type: ignore[arg-type]
    _, _, dp_loader = make_private(
        model, optimizer, loader, noise_multiplier=1.0, max_grad_norm=1.0
    )
    # Act: the very first batch drawn is empty (Opacus used to fail on dict samples here)
    batch = dp_loader.collate_fn([])  # type: ignore[misc]
    # Assert: zero-size tensors of the samples' shapes and dtypes, no values
    assert set(batch) == {"image", "cls:label"}
    assert tuple(batch["image"].shape) == (0, 1, 4, 4) and batch["image"].dtype == torch.float32
    assert tuple(batch["cls:label"].shape) == (0,) and batch["cls:label"].dtype == torch.int64


def test_make_private_draws_the_batches_and_secure_noise_from_the_callers_generator() -> None:
    # Prepare: zero inputs (zero gradients) so that a step moves the weights by the noise only
    torch.manual_seed(0)
    data = TensorDataset(torch.zeros(8, 3), torch.zeros(8, 1), torch.arange(8))
    model = nn.Linear(3, 1, bias=False)
    w0 = model.weight.detach().clone()
    lr, noise, clip = 0.5, 1.3, 0.7
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    # Execute: one Poisson batch and one step, everything random from a seeded generator
    net, dp_opt, dp_loader = make_private(
        model,
        optimizer,
        DataLoader(data, batch_size=4),
        noise_multiplier=noise,
        max_grad_norm=clip,
        generator=torch.Generator().manual_seed(11),
    )
    xb, yb, indices = next(iter(dp_loader))
    dp_opt.zero_grad()
    nn.functional.mse_loss(net(xb), yb).backward()
    dp_opt.step()
    # Assert: the same generator, replayed: the loader's base seed (drawn by iter()), the
    # batch is its Poisson mask at rate 1/2, then Opacus' secure-mode noise (one draw thrown
    # away, the mean of 4 draws times 2) divided by the expected batch size 8 x 1/2
    replay = torch.Generator().manual_seed(11)
    torch.empty((), dtype=torch.int64).random_(generator=replay)
    mask = torch.rand(8, generator=replay) < 0.5
    std = noise * clip
    torch.normal(mean=0, std=std, size=(1, 1), generator=replay)
    drawn = torch.zeros(1, 3)
    for _ in range(4):
        drawn += torch.normal(mean=0, std=std, size=(1, 3), generator=replay)
    assert indices.tolist() == mask.nonzero().flatten().tolist()
    assert dp_opt.secure_mode and dp_opt.expected_batch_size == 4
    torch.testing.assert_close(model.weight.detach(), w0 - lr * (drawn / 2) / 4)


def test_make_private_steps_as_opacus_privacy_engine_which_cannot_take_the_generator() -> None:
    from opacus import PrivacyEngine

    # Prepare: the same model, data and optimiser twice; no noise, a small clipping norm
    def objects() -> tuple[nn.Module, torch.optim.Optimizer, DataLoader[tuple[torch.Tensor, ...]]]:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1))
        data = TensorDataset(torch.randn(6, 3), torch.randn(6, 1))
        return model, torch.optim.SGD(model.parameters(), lr=0.5), DataLoader(data, batch_size=3)

    def step(net: nn.Module, dp_opt: torch.optim.Optimizer, loader: DataLoader) -> None:
        for xb, yb in loader:
            dp_opt.zero_grad()
            nn.functional.mse_loss(net(xb), yb).backward()
            dp_opt.step()

    ours, theirs = objects(), objects()
    # Execute
    net, dp_opt, loader = make_private(
        *ours, noise_multiplier=0.0, max_grad_norm=0.1, poisson_sampling=False
    )
    step(net, dp_opt, loader)
    with pytest.warns(UserWarning, match="Secure RNG turned off"):
        engine = PrivacyEngine(accountant="rdp")
    engine_net, engine_opt, engine_loader = engine.make_private(
        module=theirs[0],
        optimizer=theirs[1],
        data_loader=theirs[2],
        noise_multiplier=0.0,
        max_grad_norm=0.1,
        poisson_sampling=False,
    )
    step(engine_net, engine_opt, engine_loader)
    # Assert: the same wrapper and clipped step as the engine's
    assert type(net) is type(engine_net)
    assert (net.batch_first, net.loss_reduction) == (True, "mean")
    assert (engine_net.batch_first, engine_net.loss_reduction) == (True, "mean")
    assert dp_opt.expected_batch_size == engine_opt.expected_batch_size == 3
    for mine, engines in zip(ours[0].parameters(), theirs[0].parameters(), strict=True):
        torch.testing.assert_close(mine, engines, rtol=0, atol=0)
    # ... and the reasons it is not used (see make_private): outside secure mode (which needs
    # torchcsprng and refuses a generator) the engine's noise is not secure-mode noise and its
    # Poisson batches do not come from the given generator
    generator = torch.Generator().manual_seed(3)
    model, optimizer, data_loader = objects()
    _, engine_opt, engine_loader = engine.make_private(
        module=model,
        optimizer=optimizer,
        data_loader=data_loader,
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        noise_generator=generator,
    )
    assert engine_opt.generator is generator and not engine_opt.secure_mode
    assert engine_loader.batch_sampler.generator is None
