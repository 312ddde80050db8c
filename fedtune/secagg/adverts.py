"""Signed key adverts: each client signs its round keys with the Ed25519 key it enrolled."""

from __future__ import annotations

from cryptography.exceptions import InvalidSignature

from fedtune.crypto.keys import ed25519_public
from fedtune.errors import InvalidInput
from fedtune.secagg.protocol import KeyAdvert

# The update codec name of a masked input on the Upload stream.
WIRE_CODEC = "secagg"


def verify_advert(advert_bytes: bytes, signature: bytes, sign_public_key: bytes) -> KeyAdvert:
    """Parses an advert and checks its Ed25519 signature.

    Raises:
        InvalidInput: malformed, or the signature does not verify against ``sign_public_key``.
    """
    advert = KeyAdvert.from_bytes(advert_bytes)
    try:
        ed25519_public(sign_public_key).verify(signature, advert.signed_bytes())
    except InvalidSignature as e:
        raise InvalidInput(f"key advert of participant {advert.client_index} has a bad signature") from e
    return advert
