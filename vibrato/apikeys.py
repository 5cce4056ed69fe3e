"""API keys: token format, header parsing, pepper, hashing, role checks and a short-lived cache.

Token: ``vbk_<unix secs><24 hex>.<48 hex secret>`` (CONTRACT.md §1.4, Token). Only
``hex(SHA-256(pepper + ":" + secret))`` is stored (catalog table ``api_keys``, SQL in
``vibrato.catalog.keys``); the secret is shown once and never stored.

Pepper (CONTRACT.md D18): ``VIBRATO_API_PEPPER`` if set and non-empty, otherwise a random pepper created
once in ``<data_dir>/api_pepper`` (mode 0600) and shared by the CLI and the server. There is no
built-in default.

Verification order (CONTRACT.md D16): the secret is checked before revocation is reported, so a wrong
secret is always 401 and only the holder of the secret learns that the key is revoked (403).

Cache (CONTRACT.md D17): records and unknown ids are cached for at most ``ttl`` seconds (1 s), so a
revocation made by the CLI in another process takes effect in a running server within 1 s.
The cache itself never touches SQLite: on a miss the caller loads the record with `KeyStore.load`
(a catalog read, run off the event loop) and hands it to `KeyStore.check`.
"""
import hmac
import hashlib
import os
import re
import secrets
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from vibrato import datadir
from vibrato.catalog import keys as keys_sql
from vibrato.errors import NotFoundError, VibratoError
from vibrato.ids import long_id

ROLES = ("query", "ingest", "admin")
PEPPER_ENV = "VIBRATO_API_PEPPER"
PEPPER_FILE = "api_pepper"
BOOTSTRAP_KEY_NAME = "bootstrap-admin"
BOOTSTRAP_ROLES = "admin,query,ingest"

_KEY_ID_RE = re.compile(r"vbk_[0-9]{1,20}[0-9a-f]{24}\Z")
_SECRET_RE = re.compile(r"[0-9a-f]{48}\Z")


# ---------------------------------------------------------------------------- errors
class AuthError(VibratoError):
    """An authentication/authorization outcome other than success (CONTRACT.md §1.4, Outcomes)."""
    outcome = "internal"


class MissingAuthError(AuthError):
    code, status, outcome = "missing_authorization", 401, "missing"

    def __init__(self):
        super().__init__("missing bearer token")


class InvalidAuthError(AuthError):
    code, status, outcome = "invalid_authorization", 401, "invalid"

    def __init__(self):
        super().__init__("invalid api key")


class DuplicateAuthError(AuthError):
    code, status, outcome = "bad_request", 400, "invalid"

    def __init__(self):
        super().__init__("more than one Authorization header")


class ForbiddenError(AuthError):
    code, status, outcome = "forbidden", 403, "forbidden"

    def __init__(self):
        super().__init__("insufficient role")


class AuthBackendError(AuthError):
    code, status, outcome = "auth_internal", 500, "internal"

    def __init__(self):
        super().__init__("auth backend failure")


# ---------------------------------------------------------------------------- tokens and roles
def generate_token() -> tuple[str, str]:
    """A new (key_id, token); the token is ``<key_id>.<secret>`` with a 24-byte CSPRNG secret."""
    key_id = long_id("vbk")
    return key_id, f"{key_id}.{secrets.token_hex(24)}"


def parse_roles(text: str) -> tuple[str, ...]:
    """Comma-separated roles, trimmed and case-insensitive; unknown names dropped, order kept, no duplicates."""
    out = []
    for part in str(text).split(","):
        role = part.strip().lower()
        if role in ROLES and role not in out:
            out.append(role)
    return tuple(out)


def single_authorization(values) -> str | None:
    """The one ``Authorization`` header value of a request (None when absent).

    Several headers are ambiguous (one hop may read the first, the next the last): DuplicateAuthError (400).
    """
    if not values:
        return None
    if len(values) > 1:
        raise DuplicateAuthError()
    return values[0]


def parse_authorization(value: str | None) -> tuple[str, str]:
    """Split an ``Authorization`` header into (key_id, secret) exactly as CONTRACT.md §1.4 (Header parsing).

    Raises MissingAuthError (absent or not visible ASCII) or InvalidAuthError (bad shape). On top of
    v2.1's checks the id and secret must have the issued formats, so a malformed token is
    rejected without a catalog lookup.
    """
    if value is None or not value or not _visible_ascii(value):
        raise MissingAuthError()
    parts = value.split()
    if len(parts) != 2 or parts[0].lower() != "bearer":
        raise InvalidAuthError()
    key_id, dot, secret = parts[1].partition(".")
    if not dot or not key_id.startswith("vbk_") or not secret:
        raise InvalidAuthError()
    if not _KEY_ID_RE.match(key_id) or not _SECRET_RE.match(secret):
        raise InvalidAuthError()
    return key_id, secret


def _visible_ascii(value: str) -> bool:
    # The HTTP layer hands us a str; reject anything outside tab + printable ASCII (space..~).
    if value.isascii() and value.isprintable():
        return True
    return all(c == "\t" or " " <= c <= "~" for c in value)


def hash_secret(pepper: str, secret: str) -> str:
    """hex(SHA-256(pepper ":" secret)), 64 lowercase hex chars."""
    return hashlib.sha256(f"{pepper}:{secret}".encode()).hexdigest()


# ---------------------------------------------------------------------------- pepper
def load_pepper(data_dir) -> str:
    """The pepper from the environment, or the data dir's pepper file (created once, mode 0600).

    The file is never followed through a symlink and must be owned by the effective user and not
    writable by group/others (whoever can replace it can mint valid keys)."""
    env = os.environ.get(PEPPER_ENV)
    if env:
        return env
    data_dir = datadir.prepare(data_dir)
    path = data_dir / PEPPER_FILE
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, datadir.FILE_MODE)
    except FileExistsError:
        return _read_pepper(path)
    try:
        os.write(fd, (secrets.token_hex(32) + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    datadir.fsync_dir(data_dir)
    return _read_pepper(path)


def _read_pepper(path: Path) -> str:
    # A racing creator may not have written yet: wait briefly for the content.
    for _ in range(50):
        fd = datadir.open_private(path, os.O_RDONLY, "pepper file")
        try:
            text = os.read(fd, 4096).decode(errors="replace").strip()
        finally:
            os.close(fd)
        if text:
            return text
        time.sleep(0.01)
    raise VibratoError(f"pepper file {path} is empty; delete it or set {PEPPER_ENV}", code="pepper_invalid")


# ---------------------------------------------------------------------------- key management
def create_key(catalog, pepper: str, name: str, roles: str) -> tuple[str, str]:
    """Create a key; returns (key_id, token). Raises ValueError when no valid role is given."""
    parsed = parse_roles(roles)
    if not parsed:
        raise ValueError(f"No valid roles parsed from '{roles}'. Use comma-separated query,ingest,admin")
    key_id, token = generate_token()
    catalog.write(keys_sql.create, key_id, name, hash_secret(pepper, token.split(".", 1)[1]), ",".join(parsed))
    return key_id, token


def revoke_key(catalog, key_id: str) -> bool:
    """Revoke now; an unknown or already revoked id is not an error (returns False)."""
    return catalog.write(keys_sql.revoke, key_id)


def list_keys(catalog) -> list[dict]:
    """Every key without its hash: id, name, roles, created_at, revoked_at."""
    return [{k: row[k] for k in ("id", "name", "roles", "created_at", "revoked_at")}
            for row in catalog.read(keys_sql.list_all)]


def bootstrap_admin_key(catalog, pepper: str) -> str | None:
    """Create `bootstrap-admin` (admin,query,ingest) if no non-revoked key exists; returns its token or None.

    The count and the insert run in one write transaction, so two racing starts cannot both create one.
    """
    key_id, token = generate_token()
    key_hash = hash_secret(pepper, token.split(".", 1)[1])

    def create_if_none(conn):
        if keys_sql.count_active(conn) > 0:
            return False
        keys_sql.create(conn, key_id, BOOTSTRAP_KEY_NAME, key_hash, BOOTSTRAP_ROLES)
        return True

    return token if catalog.write(create_if_none) else None


# ---------------------------------------------------------------------------- verification
@dataclass(frozen=True)
class KeyRecord:
    id: str
    key_hash: str
    roles: frozenset
    revoked: bool


_MISS = object()


class KeyStore:
    """Verifies tokens against catalog records with a cache of at most `ttl` seconds per entry.

    Thread-safe. `lookup` and `check` never block on I/O; `load` does one catalog read.
    """

    def __init__(self, catalog, pepper: str, *, ttl: float = 1.0, max_entries: int = 4096):
        self.catalog = catalog
        self._pepper = pepper
        self.ttl = float(ttl)
        self.max_entries = max_entries
        self._cache = {}  # key_id -> (expires_monotonic, KeyRecord | None)
        self._lock = threading.Lock()

    MISS = _MISS

    def lookup(self, key_id: str):
        """The cached record, None for a cached unknown id, or KeyStore.MISS."""
        entry = self._cache.get(key_id)
        if entry is None or entry[0] <= time.monotonic():
            return _MISS
        return entry[1]

    def load(self, key_id: str) -> KeyRecord | None:
        """Read the key from the catalog (blocking) and cache the outcome, unknown ids included."""
        try:
            row = self.catalog.read(keys_sql.get, key_id)
            record = KeyRecord(row["id"], row["key_hash"], frozenset(parse_roles(row["roles"])),
                               row["revoked_at"] is not None)
        except NotFoundError:
            record = None
        except Exception as exc:  # catalog failure or read timeout
            raise AuthBackendError() from exc
        with self._lock:
            if len(self._cache) >= self.max_entries:
                now = time.monotonic()
                self._cache = {k: v for k, v in self._cache.items() if v[0] > now}
                if len(self._cache) >= self.max_entries:
                    self._cache.clear()
            self._cache[key_id] = (time.monotonic() + self.ttl, record)
        return record

    def check(self, record: KeyRecord | None, secret: str, role: str | None) -> KeyRecord:
        """Secret first (401), then revocation and role (403). `role` None means any valid key."""
        if record is None:
            raise InvalidAuthError()
        if not hmac.compare_digest(hash_secret(self._pepper, secret).encode(), record.key_hash.encode()):
            raise InvalidAuthError()
        return self.check_access(record, role)

    @staticmethod
    def check_access(record: KeyRecord, role: str | None) -> KeyRecord:
        """Revocation and role (403) of a record whose secret was checked."""
        if record.revoked:
            raise ForbiddenError()
        if role is not None and "admin" not in record.roles and role not in record.roles:
            raise ForbiddenError()
        return record

    def authenticate(self, header: str | None, role: str | None) -> KeyRecord:
        """Blocking convenience: parse, look up (loading on a miss) and check."""
        key_id, secret = parse_authorization(header)
        record = self.lookup(key_id)
        if record is _MISS:
            record = self.load(key_id)
        return self.check(record, secret, role)

    def invalidate(self, key_id: str | None = None) -> None:
        with self._lock:
            if key_id is None:
                self._cache.clear()
            else:
                self._cache.pop(key_id, None)
