"""Command line, configs and run bookkeeping for `resurgence`."""
