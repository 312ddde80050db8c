"""Update codecs (and, with offsite tuning, emulator building)."""
