"""Cryptography: update envelopes, client identities and request signing, signed manifests, certificates."""
