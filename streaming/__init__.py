"""The realtime shell and the command line."""
