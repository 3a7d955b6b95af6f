"""FusionRun tests. Harness fixtures live in tests/harness/; test modules import the ones they use."""
