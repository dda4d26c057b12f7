"""A plugin module that raises while it is imported, as one with a bug at module level would."""

raise RuntimeError("sdekit-sampler-faults: this module fails at import on purpose")
