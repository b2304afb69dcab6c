"""The pieces of `bench/run`: throw-away servers, consumers, workloads, report.

Standard library only; the servers and reference consumers are real
programs run as child processes (see `bench/run --help`).
"""
