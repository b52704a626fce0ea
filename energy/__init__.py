"""Energy at the edge: demand windows, live demand and the demand alarm, computed from meters' energy
counters between the scheduler and the buffer writer (docs/energy.md)."""
