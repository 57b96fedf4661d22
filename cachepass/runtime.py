"""Import shim: ``cachepass.runtime`` is `cachepass.state.runtime` (``current_state(model).plan``, as the README named it)."""

from cachepass.state.runtime import RuntimeState, UnitStats, current_state, states_of  # noqa: F401
