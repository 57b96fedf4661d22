"""The bundled demo: the trained tiny video model and its text encoder (`model`), its procedural
training data (`shapes`) and training (`train`), the flow-matching sampler with separate CFG
(`sampling`) and the quality metrics the demo reports (`quality`)."""
