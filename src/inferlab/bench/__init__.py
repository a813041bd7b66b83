"""The measurement core of every benchmark: statistics, timing, memory, bandwidth, sweeps."""
