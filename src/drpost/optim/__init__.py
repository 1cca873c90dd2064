"""Optimizers: ``MeSO`` (AdamW whose moments live in a k_out x k_in sketch of each weight matrix) and
``state_bytes`` (the memory an optimizer's state takes). Details in ``drpost.optim.meso``.

    from drpost.optim import MeSO
    opt = MeSO(model.parameters(), lr=1e-3, sketch=(64, 64))
"""

from drpost.optim.meso import MeSO, state_bytes

__all__ = ["MeSO", "state_bytes"]
