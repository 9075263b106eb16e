"""The mathematics of splitting: activations, splitting matrices, eigen-solvers (no mutation)."""

from splitgrow.splitting.eigen import SplitEigen, splitting_eigen

__all__ = ["SplitEigen", "splitting_eigen"]
