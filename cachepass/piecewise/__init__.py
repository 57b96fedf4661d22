"""The piecewise executor: the one-graph form split at blocks and conds (`split`), each distinct piece
compiled once (`compile`), a program that runs the pieces with an explicit per-call `Plan` (`execute`),
and the graph inputs whose addresses stay put (`static_inputs`). CUDA graphs (`cachepass.cudagraphs`)
and offload (`cachepass.offload`) attach to the program through `ProgramHooks` (`hooks`)."""
