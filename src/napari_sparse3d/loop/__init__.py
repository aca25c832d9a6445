"""The interactive loop without Qt: which slices are annotated (:mod:`.slices`),
corrections and where to annotate next (:mod:`.corrections`), and the long jobs
the docks run in a worker thread (:mod:`.jobs`).  Testable on plain arrays.
"""
