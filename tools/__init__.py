"""Tools around the emulator: demo, monitor, benchmarks."""
