"""How good a segmentation is: Dice and IoU on a mask (:mod:`.metrics`), orthogonal
views with an overlay (:mod:`.render`).  numpy only."""
