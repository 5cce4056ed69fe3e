"""Identifier formats kept from v2.1 (CONTRACT.md §1.2): jobs/segments/snapshots `<p>_<secs>_<16hex>`,
keys/collections `<p>_<secs><24hex>`, request ids `req_<secs>_<16hex>`."""
import secrets
import time


def job_id(prefix: str) -> str:
    """seg_/chk_/cmp_/snap_/req_ ids: prefix, unix seconds, 8 random bytes as hex."""
    return f"{prefix}_{int(time.time())}_{secrets.token_hex(8)}"


def long_id(prefix: str) -> str:
    """vbk_/col_ ids: prefix, unix seconds and 12 random bytes with no separator."""
    return f"{prefix}_{int(time.time())}{secrets.token_hex(12)}"
