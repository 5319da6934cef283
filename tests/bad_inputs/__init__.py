"""A corpus of malformed datasets and the tests that every one is rejected."""
