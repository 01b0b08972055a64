"""A modality adapter added by a stage (input stem, residual adapters, LoRA deltas)."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

from unicon_model.schema.base import Name, _Frozen


class ModalitySpec(_Frozen):
    """A modality adapter: an input stem and residual adapters inside the encoder.

    Attributes
    ----------
    name
        Modality name (``ct``, ``pet``).
    inputs
        Image keys of the site manifest stacked as input channels, e.g. ``["ct", "pet"]`` for
        a PET adapter that also sees the CT (PEMMA). Defaults to ``[name]``.
    init_from
        An existing modality whose stem (for shared inputs) and adapters initialise this
        one, with zeros for new inputs, so the new path starts exactly equal to the old one.
    lora_rank
        Rank of the low-rank deltas (LoRA, ``ΔW = B·A`` with ``B = 0`` at first) this modality
        adds to the shared encoder's convolutions; they apply only on its routes and belong
        to ``modality/<name>``. ``0`` (default): none. At most ``min(in, out)`` channels of
        every adapted level.
    lora_levels
        Encoder levels (``0`` = finest) that get deltas; empty: all levels.
    decoder_lora
        ``{task: rank}``: low-rank deltas this modality adds to the decoder convolutions of
        an existing segmentation task (each clamped to the convolution's ``min(in, out)``),
        applied only on the route ``task@<name>``. A new input such as PET changes what the
        encoder's features mean; these let the route's decoder read them, while the task's
        own decoder and every other route stay exactly as they were. The task must be added
        by an earlier stage.
    """

    name: Name
    inputs: tuple[Name, ...] = ()
    init_from: Name | None = None
    lora_rank: int = Field(default=0, ge=0, le=256)
    lora_levels: tuple[int, ...] = Field(default=(), max_length=8)
    decoder_lora: dict[Name, Annotated[int, Field(ge=1, le=256)]] = Field(
        default_factory=dict, max_length=64
    )

    @property
    def input_keys(self) -> tuple[str, ...]:
        """Image keys stacked as channels (``inputs`` or ``(name,)``)."""
        return self.inputs or (self.name,)
