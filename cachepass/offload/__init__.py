"""Layerwise offload planned from the cache schedule: residency, the slot scheduler and the plan of
one generation (`plan`, pure Python), and pinned host memory, the copy stream and the program hooks
that drive the scheduler at run time (`runtime`)."""
