"""Command-line entry points: each parses arguments and calls into shards/, pipeline/ or train/."""
