"""Numeric kernels in torch: PCA, eigen-solver, streaming statistics, DFM scores."""
