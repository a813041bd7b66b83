"""The sweep engine, below the benchmarks and quality alike: points, worker processes, resume and device locks."""
