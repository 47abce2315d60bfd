"""Keyed pseudonyms of user ids (``privacy.pseudonymise_user_ids``).

A pseudonym is ``p-`` and the first 128 bits of HMAC-SHA256(key, UTF-8 id) in hex: stable
for a key (every worker, every restart), not reversible without the key, and one-to-one
in practice (a collision needs about 2^64 users). The worker keys profiles, item updates,
per-process state, logs and dead letters by it; lists go out under the id as sent.

An HMAC costs about a microsecond; the ids of active users are kept in a bounded cache
(which holds ids as sent: :meth:`Pseudonymiser.forget` drops one for ``forget``).
"""

from __future__ import annotations

import hmac

from stream_knn.config import PrivacyConfig, read_secret

__all__ = ["Pseudonymiser", "pseudonymiser_for"]

#: Ids whose pseudonym is kept, at most (about 200 bytes each).
DEFAULT_CACHE_SIZE = 100_000
_PREFIX = "p-"
_DIGEST_BYTES = 16


class Pseudonymiser:
    """Pseudonyms of user ids under one key.

    Examples
    --------
    >>> p = Pseudonymiser(b"a key of sixteen bytes or more")
    >>> p.pseudonym("u1")
    'p-0f5bfd03a7cd4533227c66392c67260d'
    >>> p.pseudonym("u1") == p.of_bytes(b"u1")
    True
    """

    def __init__(self, key: bytes, cache_size: int = DEFAULT_CACHE_SIZE) -> None:
        self._key = key
        self._cache: dict[str, str] = {}
        self._cache_size = cache_size

    def pseudonym(self, user_id: str) -> str:
        """The pseudonym of ``user_id``."""
        found = self._cache.get(user_id)
        if found is not None:
            return found
        made = self.of_bytes(user_id.encode())
        cache = self._cache
        if len(cache) >= self._cache_size:
            del cache[next(iter(cache))]  # the oldest entry: a dict keeps insertion order
        cache[user_id] = made
        return made

    def of_bytes(self, user_id: bytes) -> str:
        """The pseudonym of an id given as bytes (a record key), uncached."""
        return _PREFIX + hmac.digest(self._key, user_id, "sha256")[:_DIGEST_BYTES].hex()

    def forget(self, user_id: str) -> None:
        """Drop ``user_id`` from the cache (the process keeps no trace of it)."""
        self._cache.pop(user_id, None)

    def __contains__(self, user_id: str) -> bool:
        """Whether ``user_id``'s pseudonym is cached."""
        return user_id in self._cache


def pseudonymiser_for(privacy: PrivacyConfig) -> Pseudonymiser | None:
    """The pseudonymiser of ``[privacy]``, or None when ids are kept as sent."""
    if not privacy.pseudonymise_user_ids:
        return None
    key = read_secret("privacy.pseudonym_key", privacy.pseudonym_key, privacy.pseudonym_key_file)
    return Pseudonymiser(key.encode())
