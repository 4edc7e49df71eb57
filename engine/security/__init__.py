"""Cryptographic primitives the rest of the engine relies on: sealing blobs and the key ring, TLS.

``crypto`` seals and opens payloads (AES-256-GCM per blob, data keys wrapped by key-encryption
keys from the key file, named HMAC secrets for pseudonyms and blind indexes); ``tls`` builds
the server and client contexts (BCP 195), upgrades accepted connections and reports refused
handshakes. Nothing here knows about the database: re-wrapping stored data keys on rotation is
a store operation (``engine.store.key_rotation``). Imports nothing else of the engine.
"""
