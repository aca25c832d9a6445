"""Everything on disk: arrays (:mod:`.arrays`), durable writes (:mod:`.files`),
checkpoint files (:mod:`.checkpoint`), prediction outputs (:mod:`.outputs`) and
projects (:mod:`.project` on top of :mod:`.store` and :mod:`.manifest`).

``io`` may use the engine's types; it imports no torch itself, nor ``loop`` or ``_napari``.
"""
