"""Test sampler plugins for sdekit's registry, one per submodule so that a broken one cannot affect the others."""
