"""The torch engine: arrays in, arrays out.

Volumes and annotations (:mod:`.volume`), the network (:mod:`.model`) and what
travels with a trained one (:mod:`.trained`), normalisation and patch planning
(:mod:`.preprocess`), sampling and augmentation, the losses, training
(:mod:`.training`, :mod:`.checkpointing`) and sliding-window prediction
(:mod:`.prediction`).  The engine imports nothing of ``io``, ``loop``,
``evaluation`` or ``_napari``; torch is imported here and nowhere else.
"""
