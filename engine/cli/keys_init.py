"""`medrelay keys init`: create the key file with every named secret the engine uses, up front.

The key file holds the key-encryption keys and named HMAC secrets: the blind indexes of
stored messages, DICOM and FHIR (``message-index``, ``dicom-index``, ``fhir-index``) and the
secrets of de-identification (``deid``) and UID regeneration in mappings (``mapping``). An
engine creates a secret the first time it needs one. With several engines on several hosts,
each with its own copy of the file, that is a trap: two hosts that each create
``message-index`` on their first message hold different secrets, and neither finds the
other's messages (nor the other's DICOM instances, nor its FHIR resources by identifier).
So a multi-host deployment runs ``keys init`` once, then copies or mounts that one file on
every host before any engine starts; nothing is created later.

Idempotent: existing keys and secrets are kept (the key ring's file lock and re-read make it
safe against an engine writing the file at the same time).
"""

from __future__ import annotations

from pathlib import Path

from engine.security.crypto import KeyRing
from engine.store import message_terms
from engine.store.dicom import terms as dicom_terms
from engine.store.fhir import resources as fhir_resources

# Every named secret medrelay's own code asks the key ring for. The last two belong to bundled
# transforms (transforms/deidentify.py "deid", transforms/hl7_map.py UID_KEY), which engine/
# may not import; tests/test_keys.py checks they still match.
SECRETS: tuple[str, ...] = (message_terms.HMAC_KEY_NAME, dicom_terms.HMAC_KEY_NAME, fhir_resources.HMAC_KEY_NAME,
                            "deid", "mapping")


def init_key_file(path: Path) -> tuple[bool, KeyRing, list[str]]:
    """Create ``path`` if absent and every secret of ``SECRETS`` it lacks.

    Returns (the file existed before, the key ring, the names of the secrets created now).
    """
    existed = path.exists()
    ring = KeyRing(path)
    before = set(ring.secret_names())
    for name in SECRETS:
        ring.hmac_key(name)  # created under the file lock when missing (re-read first)
    created = [n for n in SECRETS if n not in before]
    return existed, ring, created


__all__ = ["SECRETS", "init_key_file"]
