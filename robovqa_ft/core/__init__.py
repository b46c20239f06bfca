"""What every stage stands on: atomic files, logs, disk space, the settings and their
bookkeeping table, the runs, provenance, GPU allocation. Imports nothing above it."""
