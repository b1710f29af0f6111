"""Every pool operation, written once as a flow (a generator yielding the store work in
:mod:`keypool.ops`), one module per subject: :mod:`.register`, :mod:`.acquire`,
:mod:`.report`, :mod:`.admin`, :mod:`.read`, :mod:`.limits` and :mod:`.call`.
:class:`.base.FlowBase` holds what they share (settings, local state, key names, error
translation)."""
