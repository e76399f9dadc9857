"""The one error type rwasym raises for bad user input.

Messages state the rule, the values received and the fix (equinox style).
`assert` is kept for internal invariants only.
"""


class RwasymError(ValueError):
    """Bad input to an rwasym function: the message names the problem and the fix."""
