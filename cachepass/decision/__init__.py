"""The cache decision as graph code, emitted by `cachepass.passes.insert_cache_cond`: the clock (`clock`), one
unit's state views (`unit_state`), the decision (`decide`), the cross-rank agreement (`ranks`), TaylorSeer
(`taylorseer`), the cond branches (`branches`), built from exportable tensor ops (`ops`). No ``.item()``, no
host branch: every value is a graph node. `cachepass.reference` states the same semantics eagerly."""
