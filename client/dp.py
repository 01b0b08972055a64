"""DP-SGD of a site: stage noise, the Opacus wrapping and the RDP accounting of spending.

* :func:`steps_for` counts the Poisson sample rate and optimiser steps exactly as Opacus does.
* :func:`stage_noise_multiplier` picks the noise ONCE per stage, so that all the stage's
  rounds together reach the stage's target epsilon (RDP accountant).
* :func:`make_private` wraps a model, optimiser and data loader for DP-SGD (Opacus); it does
  no accounting.
* :func:`rdp_epsilon` is the epsilon of a history of DP-SGD blocks, with which the site's
  :class:`client.ledger.PrivacyLedger` accounts every request it served.

Typical use for one request::

    sample_rate, steps = steps_for(len(dataset), stage.batch_size, stage.local_epochs)
    noise = stage_noise_multiplier(target_epsilon=stage.privacy.target_epsilon,
                                   delta=stage.privacy.delta, sample_rate=sample_rate,
                                   total_steps=steps * stage.rounds)
    if not ledger.has(key):
        ledger.check_budget(policy, noise_multiplier=noise, sample_rate=sample_rate,
                            steps=steps)
    ... train with make_private(...) ...
    ledger.record(key, noise_multiplier=noise, sample_rate=sample_rate, steps=steps, ...)
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from client.errors import TrainingError

if TYPE_CHECKING:
    import torch
    from opacus.grad_sample import GradSampleModule
    from opacus.optimizers import DPOptimizer
    from torch import nn
    from torch.utils.data import DataLoader

# Opacus (with torch and scipy) takes seconds to import: it is imported where it is used, so
# the ledger (reading, recording) works without it and the site daemon starts fast.


def steps_for(num_examples: int, batch_size: int, epochs: int) -> tuple[float, int]:
    """Poisson sample rate and optimiser steps of local DP-SGD, exactly as Opacus counts them.

    Opacus' ``DPDataLoader`` samples each example with probability ``1 / len(loader)`` (the
    length of the original loader, ``ceil(num_examples / batch_size)`` batches with
    ``drop_last=False``) and yields ``int(1 / sample_rate)`` batches per epoch, empty ones
    included. Every batch is one accounted step.

    Parameters
    ----------
    num_examples
        Training examples at the site.
    batch_size
        Batch size of the original data loader (``drop_last=False``).
    epochs
        Local epochs of one round.

    Returns
    -------
    tuple[float, int]
        ``(sample_rate, steps)``; ``sample_rate = batch_size / num_examples`` when the batch
        size divides the examples.
    """
    if num_examples < 1 or batch_size < 1 or epochs < 1:
        raise ValueError(
            f"num_examples ({num_examples}), batch_size ({batch_size}) and epochs ({epochs}) "
            "must all be >= 1"
        )
    sample_rate = 1 / math.ceil(num_examples / batch_size)
    return sample_rate, epochs * int(1 / sample_rate)


def stage_noise_multiplier(
    *, target_epsilon: float, delta: float, sample_rate: float, total_steps: int
) -> float:
    """Noise multiplier with which ALL the stage's steps reach ``target_epsilon`` at ``delta``.

    Parameters
    ----------
    target_epsilon, delta
        The stage's privacy budget (``stage.privacy``).
    sample_rate
        Poisson sample rate of one step (see :func:`steps_for`).
    total_steps
        Steps of the whole stage: steps per round times the stage's rounds.

    Returns
    -------
    float
        The smallest noise found (RDP accountant, tolerance 0.01 in epsilon) whose epsilon
        after ``total_steps`` is at most ``target_epsilon``.

    Raises
    ------
    ValueError
        For arguments out of range, or a budget too small for any noise.
    """
    if not target_epsilon > 0 or not 0 < delta < 1:
        raise ValueError(
            f"need target_epsilon > 0 and 0 < delta < 1, got {target_epsilon}, {delta}"
        )
    if not 0 < sample_rate <= 1 or total_steps < 1:
        raise ValueError(
            f"need 0 < sample_rate <= 1 and total_steps >= 1, got {sample_rate}, {total_steps}"
        )
    try:
        noise = _noise_search(float(target_epsilon), float(delta), float(sample_rate), total_steps)
    except ValueError as e:
        raise ValueError(
            f"no noise reaches target_epsilon = {target_epsilon} at delta = {delta} over "
            f"{total_steps} steps at sample rate {sample_rate:g}; raise privacy.target_epsilon "
            "or lower the stage's rounds/epochs"
        ) from e
    return float(noise)


@functools.lru_cache(maxsize=256)
def _noise_search(target_epsilon: float, delta: float, sample_rate: float, steps: int) -> float:
    """Opacus' noise search (seconds of RDP computation), memoised: it is a pure function."""
    from opacus.accountants.utils import get_noise_multiplier

    return float(
        get_noise_multiplier(
            target_epsilon=target_epsilon,
            target_delta=delta,
            sample_rate=sample_rate,
            steps=steps,
            accountant="rdp",
            epsilon_tolerance=0.01,
        )
    )


def rdp_epsilon(history: Sequence[tuple[float, float, int]], delta: float) -> float:
    """Epsilon at ``delta`` of DP-SGD blocks composed by ONE Opacus RDP accountant.

    RDP composes additively, so this equals one ``opacus.accountants.RDPAccountant`` stepped
    through every step of every block.

    Parameters
    ----------
    history
        ``(noise_multiplier, sample_rate, steps)`` blocks, in any order.
    delta
        The delta at which to convert RDP to (epsilon, delta)-DP.

    Returns
    -------
    float
        0 for an empty history.

    Raises
    ------
    ValueError
        If ``delta`` is not in (0, 1).
    """
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    if not history:
        return 0.0
    return _rdp_epsilon(tuple((float(n), float(q), int(s)) for n, q, s in history), delta)


@functools.lru_cache(maxsize=256)
def _rdp_epsilon(history: tuple[tuple[float, float, int], ...], delta: float) -> float:
    """One RDP accountant over ``history`` (memoised: a pure, slow function)."""
    from opacus.accountants import RDPAccountant

    accountant = RDPAccountant()
    accountant.history = list(history)
    return float(accountant.get_epsilon(delta=delta))


def _check_private_inputs(
    module: nn.Module,
    optimizer: torch.optim.Optimizer,
    noise_multiplier: float,
    max_grad_norm: float,
) -> None:
    """The checks of ``PrivacyEngine.make_private`` (see :func:`make_private`), site errors."""
    if not noise_multiplier >= 0 or not max_grad_norm > 0:
        raise ValueError(
            f"need noise_multiplier >= 0 and max_grad_norm > 0, got {noise_multiplier}, "
            f"{max_grad_norm}"
        )
    from opacus.validators import ModuleValidator

    # The engine's checks, with the site's errors (TrainingError names the fix).
    if hasattr(module, "autograd_grad_sample_hooks"):
        raise ValueError(
            "the module is still wrapped by an earlier make_private; call "
            "private_module.to_standard_module() when its training ends"
        )
    model_params = {id(p) for p in module.parameters()}
    if any(id(p) not in model_params for g in optimizer.param_groups for p in g["params"]):
        raise ValueError("the optimiser has parameters that are not the module's parameters")
    unsupported = ModuleValidator.validate(module, strict=False)
    if unsupported:
        raise TrainingError(
            f"the model has {len(unsupported)} layer(s) DP-SGD cannot train, e.g. "
            f"{unsupported[0]}; use group/instance norm instead of batch norm"
        )


def _build_private(
    module: nn.Module,
    optimizer: torch.optim.Optimizer,
    data_loader: DataLoader[Any],
    noise_multiplier: float,
    max_grad_norm: float,
    poisson_sampling: bool,
    generator: torch.Generator | None,
) -> tuple[GradSampleModule, DPOptimizer, DataLoader[Any]]:
    """Build the wrapped module, DP optimiser and (Poisson) loader of :func:`make_private`.

    Why not ``opacus.PrivacyEngine.make_private`` (Opacus 1.6.0) itself: it cannot keep the
    caller's ``generator`` as the one random source of both the sampling and the noise.

    * Sampling: the engine builds its DPDataLoader with ``generator=self.secure_rng``, which
      is None outside secure mode, so the Poisson batches come from the loader's own
      generator or torch's global RNG, not from ``generator``.
    * Noise: the engine hands its own ``secure_mode`` to DPOptimizer. ``secure_mode=True``
      needs torchcsprng (last released in 2021 for torch 1.x) and refuses a
      ``noise_generator`` (so no seeded, reproducible tests either); ``secure_mode=False``
      takes ``noise_generator`` but draws ONE Gaussian per value, without Opacus' fix of
      the floating-point attack (arXiv 2112.05307), i.e. other, weaker noise. Passing
      ``secure_mode`` through the engine's ``**kwargs`` fails (TypeError: multiple values).

    It would also attach an accountant the site does not use and warn on every call.
    So the three objects are built here from the public classes the engine builds them
    from, with the engine's arguments; client/dp_test.py checks a step against the engine.
    """
    from opacus.data_loader import DPDataLoader
    from opacus.grad_sample import GradSampleModule
    from opacus.optimizers import DPOptimizer

    private_module = GradSampleModule(module, batch_first=True, loss_reduction="mean")
    sample_rate = 1 / len(data_loader)
    if poisson_sampling:
        private_module.forbid_grad_accumulation()
        data_loader = DPDataLoader.from_data_loader(data_loader, generator=generator)
        _empty_batches_keep_their_structure(data_loader)
    dataset_size = len(data_loader.dataset)  # type: ignore[arg-type]
    private_optimizer = DPOptimizer(
        optimizer,
        noise_multiplier=noise_multiplier,
        max_grad_norm=max_grad_norm,
        expected_batch_size=int(dataset_size * sample_rate),
        loss_reduction="mean",
        generator=_noise_generator(module, generator),
        # noise robust to the floating-point attack on Gaussian sampling (Opacus' fix of
        # arXiv 2112.05307: 4 draws per value); it needs no torchcsprng
        secure_mode=True,
    )
    return private_module, private_optimizer, data_loader


def make_private(
    module: nn.Module,
    optimizer: torch.optim.Optimizer,
    data_loader: DataLoader[Any],
    *,
    noise_multiplier: float,
    max_grad_norm: float,
    poisson_sampling: bool = True,
    generator: torch.Generator | None = None,
) -> tuple[GradSampleModule, DPOptimizer, DataLoader[Any]]:
    """Wrap a model, optimiser and data loader for DP-SGD, as ``PrivacyEngine.make_private``.

    No accountant is attached: the site accounts with its :class:`client.ledger.PrivacyLedger`.
    Train with the returned objects only. The wrapped module shares its parameters with
    ``module``; send back ``private_module._module.state_dict()`` (or ``module.state_dict()``),
    never the wrapper's state dict (its keys carry a ``_module.`` prefix). When training ends,
    call ``private_module.to_standard_module()`` to remove Opacus' hooks from ``module``; until
    then ``module`` cannot be made private again.

    Parameters
    ----------
    module
        The model (every layer must support per-sample gradients: no batch norm).
    optimizer
        Optimiser over (some of) ``module``'s parameters.
    data_loader
        Loader over the site's data (map-style dataset).
    noise_multiplier
        The stage's noise (:func:`stage_noise_multiplier`).
    max_grad_norm
        Per-sample gradient clipping norm.
    poisson_sampling
        Replace the batching by Poisson sampling with rate ``1 / len(data_loader)``, which
        the accounting assumes. ``False`` keeps the loader (the guarantee is then only
        approximate).
    generator
        Random source of the Poisson sampling and the noise. The site passes a secret one
        (:func:`client.trainer.secret_generator`, state from ``os.urandom``) so that nobody,
        the coordinator included, can reproduce the noise; tests may pass a seeded one. A CPU
        generator; when the module's parameters are on a GPU the noise is drawn from a
        generator on that device seeded with ``generator.initial_seed()`` (PyTorch cannot
        draw CUDA noise from a CPU generator).

    Returns
    -------
    tuple[GradSampleModule, DPOptimizer, DataLoader]
        The wrapped module, the DP optimiser and the (Poisson) data loader.

    Raises
    ------
    TrainingError
        If the module has layers Opacus cannot train privately.
    ValueError
        If the optimiser has parameters outside ``module``, the noise/norm are invalid, or
        ``module`` still carries the hooks of an earlier call.
    """
    _check_private_inputs(module, optimizer, noise_multiplier, max_grad_norm)
    return _build_private(
        module, optimizer, data_loader, noise_multiplier, max_grad_norm, poisson_sampling, generator
    )


def _empty_batches_keep_their_structure(data_loader: DataLoader[Any]) -> None:
    """Make an empty *first* Poisson batch a batch of zero-size tensors, like later ones.

    Opacus shapes an empty batch after the first non-empty one; when the very first batch is
    empty (probability ``(1 - q)^n``, real now that the sampling is secret) it falls back to
    per-field shapes that fail on dictionary samples. Priming the collate wrapper with the
    structure of one collated sample (only shapes and dtypes are used: the empty batch holds
    no values) gives the first empty batch the same form as every later one.
    """
    from torch.utils.data import default_collate

    collate = data_loader.collate_fn
    if getattr(collate, "first_batch", False) is None and len(data_loader.dataset) > 0:  # type: ignore[arg-type]
        collate.first_batch = default_collate([data_loader.dataset[0]])  # type: ignore[union-attr]


def _noise_generator(
    module: nn.Module, generator: torch.Generator | None
) -> torch.Generator | None:
    """``generator`` itself on the CPU; a generator on the parameters' device otherwise."""
    import torch

    device = next(module.parameters()).device
    if generator is None or device.type == generator.device.type:
        return generator
    return torch.Generator(device=device).manual_seed(generator.initial_seed())
