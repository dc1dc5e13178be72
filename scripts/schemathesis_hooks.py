"""Schemathesis hooks for scripts/schemathesis.

The window endpoints take `from`, `to` and `cursor` with constraints between
them that OpenAPI cannot state: `from` < `to` (the range is [from, to)), and
a cursor, being the start of the next page, lies in [from, to). Each value is
checked on its own by the schema; this hook moves generated values that break
only the constraint between them back inside it, so that a 400 for them is
not taken for a valid request refused. Values that are invalid on their own
are left alone for the negative tests.
"""

import time

import schemathesis

DAY_MS = 86_400_000
MAX_TS = 253_402_300_799_999
WINDOW_PATHS = (
    "/v1/devices/{device_id}/metrics/{metric}",
    "/v1/fleets/{fleet}/metrics/{metric}",
)


def _ms(value):
    """The value as ms since the epoch, if it is one the schema allows."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        n = value
    elif isinstance(value, str) and value.isascii() and value.isdigit():
        n = int(value)
    else:
        return None
    return n if 0 <= n <= MAX_TS else None


@schemathesis.hook
def before_call(ctx, case, **kwargs):
    if case.operation.path not in WINDOW_PATHS or not case.query:
        return
    q = case.query
    to = _ms(q["to"]) if "to" in q else int(time.time() * 1000)
    if to is None:
        return
    if "from" in q:
        frm = _ms(q["from"])
        if frm is None:
            return
        if frm >= to:
            frm, to = min(frm, to), max(frm, to)
            if frm == to:
                frm, to = (frm, frm + 1) if frm < MAX_TS else (frm - 1, frm)
            q["from"], q["to"] = frm, to
    else:
        frm = to - DAY_MS
    if "cursor" in q:
        c = _ms(q["cursor"])
        if c is not None and not frm <= c < to:
            # A cursor this API hands out always lies in the range.
            del q["cursor"]
