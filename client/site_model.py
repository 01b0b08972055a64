"""The model a site serves a request with: assembled from components, reused when it can be.

A request names each component of its model by digest and carries some of them in full;
:class:`ModelStore` checks the ones received against their digests, takes the others from
the site's component cache (a :class:`CacheMiss` asks the coordinator to resend those it
lacks) and loads them into a model grown through the request's stage, reusing the model of
the previous request when that is safe.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping

from torch import Tensor

from client.component_cache import ComponentCache
from client.errors import RequestRefused, SiteError
from unicon_model.checkpoint import tensor_digest
from unicon_model.components import key_prefix, load_state
from unicon_model.model import UniconModel
from unicon_model.protocol import StageRequest

SpareModel = tuple[tuple[str, int], UniconModel]
"""A kept model and the key (plan JSON, stage index) of the request it served."""


class CacheMiss(RequestRefused):
    """The request referenced components by digest that the site does not hold.

    The coordinator answers by resending those components in full.
    """

    def __init__(self, components: list[str]) -> None:
        self.components = components
        super().__init__(f"cache miss: resend component(s) {components}")


class ModelStore:
    """Assembles the model of each request; keeps the last one served to reload it.

    Parameters
    ----------
    cache
        The site's component cache.
    """

    def __init__(self, cache: ComponentCache) -> None:
        self.cache = cache
        self.spare: SpareModel | None = None
        """The model of the last request served, kept to be reloaded (:meth:`model_for`)."""
        self._spare_lock = threading.Lock()

    def assemble(
        self,
        request: StageRequest,
        arrays: Mapping[str, Tensor],
        received_components: list[dict[str, Tensor]] | None = None,
    ) -> UniconModel:
        """Grow the model through the request's stage and load the needed components.

        Components that arrived in full (digest verified) are appended to
        ``received_components`` and *not* cached here: the caller caches them with
        :meth:`cache_received` only once the request is served, so a refused request stores
        nothing.

        Raises
        ------
        SiteError
            A component arrived with another digest than the request announced.
        CacheMiss
            Components referenced by digest are not in the cache.
        """
        state: dict[str, Tensor] = {}
        missing = []
        for component, digest in sorted(request.digests.items()):
            prefix = key_prefix(component)
            received = {k: v for k, v in arrays.items() if k.startswith(prefix)}
            if received:
                actual = tensor_digest(received)
                if actual != digest:
                    raise SiteError(
                        f"component {component} arrived with digest {actual[:12]}… but the "
                        f"request announced {digest[:12]}…; refusing a corrupted transfer"
                    )
                if received_components is not None:
                    received_components.append(received)
            else:
                cached = self.cache.get(digest)
                if cached is None:
                    missing.append(component)
                    continue
                received = cached
            state.update(received)
        if missing:
            raise CacheMiss(missing)
        model = self.model_for(request, state)
        load_state(model, state)
        return model

    def model_for(self, request: StageRequest, state: Mapping[str, Tensor]) -> UniconModel:
        """A model grown through the request's stage, to load ``state`` into.

        The model of the previous request is reused (not built again, which costs more than
        loading its weights) when it was grown from the same plan through the same stage and
        ``state`` covers every one of its tensors, so nothing of its previous weights
        survives; it is put back in training mode with every parameter trainable and no
        gradient, on the CPU, as a freshly built one. It is taken out of the spare slot
        until :meth:`keep` returns it, so a request that fails never leaves one.
        """
        key = (request.plan.model_dump_json(), request.stage_index)
        with self._spare_lock:  # two requests served at once never share a model
            spare, self.spare = self.spare, None
        if spare is not None and spare[0] == key and set(spare[1].state_dict()) == set(state):
            model = spare[1].cpu().train()
            for parameter in model.parameters():
                parameter.requires_grad_(True)
                parameter.grad = None
            return model
        return UniconModel.from_plan(request.plan, through_stage=request.stage_index)

    def keep(self, request: StageRequest, model: UniconModel) -> None:
        """Keep ``model`` (just served ``request``) for the next request to reload."""
        self.spare = ((request.plan.model_dump_json(), request.stage_index), model)

    def cache_received(self, received_components: list[dict[str, Tensor]]) -> None:
        """Cache the components of a served request (evicting least recently used ones)."""
        for component in received_components:
            self.cache.put(component)
