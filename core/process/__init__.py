"""The process: launch, serving under Hypercorn, forked workers, signals and shutdown."""
