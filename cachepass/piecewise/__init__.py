"""The piecewise executor: the one-graph form split at blocks and conds (`split`), each distinct piece
compiled once (`compile`), and a program that runs the pieces with an explicit per-call `Plan` (`execute`).
On CUDA the program may run as CUDA graphs captured per model state (`cudagraphs`), joined by IF/ELSE
nodes into one launch per call (`conditional_nodes`)."""
