"""Continual-learning regularisers: EWC, LwF and a proximal (FedProx / L2) anchor.

Each regulariser adds a penalty to a site's training loss so that what the model already
learned is not forgotten while a stage retrains shared components. None of them imports
Flower; :mod:`client.regularisation` builds them from a stage spec.
"""

from unicon_model.regularisers.base import Regulariser
from unicon_model.regularisers.ewc import EWC
from unicon_model.regularisers.lwf import LwF
from unicon_model.regularisers.proximal import ProximalAnchor

__all__ = ["EWC", "LwF", "ProximalAnchor", "Regulariser"]
