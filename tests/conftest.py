"""Settings for the whole suite."""

from hypothesis import settings

# Hypothesis's per-example deadline is a timed assertion: on a busy 2-core machine it
# fails tests whose code is fine. Speed is measured by `mesh bench`, not here.
settings.register_profile("mesh", deadline=None)
settings.load_profile("mesh")
