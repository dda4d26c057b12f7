"""A plugin module whose import fails, as it would with a missing dependency."""

import sdekit_testplugins_missing_dependency  # noqa: F401

from .sdes import ConstantVESDE  # noqa: F401
