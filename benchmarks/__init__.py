"""fedstream's benchmarks: round speed and server memory, each divided by a limit measured
in the same run (see benchmarks/README.md). Not part of the installed product."""
