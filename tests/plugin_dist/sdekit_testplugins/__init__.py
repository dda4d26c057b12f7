"""sdekit test plugins. Each plugin lives in a submodule so that a broken one cannot affect the others."""
