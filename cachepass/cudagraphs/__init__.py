"""CUDA graphs over the piecewise program (`graphed`): one graph per stretch between cache decisions,
or those graphs joined by CUDA-graph IF/ELSE nodes into one launch (`conditional_nodes`)."""
