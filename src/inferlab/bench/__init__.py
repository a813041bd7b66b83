"""The measurement core shared by every benchmark: statistics, request timing, memory and bandwidth, sweeps."""
