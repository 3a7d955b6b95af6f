"""FusionRun tests. Harness fixtures live in tests/harness/ and are imported by the test modules that use them."""
