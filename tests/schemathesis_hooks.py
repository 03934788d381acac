"""Schemathesis hooks for tests/schemathesis.sh (loaded through SCHEMATHESIS_HOOKS).

They steer generated data towards the interesting paths without changing
what the schema allows; every swap below replaces a schema-valid value with
another schema-valid value, and values generated to violate the schema
(negative testing) reach the API as they are. Swaps are chosen by a hash of
the generated value, so a failing case shrinks and replays the same way.

- Path `code`: generated codes almost never name a link, so every `{code}`
  operation would only ever see 404. Two thirds of them are swapped for codes
  of links that exist (ST_KNOWN_CODES, comma-separated, seeded by the
  script); the rest stay random and exercise the 404 path.
- Bodies of POST /shorten and PATCH /links/{code}: the schema says `url` is a
  string and `expires_at` a date-time, but the API also wants an http(s) URL
  with a host and an expiry in the future, so nearly every generated body is
  a 400 and the 201/200 answers would go untested. Two thirds of such values
  are swapped for a real URL or a future instant.
- Query `from` and `to` of GET /analytics/{code}: generated dates and
  date-times mostly fall outside 1970 to 2100 (400). Two thirds of the
  well-formed ones get their year folded into 1970..2099, keeping the rest of
  the value, so ranged reports (rollups and raw events) are exercised too.
"""

import datetime
import os
import re
import zlib

import schemathesis

KNOWN = [c for c in os.environ.get("ST_KNOWN_CODES", "").split(",") if c]
VALID_CODE = re.compile(r"[A-Za-z0-9_-]{1,64}")
# RFC 3339 date-time, as the `date-time` format means it.
DATE_TIME = re.compile(
    r"\d{4}-\d{2}-\d{2}[Tt]\d{2}:\d{2}:\d{2}(\.\d+)?([Zz]|[+-]\d{2}:\d{2})"
)


def _real_date_time(value):
    """A well-formed RFC 3339 date-time that names a real instant. A value
    generated to violate `format: date-time` (minute 99, 30 February) must not
    be swapped for a valid one, or the API would rightly accept it."""
    if not DATE_TIME.fullmatch(value):
        return False
    try:
        datetime.datetime.fromisoformat(value.upper().replace("Z", "+00:00"))
        return True
    except ValueError:
        return False


def _hash(value):
    return zlib.crc32(repr(value).encode("utf-8", "surrogatepass"))


@schemathesis.hook
def map_path_parameters(context, path_parameters):
    code = (path_parameters or {}).get("code")
    if KNOWN and isinstance(code, str) and VALID_CODE.fullmatch(code):
        h = _hash(code)
        if h % 3:
            path_parameters = {**path_parameters, "code": KNOWN[h % len(KNOWN)]}
    return path_parameters


@schemathesis.hook
def map_body(context, body):
    operation = getattr(context, "operation", None)
    path = getattr(operation, "path", "")
    if path not in ("/shorten", "/links/{code}") or not isinstance(body, dict):
        return body
    h = _hash(body)
    if not h % 3:
        return body
    body = dict(body)
    url = body.get("url")
    if isinstance(url, str) and len(url.encode()) <= 8192:
        body["url"] = f"https://example.com/schemathesis/{h:08x}"
    expires = body.get("expires_at")
    if isinstance(expires, str) and _real_date_time(expires):
        body["expires_at"] = "2099-01-01T00:00:00Z"
    return body


YEAR = re.compile(r"\d{4}(?=-\d{2}-\d{2}([Tt]|$))")


@schemathesis.hook
def map_query(context, query):
    operation = getattr(context, "operation", None)
    if getattr(operation, "path", "") != "/analytics/{code}" or not isinstance(query, dict):
        return query
    query = dict(query)
    for name in ("from", "to"):
        value = query.get(name)
        if not isinstance(value, str) or not _hash(value) % 3:
            continue
        match = YEAR.match(value)
        if not match or not (len(value) == 10 or _real_date_time(value)):
            continue
        folded = f"{1970 + int(match.group(0)) % 130:04d}{value[4:]}"
        # Only a real calendar date before and after: a value generated to be
        # invalid stays invalid, a valid one stays valid (29 February).
        if _real_date(value) and _real_date(folded):
            query[name] = folded
    return query


def _real_date(value):
    try:
        datetime.date.fromisoformat(value[:10])
        return True
    except ValueError:
        return False
