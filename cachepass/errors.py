"""The one exception family of cachepass.

Configuration mistakes raise ``ValueError`` (see :mod:`cachepass.config`); everything that goes
wrong while analysing or rewriting a model's graph raises a :class:`CachepassError` subclass whose
message names the module paths or graph nodes involved.
"""


class CachepassError(RuntimeError):
    """Base class of every error cachepass raises about a model or a graph."""


class BlockDiscoveryError(CachepassError):
    """The graph has no repeated block list that can be cached, or the config does not fit it."""


class UnsupportedGraphError(CachepassError):
    """A block list was found but its graph cannot be rewritten into a cached cond."""


class PassError(CachepassError):
    """A graph pass failed; the message names the pass and the passes that ran before it."""


class BlockScopeUnfitError(CachepassError):
    """The model's loop does not run a block list as one chain (``scope="blocks"``): a block skipped, fed something
    else or called out of order. The default scope then compiles the whole model instead."""
